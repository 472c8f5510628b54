"""Several runs per study (store format 2), on a study made here -- not by giblet.synth.

Two runs of unequal length, each with its own movie; one annotation sheet for both whose
clock restarts (Sherlock's layout); subjects whose scans are longer or shorter than their
run's movie; one subject without run 2; float32 BOLD whose voxels each drift their own way.
Built once through the CLI (module fixture), copied when a test changes it.
"""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

import giblet
from giblet.data import GibletDataset, hrf_convolve
from giblet.errors import ModalityMissingError, StoreError
from giblet.synth import scenes, write_movie
from giblet.verify import verify_store
from tests.test_cli import _one_line_error, cli

SHAPE, TR = (9, 10, 8), 1.5
MOVIE_S = {"run-1": 24.0, "run-2": 31.5}  # 16 and 21 whole TRs
BOLD_TRS = {("sub-01", "run-1"): 20, ("sub-01", "run-2"): 18, ("sub-02", "run-1"): 16, ("sub-02", "run-2"): 21,
            ("sub-03", "run-1"): 14}  # sub-03 has no run 2
SERVED = {("sub-01", "run-1"): 16, ("sub-01", "run-2"): 18, ("sub-02", "run-1"): 16, ("sub-02", "run-2"): 21,
          ("sub-03", "run-1"): 14}


def write_bold(path, n_trs, seed):
    """float32 BOLD: a blob brain, per-voxel drift and noise, the TR in the header."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    inside = sum(g ** 2 for g in grid) < 0.7
    base = np.where(inside, rng.uniform(700, 1300, SHAPE), 20.0)
    t = np.arange(n_trs)
    drift = rng.normal(0, 0.4, SHAPE)[..., None] * t
    data = base[..., None] + drift + rng.normal(0, 8, SHAPE + (n_trs,)) * inside[..., None]
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((3.0, 3.0, 3.0, TR))
    nib.save(img, str(path))


def write_sheet(path):
    """Both runs' rows in one sheet, seconds restarting at 0 for run 2 (the first rows of each
    run are the same 'cartoon'), plus a duplicated block at the end of the file."""
    rows = []
    for run, dur in MOVIE_S.items():
        t, k = 0.0, 0
        while t < dur:
            label = "Cartoon: popcorn sings." if t < 6 else f"{run}: scene {k} happens."
            rows.append({"Start Time (s) ": t, "End Time (s) ": min(t + 3, dur), "Scene Details - A Level ": label})
            t, k = t + 3, k + 1
    rows += [dict(r) for r in rows[:3]]  # the duplicated block
    pd.DataFrame(rows).to_csv(path, index=False)


def make_two_runs(root):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    runs = {}
    for i, (run, dur) in enumerate(MOVIE_S.items()):
        write_movie(root / f"{run}.mp4", scenes(dur, rng), dur, size=(48, 28), fps=10, rng=rng, audio=False)
        runs[run] = {"movie": f"{run}.mp4", "fmri": {}}
    for k, ((subject, run), n) in enumerate(BOLD_TRS.items()):
        write_bold(root / f"{subject}_{run}.nii.gz", n, k)
        runs[run]["fmri"][subject] = f"{subject}_{run}.nii.gz"
    write_sheet(root / "sheet.csv")
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump({
        "output": "study.zarr", "tr_s": TR, "annotations": "sheet.csv", "runs": runs,
        "fmri": {"chunk_trs": 8, "mask_strategy": "background"},
        "video": {"width": 32, "height": 18, "chunk_trs": 8, "segment_trs": 16},
        "text": {"chunk_trs": 8, "device": "cpu"}}, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    config = make_two_runs(tmp_path_factory.mktemp("two_runs") / "s")
    r = cli("run", config, "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    return config


@pytest.fixture
def study(built, tmp_path):
    shutil.copytree(built.parent, tmp_path / "s")
    return tmp_path / "s" / built.name


def raw_masked(path, mask):
    return np.asanyarray(nib.load(str(path)).dataobj, dtype=np.float64)[mask].T


def test_runs_subjects_and_served_trs(built):
    s = giblet.open_store(built.parent / "study.zarr")
    assert s.runs == ["run-1", "run-2"] and s.subjects == ["sub-01", "sub-02", "sub-03"]
    assert (s.n_trs("run-1"), s.n_trs("run-2")) == (16, 21)
    assert s.subject_runs("sub-03") == ["run-1"] and not s.has_run("sub-03", "run-2")
    for (subject, run), n in SERVED.items():
        assert s.n_trs(run, subject) == n
        assert s.fmri(subject, run).shape == (n, s.n_voxels)
    with pytest.raises(ModalityMissingError, match="sub-03.*no run 'run-2'"):
        s.fmri("sub-03", "run-2")
    with pytest.raises(ModalityMissingError, match="2 runs"):
        s.fmri("sub-01")  # several runs: say which
    assert s.video("run-1").shape[0] == 16 and s.video("run-2").shape[0] == 21
    assert verify_store(built.parent / "study.zarr") == []


def test_zscore_over_exactly_the_served_trs_of_each_subject_and_run(built):
    """Statistics over the TRs served -- sub-01's run 1 has 4 more TRs than its movie covers."""
    s = giblet.open_store(built.parent / "study.zarr")
    for (subject, run), n in SERVED.items():
        z = s.fmri(subject, run).astype(np.float64)
        mean, std = s.fmri_stats(subject, run)
        live = std > 0
        assert np.abs(z.mean(0)).max() < 1e-3
        assert np.abs(z[:, live].std(0) - 1).max() < 1e-3
        raw = raw_masked(built.parent / f"{subject}_{run}.nii.gz", s.mask)
        np.testing.assert_allclose(mean, raw[:n].mean(0), rtol=1e-5)  # the raw mean of the served TRs
        np.testing.assert_allclose(s.denormalize(subject, z, run=run), raw[:n], rtol=1e-5)


def test_the_shared_sheet_splits_where_its_clock_restarts(built):
    s = giblet.open_store(built.parent / "study.zarr")
    meta1, meta2 = s.unit_meta("text/run-1"), s.unit_meta("text/run-2")
    assert meta1["shared_sheet_rows"] == [1, 8] and meta2["shared_sheet_rows"] == [9, 19]
    assert meta1["n_trs"] == 16 and meta2["n_trs"] == 21
    # run 2's last row (30-31.5 s) covers its TR 20; the duplicated block belongs to no run
    assert s.has_text("run-2")[20] and s.has_text("run-1").all()
    emb1, emb2 = s.text("run-1"), s.text("run-2")
    np.testing.assert_allclose(emb1[0], emb2[0], atol=1e-6)  # both runs open with the same cartoon row
    assert not np.allclose(emb1[6], emb2[6])  # then differ


def test_windows_and_hrf_never_cross_a_run_boundary(built):
    store = built.parent / "study.zarr"
    s = giblet.open_store(store)
    ds = GibletDataset(store, "all", window=3, hrf=True)
    firsts = [i for i in range(len(ds)) if ds.locate(i)[1:] == (1, 0)]  # every subject's run-2 TR 0
    assert firsts
    for i in firsts:
        sample = ds[i]
        assert sample["run"] == 1 and sample["tr"] == 0
        assert sample["stim_valid"].tolist() == [False, False, False, True]
        assert (sample["video"][:3] == 0).all()  # zeros, not the end of run 1
        np.testing.assert_allclose(sample["text"][-1], hrf_convolve(s.text("run-2"), TR)[0], atol=1e-6)
    # a TR deep in run 2: its HRF is computed from run 2's rows only
    i = next(i for i in range(len(ds)) if ds.locate(i)[1:] == (1, 5))
    np.testing.assert_allclose(ds[i]["text"], hrf_convolve(s.text("run-2"), TR)[2:6], atol=1e-6)


def test_dataset_samples_every_subject_run_pair_of_the_split(built):
    store = built.parent / "study.zarr"
    s = giblet.open_store(store)
    train, val = GibletDataset(store, "train"), GibletDataset(store, "val")
    seen = {}
    for ds in (train, val):
        for i in range(len(ds)):
            si, ri, t = ds.locate(i)
            seen.setdefault((ds.subjects[si], ds.runs[ri]), []).append(t)
    for (subject, run), n in SERVED.items():
        assert sorted(seen[subject, run]) == list(range(n))  # every served TR once, nothing else
    a, b = s.split["val"]["run-2"]
    assert (a, b) == (21 - round(0.2 * 21), 21)
    by_run = GibletDataset(store, "train", runs=["run-2"], subjects=["sub-02"])
    assert len(by_run) == s.split["train"]["run-2"][1]
    batch = next(iter(torch_loader(val)))
    back = val.denormalize(batch["fmri"], batch["subject"], batch["run"])
    for k in range(len(back)):
        subject, run = val.subjects[int(batch["subject"][k])], val.runs[int(batch["run"][k])]
        raw = raw_masked(built.parent / f"{subject}_{run}.nii.gz", s.mask)
        np.testing.assert_allclose(back[k].numpy(), raw[int(batch["tr"][k])], rtol=1e-5)


def torch_loader(ds):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=16, shuffle=True)


def test_split_by_run_changes_no_unit(study):
    raw = yaml.safe_load(study.read_text())
    raw["split"] = {"val_runs": ["run-2"]}
    study.write_text(yaml.safe_dump(raw))
    r = cli("run", study, "--no-progress")
    assert r.returncode == 0 and "all 10 unit(s) up to date" in r.stderr, r.stderr
    s = giblet.open_store(study.parent / "study.zarr")
    assert s.split["train"] == {"run-1": (0, 16)} and s.split["val"] == {"run-2": (0, 21)}
    val = GibletDataset(study.parent / "study.zarr", "val")
    assert val.runs == ["run-1", "run-2"] and {val.locate(i)[1] for i in range(len(val))} == {1}
    frames = s.video("run-1").astype(np.float64) / 255  # video stats now over run 1 only
    np.testing.assert_allclose(s.video_stats()[0], frames.reshape(-1, 3).mean(0), rtol=1e-5)
    assert verify_store(study.parent / "study.zarr") == []


def test_adding_a_run_or_a_subject_builds_only_its_units(study):
    raw = yaml.safe_load(study.read_text())
    shutil.copy(study.parent / "run-1.mp4", study.parent / "run-3.mp4")
    write_bold(study.parent / "sub-02_run-3.nii.gz", 16, 99)
    sheet = pd.read_csv(study.parent / "sheet.csv")  # run 3's rows appended to the shared sheet
    more = pd.DataFrame({"Start Time (s) ": [0, 10], "End Time (s) ": [10, 24],
                         "Scene Details - A Level ": ["Run 3 begins.", "Run 3 ends."]})
    pd.concat([sheet, more]).to_csv(study.parent / "sheet.csv", index=False)
    raw["runs"]["run-3"] = {"movie": "run-3.mp4", "fmri": {"sub-02": "sub-02_run-3.nii.gz"}}
    write_bold(study.parent / "sub-04_run-1.nii.gz", 16, 98)
    raw["runs"]["run-1"]["fmri"]["sub-04"] = "sub-04_run-1.nii.gz"
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    r = cli("run", study, "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "4 unit(s) to build, 10 up to date" in r.stderr, r.stderr
    built_now = sorted(ln.split(":")[0] for ln in r.stderr.splitlines() if ": done in" in ln)
    assert built_now == ["fmri/sub-02/run-3", "fmri/sub-04/run-1", "text/run-3", "video/run-3"]
    s = giblet.open_store(study.parent / "study.zarr")
    assert s.runs == ["run-1", "run-2", "run-3"] and s.subject_runs("sub-04") == ["run-1"]
    assert s.unit_meta("text/run-3")["shared_sheet_rows"] == [23, 24]  # after the duplicated block
    assert verify_store(study.parent / "study.zarr") == []


def test_subject_zscore_pools_a_subjects_runs(study):
    r = cli("run", study, "--no-progress", "fmri.zscore=subject")
    assert r.returncode == 0, r.stderr
    s = giblet.open_store(study.parent / "study.zarr")
    assert sorted(k for k in s.manifest["units"] if k.startswith("fmri/sub")) == ["fmri/sub-01", "fmri/sub-02",
                                                                                   "fmri/sub-03"]
    z = np.concatenate([s.fmri("sub-01", r) for r in ("run-1", "run-2")]).astype(np.float64)
    assert np.abs(z.mean(0)).max() < 1e-3 and np.abs(z.std(0)[s.fmri_stats("sub-01", "run-1")[1] > 0] - 1).max() < 1e-3
    assert np.abs(s.fmri("sub-01", "run-1").mean(0)).max() > 1e-2  # not per run
    np.testing.assert_array_equal(s.fmri_stats("sub-01", "run-1")[0], s.fmri_stats("sub-01", "run-2")[0])
    assert verify_store(study.parent / "study.zarr") == []


def test_a_format_1_store_is_refused_with_how_to_rebuild(study):
    store = study.parent / "study.zarr"
    m = json.loads((store / "manifest.json").read_text())
    old = {"schema_version": 1, "units": m["units"], "align": {"n_trs": 16}}
    (store / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(StoreError, match="store format 1.*reads format 2.*new output path"):
        giblet.open_store(store)
    _one_line_error(cli("run", study, "--no-progress"), "format 1")
    assert json.loads((store / "manifest.json").read_text()) == old  # untouched


def test_one_run_of_a_shared_sheet_takes_its_rows_from_text_run_rows(study):
    """A study that keeps only run 1 of a sheet covering both: without `text.run_rows` the
    restart is a one-line error that names the fix; with it, run 1 reads just its rows."""
    raw = yaml.safe_load(study.read_text())
    del raw["runs"]["run-2"]
    raw["output"] = "one.zarr"
    study.write_text(yaml.safe_dump(raw))
    _one_line_error(cli("run", study, "--only", "text", "--no-progress"),
                    "sheet.csv", "text.run_rows")
    r = cli("run", study, "--only", "text", "--no-progress", "text.run_rows={run-1: 1-8}")
    assert r.returncode == 0, r.stderr
    s = giblet.open_store(study.parent / "one.zarr")
    assert s.runs == ["run-1"] and s.unit_meta("text/run-1")["shared_sheet_rows"] == [1, 8]
    built = giblet.open_store(study.parent / "study.zarr")
    np.testing.assert_array_equal(s.text("run-1"), built.text("run-1"))


def test_a_run_every_subject_lacks_is_an_error_a_missing_pair_is_not(study):
    raw = yaml.safe_load(study.read_text())
    raw["runs"]["run-2"]["fmri"] = {}
    study.write_text(yaml.safe_dump(raw))
    _one_line_error(cli("run", study, "--no-progress"), "run-2", "no subject")


def test_the_real_sherlock_sheet_lands_in_the_right_runs_and_trs():
    """Rows 1-482 are run 1, 483-1,000 run 2 (its seconds restart at 0); the TR each row
    covers, read from the seconds columns, agrees with the sheet's own TR columns (which run
    on across runs: run 2's TR 1 is the sheet's 947)."""
    from giblet.features import text
    from tests.conftest import REAL_XLSX

    cols = ("Start Time (s)", "End Time (s)", ["Scene Details - A Level"])
    rows = text.shared_sheet_rows(REAL_XLSX, *cols, "s", ["run-1", "run-2"], None)
    assert rows["run-1"]["rows"] == (1, 482) and rows["run-2"]["rows"] == (483, 1000)
    sheet = text.read_table(REAL_XLSX)
    tr_cols = sheet["Start Time (TRs, 1.5s)"], sheet["End Time (TRs, 1.5s)"]
    for run, offset, check in (("run-1", 0, (1, 480)), ("run-2", 946, (483, 1000))):
        got = text.clip_to_grid(text.read_rows(REAL_XLSX, *cols, row_range=rows[run]["rows"]), TR, 0.0, None, "x")
        row, tr, _ = text.coverage(np.array(got.start), np.array(got.end), TR, 0.0, got.n_trs)
        for data_row in check:
            covered = set(tr[row == got.sheet_row.index(data_row + 1)].tolist())
            first, last = int(tr_cols[0][data_row - 1]) - offset - 1, int(tr_cols[1][data_row - 1]) - offset - 1
            assert covered & set(range(first, last + 1)), (run, data_row, covered, first, last)
            assert min(covered) >= first - 1 and max(covered) <= last + 1, (run, data_row, covered, first, last)
    assert text.clip_to_grid(text.read_rows(REAL_XLSX, *cols, row_range=(483, 1000)), TR, 0, None, "x").n_trs == 1030
