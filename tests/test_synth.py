"""giblet.synth: files independent of the worker count, the real spreadsheet copied in, the CLI;
several runs (missing pairs, scan lengths, the one sheet), subject-specific weights, the
per-subject expected r, the one HRF and the one demo definition."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REAL_XLSX
from giblet import synth
from giblet.config import load_config
from giblet.synth import SHERLOCK_STAGES, make_study

SMALL = dict(shape=(9, 10, 8), movie_size=(64, 36), fps=10, audio_track=False)


def test_subjects_written_by_two_processes_equal_one_process(tmp_path):
    kw = dict(n_subjects=3, n_trs=24, shape=(9, 10, 8), movie=False, annotations=False, seed=4)
    one, two = make_study(tmp_path / "one", workers=1, **kw), make_study(tmp_path / "two", workers=2, **kw)
    subjects = yaml.safe_load(one.read_text())["inputs"]["fmri"]
    assert list(subjects) == ["sub-01", "sub-02", "sub-03"]
    data = {}
    for name, rel in subjects.items():
        a = nib.load(str(one.parent / rel))
        b = nib.load(str(two.parent / rel))
        assert a.get_data_dtype() == np.int16 and a.shape == (9, 10, 8, 24)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        data[name] = np.asanyarray(a.dataobj)
    assert not np.array_equal(data["sub-01"], data["sub-02"])  # each subject its own noise
    np.testing.assert_array_equal(np.load(one.parent / "truth.npz")["weights"], np.load(two.parent / "truth.npz")["weights"])


def test_real_annotation_file_is_copied_and_read_by_its_tr_columns(tmp_path):
    config = make_study(tmp_path, n_subjects=1, n_trs=20, shape=(9, 10, 8), movie=False, seed=0,
                        annotations_file=REAL_XLSX, stages={"text": SHERLOCK_STAGES["text"]})
    copied = tmp_path / "annotations.xlsx"
    assert copied.read_bytes() == REAL_XLSX.read_bytes()
    cfg = load_config(config)
    assert str(cfg.inputs.annotations).endswith("annotations.xlsx")
    assert cfg.text.time_unit == "tr" and cfg.text.start_column == "Start Time (TRs, 1.5s)"


def test_cli_writes_a_demo_study_and_prints_its_config(tmp_path):
    # The demo has two runs now (store format 2): the config lists them under `runs:`.
    r = subprocess.run([sys.executable, "-m", "giblet.synth", str(tmp_path / "s"), "--subjects", "2", "--workers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    config = r.stdout.strip().splitlines()[-1]
    assert config.endswith("study.yaml")
    raw = yaml.safe_load(open(config))
    runs = raw["runs"]
    assert list(runs) == ["run-1", "run-2"] and raw["annotations"] == "annotations.xlsx"
    assert list(runs["run-1"]["fmri"]) == ["sub-01", "sub-02"] and list(runs["run-2"]["fmri"]) == ["sub-01"]
    assert runs["run-1"]["movie"] == "stimuli/run-1.mp4" and raw["audio"]["model"] == "random"
    truth = np.load(tmp_path / "s" / "truth.npz")
    assert list(truth["n_trs"]) == [80, 64]


# -- one HRF (issue #17) -----------------------------------------------------------------------------------
def test_the_three_import_paths_give_the_one_kernel():
    from giblet.data import hrf_kernel as data_kernel
    from giblet.hrf import hrf_convolve, hrf_kernel
    from giblet.models import hrf_kernel as model_kernel

    for tr in (0.8, 1.5, 2.0):
        assert data_kernel(tr) is model_kernel(tr) is hrf_kernel(tr) is hrf_kernel(np.float64(tr), 32.0)
        assert not hrf_kernel(tr).flags.writeable and hrf_kernel(tr).sum() == pytest.approx(1.0)
    assert synth.hrf_convolve is hrf_convolve


@pytest.mark.parametrize("tr_s", [1.5, 2.0])
def test_planted_response_peaks_about_5_s_after_a_scene_impulse(tmp_path, tr_s):
    dark = {"label": 0, "color": np.zeros(3), "tone_hz": 220.0, "loudness": 0.0}
    impulse = [{**dark, "start": 0, "end": 30}, {**dark, "start": 30, "end": 31, "color": np.ones(3)},
               {**dark, "start": 31, "end": 90}]
    onset = int(30 / tr_s)  # a TR starts at 30 s for both TRs
    response = synth.hrf_convolve(synth.latents(impulse, int(90 / tr_s), tr_s), tr_s)[:, 0]
    assert not response[:onset].any()  # causal
    i = int(np.argmax(response))
    a, b, c = response[i - 1: i + 2]
    peak_s = (i - onset + 0.5 * (a - c) / (a - 2 * b + c)) * tr_s  # parabola through the top 3 samples
    assert 4.5 <= peak_s <= 5.6, peak_s  # nilearn's oversampling=1 grid puts it at 6.2 s (TR 1.5) / 6.6 s (TR 2)
    config = make_study(tmp_path, n_subjects=1, n_trs=[30, 20], tr_s=tr_s, movie=False, annotations=False, **SMALL)
    truth = np.load(config.parent / "truth.npz")
    for run in ("run-1", "run-2"):  # the study plants exactly this convolution
        np.testing.assert_allclose(truth[f"latents_hrf_{run}"], synth.hrf_convolve(truth[f"latents_{run}"], tr_s),
                                   rtol=1e-6)


# -- several runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs_study(tmp_path_factory):
    """Two runs with the multi-run defaults: 4 subjects, 40 + 30 TRs."""
    root = tmp_path_factory.mktemp("runs")
    return make_study(root, n_subjects=4, n_trs=[40, 30], seed=1, **SMALL)


def test_two_runs_write_their_files_and_the_runs_config(tmp_path):
    import av

    config = make_study(tmp_path, n_subjects=3, n_trs=[24, 18], seed=2, missing=[("sub-03", "run-2")], scan_jitter=0,
                        scan_trs={("sub-01", "run-1"): 30, ("sub-02", "run-2"): 15}, per_run_annotations=True,
                        split={"val_runs": ["run-2"]}, stages={"audio": {"model": "random"}}, **SMALL)
    raw = yaml.safe_load(config.read_text())
    assert list(raw) == ["output", "tr_s", "runs", "split", "audio"]  # per-run sheets: no top-level one
    runs = raw["runs"]
    assert runs["run-1"] == {"movie": "stimuli/run-1.mp4", "onset_s": 0.0, "annotations": "annotations/run-1.xlsx",
                             "fmri": {s: f"bold/{s}_run-1.nii.gz" for s in ("sub-01", "sub-02", "sub-03")}}
    assert runs["run-2"]["fmri"] == {s: f"bold/{s}_run-2.nii.gz" for s in ("sub-01", "sub-02")}
    assert not (tmp_path / "bold" / "sub-03_run-2.nii.gz").exists() and raw["split"] == {"val_runs": ["run-2"]}
    truth = np.load(tmp_path / "truth.npz")
    expected = {("sub-01", "run-1"): 30, ("sub-02", "run-1"): 24, ("sub-03", "run-1"): 24,
                ("sub-01", "run-2"): 18, ("sub-02", "run-2"): 15}
    for (s, r), n in expected.items():
        assert nib.load(str(tmp_path / "bold" / f"{s}_{r}.nii.gz")).shape == (9, 10, 8, n)
        assert truth["scan_trs"][int(s[-1]) - 1, int(r[-1]) - 1] == n
    assert truth["missing"].tolist() == [[False, False], [False, False], [False, True]]
    assert truth["scan_trs"][0, 0] > truth["stimulus_trs"][0] == 26  # 39 s of movie: 26 whole TRs, the scan 30
    for r, seconds in (("run-1", 24 * 1.5 + 3), ("run-2", 18 * 1.5 + 3)):
        with av.open(str(tmp_path / "stimuli" / f"{r}.mp4")) as movie:
            stream = movie.streams.video[0]
            assert float(stream.duration * stream.time_base) == pytest.approx(seconds, abs=0.15)
            assert synth.decode_frame_index(next(movie.decode(stream)).to_ndarray(format="rgb24")) == 0
        assert (tmp_path / "annotations" / f"{r}.xlsx").exists()
    # each run its own scenes after the shared ~12 s opening (8 TRs)
    np.testing.assert_array_equal(truth["latents_run-1"][:8], truth["latents_run-2"][:8])
    assert not np.allclose(truth["latents_run-1"][10:18], truth["latents_run-2"][10:18])


def test_missing_pairs_and_scan_lengths_by_default(runs_study):
    raw = yaml.safe_load(runs_study.read_text())
    truth = np.load(runs_study.parent / "truth.npz")
    subjects, runs = list(truth["subjects"]), list(truth["runs"])
    assert truth["missing"].any() and not truth["missing"][:, 0].any()  # a pair is missing, never a first run
    for j, r in enumerate(runs):
        listed = raw["runs"][r]["fmri"]
        for i, s in enumerate(subjects):
            path = runs_study.parent / "bold" / f"{s}_{r}.nii.gz"
            if truth["missing"][i, j]:
                assert s not in listed and not path.exists()
            else:
                assert listed[s] == f"bold/{s}_{r}.nii.gz" and nib.load(str(path)).shape[3] == truth["scan_trs"][i, j]
    present = truth["scan_trs"][~truth["missing"]]
    longest = np.broadcast_to(truth["stimulus_trs"], truth["scan_trs"].shape)[~truth["missing"]]
    nominal = np.broadcast_to(truth["n_trs"], truth["scan_trs"].shape)[~truth["missing"]]
    assert (present > longest).any() and (present < nominal).any()  # some to trim, some stopped early
    assert (np.abs(present - nominal) <= 3 + longest - nominal).all()
    assert list(truth["n_trs"]) == [40, 30]


def test_one_sheet_restarts_its_seconds_and_continues_its_tr_numbers(runs_study):
    sheet = pd.read_excel(runs_study.parent / "annotations.xlsx")
    start, first_tr = sheet["Start Time (s) "].to_numpy(), sheet["Start Time (TRs, 1.5s)"].to_numpy()
    end_tr = sheet["End Time (TRs, 1.5s)"].to_numpy()
    back = np.flatnonzero(np.diff(start) < 0)
    assert len(back) == 1 and start[back[0] + 1] == 0  # one restart: run 2's first row
    k = back[0] + 1
    assert first_tr[k] == 40 + 1 and first_tr[0] == 1  # run 1 has 40 TRs
    assert np.nanmax(end_tr[:k]) <= 40 and np.nanmin(first_tr[k:]) == 41 and np.nanmax(end_tr[k:]) <= 70
    text = sheet["Scene Details - A Level "]
    assert (start[0], text[0]) == (start[k], text[k])  # the shared opening, repeated as in the real file
    for rows, seconds in ((slice(0, k), 40 * 1.5 + 3), (slice(k, None), 30 * 1.5 + 3)):
        part = sheet.iloc[rows]
        assert part.drop(columns="Segment Number").duplicated().sum() >= 1  # a repeated row
        past = part[part["Start Time (s) "] >= seconds]  # a row past the movie's end, without TR numbers
        assert len(past) == 1 and past["Start Time (TRs, 1.5s)"].isna().all()
    assert sheet["Segment Number"].tolist() == list(range(1, len(sheet) + 1))


# -- subject-specific responses (issue #19) -------------------------------------------------------------------
@pytest.mark.parametrize("shared", [0.3, 0.7])
def test_subjects_weights_share_the_asked_fraction(tmp_path, shared):
    kw = dict(n_subjects=3, n_trs=[6, 6], shape=(14, 14, 10), movie=False, annotations=False, seed=5)
    truth = np.load(make_study(tmp_path / "a", shared=shared, **kw).parent / "truth.npz")
    w = truth["weights"].reshape(3, -1)
    assert truth["weights"].shape == (3, 14, 14, 10, 5) and not np.allclose(w[0], w[1])
    r = np.corrcoef(w)[np.triu_indices(3, 1)]
    np.testing.assert_allclose(r, shared, atol=0.05)  # 9,800 weights: standard error ~0.01
    same = np.load(make_study(tmp_path / "b", shared=1.0, **kw).parent / "truth.npz")["weights"]
    assert np.array_equal(same[0], same[1]) and np.array_equal(same[1], same[2])


def test_expected_r_is_each_subjects_correlation_of_planted_response_and_bold(tmp_path):
    config = make_study(tmp_path, n_subjects=3, n_trs=[300, 240], shape=(8, 8, 6), movie=False, annotations=False,
                        seed=6, noise=0.03, drift=0.0, subject_spread=0.4, missing=[("sub-02", "run-2")])
    truth = np.load(config.parent / "truth.npz")
    inside, amplitude = truth["inside"], float(truth["amplitude"])
    empirical = []
    for i, s in enumerate(truth["subjects"]):
        response, bold = [], []
        for j, r in enumerate(truth["runs"]):
            if truth["missing"][i, j]:
                continue
            keep = min(truth["scan_trs"][i, j], truth["stimulus_trs"][j])  # trimmed at the movie's end
            x = truth[f"regressors_{r}"][:keep]
            response.append(amplitude * np.einsum("vk,tk->vt", truth["weights"][i][inside], x))
            bold.append(nib.load(str(config.parent / "bold" / f"{s}_{r}.nii.gz")).get_fdata()[inside][:, :keep])
        a, b = np.concatenate(response, 1), np.concatenate(bold, 1)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        empirical.append((a * b).sum(1) / np.sqrt((a**2).sum(1) * (b**2).sum(1)))
    expected = truth["expected_r"][:, inside]
    assert np.ptp(expected.mean(1)) > 0.05  # subjects differ (noise level, weights)
    np.testing.assert_allclose([e.mean() for e in empirical], expected.mean(1), atol=0.01)
    assert np.abs(np.stack(empirical) - expected).mean() < 0.03
    assert not truth["expected_r"][:, ~inside].any()


# -- presets: one demo definition (issues #17, #18) --------------------------------------------------------
def test_demo_preset_and_run_demo_use_the_same_definition(tmp_path, monkeypatch):
    from pipelines.cli import _demo_config

    calls = []
    monkeypatch.setattr(synth, "make_study", lambda root, **kw: calls.append(kw) or Path(root) / "study.yaml")
    _demo_config(tmp_path / "a")
    synth.main([str(tmp_path / "b"), "--preset", "demo"])
    local = ("config_path", "workers", "progress")
    a, b = ({k: v for k, v in kw.items() if k not in local} for kw in calls)
    assert a == b
    assert a["n_trs"] == (80, 64) and a["n_subjects"] == 3 and a["missing"] == [("sub-03", "run-2")]
    assert a["stages"]["audio"]["model"] == "random" and a["output"] == "demo.zarr"


def test_sherlock_preset_has_two_runs_read_by_seconds_or_one_by_trs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(synth, "make_study", lambda root, **kw: calls.append(kw) or Path(root) / "study.yaml")
    synth.main([str(tmp_path), "--preset", "sherlock", "--annotations", str(REAL_XLSX)])
    synth.main([str(tmp_path), "--preset", "sherlock", "--runs", "1"])
    two, one = calls
    assert two["n_trs"] == (946, 1030) and two["shape"] == (61, 73, 61) and two["n_subjects"] == 17
    assert two["movie_size"] == (640, 360) and two["fps"] == 25 and two["annotations_file"] == str(REAL_XLSX)
    assert (two["stages"]["text"]["start_column"], two["stages"]["text"]["time_unit"]) == ("Start Time (s)", "s")
    assert one["n_trs"] == 946 and one["stages"]["text"]["time_unit"] == "tr"


def test_the_sherlock_preset_builds_as_printed_at_a_small_scale(tmp_path, monkeypatch):
    """The two-run Sherlock preset's printed config, with the real sheet copied in, builds as
    printed (the sizes shrunk so it takes seconds: the config and its text rules are the preset's)."""
    import subprocess
    import sys

    import giblet

    small = {**synth.SHERLOCK, "n_trs": (24, 30), "shape": (10, 12, 8), "movie_size": (48, 28), "fps": 10}
    monkeypatch.setattr(synth, "SHERLOCK", small)
    monkeypatch.setitem(synth.SHERLOCK_STAGES, "audio", {"model": "random", "segment_s": 10.0, "workers": None})
    synth.main([str(tmp_path / "s"), "--preset", "sherlock", "--subjects", "2", "--annotations", str(REAL_XLSX),
                "--workers", "1"])
    config = tmp_path / "s" / "study.yaml"
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config), "--no-progress"],
                       capture_output=True, text=True, timeout=900)  # small: in-process by the engine's rule
    assert r.returncode == 0, r.stderr
    s = giblet.open_store(r.stdout.strip().splitlines()[-1])
    assert s.runs == ["run-1", "run-2"]
    # each run's text comes from its own rows of the real sheet: run 2's from data row 483 on
    assert s.unit_meta("text/run-1")["shared_sheet_rows"] == [1, 482]
    assert s.unit_meta("text/run-2")["shared_sheet_rows"] == [483, 1000]
