"""Never act on a path giblet did not make; verify and open_store cover every byte they serve.

One small fMRI-only store is built once (module fixture) and copied per test; each test
then tampers with the copy the way a careless hand or a hostile file would.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import yaml

import giblet
from giblet.errors import StoreError
from giblet.store import manifest_digest
from giblet.verify import verify_store
from tests.test_cli import _one_line_error, cli, store_arrays


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An fMRI-only study of two runs (sub-03 lacks run 2), built once through the CLI."""
    from giblet.synth import make_study

    root = tmp_path_factory.mktemp("integrity")
    one = make_study(root / "one", n_subjects=3, n_trs=20, shape=(9, 10, 8), movie=False, annotations=False, seed=7)
    raw = yaml.safe_load(one.read_text())
    fmri = {k: str(one.parent / v) for k, v in raw["inputs"]["fmri"].items()}
    runs = {"run-1": {"fmri": fmri}, "run-2": {"fmri": {k: v for k, v in fmri.items() if k != "sub-03"}}}
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump({"output": "study.zarr", "tr_s": 1.5, "runs": runs,
                                      "fmri": {"chunk_trs": 8}}))
    r = cli("run", config, "--no-progress")
    assert r.returncode == 0, r.stderr
    return config


@pytest.fixture
def study(built, tmp_path):
    shutil.copytree(built.parent, tmp_path / "s", symlinks=True)
    config = tmp_path / "s" / built.name
    return config, config.parent / "study.zarr"


def _edit_manifest(store, edit, fix_digest=True):
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    if fix_digest:  # a deliberate edit that also recomputes the digest: the path checks must still hold
        m["digest"] = manifest_digest(m)
    path.write_text(json.dumps(m))


def _tree(folder):
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def _outside(tmp_path):
    victim = tmp_path / "outside"
    (victim / "keep").mkdir(parents=True)
    (victim / "keep" / "precious.txt").write_text("do not delete")
    return victim


@pytest.mark.parametrize("name", ["../../outside", "../outside/keep", "/ABS/outside", "fmri/../../../outside",
                                  "fmri/.hidden", ""])
def test_manifest_path_outside_the_store_touches_nothing(study, tmp_path, name):
    config, store = study
    victim = _outside(tmp_path)
    name = name.replace("/ABS/outside", str(victim))
    before_tree = _tree(store)

    def plant(m):  # a unit no longer in the config: a plain run would remove it and its arrays
        m["units"]["fmri/sub-09/run-1"] = {"stage": "fmri", "fingerprint": "0" * 16, "arrays": {name: {
            "shape": [1], "dtype": "bool", "chunks": [1], "dims": ["x"], "checksums": {}}}}
        m["align"]["units"] = {k: e["fingerprint"] for k, e in m["units"].items()}

    _edit_manifest(store, plant)
    before_tree = [t for t in _tree(store) if t[0] != "manifest.json"]
    r = cli("run", config, "--no-progress")
    _one_line_error(r, "not a plain relative path inside the store")
    assert (victim / "keep" / "precious.txt").read_text() == "do not delete"
    assert [t for t in _tree(store) if t[0] != "manifest.json"] == before_tree  # nothing in the store changed
    with pytest.raises(StoreError, match="plain relative path"):
        giblet.open_store(store)
    assert any("plain relative path" in p for p in verify_store(store))


def test_symlinked_array_folder_pointing_outside_is_never_deleted(study, tmp_path):
    config, store = study
    victim = _outside(tmp_path)
    target = store / "fmri" / "sub-02" / "run-2"
    shutil.rmtree(target)
    os.symlink(victim, target)  # fmri/sub-02/run-2 now leads outside
    raw = yaml.safe_load(config.read_text())
    del raw["runs"]["run-2"]["fmri"]["sub-02"]  # the run would delete sub-02's run-2 arrays
    config.write_text(yaml.safe_dump(raw))
    r = cli("run", config, "--no-progress")
    _one_line_error(r, "outside the store")
    assert (victim / "keep" / "precious.txt").read_text() == "do not delete"


@pytest.mark.parametrize("where", [".giblet/staging", ".giblet/lock", ".giblet"])
def test_planted_links_in_the_meta_folder_are_refused(study, tmp_path, where):
    config, store = study
    victim = _outside(tmp_path)
    path = store / where
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.symlink(victim if where != ".giblet/lock" else victim / "keep" / "precious.txt", path)
    raw = yaml.safe_load(config.read_text())
    raw["fmri"]["detrend"] = True  # every subject unit runs again: staging is used
    config.write_text(yaml.safe_dump(raw))
    r = cli("run", config, "--no-progress")
    _one_line_error(r)
    assert "symbolic link" in r.stderr or "outside the store" in r.stderr, r.stderr
    assert (victim / "keep" / "precious.txt").read_text() == "do not delete"
    assert sorted(p.name for p in (victim / "keep").iterdir()) == ["precious.txt"]


def test_edited_align_record_is_refused_and_a_recomputed_digest_is_caught(study):
    _, store = study
    _edit_manifest(store, lambda m: m["align"]["runs"]["run-1"].__setitem__("n_trs", 5), fix_digest=False)
    with pytest.raises(StoreError, match="does not match its digest"):
        giblet.open_store(store)
    assert any("digest" in p for p in verify_store(store))

    def consistent_edit(m):  # a careful edit: the digest recomputed too
        m["align"]["runs"]["run-1"]["split"]["train"] = [0, 3]

    _edit_manifest(store, lambda m: None, fix_digest=True)
    _edit_manifest(store, consistent_edit)
    problems = verify_store(store)
    assert any("split" in p and "run-1" in p for p in problems), problems


def test_edited_study_attributes_and_missing_group_metadata(study):
    config, store = study
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["giblet"]["tr_s"] = 2.0
    (store / "zarr.json").write_text(json.dumps(root))
    (store / "fmri" / "sub-01" / "zarr.json").unlink()
    problems = verify_store(store)
    assert any("group / " in p and "checksum mismatch" in p for p in problems), problems
    assert any("group fmri/sub-01" in p and "missing" in p for p in problems), problems
    assert any("tr_s 2.0" in p for p in problems), problems
    assert cli("verify", store).returncode == 1
    r = cli("run", config, "--no-progress")  # writes the group metadata again
    assert r.returncode == 0, r.stderr
    assert verify_store(store) == []
    import xarray as xr

    ds = xr.open_zarr(store, group="fmri/sub-01/run-1", consolidated=False)
    assert ds["bold"].dims == ("tr", "voxel")


def test_missing_chunk_is_an_error_never_zeros_and_flipped_bytes_are_caught_on_request(study):
    _, store = study
    (store / "fmri/sub-01/run-1/bold/c/1/0").unlink()
    s = giblet.open_store(store)
    with pytest.raises(StoreError, match="missing although the manifest lists it"):
        s.fmri("sub-01", "run-1")
    assert s.fmri("sub-02", "run-1").shape[0] == 20  # other arrays still serve
    chunk = store / "fmri/sub-02/run-1/bold/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF  # flip the last byte: may still decode -- only the checksum can tell
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match its checksum"):
        giblet.open_store(store, verify="chunks").fmri("sub-02", "run-1")
    problems = verify_store(store)
    assert any("c/1/0 is missing" in p for p in problems) and any("chunk c/0/0 checksum" in p for p in problems)


def test_edited_array_metadata_is_caught(study):
    _, store = study
    meta_path = store / "fmri/sub-01/run-1/mean/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["units"] = "volts"
    meta_path.write_text(json.dumps(meta))
    assert any("fmri/sub-01/run-1/mean: metadata" in p for p in verify_store(store))


@pytest.mark.parametrize("name", ["mask", "voxels"])
def test_reserved_subject_names_are_refused_before_anything_is_touched(study, name):
    config, store = study
    before = store_arrays(store)
    manifest = (store / "manifest.json").read_text()
    raw = yaml.safe_load(config.read_text())
    raw["runs"]["run-1"]["fmri"][name] = raw["runs"]["run-1"]["fmri"]["sub-01"]
    config.write_text(yaml.safe_dump(raw))
    r = cli("run", config, "--no-progress")
    _one_line_error(r, "reserved", name)
    assert (store / "manifest.json").read_text() == manifest
    after = store_arrays(store)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert verify_store(store) == []


def test_a_view_opened_before_a_rebuild_fails_clearly_when_checked(study):
    config, store = study
    view = giblet.open_store(store, verify="chunks")
    raw = yaml.safe_load(config.read_text())
    raw["fmri"]["detrend"] = True
    config.write_text(yaml.safe_dump(raw))
    assert cli("run", config, "--no-progress").returncode == 0
    with pytest.raises(StoreError, match="reopen the store"):
        view.fmri("sub-01", "run-1")
    assert giblet.open_store(store).generation > view.generation


def test_a_derived_result_is_served_while_its_basis_holds_and_verified(study):
    from giblet.store import StoreLock, StoreWriter, create_array

    config, store = study
    s = giblet.open_store(store)
    writer = StoreWriter(store)
    staging = store / ".giblet" / "staging" / "derived-test"
    arr = create_array(staging, "derived/test-val/isc", (3, s.n_voxels), "float32", (3, s.n_voxels),
                       ("subject", "voxel"))
    arr[...] = np.arange(3 * s.n_voxels, dtype=np.float32).reshape(3, -1)
    with StoreLock(store):
        writer.commit_derived("derived/test-val", {"basis": s.align["fingerprint"], "params": {"split": "val"}},
                              staging, ["derived/test-val/isc"])
    s = giblet.open_store(store)
    assert s.derived("derived/test-val")["params"] == {"split": "val"}
    assert s.array("derived/test-val/isc")[1, 0] == s.n_voxels
    assert verify_store(store) == []
    chunk = store / "derived/test-val/isc/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[::-1])
    assert any("derived/test-val/isc: chunk c/0/0 checksum mismatch" in p for p in verify_store(store))
    chunk.write_bytes(chunk.read_bytes()[::-1])
    raw = yaml.safe_load(config.read_text())
    raw["split"] = {"val_runs": ["run-2"]}  # a new align record: the result is stale, never served
    config.write_text(yaml.safe_dump(raw))
    assert cli("run", config, "--no-progress").returncode == 0
    s = giblet.open_store(store)
    assert s.derived("derived/test-val") is None and not s.has("derived/test-val/isc")
    assert verify_store(store) == []
