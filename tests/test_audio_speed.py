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
from giblet.errors import InputError
from giblet.features import audio, encodec_stream, encodec_torch
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
    spec = encodec_stream.spec_of(model)
    small = encodec_stream.StreamEncoder(spec, chunk_frames=5)  # chunks not much longer than their margin
    assert small.margin >= 1
    windows = [wave[:48000], wave, wave[:24000]]  # three groups: the pipeline holds two at a time
    with torch_threads(1):
        one = encodec_stream.for_model(model).encode(windows, 3.0)
        with torch.inference_mode():  # chunks rebuild the window's front (to float rounding: oneDNN may pick
            whole = encodec_stream.StreamEncoder(spec, chunk_frames=10**6)._front(wave)  # other kernels)
            torch.testing.assert_close(small._front(wave), whole, rtol=1e-5, atol=1e-5)
            no_margin = encodec_stream.StreamEncoder(spec, chunk_frames=5)
            no_margin.margin = 0  # each chunk starts cold: its first frames differ (why the margin exists)
            assert not torch.allclose(no_margin._front(wave), whole, rtol=1e-3, atol=1e-3)
    two = encodec_stream.for_model(model).encode(windows, 3.0, threads=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))  # bit-identical codes with 1 and 2 threads
    assert [c.shape[1] for c in two] == [150, 300, 75]  # each window's own codes, in order


# -- the stream path's own reading of the weights (no transformers) -----------------------------

def test_reference_is_transformers_encode_exactly(model, signals, tmp_path):
    """The eager reference the stage checks the stream path against: embeddings and codes
    equal (not close) to transformers' ``EncodecModel.encode``, from the model or its folder,
    before and after the stream path re-lays the weights."""
    model.save_pretrained(tmp_path / "enc")
    from_dir = encodec_torch.load_dir(str(tmp_path / "enc"), "fp", n_codebooks=4)
    assert len(from_dir.codebooks) == 4 and not any(n.startswith("transformers") for n in encodec_torch.__dict__)
    for name, wave in signals.items():
        wave = wave[-60000:]  # 2.5 s, ending where the signal ends (off a code frame for speech)
        x = torch.from_numpy(wave)[None, None]
        with torch.inference_mode(), torch_threads(1):
            emb = model.encoder(x)
            codes = model.encode(x, bandwidth=3.0).audio_codes[0, 0].numpy()
            assert torch.equal(encodec_stream.spec_of(model).embeddings(x), emb), name
            assert torch.equal(from_dir.embeddings(x), emb), name
        assert len(np.unique(codes)) > 20, name
        for spec in (encodec_stream.spec_of(model), from_dir):
            with torch_threads(1):
                assert np.array_equal(spec.reference(wave, 3.0), codes), name
            encodec_stream.for_model(spec)  # the stream path shares (re-lays) the convolution weights
    with pytest.raises(InputError, match="5 codebooks are needed at 3.75 kbps, the checkpoint has 4"):
        from_dir.quantize(torch.zeros(3, 128), 3.75)


def test_weights_are_read_without_transformers(model, signals, tmp_path):
    """A folder's stream-path model is read with safetensors and torch alone (what keeps an
    audio worker's memory down), and encodes as transformers does."""
    import subprocess
    import sys

    model.save_pretrained(tmp_path / "enc")
    wave = signals["movie track"][:48000]
    np.save(tmp_path / "wave.npy", wave)
    code = (f"import sys, numpy as np; from giblet.features import encodec_stream as s; "
            f"net, path, note = s.load({str(tmp_path / 'enc')!r}, 'fp', 'cpu', 'auto', 4); "
            f"c = s.for_model(net).encode([np.load({str(tmp_path / 'wave.npy')!r})], 3.0)[0]; "
            f"np.save({str(tmp_path / 'codes.npy')!r}, c); "
            f"print(path, note, sorted(m for m in sys.modules if m.startswith('transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["stream", "None", "[]"], out
    with torch.inference_mode(), torch_threads(1):
        eager = model.encode(torch.from_numpy(wave)[None, None], bandwidth=3.0).audio_codes[0, 0].numpy()
    assert (np.load(tmp_path / "codes.npy") == eager).mean() >= AGREEMENT


def test_older_and_unknown_checkpoints(model, signals, tmp_path):
    """weight_g/weight_v names (checkpoints saved before torch's parametrizations, as the hub's
    facebook/encodec_24khz) and pytorch_model.bin read the same; weights outside EnCodec's
    known layout fall back to transformers' encode with the reason; missing ones fail in one line."""
    from safetensors.torch import save_file

    model.save_pretrained(tmp_path / "new")
    config = (tmp_path / "new" / "config.json").read_text()
    state = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                  "weight_v"): v.contiguous()
             for k, v in model.state_dict().items()}
    for name, write in {"old": lambda d: save_file(state, d / "model.safetensors"),
                        "bin": lambda d: torch.save(state, d / "pytorch_model.bin"),
                        "legacy": lambda d: torch.save(state, d / "pytorch_model.bin",
                                                       _use_new_zipfile_serialization=False),
                        "none": lambda d: None,
                        "odd": lambda d: save_file({**state, "encoder.layers.99.conv.bias": torch.zeros(2)},
                                                   d / "model.safetensors"),
                        "partial": lambda d: save_file({k: v for k, v in state.items() if "layers.4." not in k},
                                                       d / "model.safetensors")}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        write(tmp_path / name)
    wave = signals["speech-like"][:24000]
    want = encodec_stream.spec_of(model).reference(wave, 3.0)
    for name in ("old", "bin", "legacy"):
        assert np.array_equal(encodec_torch.load_dir(str(tmp_path / name), "fp").reference(wave, 3.0), want), name
    net, path, note = encodec_stream.load(str(tmp_path / "odd"), "fp-odd", "cpu", "auto")
    assert path == "eager" and "encoder.layers.99.conv.bias" in note and "known layout" in note
    assert type(net).__name__ == "EncodecModel"
    with pytest.raises(InputError, match=r"lacks EnCodec weight encoder\.layers\.4\..*re-save it"):
        encodec_torch.load_dir(str(tmp_path / "partial"), "fp")
    with pytest.raises(InputError, match="could not be loaded as EncodecModel"):  # no weights: transformers says so
        encodec_stream.load(str(tmp_path / "none"), "fp-none", "cpu", "auto")


def test_defaults_are_transformers_defaults():
    from transformers import EncodecConfig

    ours = encodec_torch.config_of({})
    theirs = EncodecConfig()
    for key in encodec_torch.DEFAULTS:
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (tuple in the config object)
        assert norm(getattr(ours, key)) == norm(getattr(theirs, key)), key


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
    cfg = encodec_torch.config_of(noncausal.config.to_dict())
    path, note = encodec_stream.choose(cfg, "cpu", "stream")
    assert path == "eager" and "not causal" in note and "audio.fast_path=stream" in note
    assert encodec_stream.choose(cfg, "cpu", "auto")[0] == "eager"
    causal = encodec_torch.config_of(model.config.to_dict())
    assert encodec_stream.choose(causal, "cpu", "auto") == ("stream", None)
    assert encodec_stream.choose(causal, "cpu", "eager") == ("eager", None)
    assert encodec_stream.choose(causal, "cuda", "auto") == ("eager", None)  # cuDNN runs eager well: no note
    assert "not on the CPU" in encodec_stream.choose(causal, "cuda", "stream")[1]

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

