"""BIDS and fMRIPrep derivatives as input (giblet.bids, giblet.features.confounds, `init`).

Datasets are written here by giblet.synth_bids (fMRIPrep-shaped: raw BIDS + derivatives with
masks and confounds tables whose first rows hold 'n/a') and, for discovery, by nilearn's own
fake-BIDS generator. One dataset and one store (scrubbing confounds, fMRIPrep masks) are
built per module and copied where a test changes them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

import giblet
from giblet.bids import discover, parse_name, run_name
from giblet.config import BidsConfig, load_config
from giblet.errors import ConfigError, InputError
from giblet.synth_bids import SPACE, write_bids_dataset
from tests.test_cli import _one_line_error, cli

RUNS = ["task-movie_run-1", "task-movie_run-2"]
MOVIE_S, TR = 75.0, 1.5  # the movies cover 50 whole TRs; scans have 60 (trimmed) or 48 (sub-02, run 2)
N_TRS = {None: 60, ("02", "sub-02_task-movie_run-2"): 48}
SERVED = {("sub-01", RUNS[0]): 50, ("sub-01", RUNS[1]): 50, ("sub-02", RUNS[0]): 50, ("sub-02", RUNS[1]): 48,
          ("sub-03", RUNS[0]): 50}  # sub-03 has no run 2
CONFIG = {"output": "study.zarr", "bids": {"root": "ds", "derivatives": "ds/derivatives/fmriprep"},
          "split": {"val_fraction": 0.25},
          "fmri": {"mask_strategy": "fmriprep", "confounds": {"strategy": "scrubbing"}, "detrend": True,
                   "high_pass": 0.01},
          "video": {"width": 32, "height": 18}}


def _deriv(ds: Path, subject: str, run: str, tail: str) -> Path:
    return ds / "derivatives" / "fmriprep" / f"sub-{subject}" / "func" / f"sub-{subject}_{run}_{tail}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 subjects x 2 runs; sub-03 lacks run 2; sub-02's run-1 mask misses a slab of voxels."""
    ds = write_bids_dataset(tmp_path_factory.mktemp("bids") / "ds", n_subjects=3, tasks={"movie": 2}, n_trs=N_TRS,
                            movie_s=MOVIE_S, tr_s=TR, non_steady=2, spikes=(9,))
    for path in list(ds.rglob("sub-03_task-movie_run-2_*")):
        path.unlink()
    mask_path = _deriv(ds, "02", RUNS[0], f"space-{SPACE}_desc-brain_mask.nii.gz")
    img = nib.load(mask_path)
    data = np.asanyarray(img.dataobj).copy()
    data[2] = 0
    nib.save(nib.Nifti1Image(data, img.affine, img.header), mask_path)
    return ds


@pytest.fixture(scope="module")
def built(dataset) -> Path:
    """The store of CONFIG, built through the CLI."""
    root = dataset.parent
    (root / "study.yaml").write_text(yaml.safe_dump(CONFIG))
    r = cli("run", root / "study.yaml", "--no-progress")
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def ds_copy(dataset, tmp_path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "ds"))


# -- discovery -----------------------------------------------------------------------------------
def test_file_names_parse_into_entities_suffix_and_extension():
    n = parse_name("sub-01_ses-2_task-movie_run-01_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz")
    assert n.ents == {"sub": "01", "ses": "2", "task": "movie", "run": "01", "space": "MNI152NLin2009cAsym",
                      "desc": "preproc"}
    assert (n.suffix, n.extension) == ("bold", ".nii.gz")
    assert parse_name("task-movie_bold.json").ents == {"task": "movie"}
    for bad in ("README.txt", "sub-01_task_bold.nii.gz", "sub-01_sub-02_bold.nii", "notes.md"):
        assert parse_name(bad) is None, bad
    assert run_name(n.ents) == "ses-2_task-movie_run-01" and run_name(n.ents, False) == "task-movie_run-01"


def test_sessions_runs_and_filters_come_from_the_file_names(tmp_path):
    ds = write_bids_dataset(tmp_path / "ds", n_subjects=3, tasks={"movie": 11, "rest": 0}, sessions=["01", "02"],
                            n_trs=20, tiny=True, non_steady=0, spikes=())
    deriv = ds / "derivatives" / "fmriprep"
    study = discover(BidsConfig(), ds, deriv)
    assert not study.problems and study.subjects == ["sub-01", "sub-02", "sub-03"] and study.tr_s == TR
    names = list(study.runs)
    assert len(names) == 24 and names[:3] == ["ses-01_task-movie_run-1", "ses-01_task-movie_run-2",
                                               "ses-01_task-movie_run-3"]
    assert names[10:13] == ["ses-01_task-movie_run-11", "ses-01_task-rest", "ses-02_task-movie_run-1"]
    b = BidsConfig(task=["movie"], session=["2"], run=["01", "10"], subjects=["02", "sub-03"], exclude_subjects=["3"])
    study = discover(b, ds, deriv)  # labels match as numbers; sub- prefixes optional
    assert list(study.runs) == ["ses-02_task-movie_run-1", "ses-02_task-movie_run-10"]
    assert study.subjects == ["sub-02"] and study.runs["ses-02_task-movie_run-1"]["sub-02"].bold.parent == \
        deriv / "sub-02" / "ses-02" / "func"
    raw = discover(BidsConfig(task=["rest"]), ds)  # no derivatives: the raw BOLD
    assert list(raw.runs) == ["ses-01_task-rest", "ses-02_task-rest"]
    assert "space" not in parse_name(raw.runs["ses-01_task-rest"]["sub-01"].bold.name).ents
    merged = discover(BidsConfig(task=["rest"], session_in_run=False), ds, deriv)  # same (task, run) twice
    assert len(merged.problems) == 3 and "sub-01/task-rest: two BOLD files match" in merged.problems[0]
    assert "ses-01" in merged.problems[0] and "ses-02" in merged.problems[0] and "differ in ses" in merged.problems[0]


def test_discovery_reads_nilearns_fake_fmriprep_dataset(tmp_path):
    from nilearn._utils.data_gen import create_fake_bids_dataset

    ds = create_fake_bids_dataset(base_dir=tmp_path, n_sub=2, n_ses=0, tasks=["movie", "rest"], n_runs=[2, 1])
    ds = tmp_path / ds
    study = discover(BidsConfig(), ds, ds / "derivatives")
    assert len(study.problems) == 1 and "2 spaces (MNI, T1w)" in study.problems[0] and "--space MNI" in study.problems[0]
    study = discover(BidsConfig(space="MNI", task=["movie"]), ds, ds / "derivatives")
    assert not study.problems and list(study.runs) == ["task-movie_run-01", "task-movie_run-02"]
    assert study.subjects == ["sub-01", "sub-02"] and study.tr_s == 1.5
    assert all(m is None for m in study.movies.values()) and any("stim_file" in n for n in study.notes)


def test_tr_comes_from_sidecars_by_inheritance(tmp_path):
    ds = write_bids_dataset(tmp_path / "ds", n_subjects=2, tasks={"movie": 2}, n_trs=20, tiny=True, non_steady=0,
                            spikes=(), tr_s=2.0)
    deriv = ds / "derivatives" / "fmriprep"
    raw = discover(BidsConfig(), ds)
    assert raw.tr_s == 2.0 and raw.runs[RUNS[0]]["sub-01"].tr_files == [ds / "task-movie_bold.json"]
    (ds / "sub-01" / "sub-01_task-movie_bold.json").write_text(json.dumps({"RepetitionTime": 1.0}))  # subject level
    (ds / "sub-01" / "func" / "sub-01_task-movie_run-1_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    raw = discover(BidsConfig(), ds)
    trs = {(s, r): scan.tr_s for r, scans in raw.runs.items() for s, scan in scans.items()}
    assert trs == {("sub-01", RUNS[0]): 2.0, ("sub-01", RUNS[1]): 1.0, ("sub-02", RUNS[0]): 2.0, ("sub-02", RUNS[1]): 2.0}
    assert len(raw.problems) == 1 and raw.problems[0].startswith("TRs differ across runs: ")
    assert "sub-01_task-movie_run-1_bold.json says RepetitionTime 2 s" in raw.problems[0]
    assert "sub-01_task-movie_bold.json says 1 s (sub-01/task-movie_run-2)" in raw.problems[0]
    deriv_study = discover(BidsConfig(), ds, deriv)  # the derivative BOLD's own JSON wins
    assert not deriv_study.problems and deriv_study.tr_s == 2.0
    study = discover(BidsConfig(), ds, deriv, config_tr_s=1.5)
    assert "RepetitionTime 2 s but the config says tr_s = 1.5 s" in study.problems[0]


def test_movies_come_from_events_stim_file(dataset, tmp_path):
    study = discover(BidsConfig(), dataset, dataset / "derivatives" / "fmriprep")
    assert study.movies == {r: dataset / "stimuli" / f"movie_run-{i + 1}.mp4" for i, r in enumerate(RUNS)}
    assert {(s, r) for r, scans in study.runs.items() for s in scans} == set(SERVED)
    assert any("task-movie_run-2: no BOLD for sub-03" in n for n in study.notes)
    given = {RUNS[1]: tmp_path / "other.mp4"}
    shutil.copy(dataset / "stimuli" / "movie_run-1.mp4", given[RUNS[1]])
    study = discover(BidsConfig(), dataset, None, stimuli=given)
    assert study.movies[RUNS[1]] == given[RUNS[1]] and not study.problems


# -- the built store -------------------------------------------------------------------------------
def test_bids_config_expands_into_runs_and_builds(built, dataset):
    cfg = load_config(dataset.parent / "study.yaml")
    assert list(cfg.runs) == RUNS and cfg.tr_s == TR and cfg.subjects == ["sub-01", "sub-02", "sub-03"]
    assert cfg.runs[RUNS[1]].fmri["sub-02"].endswith(f"sub-02_{RUNS[1]}_space-{SPACE}_desc-preproc_bold.nii.gz")
    s = giblet.open_store(built)
    assert s.runs == RUNS and {(x, r): s.n_trs(r, x) for x in s.subjects for r in s.subject_runs(x)} == SERVED
    from giblet.verify import verify_store

    assert verify_store(built) == []


def _expected(dataset, subject: str, run: str, n: int, mask: np.ndarray, strategy="scrubbing"):
    """What nilearn gives when called directly: (kept TRs, z-scored cleaned signal there)."""
    from nilearn.interfaces.fmriprep import load_confounds_strategy
    from nilearn.signal import clean

    bold = _deriv(dataset, subject[4:], run, f"space-{SPACE}_desc-preproc_bold.nii.gz")
    raw = np.asanyarray(nib.load(bold).dataobj)[mask].T[:n].astype(np.float64)
    table, kept = load_confounds_strategy(str(bold), denoise_strategy=strategy)
    kept = kept[kept < n]
    out = clean(raw, detrend=True, standardize=None, confounds=table.to_numpy()[:n], sample_mask=kept,
                high_pass=0.01, t_r=TR)
    return kept, (out - out.mean(0)) / out.std(0), raw


def test_confound_regression_equals_nilearn_signal_clean(built, dataset):
    s = giblet.open_store(built)
    for (subject, run), n in SERVED.items():
        kept, want, raw = _expected(dataset, subject, run, n, s.mask)
        got = s.fmri(subject, run)
        censored = s.censored(subject, run)
        assert np.array_equal(np.flatnonzero(~censored), kept) and censored[[0, 1, 9]].all()
        assert np.isnan(got[censored]).all() and np.isfinite(got[~censored]).all()
        assert np.abs(got[~censored] - want).max() < 1e-5, (subject, run)
        plain = raw[kept] - raw[kept].mean(0)  # the confounds did something
        assert np.abs(want - plain / plain.std(0)).max() > 0.1
        z = got[~censored].astype(np.float64)  # statistics over the kept TRs only
        assert np.abs(z.mean(0)).max() < 1e-4 and np.abs(z.std(0) - 1).max() < 1e-4
        mean, _ = s.fmri_stats(subject, run)
        assert np.allclose(mean, raw[kept].mean(0), rtol=1e-6)


def test_fmriprep_masks_are_intersected(built, dataset):
    s = giblet.open_store(built)
    masks = [np.asanyarray(nib.load(_deriv(dataset, x[4:], r, f"space-{SPACE}_desc-brain_mask.nii.gz")).dataobj) > 0
             for x, r in SERVED]
    assert np.array_equal(s.mask, np.logical_and.reduce(masks))
    assert s.mask.sum() < np.logical_or.reduce(masks).sum()  # sub-02's slab is left out
    assert s.array("fmri/mask").attrs["rule"] == "intersection" and s.array("fmri/mask").attrs["n_masks"] == 5


def test_dataset_leaves_censored_trs_out(built):
    from giblet.data import GibletDataset

    s = giblet.open_store(built)
    ds = GibletDataset(built, split="all", modalities=["fmri"])
    kept = sum(int((~s.censored(x, r)).sum()) for x in s.subjects for r in s.subject_runs(x))
    assert len(ds) == kept < sum(SERVED.values())
    seen = set()
    for i in range(len(ds)):
        si, ri, t = ds.locate(i)
        subject, run = ds.subjects[si], ds.runs[ri]
        assert not s.censored(subject, run)[t]
        seen.add((subject, run, t))
    assert len(seen) == kept and all(np.isfinite(ds[i]["fmri"].numpy()).all() for i in range(0, len(ds), 7))
    train = GibletDataset(built, split="train", modalities=["fmri", "video"], window=2)
    assert all(not s.censored(train.subjects[a], train.runs[b])[t] for a, b, t in map(train.locate, range(len(train))))


def test_ridge_and_ceiling_score_only_uncensored_trs(built):
    from giblet.evaluation.ceiling import noise_ceiling
    from giblet.evaluation.features import store_features
    from giblet.evaluation.ridge import ridge_baseline, subject_samples

    s = giblet.open_store(built)
    features = store_features(s)
    for subject in s.subjects:
        for split in ("train", "val"):
            got = subject_samples(s, features, subject, split)
            want = sum(int((~s.censored(subject, r)[slice(*s.split_trs(split, r, subject))]).sum())
                       for r in s.subject_runs(subject))
            assert len(got.y) == want and np.isfinite(got.y).all()
    result = ridge_baseline(s, alphas=(1.0, 100.0))
    assert all(np.isfinite(r).all() for r in result.r["val"].values())
    ceiling = noise_ceiling(s, "all", cache=False)
    for subject in s.subjects:  # TRs it keeps that another subject also keeps
        want = 0
        for run in s.subject_runs(subject):
            others = [x for x in s.subjects if x != subject and s.has_run(x, run)]
            for t in np.flatnonzero(~s.censored(subject, run)):
                want += any(t < s.n_trs(run, x) and not s.censored(x, run)[t] for x in others)
        assert ceiling.n_trs[subject] == want


def test_confounds_and_their_settings_key_the_fmri_units(built, dataset, tmp_path):
    from pipelines.engine import plan_for
    from pipelines.stages import is_current

    root = Path(shutil.copytree(dataset.parent, tmp_path / "copy", symlinks=True))
    tsv = _deriv(root / "ds", "02", RUNS[0], "desc-confounds_timeseries.tsv")
    table = pd.read_csv(tsv, sep="\t")
    table.loc[5, "csf"] += 1.0
    table.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    _, units = plan_for(load_config(root / "study.yaml"))
    stale = sorted(u.key for u in units if not is_current(u, giblet.open_store(root / "study.zarr").manifest["units"]))
    assert stale == [f"fmri/sub-02/{RUNS[0]}"]
    _, units = plan_for(load_config(root / "study.yaml", ["fmri.confounds.options.fd_threshold=0.3"]))
    manifest = giblet.open_store(root / "study.zarr").manifest["units"]
    assert sorted(u.key for u in units if not is_current(u, manifest) and u.key.startswith("fmri/sub")) == \
        sorted(f"fmri/{x}/{r}" for x, r in SERVED)
    assert is_current(next(u for u in units if u.key == "fmri/mask"), manifest)  # the mask does not depend on them


# -- init --------------------------------------------------------------------------------------------
def test_init_writes_a_config_that_runs_unchanged(dataset, tmp_path):
    r = cli("init", dataset, "--derivatives", dataset / "derivatives" / "fmriprep", "--task", "movie")
    assert r.returncode == 0, r.stderr
    assert "3 subject(s) x 2 run(s), TR 1.5 s" in r.stderr and "movies found: 2 of 2" in r.stderr
    table = {ln.split()[0]: ln.split()[1:] for ln in r.stderr.splitlines() if ln.startswith("  sub-")}
    assert table == {"sub-01": ["60", "60"], "sub-02": ["60", "48"], "sub-03": ["60", "--"]}
    assert "task-movie_run-2: no BOLD for sub-03" in r.stderr
    config = tmp_path / "study.yaml"
    config.write_text(r.stdout)
    raw = yaml.safe_load(r.stdout)
    assert raw["bids"]["space"] == SPACE and raw["fmri"]["confounds"]["strategy"] == "simple" and "tr_s" not in raw
    r = cli("run", config, "--no-progress")
    assert r.returncode == 0, r.stderr
    s = giblet.open_store(r.stdout.strip().splitlines()[-1])
    assert s.runs == RUNS and s.has_modality("video") and s.array("fmri/mask").attrs["strategy"] == "fmriprep"
    assert cli("verify", tmp_path / "study.zarr").returncode == 0


# -- bad input: one line naming the file and the fix ---------------------------------------------------
def test_a_run_without_a_sidecar_tr_is_one_line(ds_copy):
    (ds_copy / "task-movie_bold.json").unlink()
    _one_line_error(cli("init", ds_copy), "sub-01_task-movie_run-1_bold.nii.gz", "no RepetitionTime",
                    "task-movie_bold.json")


def test_inconsistent_trs_are_one_line(ds_copy):
    (ds_copy / "sub-02" / "func" / "sub-02_task-movie_run-1_bold.json").write_text('{"RepetitionTime": 2.0}')
    _one_line_error(cli("init", ds_copy), "TRs differ across runs", "sub-02_task-movie_run-1_bold.json", "2 s")


def test_a_missing_stimulus_file_is_one_line(ds_copy):
    (ds_copy / "stimuli" / "movie_run-2.mp4").unlink()
    _one_line_error(cli("init", ds_copy), "sub-01_task-movie_run-2_events.tsv", "'movie_run-2.mp4'",
                    "bids.stimuli.task-movie_run-2")


def test_subjects_naming_different_stimuli_is_one_line(ds_copy):
    events = ds_copy / "sub-02" / "func" / "sub-02_task-movie_run-1_events.tsv"
    events.write_text(events.read_text().replace("movie_run-1.mp4", "movie_run-2.mp4"))
    _one_line_error(cli("init", ds_copy), "subjects name different stimuli", "sub-01_task-movie_run-1_events.tsv",
                    "sub-02_task-movie_run-1_events.tsv")


def test_a_confounds_file_with_missing_columns_is_one_line(ds_copy):
    from giblet.config import ConfoundsParams
    from giblet.features.confounds import load

    for subject, run in (("01", RUNS[0]), ("02", RUNS[1])):
        tsv = _deriv(ds_copy, subject, run, "desc-confounds_timeseries.tsv")
        pd.read_csv(tsv, sep="\t").drop(columns=["csf"]).to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    (ds_copy.parent / "study.yaml").write_text(yaml.safe_dump(CONFIG))
    _one_line_error(cli("run", ds_copy.parent / "study.yaml"), "sub-01_task-movie_run-1_desc-confounds_timeseries.tsv",
                    "csf", "fmri.confounds")  # the first run is tried at plan time
    bold = _deriv(ds_copy, "02", RUNS[1], f"space-{SPACE}_desc-preproc_bold.nii.gz")
    with pytest.raises(InputError, match="sub-02_task-movie_run-2_desc-confounds_timeseries.tsv.*csf"):
        load(bold, ConfoundsParams(strategy="simple"), 48, 48, "sub-02/run")  # each task reads its own


def test_a_mask_on_another_grid_is_one_line(ds_copy):
    mask = _deriv(ds_copy, "02", RUNS[0], f"space-{SPACE}_desc-brain_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), mask)
    (ds_copy.parent / "study.yaml").write_text(yaml.safe_dump(CONFIG))
    _one_line_error(cli("run", ds_copy.parent / "study.yaml"), f"sub-02/{RUNS[0]}", str(mask), "(5, 5, 5)")


def test_config_problems_are_caught_at_load(dataset):
    def load(**changes):
        raw = json.loads(json.dumps(CONFIG))
        for key, value in changes.items():
            block, _, name = key.partition("__")
            if name:
                raw[block][name] = value
            else:
                raw[key] = value
        (dataset.parent / "bad.yaml").write_text(yaml.safe_dump(raw))
        return load_config(dataset.parent / "bad.yaml")

    with pytest.raises(ConfigError, match="give either a `bids` block or a `runs`"):
        load(runs={"run-1": {"movie": "x.mp4"}})
    with pytest.raises(ConfigError, match="did you mean 'fd_threshold'"):
        load(fmri__confounds={"strategy": "scrubbing", "options": {"fd_treshold": 0.3}})
    with pytest.raises(ConfigError, match="not a nilearn preset"):
        load(fmri__confounds={"strategy": "aggressive"})
    with pytest.raises(ConfigError, match="fmri.mask_rule"):
        load(fmri__mask_rule="fraction:2")
    with pytest.raises(InputError, match="tr_s = 2 s"):
        load(tr_s=2.0)
    with pytest.raises(InputError, match="2 spaces"):
        write_bids_dataset(dataset.parent / "two", n_subjects=1, tasks={"movie": 1}, tiny=True, n_trs=20)
        for f in (dataset.parent / "two" / "derivatives" / "fmriprep" / "sub-01" / "func").glob("*preproc_bold*"):
            shutil.copy(f, f.with_name(f.name.replace(SPACE, "T1w")))
        load(bids={"root": "two", "derivatives": "two/derivatives/fmriprep"})


def test_options_list_matches_nilearns_signature():
    import inspect

    from nilearn.interfaces.fmriprep import load_confounds

    from giblet.features.confounds import OPTIONS

    assert set(OPTIONS) == set(inspect.signature(load_confounds).parameters) - {"img_files", "strategy"}


def test_xarray_view_carries_the_censored_trs(built):
    s = giblet.open_store(built)
    run = s.runs[0]
    ds = s.to_xarray(run)
    subs = list(ds["subject"].values)
    for i, subject in enumerate(subs):
        n = s.n_trs(run, subject)
        got = ds["fmri_censored"].values[i]
        assert np.array_equal(got[:n], s.censored(subject, run)) and not got[n:].any()
        assert np.isnan(ds["fmri"].values[i][got]).all()
    assert ds["fmri_censored"].values.any()  # the study censors some TRs
