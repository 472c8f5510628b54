"""Audio speed (issue 23): the stream encode path against transformers' eager encode, torch
threads, the fallback, and in-process builds against LocalCluster builds."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
import yaml

from giblet.config import load_config
from giblet.features import audio, encodec_stream
from giblet.features.media import task_threads, torch_threads
from giblet.store import read_manifest
from giblet.synth import make_study, scenes, write_movie
from giblet.synth_stimulus import speech_like
from pipelines import cli as giblet_cli
from pipelines import engine
from pipelines.cluster import CELLS_PER_S, CLUSTER_START_S, Cluster

AGREEMENT = 0.999  # the bar for a default-on fast path (measured here: 1.0 and 0.99994)
WINDOWS = {"bandwidth": 3.0, "segment_s": 2.0, "context_s": 1.0, "batch_size": 3}  # several windows and groups


@pytest.fixture(scope="module")
def model():
    return audio.build_random_model(seed=3)


@functools.lru_cache(maxsize=None)
def movie_track(tmp: str) -> np.ndarray:
    """The soundtrack of a giblet.synth movie (tones per scene, AAC, 44.1 kHz stereo), at 24 kHz."""
    rng = np.random.default_rng(4)
    path = f"{tmp}/movie.mp4"
    write_movie(path, scenes(5.0, rng), 5.0, size=(32, 18), fps=5, rng=rng)
    return audio.read_waveform(path, "movie", 24000, 0.0)[0]


@pytest.fixture(scope="module")
def signals(tmp_path_factory) -> dict:
    return {"movie track": movie_track(str(tmp_path_factory.mktemp("track"))),
            "speech-like": speech_like(5.0, seed=1)[:-77]}  # ends off a code frame: the last window is partial


def test_stream_path_agrees_with_eager_on_a_movie_track_and_speech(model, signals):
    for name, wave in signals.items():
        k = len(wave) // 320
        with torch_threads(1):  # an OpenMP team crawls on a loaded machine (tests run 2 files at once)
            eager = audio.encode_frames(model, wave, 0, k, path="eager", **WINDOWS)
        stream = audio.encode_frames(model, wave, 0, k, path="stream", **WINDOWS)
        assert len(np.unique(eager)) > 20, name  # codes that follow the audio, not a constant
        assert stream.shape == eager.shape and stream.dtype == np.int16
        assert (stream == eager).mean() >= AGREEMENT, (name, (stream == eager).mean())
        part = audio.encode_frames(model, wave, 200, 340, path="stream", **WINDOWS)  # a task's span
        assert (part == stream[:, 200:340]).mean() >= AGREEMENT, name


def test_stream_codes_do_not_depend_on_threads_or_chunking(model, signals, monkeypatch):
    monkeypatch.setattr(encodec_stream, "BACK_FRAMES", 400)  # a group per window: two threads share the work
    wave = signals["speech-like"][:96000]  # 4 s
    small = encodec_stream.StreamEncoder(model, chunk_frames=5)  # chunks not much longer than their margin
    assert small.margin >= 1
    with torch_threads(1):
        one = encodec_stream.for_model(model).encode([wave[:48000], wave], 3.0)
        with torch.inference_mode():  # chunks rebuild the window's front (to float rounding: oneDNN may pick
            whole = encodec_stream.StreamEncoder(model, chunk_frames=10**6)._front(wave)  # other kernels)
            torch.testing.assert_close(small._front(wave), whole, rtol=1e-5, atol=1e-5)
            no_margin = encodec_stream.StreamEncoder(model, chunk_frames=5)
            no_margin.margin = 0  # each chunk starts cold: its first frames differ (why the margin exists)
            assert not torch.allclose(no_margin._front(wave), whole, rtol=1e-3, atol=1e-3)
    two = encodec_stream.for_model(model).encode([wave[:48000], wave], 3.0, threads=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))  # bit-identical codes with 1 and 2 threads


def test_threads_rule():
    from pipelines.engine import task_slots

    workers = {"tcp://a": {"nthreads": 1}, "tcp://b": {"nthreads": 1}, "tcp://c": {"nthreads": 2}}
    assert task_slots(workers, 1) == 2 and task_slots(workers, None) == 4 and task_slots({}, None) == 1
    assert task_threads(3, 1) == 3
    assert task_threads(None, 1) == len(os.sched_getaffinity(0))  # one audio task at a time: every core
    assert task_threads(None, None) == 1  # any number of audio tasks at once: one thread each, as before
    assert task_threads(None, 10**6) == 1


def test_fallback_for_a_model_the_stream_path_cannot_run(model, tmp_path):
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    noncausal = EncodecModel(EncodecConfig(**{**audio.ENCODEC_24KHZ, "use_causal_conv": False})).eval()
    path, note = encodec_stream.choose(noncausal, "stream")
    assert path == "eager" and "not causal" in note and "audio.fast_path=stream" in note
    assert encodec_stream.choose(noncausal, "auto")[0] == "eager"
    assert encodec_stream.choose(model, "auto") == ("stream", None)
    assert encodec_stream.choose(model, "eager") == ("eager", None)
    with pytest.raises(encodec_stream.Unsupported, match="not causal"):
        encodec_stream.StreamEncoder(noncausal)

    # through the engine: the fallback is logged and recorded, and the codes are the eager ones
    noncausal.save_pretrained(tmp_path / "noncausal")
    rng = np.random.default_rng(0)
    write_movie(tmp_path / "m.mp4", scenes(4.0, rng), 4.0, size=(32, 18), fps=5, rng=rng)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"output": "s.zarr", "inputs": {"movie": "m.mp4"}, "audio": {
        "model": str(tmp_path / "noncausal"), "fast_path": "stream", "segment_s": 2.0, "threads": 1}}))
    lines = []
    report = engine.run(load_config(config), only=["audio"], progress=False, log=lines.append)
    meta = read_manifest(report.store)["units"]["audio/run-1"]["meta"]
    assert meta["fast_path"] == "eager" and len(meta["warnings"]) == 1 and "not causal" in meta["warnings"][0]
    assert any(line.startswith("audio/run-1: warning: audio.fast_path=stream") for line in lines), lines
    assert "fast_path_agreement" not in meta
    import zarr

    codes = zarr.open_array(report.store / "stimuli/run-1/audio/codes", mode="r")[:]
    wave = audio.read_waveform(str(tmp_path / "m.mp4"), "movie", 24000, 0.0)[0]
    starts = audio.tr_start_frames(len(codes), 1.5, 75.0)
    with torch_threads(1):  # as the task ran it (audio.threads=1: the eager path's floats follow the threads)
        eager = audio.encode_frames(noncausal, wave, 0, int(starts[-1]) + 112, bandwidth=3.0, segment_s=2.0,
                                    context_s=1.0, batch_size=8, path="eager")
    assert np.array_equal(codes, np.stack([eager[:, s:s + 112] for s in starts]))


# -- in-process builds --------------------------------------------------------------------------

def test_in_process_rule():
    def mode(workers=None, scheduler=None, cells=0, cores=2):
        c = Cluster(scheduler, workers)
        c.workers = cores if workers is None else c.workers  # the default LocalCluster size on this machine
        c.choose(cells)
        return c.in_process

    small = int(CLUSTER_START_S * CELLS_PER_S)  # at 2 workers, saves half of it: under the start-up
    assert mode(cells=small) and mode(cells=0)
    assert not mode(cells=3 * small)  # saves 1.5x the start-up: a LocalCluster
    assert mode(cells=10**12, cores=1)  # one core: a LocalCluster never saves time
    assert not mode(workers=1) and not mode(workers=2) and mode(workers=0)  # forced either way
    assert not mode(scheduler="tcp://127.0.0.1:1", cells=0)
    with pytest.raises(SystemExit) as exit_:
        giblet_cli.main(["run", "x.yaml", "--in-process", "--workers", "2"])
    assert exit_.value.code == 2


def _same_stores(a_path, b_path) -> dict:
    """Every array's chunk and zarr.json checksums equal in two stores' manifests; ``a``'s units."""
    a, b = read_manifest(a_path)["units"], read_manifest(b_path)["units"]
    assert sorted(a) == sorted(b)
    for key, entry in a.items():
        for name, rec in entry["arrays"].items():
            assert rec["checksums"] == b[key]["arrays"][name]["checksums"], (key, name)
        assert entry["fingerprint"] == b[key]["fingerprint"]
    assert all(w.startswith("inproc://") for e in a.values() for w in e["ran_on"])
    assert all(w.startswith("tcp://127.0.0.1:") for e in b.values() for w in e["ran_on"])
    return a


def test_in_process_and_cluster_builds_are_bit_identical(fmri_study, monkeypatch):
    """The same fMRI study in-process (BLAS single-threaded in the worker thread, as in a
    worker process) and on a LocalCluster: equal checksums of every chunk and zarr.json."""
    monkeypatch.chdir(fmri_study.parent)  # an output override is relative to the working directory
    lines = []
    inproc = engine.run(load_config(fmri_study), progress=False, log=lines.append)
    assert any(line.startswith("running in-process") for line in lines), lines
    local = engine.run(load_config(fmri_study, ["output=cluster.zarr"]), workers=1, progress=False, log=lambda m: None)
    assert len(_same_stores(inproc.store, local.store)) == 4  # the mask and 3 subjects


@pytest.mark.slow  # ~15-25 s: a LocalCluster whose worker imports torch, transformers and the sentence model
def test_in_process_and_cluster_builds_of_every_stage_are_bit_identical(tmp_path, monkeypatch):
    """fMRI (numpy, BLAS), video (PyAV, OpenCV), audio (torch, the stream path's thread pool)
    and text (torch threads) both ways, same folder."""
    monkeypatch.chdir(tmp_path)
    config = make_study(tmp_path / "s", n_subjects=1, n_trs=10, shape=(6, 7, 5), seed=2, fps=5, movie_size=(32, 18),
                        stages={"audio": {"model": "random", "segment_s": 4.0, "chunk_trs": 4},
                                "fmri": {"mask_strategy": "background"}})
    inproc = engine.run(load_config(config), progress=False, log=lambda m: None)
    local = engine.run(load_config(config, ["output=s/cluster.zarr"]), workers=1, progress=False, log=lambda m: None)
    a = _same_stores(inproc.store, local.store)
    assert {k.split("/")[0] for k in a} == {"fmri", "video", "audio", "text"}
    meta = a["audio/run-1"]["meta"]  # the path and the threads are recorded
    assert meta["fast_path"] == "stream" and meta["threads"] == [task_threads(None, 1)]
    assert meta["fast_path_agreement"] >= AGREEMENT and meta["agreement_codes"] > 0 and meta["warnings"] == []
