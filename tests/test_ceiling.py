"""The leave-one-subject-out ISC noise ceiling (giblet.evaluation.ceiling), on a study made here.

An fMRI-only study of two runs: a shared signal per run plus each subject's own noise; sub-03
has no run 2 and sub-04 no run 1; every subject serves its own number of TRs (so some val
TRs have one subject only); one voxel is constant in every scan and one in sub-02's only.
Built once through the CLI (module fixture), copied when a test changes it.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

import giblet
import giblet.evaluation.ceiling as ceiling
from giblet.errors import ConfigError, StoreError
from giblet.evaluation.ceiling import ceiling_name, noise_ceiling, run_stack
from giblet.store import StoreLock
from giblet.verify import verify_store
from tests.test_cli import cli
from tests.conftest import write_nifti as _write_nifti

SHAPE, TR = (4, 3, 2), 2.0
SCANS = {("sub-01", "run-1"): 40, ("sub-02", "run-1"): 34, ("sub-03", "run-1"): 30,
         ("sub-01", "run-2"): 36, ("sub-02", "run-2"): 44, ("sub-04", "run-2"): 44}
CONSTANT, CONSTANT_IN_SUB02 = (0, 0, 0), (3, 2, 1)


def write_nifti(path, data):
    _write_nifti(path, data, TR)


def make_study(root):
    rng = np.random.default_rng(5)
    write_nifti(root / "mask.nii.gz", np.ones(SHAPE, np.uint8))
    shared = {run: rng.normal(size=SHAPE + (44,)) for run in ("run-1", "run-2")}
    runs = {"run-1": {"fmri": {}}, "run-2": {"fmri": {}}}
    for (subject, run), n in SCANS.items():
        data = 1000 + 10 * shared[run][..., :n] + rng.uniform(5, 20, SHAPE)[..., None] * rng.normal(size=SHAPE + (n,))
        data[CONSTANT] = 900
        if subject == "sub-02":
            data[CONSTANT_IN_SUB02] = 950
        write_nifti(root / f"{subject}_{run}.nii.gz", data)
        runs[run]["fmri"][subject] = f"{subject}_{run}.nii.gz"
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump({
        "output": "study.zarr", "tr_s": TR, "runs": runs, "split": {"val_fraction": 0.25},
        "fmri": {"mask_strategy": "file", "mask_file": "mask.nii.gz", "chunk_trs": 8}}, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    config = make_study(tmp_path_factory.mktemp("ceiling"))
    assert (r := cli("run", config, "--no-progress")).returncode == 0, r.stderr
    return config


@pytest.fixture
def study(built, tmp_path):
    shutil.copytree(built.parent, tmp_path / "s")
    return tmp_path / "s" / built.name, tmp_path / "s" / "study.zarr"


def direct_isc(view, split):
    """The definition, TR by TR: r between a subject and the mean of the others having that TR."""
    out = np.zeros((len(view.subjects), view.n_voxels), np.float32)
    for i, s in enumerate(view.subjects):
        xs, ms = [], []
        for run in view.subject_runs(s):
            a, b = view.split_trs(split, run, s)
            for t in range(a, b):
                others = [view.fmri(o, run)[t] for o in view.subjects
                          if o != s and view.has_run(o, run) and t < view.n_trs(run, o)]
                if others:
                    xs.append(view.fmri(s, run)[t])
                    ms.append(np.mean(others, axis=0))
        x, m = np.array(xs, np.float64), np.array(ms, np.float64)
        for v in range(view.n_voxels):
            if len(x) < 2:
                out[i, v] = np.nan
            elif x[:, v].std() > 1e-6 and m[:, v].std() > 1e-6:
                out[i, v] = np.corrcoef(x[:, v], m[:, v])[0, 1]
    return out


def test_the_study_has_the_edge_cases(built):
    view = giblet.open_store(built.parent / "study.zarr")
    assert view.split["val"] == {"run-1": (30, 40), "run-2": (33, 44)}
    assert view.split_trs("val", "run-1", "sub-02") == (30, 34) and view.split_trs("val", "run-1", "sub-03") == (30, 30)
    assert not view.has_run("sub-03", "run-2") and not view.has_run("sub-04", "run-1")


@pytest.mark.parametrize("split", ["val", "train", "all"])
def test_isc_matches_a_direct_computation(built, split):
    view = giblet.open_store(built.parent / "study.zarr")
    got = noise_ceiling(view, split, cache=False)
    want = direct_isc(view, split)
    assert got.subjects == view.subjects and got.isc.shape == (4, view.n_voxels) and not got.cached
    np.testing.assert_allclose(got.isc, want, atol=1e-5)
    measured = ~np.isnan(got.isc).all(1)
    assert (got.isc[measured, np.ravel_multi_index(CONSTANT, SHAPE)] == 0).all()  # no variance: 0
    assert got.isc[1, np.ravel_multi_index(CONSTANT_IN_SUB02, SHAPE)] == 0
    assert measured.all() or split == "val"
    if split == "val":
        # sub-01's run-1 TRs 34-39 have no other subject; sub-03 has no val TR at all
        assert got.n_trs == {"sub-01": 4 + 3, "sub-02": 4 + 11, "sub-03": 0, "sub-04": 11}
        assert np.isnan(got.isc[2]).all() and not np.isnan(got.isc[[0, 1, 3]]).any()
        assert np.mean(got.isc[3]) > 0.2  # the shared signal is found


def test_each_task_holds_one_stored_chunk_of_trs(built):
    view = giblet.open_store(built.parent / "study.zarr")
    stack = run_stack(view, "run-2", "train")
    assert stack.shape == (4, 33, view.n_voxels) and stack.chunks[0] == (4,)
    assert stack.chunks[1] == (8, 8, 8, 8, 1)  # the store's chunk_trs=8 grid from TR 0: no task spans two chunks
    assert np.isnan(stack[2].compute()).all()  # sub-03 has no run 2
    assert run_stack(view, "run-1", "test") is None


def test_saved_cached_verified_and_recomputed_when_the_store_changes(study, monkeypatch):
    config, store = study
    calls = []
    compute = ceiling.loso_isc
    monkeypatch.setattr(ceiling, "loso_isc", lambda *a, **k: calls.append(1) or compute(*a, **k))
    first = noise_ceiling(store, "val")
    view = giblet.open_store(store)
    entry = view.derived(ceiling_name("val"))
    assert entry["basis"] == view.align["fingerprint"] and entry["params"] == {"split": "val", "version": 1}
    assert entry["meta"]["subjects"] == view.subjects and entry["meta"]["runs"]["run-1"]["sub-02"] == [30, 34]
    assert "sub-03" not in entry["meta"]["runs"]["run-1"] and "sub-03" not in entry["meta"]["runs"].get("run-2", {})
    arr = view.array("derived/noise_ceiling-val/isc")
    assert tuple(arr.metadata.dimension_names) == ("subject", "voxel") and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[...], first.isc)
    second = noise_ceiling(store, "val")
    assert len(calls) == 1 and second.cached and second.n_trs == first.n_trs
    np.testing.assert_array_equal(second.isc, first.isc)
    assert verify_store(store) == []
    chunk = store / "derived/noise_ceiling-val/isc/c/0/0"
    good = chunk.read_bytes()
    chunk.write_bytes(good[::-1])
    assert any("derived/noise_ceiling-val/isc: chunk c/0/0 checksum mismatch" in p for p in verify_store(store))
    chunk.write_bytes(good)
    raw = yaml.safe_load(config.read_text())
    raw["split"] = {"val_fraction": 0.4}  # a new align record: the cached ceiling is stale
    config.write_text(yaml.safe_dump(raw))
    assert cli("run", config, "--no-progress").returncode == 0
    assert giblet.open_store(store).derived(ceiling_name("val")) is None
    third = noise_ceiling(store, "val")
    assert len(calls) == 2 and not third.cached
    np.testing.assert_allclose(third.isc, direct_isc(giblet.open_store(store), "val"), atol=1e-5)
    assert verify_store(store) == []


def test_a_locked_or_rebuilt_store_is_not_written(study):
    config, store = study
    with StoreLock(store):  # a build is running
        with pytest.raises(StoreError, match="locked by another run"):
            noise_ceiling(store, "val")
    view = giblet.open_store(store)
    raw = yaml.safe_load(config.read_text())
    raw["split"] = {"val_fraction": 0.4}
    config.write_text(yaml.safe_dump(raw))
    assert cli("run", config, "--no-progress").returncode == 0
    with pytest.raises(StoreError, match="rebuilt while derived/noise_ceiling-val was computed"):
        noise_ceiling(view, "val")  # opened before the rebuild
    assert giblet.open_store(store).derived(ceiling_name("val")) is None


def test_errors(built):
    view = giblet.open_store(built.parent / "study.zarr")
    with pytest.raises(StoreError, match="split 'test' has no TR.*split.test_runs"):
        noise_ceiling(view, "test", cache=False)
    with pytest.raises(ConfigError, match="'vall'"):
        noise_ceiling(view, "vall", cache=False)
