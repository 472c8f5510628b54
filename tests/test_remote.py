"""Stores on object storage, against a real S3 API server (moto in server mode, on loopback).

One tiny study (2 subjects x 20 TRs of fMRI and a small movie) is built once into a bucket
and once into a local folder, on one LocalCluster shared by every build of the module; the
tests read, stream, train on, race, kill and clean that bucket (docs/store.md, *Stores on
object storage*).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import giblet
from giblet.config import load_config
from giblet.errors import StoreError
from giblet.synth import make_study
from giblet.verify import verify_store
from pipelines import engine
from tests.s3_server import SECRET, make_bucket, moto_server, s3_environment

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"


@pytest.fixture(scope="module")
def s3():
    with moto_server() as endpoint, s3_environment(endpoint):
        yield endpoint


@pytest.fixture(scope="module")
def scheduler(s3):
    """One single-thread worker in this process for every build here: no process to start and
    warm up per build (the killed runs below are separate processes that connect to it)."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("remote_study"), n_subjects=2, n_trs=20, shape=(10, 12, 8),
                      movie_size=(64, 36), audio_track=False, annotations=False, seed=4,
                      stages={"video": {"width": 32, "height": 18, "chunk_trs": 8}, "fmri": {"chunk_trs": 8}})


@pytest.fixture(scope="module")
def built(s3, scheduler, study) -> tuple[str, Path]:
    """``(url, local store)``: the same config built into the bucket and into a folder."""
    url = f"{make_bucket('giblet-test')}/study.zarr"
    engine.run(load_config(study, [f"output={url}"]), scheduler=scheduler, progress=False)
    local = engine.run(load_config(study), scheduler=scheduler, progress=False).store
    return url, Path(local)


def arrays(view) -> dict[str, np.ndarray]:
    return {name: view.array(name)[...] for name in sorted(view._arrays)}


def assert_same_arrays(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def bucket_objects(prefix: str) -> dict[str, bytes]:
    from giblet.location import RemoteLocation

    loc = RemoteLocation(prefix)
    return loc.cat(sorted(loc.files("")))


def _copy(url: str, name: str) -> str:
    from giblet.location import RemoteLocation

    src, dst = RemoteLocation(url), RemoteLocation(f"{url.rsplit('/', 1)[0]}/{name}")
    src.fs.copy(src.root, dst.root, recursive=True)
    return dst.url


# -- build, verify, read --------------------------------------------------------------------------
def test_a_store_built_into_a_bucket_verifies_and_reads_equal_to_a_local_build(built, s3, capsys):
    from pipelines.cli import main

    url, local = built
    assert main(["verify", url]) == 0 and capsys.readouterr().out.strip() == f"{url}: ok"
    view = giblet.open_store(url, verify="chunks")
    assert str(view.path) == url and view.subjects == ["sub-01", "sub-02"]
    assert_same_arrays(arrays(view), arrays(giblet.open_store(local)))
    # every array lives under its build attempt; the manifest names it
    paths = [rec["path"] for e in view.manifest["units"].values() for rec in e["arrays"].values()]
    assert paths and all(p.startswith("attempts/") for p in paths)
    ds = view.to_xarray()
    np.testing.assert_array_equal(ds["fmri"].values[1], view.fmri("sub-02"))
    assert ds.attrs["store"] == url
    # neither the credentials nor the endpoint are written anywhere in the store
    for key, raw in bucket_objects(url).items():
        assert SECRET.encode() not in raw and s3.encode() not in raw, key


def test_a_corrupted_file_in_the_chunk_cache_is_read_again_from_the_bucket(built, tmp_path):
    url, _ = built
    first = giblet.open_store(url, cache_dir=tmp_path).fmri("sub-01")
    cached = sorted(p for p in tmp_path.rglob("*") if p.is_file() and "/bold/c/" in p.as_posix())
    assert cached
    cached[0].write_bytes(b"corrupted")
    np.testing.assert_array_equal(giblet.open_store(url, cache_dir=tmp_path).fmri("sub-01"), first)
    assert cached[0].read_bytes() != b"corrupted"  # replaced by what the bucket holds


# -- streaming and training -------------------------------------------------------------------------
def test_a_dataloader_epoch_streams_from_the_bucket_through_a_local_chunk_cache(built, tmp_path):
    from giblet.data import GibletDataset

    url, local = built
    remote = GibletDataset(url, "train", cache_dir=tmp_path / "cache")
    reference = GibletDataset(local, "train")
    loader = torch.utils.data.DataLoader(remote, batch_size=8, num_workers=2)
    seen = []
    for batch in loader:
        for i, index in enumerate(batch["index"].tolist()):
            want = reference[index]
            assert all(torch.equal(batch[k][i], want[k]) for k in want), index
            seen.append(index)
    assert sorted(seen) == list(range(len(reference)))
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached and all("/attempts/" in p.as_posix() for p in cached)


@pytest.mark.slow  # ~5 s of training; the store URL reaching the dataset is the default tier's concern
def test_a_few_training_steps_read_the_bucket(built, tmp_path):
    from pipelines.train import load_train_config, train

    url, _ = built
    cfg = load_train_config(TINY, [f"store={url}", f"out={tmp_path / 'run'}", "schedule.epochs=1",
                                   "log.val_every=2", "log.ckpt_every=2", "loss.weights.audio=0",
                                   "loss.weights.text=0"])
    train(cfg)
    log = (tmp_path / "run" / "log.jsonl").read_text()
    steps = [json.loads(line) for line in log.splitlines() if json.loads(line)["kind"] == "train"]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)
    assert SECRET not in log


# -- the commit protocol --------------------------------------------------------------------------
def test_a_run_that_read_the_manifest_before_another_committed_loses_in_one_line_and_gc_cleans(
        built, study, scheduler, monkeypatch, capsys):
    from giblet.objstore import open_writer
    from pipelines.cli import main

    url = _copy(built[0], "race.zarr")
    cfg = load_config(study, [f"output={url}"])
    loser = open_writer(url)  # reads the manifest (and its ETag) now
    engine.run(cfg, force=True, only=["video"], scheduler=scheduler, progress=False)  # the other run commits
    monkeypatch.setattr(engine, "open_writer", lambda store: loser)
    with pytest.raises(StoreError) as exc:
        engine.run(cfg, force=True, only=["video"], scheduler=scheduler, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and "another run committed to this store" in msg and "gc" in msg
    monkeypatch.undo()
    assert verify_store(url, invariants=False) == []  # the winner's store, complete
    assert main(["gc", url, "--min-age", "0"]) == 0  # a dry run lists the loser's attempt
    listed = capsys.readouterr().out
    assert "1 orphan(s)" in listed and "attempts/video__run-1-" in listed and "--yes" in listed
    assert main(["gc", url, "--min-age", "0", "--yes"]) == 0
    assert main(["gc", url, "--min-age", "0"]) == 0 and "0 orphan(s)" in capsys.readouterr().out
    assert verify_store(url, invariants=False) == []
    assert_same_arrays(arrays(giblet.open_store(url)), arrays(giblet.open_store(built[0])))
    # verify reads every file: an edited chunk and a planted one are reported, a checked read refuses
    from giblet.location import RemoteLocation

    rec = giblet.open_store(url).manifest["units"]["video/run-1"]["arrays"]["stimuli/run-1/video/frames"]
    RemoteLocation(url).write_bytes(f"{rec['path']}/c/1/0/0/0/0", b"not a chunk")
    RemoteLocation(url).write_bytes(f"{rec['path']}/c/9/0/0/0/0", b"planted")
    problems = verify_store(url, invariants=False)
    assert len(problems) == 2 and "unexpected file c/9/0/0/0/0" in problems[0] and \
        "chunk c/1/0/0/0/0 checksum mismatch" in problems[1]
    with pytest.raises(StoreError, match="does not match its checksum"):
        giblet.open_store(url, verify="chunks").video()


def test_gc_leaves_a_young_attempt_alone_by_default(built):
    from giblet.location import RemoteLocation
    from giblet.orphans import find_orphans

    url = f"{built[0].rsplit('/', 1)[0]}/young.zarr"
    RemoteLocation(url).write_bytes("attempts/video__run-1-0123456789abcdef-000000000000/attempt.json", b"{}")
    assert find_orphans(url) == []
    assert [o.name for o in find_orphans(url, min_age_s=0)] == ["attempts/video__run-1-0123456789abcdef-000000000000"]


def _run_killed(config: Path, url: str, scheduler: str, step: str, unit: str) -> None:
    from giblet.store import KILL_ENV

    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(config), f"output={url}", "--scheduler", scheduler,
           "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, KILL_ENV: f"{step}:{unit}"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _committed_units_are_whole(url: str, reference: dict) -> set[str]:
    """Every unit the manifest names reads back equal to the reference; returns their keys."""
    import zarr

    from giblet.location import RemoteLocation
    from giblet.store import read_manifest

    loc = RemoteLocation(url)
    manifest = read_manifest(loc)
    for entry in manifest["units"].values():
        for name, rec in entry["arrays"].items():
            np.testing.assert_array_equal(zarr.open_array(loc.url_of(rec["path"]), mode="r")[...], reference[name])
    return set(manifest["units"])


def test_sigkill_before_the_commit_point_shows_nothing_and_the_rerun_resumes_the_attempt(built, study, scheduler):
    from giblet.location import RemoteLocation

    url = f"{built[0].rsplit('/', 1)[0]}/crash.zarr"
    reference = arrays(giblet.open_store(built[1]))
    _run_killed(study, url, scheduler, "checksummed", "fmri/sub-01/run-1")  # read back, checksummed, not PUT
    assert "fmri/sub-01/run-1" not in _committed_units_are_whole(url, reference)
    with pytest.raises(StoreError, match="incomplete"):
        giblet.open_store(url)
    left = [a for a in RemoteLocation(url).children("attempts") if a.startswith("fmri__sub-01__run-1-")]
    engine.run(load_config(study, [f"output={url}"]), scheduler=scheduler, progress=False)
    view = giblet.open_store(url)
    assert len(left) == 1 and view.manifest["units"]["fmri/sub-01/run-1"]["arrays"]["fmri/sub-01/run-1/bold"][
        "path"].startswith(f"attempts/{left[0]}/")  # resumed: its finished task was not run again
    assert verify_store(url) == []
    assert_same_arrays(arrays(view), reference)


@pytest.mark.slow  # two killed runs
def test_sigkill_in_the_commit_shows_nothing_half_written_and_the_rerun_resumes(built, study, scheduler):
    url = f"{built[0].rsplit('/', 1)[0]}/crash2.zarr"
    reference = arrays(giblet.open_store(built[1]))
    _run_killed(study, url, scheduler, "checksummed", "fmri/sub-01/run-1")
    assert "fmri/sub-01/run-1" not in _committed_units_are_whole(url, reference)
    _run_killed(study, url, scheduler, "recorded", "fmri/sub-02/run-1")  # right after its PUT
    assert {"fmri/sub-01/run-1", "fmri/sub-02/run-1"} <= _committed_units_are_whole(url, reference)
    with pytest.raises(StoreError, match="incomplete"):  # committed, not yet aligned
        giblet.open_store(url)
    report = engine.run(load_config(study, [f"output={url}"]), scheduler=scheduler, progress=False)
    assert report.ran == []  # every unit was committed by the killed runs: only the align step is left
    assert verify_store(url) == []
    assert_same_arrays(arrays(giblet.open_store(url)), reference)
    from giblet.orphans import find_orphans

    assert find_orphans(url, min_age_s=0) == []


# -- inputs given by URL ------------------------------------------------------------------------------
def _upload_inputs(study: Path, bucket: str) -> list[str]:
    """The study's BOLD files and movie, uploaded; returns the config overrides naming their URLs."""
    from giblet.location import RemoteLocation

    loc, overrides = RemoteLocation(f"{bucket}/inputs"), []
    for key, rel in (("inputs.fmri.sub-01", "bold/sub-01.nii.gz"), ("inputs.fmri.sub-02", "bold/sub-02.nii.gz"),
                     ("inputs.movie", "movie.mp4")):
        loc.write_bytes(rel, (study.parent / rel).read_bytes())
        overrides.append(f"{key}={loc.url_of(rel)}")
    return overrides


def test_an_input_given_by_url_is_fetched_to_scratch_again_when_it_changes_and_cleaned_up(
        built, study, tmp_path, monkeypatch):
    from giblet import inputs
    from giblet.location import RemoteLocation

    monkeypatch.setenv("GIBLET_SCRATCH", str(tmp_path / "scratch"))
    bucket = built[0].rsplit("/", 1)[0]
    overrides = _upload_inputs(study, bucket)
    cfg = load_config(study, overrides)
    url = cfg.inputs.fmri["sub-01"]
    assert url == f"{bucket}/inputs/bold/sub-01.nii.gz"  # kept as written, never resolved as a path
    path = cfg.input_path(url)
    want = (study.parent / "bold" / "sub-01.nii.gz").read_bytes()
    assert path.is_relative_to(tmp_path / "scratch") and path.read_bytes() == want
    path.unlink()  # a Dask worker on another machine has no copy: its task fetches one first
    inputs.FETCHED.clear()
    assert inputs.call_with_inputs(lambda p: Path(p).read_bytes(), {str(path): url}, p=str(path)) == want
    RemoteLocation(url).fs.pipe_file(RemoteLocation(url).root, b"changed")
    assert inputs.fetch(url).read_bytes() == b"changed"
    inputs.cleanup()
    assert not path.exists() and inputs.FETCHED == {}


@pytest.mark.slow  # a third build
def test_a_build_from_inputs_given_by_url_equals_the_local_build(built, study, scheduler, tmp_path, monkeypatch):
    monkeypatch.setenv("GIBLET_SCRATCH", str(tmp_path / "scratch"))
    overrides = _upload_inputs(study, built[0].rsplit("/", 1)[0])
    out = tmp_path / "from_urls.zarr"
    engine.run(load_config(study, overrides + [f"output={out}"]), scheduler=scheduler, progress=False)
    assert_same_arrays(arrays(giblet.open_store(out)), arrays(giblet.open_store(built[1])))
    assert not any(p.is_file() for p in (tmp_path / "scratch").rglob("*"))  # the copies are gone


@pytest.mark.slow  # two real builds at once (~20 s on 2 cores)
def test_two_concurrent_builds_on_one_store_one_commits_the_other_fails_in_one_line(built, study):
    url = f"{built[0].rsplit('/', 1)[0]}/concurrent.zarr"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(study), f"output={url}", "--workers", "1",
           "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    err = next(e for code, e in results if code == 1).strip().splitlines()[-1]
    assert err.startswith("giblet-preprocess: error: ") and "another run committed to this store" in err
    assert verify_store(url) == []
