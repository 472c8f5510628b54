"""Audio stage: EnCodec codes per TR, through the real model-loading path, engine and store."""
from __future__ import annotations

import functools
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml


import giblet
from giblet.config import load_config
from giblet.errors import ConfigError, InputError, InputMissingError
from giblet.features import audio
from giblet.fingerprint import hash_tree
from giblet.synth import make_study, scenes, write_movie
from giblet.verify import verify_store
from pipelines import engine

AGREEMENT = 0.999  # fraction of code frames equal to a whole-waveform encode (measured: 1.0)
STAGE = {"segment_s": 4.0, "context_s": 1.0, "batch_size": 2, "chunk_trs": 2}  # several windows and tasks


@pytest.fixture(scope="session")
def encodec_dir(tmp_path_factory) -> Path:
    """A seeded random-weight EnCodec (24 kHz architecture) saved with save_pretrained."""
    path = tmp_path_factory.mktemp("encodec") / "encodec-random"
    audio.build_random_model(seed=7).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def encodec(encodec_dir):
    from transformers import EncodecModel

    return EncodecModel.from_pretrained(encodec_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def study_template(tmp_path_factory, encodec_dir) -> Path:
    """1 subject x 6 TRs of fMRI and a 12 s movie with a stereo AAC track (8 whole TRs)."""
    root = tmp_path_factory.mktemp("audio_study")
    return make_study(root, n_subjects=1, n_trs=6, shape=(8, 10, 6), annotations=False, seed=5, fps=10,
                      movie_size=(64, 36), stages={"audio": {"model": str(encodec_dir), **STAGE},
                                                   "fmri": {"mask_strategy": "background"}})


@pytest.fixture
def study(study_template, tmp_path) -> Path:
    dst = tmp_path / "study"
    shutil.copytree(study_template.parent, dst)
    return dst / study_template.name


def build(config, *overrides):
    """In-process (a small study: the engine's rule), as the command line runs it."""
    return engine.run(load_config(config, overrides), only=["fmri", "audio"], progress=False)


def binned(stream: np.ndarray, n_trs: int) -> np.ndarray:
    """The documented rule: TR i = frames [floor(i * 112.5), +112) -> (tr, codebook, code_frame)."""
    starts = [int(Fraction(225, 2) * i) for i in range(n_trs)]  # exact floor(i * 1.5 * 75)
    return np.stack([stream[:, s:s + 112] for s in starts])


def whole_encode(model, wave: np.ndarray, bandwidth: float = 3.0) -> np.ndarray:
    with torch.inference_mode():
        out = model.encode(torch.from_numpy(np.ascontiguousarray(wave))[None, None], bandwidth=bandwidth)
    return out.audio_codes[0, 0].numpy()  # (codebook, code_frame)


# -- units ------------------------------------------------------------------------------------

def test_tr_rule_and_codebooks_per_bandwidth():
    assert audio.code_frames_per_tr(1.5, 75.0) == 112
    assert audio.tr_start_frames(5, 1.5, 75.0).tolist() == [0, 112, 225, 337, 450]
    assert audio.tr_start_frames(3, 0.72, 75.0).tolist() == [0, 54, 108]  # 0.72 * 75 = 53.999... in floats
    # 8 TRs need frames up to 787 + 112 = 899: 899 whole frames of 320 samples is the minimum
    assert audio.count_trs(899 * 320, 320, 1.5, 75.0) == 8 and audio.count_trs(899 * 320 - 1, 320, 1.5, 75.0) == 7
    info = audio.resolve_model("random", Path("."))
    assert [info.n_codebooks(b) for b in (1.5, 3.0, 6.0, 12.0, 24.0)] == [2, 4, 8, 16, 32]
    with pytest.raises(ConfigError, match=r"audio.bandwidth: 2 kbps is not offered .*1.5, 3, 6, 12, 24"):
        info.n_codebooks(2.0)


def test_random_recipe_matches_transformers_defaults_and_is_seeded(encodec_dir, encodec):
    from transformers import EncodecConfig

    defaults = EncodecConfig().to_dict()
    for key, value in audio.ENCODEC_24KHZ.items():
        assert defaults[key] == (list(value) if isinstance(value, tuple) else value), key
    # the saved-and-loaded model is exactly the seeded build (codebooks included)
    assert audio.weights_hash(encodec) == audio.weights_hash(audio.build_random_model(seed=7))
    assert float(encodec.quantizer.layers[0].codebook.embed.abs().sum()) > 0  # transformers leaves zeros


def test_windows_cover_frames_and_batches_respect_the_cuda_bound():
    hop, n = 320, 100 * 320 + 17  # 100 whole frames and a partial one
    wins = audio.plan_windows(0, 100, n, hop, segment_frames=30, context_frames=5, causal=True)
    assert [(w.keep0, w.keep1) for w in wins] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert [(w.start // hop, w.stop // hop) for w in wins] == [(0, 25), (20, 50), (45, 75), (70, 100)]
    noncausal = audio.plan_windows(0, 100, n, hop, 30, 5, causal=False)
    assert noncausal[0].stop == 30 * hop and noncausal[-1].stop == n  # right context up to the audio end
    batches = list(audio._batches(noncausal, n, hop, batch_size=8, num_filters=32))
    assert sorted(len(b) for b in batches) == [1, 3]  # the window ending off-frame at the audio end goes alone
    long = [audio.Window(0, 1, 0, 24000 * 60)] * 40
    sizes = [len(b) for b in audio._batches(long, 10**9, hop, batch_size=64, num_filters=32)]
    assert max(sizes) * 24000 * 60 * 32 <= audio.MAX_PAD_ELEMENTS and sum(sizes) == 40 and max(sizes) == 23


def test_segmented_encode_equals_whole_waveform_encode(encodec):
    rng = np.random.default_rng(0)
    t = np.arange(24000 * 6) / 24000
    wave = (0.3 * np.sin(2 * np.pi * (200 + 150 * np.floor(t / 1.5)) * t) + 0.05 * rng.normal(size=t.size))
    wave = wave.astype(np.float32)[:-100]
    ref = whole_encode(encodec, wave)
    k = len(wave) // 320
    assert len(np.unique(ref[0])) > 20  # the random model's codes follow the audio
    codes = audio.encode_frames(encodec, wave, 0, k, bandwidth=3.0, segment_s=2.0, context_s=1.0, batch_size=3)
    assert codes.dtype == np.int16 and codes.shape == (4, k)
    assert (codes == ref[:, :k]).mean() >= AGREEMENT
    part = audio.encode_frames(encodec, wave, 300, 360, bandwidth=3.0, segment_s=2.0, context_s=1.0, batch_size=3)
    assert (part == ref[:, 300:360]).mean() >= AGREEMENT
    # without context each window starts cold: the boundary frames differ (why context_s exists)
    cold = audio.encode_frames(encodec, wave, 0, k, bandwidth=3.0, segment_s=2.0, context_s=0.0, batch_size=3)
    assert (cold != ref[:, :k]).any()


def write_wav(path: Path, left: np.ndarray, right: np.ndarray, rate: int = 48000) -> None:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("pcm_f32le", rate=rate)
        s.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.stack([left, right]).astype(np.float32), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in s.encode(frame):
            out.mux(packet)
        for packet in s.encode(None):
            out.mux(packet)


def test_waveform_downmix_resample_and_onset(tmp_path):
    wav = tmp_path / "a.wav"
    n = 48000 * 2
    write_wav(wav, np.full(n, 0.6), np.full(n, 0.2))  # stereo DC: the mean downmix is 0.4
    wave, info = audio.read_waveform(str(wav), "audio", 24000, 0.0)
    assert abs(len(wave) - 48000) <= 32 and info["source_channels"] == 2 and info["source_rate"] == 48000
    np.testing.assert_allclose(wave[100:-100], 0.4, atol=1e-4)
    later, info = audio.read_waveform(str(wav), "audio", 24000, 0.5)
    assert info["onset_shift_samples"] == 12000 and np.array_equal(later, wave[12000:])
    earlier, _ = audio.read_waveform(str(wav), "audio", 24000, -0.25)
    assert np.array_equal(earlier[:6000], np.zeros(6000)) and np.array_equal(earlier[6000:], wave)


# -- through the engine ---------------------------------------------------------------------

def test_round_trip_cache_hit_and_bandwidth_recomputes_only_audio(study, encodec, encodec_dir):
    report = build(study)
    assert sorted(report.ran) == ["audio/run-1", "fmri/mask", "fmri/sub-01/run-1"]
    s = giblet.open_store(report.store)
    meta = s.unit_meta("audio/run-1")
    wave, _ = audio.read_waveform(str(study.parent / "movie.mp4"), "movie", 24000, 0.0)
    n_trs = audio.count_trs(len(wave), 320, 1.5, 75.0)
    assert n_trs == 8 and meta["n_trs"] == 8 and s.align["runs"]["run-1"]["n_trs_by_unit"]["audio/run-1"] == 8
    assert s.n_trs() == 6  # the run's grid is cut to the 6 TRs its fMRI serves
    assert meta["n_tasks"] == 3 and meta["n_samples"] == len(wave)  # 10 TRs allotted from the header: 3 tasks
    assert meta["model"] == str(encodec_dir.resolve()) and meta["model_hash"] == hash_tree(encodec_dir)
    # the default path, its threads and its measured agreement with the eager encode are recorded
    assert meta["fast_path"] == "stream" and meta["warnings"] == [] and meta["threads"] == [len(os.sched_getaffinity(0))]
    assert meta["fast_path_agreement"] >= AGREEMENT and meta["agreement_codes"] == 4 * 375  # the first 5 s
    stored = s.array("stimuli/run-1/audio/codes")
    assert stored.shape == (8, 4, 112) and stored.dtype == np.int16 and stored.chunks == (2, 4, 112)
    assert stored.attrs["code_frames_per_tr"] == 112 and stored.attrs["bandwidth_kbps"] == 3.0
    assert stored.attrs["model_hash"] == hash_tree(encodec_dir) and "floor(i * tr_s * 75)" in stored.attrs["tr_rule"]
    codes3 = stored[...]
    assert (codes3 == binned(whole_encode(encodec, wave), 8)).mean() >= AGREEMENT
    assert codes3.min() >= 0 and codes3.max() < 1024 and len(np.unique(codes3)) > 50
    assert s.audio_codes().shape == (6, 4, 112)  # served trimmed to the common (fMRI) length
    assert s.to_xarray()["audio_codes"].dims == ("tr", "codebook", "code_frame")
    assert verify_store(report.store) == []

    fmri_fps = {k: e["fingerprint"] for k, e in s.manifest["units"].items() if k.startswith("fmri/")}
    again = build(study)
    assert again.ran == [] and sorted(again.skipped) == ["audio/run-1", "fmri/mask", "fmri/sub-01/run-1"]
    assert build(study, "audio.device=cpu").ran == []  # where it runs is not what it stores
    six = build(study, "audio.bandwidth=6.0")
    assert six.ran == ["audio/run-1"]
    s = giblet.open_store(six.store)
    assert {k: e["fingerprint"] for k, e in s.manifest["units"].items() if k.startswith("fmri/")} == fmri_fps
    codes6 = s.array("stimuli/run-1/audio/codes")[...]
    assert codes6.shape == (8, 8, 112) and s.unit_meta("audio/run-1")["n_codebooks"] == 8
    assert (codes6[:, :4] == codes3).mean() >= AGREEMENT  # residual VQ: 3 kbps = the first 4 of 8 codebooks
    assert verify_store(six.store) == []

    # the verify invariants: a code out of range, a codebook count that does not match the bandwidth
    import zarr

    from giblet.verify import _check_audio

    writable = zarr.open_array(str(six.store / "stimuli/run-1/audio/codes"), mode="r+")
    writable[3, 1, 5] = 1024
    assert any("outside [0, 1024)" in p for p in _check_audio(giblet.open_store(six.store), "run-1"))
    writable.attrs["bandwidth_kbps"] = 3.0
    assert any("expected int16 (tr, 4, 112)" in p for p in _check_audio(giblet.open_store(six.store), "run-1"))


def _mark(folder: str) -> None:
    Path(folder, str(os.getpid())).touch()


_REAL_ENCODE = audio.encode_trs


def _encode_or_die(**kwargs):
    """The first audio task kills its worker process (the nanny starts a new one, at a new address)."""
    mark = Path(os.environ["GIBLET_TEST_DIE_MARK"])
    if not mark.exists():
        mark.touch()
        os._exit(1)
    return _REAL_ENCODE(**kwargs)


def test_audio_runs_on_one_worker_moves_on_when_it_dies_then_every_worker_drops_its_caches(study, tmp_path,
                                                                                          monkeypatch):
    """audio.workers=1 (the default): one model copy in the tree, pinned strictly (Dask would
    steal loosely pinned tasks). The first audio task kills its worker: the engine re-pins the
    waiting tasks to a worker still there, and they all run on that one. Once the stage's last
    unit is committed, every worker runs the stage's cleanup (here a marker; by default
    release_caches). Where the audio ran is not what it stores: no rebuild with any worker."""
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("GIBLET_TEST_DIE_MARK", str(tmp_path / "died"))
    monkeypatch.setattr(audio, "encode_trs", _encode_or_die)
    monkeypatch.setattr(audio, "release_caches", functools.partial(_mark, str(marks)))
    monkeypatch.setattr(engine, "POOL_CHECK_S", 1.0)
    lines = []
    report = engine.run(load_config(study), only=["fmri", "audio"], workers=2, progress=False, log=lines.append)
    assert (tmp_path / "died").exists() and sorted(report.ran) == ["audio/run-1", "fmri/mask", "fmri/sub-01/run-1"]
    assert any("audio: its workers left" in line for line in lines), lines
    entry = giblet.open_store(report.store).manifest["units"]["audio/run-1"]
    assert entry["meta"]["n_tasks"] == 3 and entry["meta"]["n_trs"] == 8 and len(entry["ran_on"]) == 1
    assert len(list(marks.iterdir())) == 2  # both workers (the restarted one too) were told
    again = engine.run(load_config(study, ["audio.workers=null"]), only=["audio"], workers=2, progress=False)
    assert again.ran == []


def test_release_caches_drops_the_soundtrack_and_the_model(study):
    from giblet.features.encodec import load_model

    audio.cached_waveform(str(study.parent / "movie.mp4"), "movie", "fp", 24000, 0.0)
    load_model("random", "fp", "cpu")
    audio.release_caches()
    assert audio.cached_waveform.cache_info().currsize == 0 and load_model.cache_info().currsize == 0


# -- bad inputs: one-line errors at plan time, before any compute -------------------------------

def plan(config, *overrides):
    return engine.plan_for(load_config(config, overrides))[1]


def test_model_not_set_is_a_config_error(study):
    with pytest.raises(ConfigError, match="audio.model: not set.*audio.model=PATH.*audio.model=random"):
        plan(study, "audio.model=null")


def test_bad_model_directories(study, tmp_path):
    with pytest.raises(InputMissingError, match="audio.model: directory .*nope does not exist"):
        plan(study, f"audio.model={tmp_path / 'nope'}")
    with pytest.raises(InputMissingError, match="neither a directory nor a repo in the offline Hugging Face cache"):
        plan(study, "audio.model=nobody/no-such-encodec")
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(bert)
    with pytest.raises(InputError, match="holds a bert model, not EnCodec"):
        plan(study, f"audio.model={bert}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="not a save_pretrained directory"):
        plan(study, f"audio.model={empty}")
    with pytest.raises(ConfigError, match="audio.bandwidth: 5 kbps is not offered"):
        plan(study, "audio.bandwidth=5")


def test_weights_missing_fails_at_load(encodec_dir, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(encodec_dir / "config.json", config_only / "config.json")
    info = audio.resolve_model(str(config_only), tmp_path)  # plan time: the config is fine
    with pytest.raises(InputError, match="could not be loaded as EncodecModel"):
        audio.load_model(info.name, info.fingerprint, "cpu")


def test_missing_track_unreadable_and_missing_files(study, tmp_path):
    rng = np.random.default_rng(0)
    silent = study.parent / "movie.mp4"
    write_movie(silent, scenes(4, rng), 4.0, size=(32, 18), fps=10, rng=rng, audio=False)
    with pytest.raises(InputError, match="movie.mp4 has no audio track \\(streams: video\\); give the soundtrack "
                                         "as inputs.audio=FILE"):
        plan(study)
    assert "audio" not in [u.key for u in plan(study, "audio.model=null")]  # no track, no model: no modality
    garbage = tmp_path / "noise.wav"
    garbage.write_bytes(rng.bytes(4096))
    with pytest.raises(InputError, match="noise.wav is not a readable media file"):
        plan(study, f"inputs.audio={garbage}")
    with pytest.raises(InputMissingError, match="gone.flac does not exist; fix inputs.audio"):
        plan(study, f"inputs.audio={tmp_path / 'gone.flac'}")


def test_config_checks():
    from giblet.config import parse_config

    inputs = {"inputs": {"movie": "movie.mp4"}}  # a config needs something to build; files are checked at plan time

    with pytest.raises(ConfigError, match="3 problem.*bandwidth: must be > 0.*segment_s: must be in.*context_s"):
        parse_config({**inputs, "audio": {"bandwidth": 0, "segment_s": 0, "context_s": -1}})
    with pytest.raises(ConfigError, match="audio.device: must be auto, cpu or cuda"):
        parse_config({**inputs, "audio": {"device": "tpu"}})
    assert yaml.safe_dump(parse_config({**inputs, "audio": {"model": "random"}}).audio.__dict__)
