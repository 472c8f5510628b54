"""GibletDataset on real stores: built by the engine (fMRI and any registered stimulus stage), and
real stores given stimulus arrays of the documented schema through the store's own commit path."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

import giblet
from giblet import store as gstore
from giblet.config import load_config, parse_config
from giblet.data import GibletDataset, GibletLoader, World, hrf_convolve, hrf_kernel
from giblet.errors import ConfigError, ModalityMissingError
from giblet.fingerprint import hash_obj
from giblet.synth import make_study
from pipelines import engine
from pipelines.align import align_record
from pipelines.stages import STAGE_NAMES

N_TRS = 48
EXTRA = 4  # stimulus arrays are stored longer than n_trs: only [:n_trs] may be served
RUN = "run-1"  # the one run of an `inputs:` config
REPO = Path(__file__).resolve().parents[1]


def build(config, **kw):
    return engine.run(load_config(config), workers=1, progress=False, **kw).store


@pytest.fixture(scope="session")
def built_store(tmp_path_factory) -> Path:
    """A real store from the engine: 3 subjects x N_TRS TRs, plus every registered stimulus stage."""
    registered = set(STAGE_NAMES)
    root = tmp_path_factory.mktemp("ds_built")
    config = make_study(root, n_subjects=3, n_trs=N_TRS, shape=(10, 12, 8), movie=bool({"video", "audio"} & registered),
                        annotations="text" in registered, seed=4, fps=10,
                        stages={"audio": {"model": "random"}} if "audio" in registered else None)
    return build(config)


@pytest.fixture(scope="session")
def fmri_store(built_store, tmp_path_factory) -> Path:
    """The built store with its stimulus units removed (as a config without a movie would leave it)."""
    path = tmp_path_factory.mktemp("ds_fmri") / "fmri.zarr"
    shutil.copytree(built_store, path)
    writer = gstore.StoreWriter(path)
    for key in [k for k in writer.manifest["units"] if not k.startswith("fmri/")]:
        writer.remove_unit(key)
    realign(path)
    return path


def realign(path: Path) -> None:
    """Write the align record of a store whose units were committed or removed by hand, with
    the engine's own align step (``pipelines.align``) and the config the store was built from."""
    writer = gstore.StoreWriter(path)
    cfg = parse_config(zarr.open_group(str(path), mode="r").attrs["giblet"]["config"])
    # No stage is run here: like the stages an `--only` run leaves alone, every stored unit counts.
    align = align_record(cfg, [], writer.manifest, only=["no stage"])
    writer.write_align(align["record"], align["attrs"])


def add_stimulus(path: Path, units: dict[str, dict[str, tuple]]) -> None:
    """Commit stimulus units ({unit: {array: (data, chunks, dims, attrs)}}) and re-align, as a stage would."""
    writer = gstore.StoreWriter(path)
    for key, arrays in units.items():
        fp = hash_obj("test", key)
        staging = writer.staging_dir(key, fp)
        staging.mkdir(parents=True)
        for name, (data, chunks, dims, attrs) in arrays.items():
            gstore.create_array(staging, name, data.shape, str(data.dtype), chunks, dims, attrs)[...] = data
        modality, run = key.split("/")
        entry = {"stage": modality, "version": 1, "fingerprint": fp, "params": {}, "inputs": {}, "deps": [],
                 "meta": {"n_trs": N_TRS + EXTRA}, "run": run}
        writer.commit(key, entry, staging, list(arrays))
    realign(path)  # commit() dropped the align record: the store is incomplete until re-aligned


def stimulus_units(rng, n=N_TRS + EXTRA, video=(2, 4, 6), text_dim=8, text=None, frames=None, video_chunk=16):
    """One run's stimulus units of the documented schema: {unit: {array: (data, chunks, dims, attrs)}}."""
    f, h, w = video
    if frames is None:  # every pixel of TR t holds t (mod 251): the TR is readable from any sample
        tr_of = (np.arange(n) % 251).astype(np.uint8)[:, None, None, None, None]
        frames = np.broadcast_to(tr_of, (n, f, h, w, 3)).copy()
    flat = frames.reshape(n, -1, 3).astype(np.int64)
    moments = np.stack([flat.sum(1), (flat ** 2).sum(1)], axis=1)  # per TR: [sum, sum of squares] per channel
    text = rng.normal(0.5, 2.0, size=(n, text_dim)).astype(np.float32) if text is None else text
    has_text = np.ones(n, dtype=bool)
    has_text[10:13] = False
    text[~has_text] = 0.0
    video, audio, words = (gstore.stimulus_prefix(RUN, m) for m in ("video", "audio", "text"))
    return {
        f"video/{RUN}": {
            f"{video}/frames": (frames, (video_chunk,) + frames.shape[1:],
                                ("tr", "frame", "height", "width", "channel"), {}),
            f"{video}/padded": (np.zeros((n, f), bool), (video_chunk, f), ("tr", "frame"), {}),
            f"{video}/moments": (moments, (video_chunk, 2, 3), ("tr", "moment", "channel"),
                                 {"pixels_per_tr": f * h * w})},
        f"audio/{RUN}": {f"{audio}/codes": (rng.integers(0, 1024, size=(n, 4, 7)).astype(np.int16), (64, 4, 7),
                                            ("tr", "codebook", "code_frame"), {})},
        f"text/{RUN}": {f"{words}/embeddings": (text, (32, text_dim), ("tr", "embedding"), {}),
                        f"{words}/has_text": (has_text, (32,), ("tr",), {})},
    }


def stimulus_copy(fmri_store: Path, dst: Path, **kw) -> tuple[Path, dict]:
    """A copy of ``fmri_store`` with stimulus units; the arrays by name within the run (``video/frames``)."""
    path = dst / "stim.zarr"
    shutil.copytree(fmri_store, path)
    units = stimulus_units(np.random.default_rng(0), **kw)
    add_stimulus(path, units)
    prefix = f"{gstore.STIMULI}/{RUN}/"
    return path, {name[len(prefix):]: arr[0] for u in units.values() for name, arr in u.items()}


def train_stats(path: Path, arrays: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The documented normalization, computed here from the arrays: per-channel (mean, std) of
    [0, 1] pixels and per-dimension (mean, std) of the embeddings of TRs with text, over the
    store's training TRs (ddof 0)."""
    a, b = giblet.open_store(path).split["train"][RUN]
    pixels = arrays["video/frames"][a:b].reshape(-1, 3) / 255.0
    emb = arrays["text/embeddings"][a:b][arrays["text/has_text"][a:b]].astype(np.float64)
    return {"video": (pixels.mean(0), pixels.std(0)), "text": (emb.mean(0), emb.std(0))}


@pytest.fixture(scope="session")
def stim_store(fmri_store, tmp_path_factory) -> tuple[Path, dict]:
    return stimulus_copy(fmri_store, tmp_path_factory.mktemp("ds_stim"))


# -- fMRI through the engine -------------------------------------------------------------------
def test_fmri_samples_are_the_stored_rows_of_each_split(fmri_store):
    s = giblet.open_store(fmri_store)
    a, b = s.split["train"][RUN]
    ds = GibletDataset(fmri_store)
    assert ds.modalities == ("fmri",) and len(ds) == 3 * (b - a) and ds.runs == [RUN]
    assert ds.pairs == [(subj, 0, a, b) for subj in range(3)]  # subject-major, each pair's split TRs
    chunk = s.array(f"fmri/sub-01/{RUN}/bold").chunks[0]
    assert sum(ds.chunk_sizes) == len(ds) and max(ds.chunk_sizes) == chunk
    ends = set(np.cumsum(ds.chunk_sizes).tolist())
    assert set(ds.offsets[1:].tolist()) <= ends  # a chunk run never spans two (subject, run) pairs
    for i in (0, 17, b - a, len(ds) - 1):
        x = ds[i]
        subj, tr = divmod(i, b - a)
        tr += a
        assert set(x) == {"index", "subject", "run", "tr", "fmri"} and x["fmri"].dtype == torch.float32
        assert (int(x["subject"]), int(x["run"]), int(x["tr"]), int(x["index"])) == (subj, 0, tr, i)
        assert ds.locate(i) == (subj, 0, tr)
        np.testing.assert_array_equal(x["fmri"].numpy(), s.fmri(s.subjects[subj])[tr])
    val = GibletDataset(fmri_store, split="val", subjects=["sub-03", "sub-01"])
    assert val.subjects == ["sub-01", "sub-03"] and len(val) == 2 * (N_TRS - b)
    assert [p[2:] for p in val.pairs] == [s.split["val"][RUN]] * 2 == [(b, N_TRS)] * 2
    last = val[len(val) - 1]
    assert int(last["tr"]) == N_TRS - 1
    np.testing.assert_array_equal(last["fmri"].numpy(), s.fmri("sub-03")[N_TRS - 1])
    assert len(GibletDataset(fmri_store, split="all")) == 3 * N_TRS
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_pickles_small_and_opens_the_store_per_process(fmri_store):
    ds = GibletDataset(fmri_store, split="all")
    for i in range(0, len(ds), 7):
        ds[i]
    assert ds.cache.misses > 0 and ds.cache.nbytes > 0
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # path and integers only: no arrays, no open store, no cache
    clone = pickle.loads(blob)
    assert clone._local is None
    np.testing.assert_array_equal(clone[5]["fmri"].numpy(), ds[5]["fmri"].numpy())


def test_bad_requests_name_the_value_and_the_fix(fmri_store):
    with pytest.raises(ModalityMissingError, match="no subject.*'sub-09'.*sub-01, sub-02, sub-03"):
        GibletDataset(fmri_store, subjects=["sub-09"])
    with pytest.raises(ModalityMissingError, match="has no video.*add that input"):
        GibletDataset(fmri_store, modalities=["fmri", "video"])
    with pytest.raises(ConfigError, match="split='testing'"):
        GibletDataset(fmri_store, split="testing")
    with pytest.raises(ModalityMissingError, match="split 'test' of runs.*holds no sample"):
        GibletDataset(fmri_store, split="test")  # a split the store has no TR of
    with pytest.raises(ConfigError, match="window=-1"):
        GibletDataset(fmri_store, window=-1)
    with pytest.raises(ConfigError, match="hrf=True convolves text embeddings and pretrained features only"):
        GibletDataset(fmri_store, hrf=True)


def test_denormalize_goes_through_the_stores_scaler(fmri_store):
    s = giblet.open_store(fmri_store)
    ds = GibletDataset(fmri_store, split="all")
    batch = next(iter(DataLoader(ds, batch_size=40, shuffle=True, generator=torch.Generator().manual_seed(0))))
    raw = ds.denormalize(batch["fmri"], batch["subject"])
    assert isinstance(raw, torch.Tensor) and len(set(batch["subject"].tolist())) == 3
    for j in range(40):
        subject = s.subjects[int(batch["subject"][j])]
        expect = s.denormalize(subject, s.fmri(subject)[int(batch["tr"][j])])
        np.testing.assert_allclose(raw[j].numpy(), expect, rtol=1e-6)
        assert expect.mean() > 100  # scanner units, not z-scores
    mean, std = s.fmri_stats("sub-02")
    assert (ds.stats["fmri"]["sub-02"][RUN].mean_ == mean).all() and (ds.scaler(1).std_ == std).all()
    assert (ds.scaler("sub-02", RUN).std_ == std).all()


def test_plain_dataloader_with_two_workers_serves_every_sample(fmri_store):
    ds = GibletDataset(fmri_store, split="all")
    batches = list(DataLoader(ds, batch_size=16, num_workers=2))
    index = torch.cat([b["index"] for b in batches])
    assert (index == torch.arange(len(ds))).all()
    s = giblet.open_store(fmri_store)
    expect = np.concatenate([s.fmri(sub) for sub in s.subjects])
    np.testing.assert_array_equal(torch.cat([b["fmri"] for b in batches]).numpy(), expect)


# -- every modality, schema-exact arrays committed into a real store ---------------------------
def test_stimulus_samples_match_the_stored_arrays(stim_store):
    path, arrays = stim_store
    s = giblet.open_store(path)
    assert s.n_trs() == N_TRS  # the longer stimulus arrays are trimmed, never served past n_trs
    ds = GibletDataset(path, split="all")
    assert ds.modalities == ("fmri", "video", "audio", "text")
    spec = ds.sample_spec()
    for i in (0, 11, 33, 95, len(ds) - 1):  # TR 11: no annotation (has_text False)
        x = ds[i]
        t = int(x["tr"])
        assert {k: (tuple(v.shape), v.dtype) for k, v in x.items()} == spec
        np.testing.assert_array_equal(x["video"].numpy(), arrays["video/frames"][t])
        assert x["audio"].dtype == torch.int64
        np.testing.assert_array_equal(x["audio"].numpy(), arrays["audio/codes"][t])
        np.testing.assert_array_equal(x["text"].numpy(), arrays["text/embeddings"][t])
        assert bool(x["has_text"]) == arrays["text/has_text"][t] == (t != 11) and bool(x["stim_valid"])
    batch = ds.get_batch([3, 40, 41, 130])  # GibletLoader's one-copy path = default_collate of samples
    expect = torch.utils.data.default_collate([ds[i] for i in (3, 40, 41, 130)])
    assert batch.keys() == expect.keys() and all(torch.equal(batch[k], expect[k]) for k in batch)
    x = ds[41]
    x["fmri"] += 1000.0  # samples are copies: editing one never reaches the cache
    np.testing.assert_array_equal(ds[41]["fmri"].numpy(), s.fmri(ds.subjects[0])[41])
    norm = GibletDataset(path, split="all", normalize=True, modalities=["video", "text"])
    x = norm[40]
    stats = train_stats(path, arrays)  # over the training TRs only (TRs 10-12, without text, left out)
    vmean, vstd = stats["video"]
    np.testing.assert_allclose(x["video"].numpy(), (arrays["video/frames"][40] / 255 - vmean) / vstd, rtol=1e-5)
    tmean, tstd = stats["text"]
    np.testing.assert_allclose(x["text"].numpy(), (arrays["text/embeddings"][40] - tmean) / tstd, rtol=1e-4, atol=1e-5)
    assert set(norm.stats) == {"fmri", "video", "text"} and "fmri" not in x


def test_frames_serves_evenly_spaced_frames_of_each_tr(fmri_store, tmp_path):
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, size=(N_TRS + EXTRA, 10, 4, 6, 3), dtype=np.uint8)
    path, arrays = stimulus_copy(fmri_store, tmp_path, video=(10, 4, 6), frames=frames)
    ds = GibletDataset(path, split="all", frames=4, window=1, modalities=["video"])
    x = ds[30]
    assert x["video"].shape == (2, 4, 4, 6, 3) and ds.sample_spec()["video"][0] == (2, 4, 4, 6, 3)
    np.testing.assert_array_equal(x["video"].numpy(), frames[29:31][:, [0, 3, 6, 9]])
    batch = ds.get_batch([30, 31])
    np.testing.assert_array_equal(batch["video"][1].numpy(), frames[30:32][:, [0, 3, 6, 9]])
    norm = GibletDataset(path, split="all", frames=2, normalize=True, modalities=["video"])
    vmean, vstd = train_stats(path, arrays)["video"]  # over every stored frame slot, not only those served
    np.testing.assert_allclose(norm[7]["video"].numpy(), (frames[7][[0, 9]] / 255 - vmean) / vstd, rtol=1e-5)
    assert GibletDataset(path, split="all", frames=12, modalities=["video"])[7]["video"].shape[0] == 10  # all
    with pytest.raises(ConfigError, match="frames=2 selects video frames"):
        GibletDataset(path, frames=2, modalities=["fmri"])
    with pytest.raises(ConfigError, match="frames=0"):
        GibletDataset(path, frames=0)


def test_video_pool_serves_frames_pooled_once_per_chunk(fmri_store, tmp_path):
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, size=(N_TRS + EXTRA, 10, 4, 6, 3), dtype=np.uint8)
    path, arrays = stimulus_copy(fmri_store, tmp_path, video=(10, 4, 6), frames=frames, video_chunk=4)

    def pooled(x, size):  # what the model's VideoPool does to uint8 frames on the GPU
        t = torch.from_numpy(x).reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float() / 255
        return torch.nn.functional.adaptive_avg_pool2d(t, size).permute(0, 2, 3, 1).reshape(
            *x.shape[:-3], *size, 3).numpy()

    for size in [(2, 3), (3, 4)]:  # (3, 4): bins of unequal size overlap
        ds = GibletDataset(path, split="all", frames=4, window=2, video_pool=size, modalities=["video"])
        assert ds.sample_spec()["video"] == ((3, 4, *size, 3), torch.float32)
        x = ds[9]  # TRs 7..9 span two chunks of 4
        assert x["video"].shape == (3, 4, *size, 3) and x["video"].dtype == torch.float32
        np.testing.assert_allclose(x["video"].numpy(), pooled(frames[7:10][:, [0, 3, 6, 9]], size), rtol=1e-6)
        x = ds[1]  # TR -1 is before the movie: zeros, flagged
        assert x["stim_valid"].tolist() == [False, True, True] and float(x["video"][0].abs().sum()) == 0
        np.testing.assert_allclose(x["video"][1:].numpy(), pooled(frames[0:2][:, [0, 3, 6, 9]], size), rtol=1e-6)
        batch = ds.get_batch([9, 1])
        np.testing.assert_array_equal(batch["video"].numpy(), np.stack([ds[9]["video"], ds[1]["video"]]))
    cached = list(ds.cache._items.values())  # the cache holds the kept frames, pooled
    assert cached and all(v.shape[1:] == (4, 3, 4, 3) and v.dtype == np.float32 for v in cached)
    misses = ds.cache.misses
    ds[10], ds[11]  # same chunks: nothing decoded or pooled again
    assert ds.cache.misses == misses
    norm = GibletDataset(path, split="all", video_pool=(2, 3), normalize=True, modalities=["video"])
    vmean, vstd = train_stats(path, arrays)["video"]
    np.testing.assert_allclose(norm[7]["video"].numpy(), (pooled(frames[7], (2, 3)) - vmean) / vstd, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"video_pool=\[5, 3\].*stored frame size \[4, 6\]"):
        GibletDataset(path, video_pool=(5, 3))
    with pytest.raises(ConfigError, match="pools video frames"):
        GibletDataset(path, video_pool=(2, 3), modalities=["fmri"])


def test_window_lag_and_the_rule_before_tr_zero(stim_store):
    path, arrays = stim_store
    ds = GibletDataset(path, split="all", window=3, lag=2)
    x = ds[1]  # target TR 1: sources -4..-1, all before the movie
    assert x["video"].shape == (4, 2, 4, 6, 3) and x["stim_valid"].tolist() == [False] * 4
    assert int(x["video"].abs().sum()) == 0 and int(x["audio"].abs().sum()) == 0 and not x["has_text"].any()
    x = ds[4]  # sources -1..2
    assert x["stim_valid"].tolist() == [False, True, True, True]
    assert x["video"][:, 0, 0, 0, 0].tolist() == [0, 0, 1, 2]
    x = ds[40]
    assert x["video"][:, 0, 0, 0, 0].tolist() == [35, 36, 37, 38]
    np.testing.assert_array_equal(x["audio"].numpy(), arrays["audio/codes"][35:39])
    np.testing.assert_array_equal(x["text"].numpy(), arrays["text/embeddings"][35:39])
    dropped = GibletDataset(path, split="all", window=3, lag=2, edge="drop")
    assert [p[2:] for p in dropped.pairs] == [(5, N_TRS)] * 3 and dropped[0]["stim_valid"].all()


def test_impulse_influences_only_later_samples_and_the_hrf_peaks_4_to_6_s_after(fmri_store, tmp_path):
    onset, n = 20, N_TRS + EXTRA
    text = np.zeros((n, 8), np.float32)
    text[onset] = np.linspace(1, 2, 8)
    frames = np.zeros((n, 2, 4, 6, 3), np.uint8)
    frames[onset] = 255
    path, _ = stimulus_copy(fmri_store, tmp_path, text=text, frames=frames)
    tr_s = giblet.open_store(path).tr_s
    for window, lag in ((0, 0), (2, 0), (0, 3), (4, 2)):
        ds = GibletDataset(path, split="all", subjects=["sub-02"], window=window, lag=lag, modalities=["video"])
        hit = [t for t in range(N_TRS) if ds[t]["video"].any()]
        assert hit == list(range(onset + lag, onset + lag + window + 1)), (window, lag)  # t >= s, never before
    ds = GibletDataset(path, split="all", subjects=["sub-02"], hrf=True, modalities=["text"])
    response = np.stack([ds[t]["text"].numpy() for t in range(N_TRS)])
    assert not response[:onset].any()  # exactly zero before the event: causal
    peak = int(np.abs(response[:, 0]).argmax())
    assert 4.0 <= (peak - onset) * tr_s <= 6.0
    kernel = hrf_kernel(tr_s)
    np.testing.assert_allclose(response[onset:onset + len(kernel), 0], kernel * text[onset, 0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(response, hrf_convolve(text[:N_TRS], tr_s), rtol=1e-5, atol=1e-7)
    lagged = GibletDataset(path, split="all", subjects=["sub-02"], hrf=True, lag=2, window=1, modalities=["text"])
    np.testing.assert_allclose(lagged[40]["text"].numpy(), response[[37, 38]], rtol=1e-5, atol=1e-7)


def test_loader_epoch_covers_the_split_and_resumes_with_other_workers(stim_store):
    path, _ = stim_store
    ds = GibletDataset(path, split="train")
    full = GibletLoader(ds, batch_size=8, num_workers=2, seed=3, world=World(0, 1))
    assert full.group == 8  # small samples: 8 batches per hand-over, each worker on its own lane
    assert GibletLoader(ds, batch_size=8, num_workers=0).group == 1  # in-process: alternating lanes, batch by batch
    epoch = [b["index"].tolist() for b in full]
    assert sorted(sum(epoch, [])) == list(range(len(ds)))
    part = GibletLoader(ds, batch_size=8, num_workers=2, seed=3, world=World(0, 1))
    it = iter(part)
    head = [next(it)["index"].tolist() for _ in range(7)]
    state = part.state_dict()
    del it
    resumed = GibletLoader(GibletDataset(path, split="train"), batch_size=8, num_workers=1, world=World(0, 1))
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert head + [b["index"].tolist() for b in rest] == epoch
    first = rest[0]
    assert first["video"].shape == (8, 2, 4, 6, 3) and first["audio"].dtype == torch.int64
    np.testing.assert_array_equal(first["video"][:, 0, 0, 0, 0].numpy(), first["tr"].numpy() % 251)


MEMORY_PROBE = """
import json, sys
import psutil
from giblet.data import GibletDataset, GibletLoader, World
path, bound = sys.argv[1], int(sys.argv[2])
proc = psutil.Process()

def epoch(ds):
    peak = 0
    for _ in GibletLoader(ds, batch_size=4, world=World(0, 1), seed=0):
        peak = max(peak, proc.memory_info().rss)
    return peak

# Warm-up epoch on another instance (fixed small cache): imports, zarr's threads, and glibc's
# per-thread arenas, which keep freed multi-MB decode buffers for reuse (a one-off plateau, ~50 MiB).
epoch(GibletDataset(path, split="all", modalities=["fmri", "video"], cache_bytes=4 * 2**20))
ds = GibletDataset(path, split="all", modalities=["fmri", "video"], cache_bytes=bound)
base = proc.memory_info().rss
peak = epoch(ds)
print(json.dumps({"growth": peak - base, "cache_nbytes": ds.cache.nbytes, "misses": ds.cache.misses}))
"""


def test_epoch_memory_stays_within_the_cache_bound(fmri_store, tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(N_TRS + EXTRA, 32, 90, 160, 3), dtype=np.uint8)  # 72 MB, incompressible
    path, _ = stimulus_copy(fmri_store, tmp_path, frames=frames, video_chunk=2)
    del frames
    bound, largest_chunk, margin = 4 * 2**20, 2 * 32 * 90 * 160 * 3, 16 * 2**20
    # A fresh interpreter: RSS then reflects this epoch, not the heap history of earlier tests.
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(bound)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["misses"] >= N_TRS // 2 and got["cache_nbytes"] <= bound + largest_chunk
    # An unbounded cache grows by the whole video (checked with this script: +222 MiB for 249 MB);
    # the bound allows < 23 MiB: the cache, one chunk, and a margin for allocator slack.
    assert got["growth"] < bound + largest_chunk + margin, f"RSS grew {got['growth'] / 2**20:.1f} MiB"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_ranks_cover_the_epoch_exactly(stim_store, tmp_path):
    path, _ = stim_store
    out = tmp_path / "ids.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(REPO / "tests" / "_torchrun_partition.py"), str(path), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(out.read_text())
    n = len(GibletDataset(path, split="train"))
    assert got["world_size"] == 2 and sorted(got["ranks"]) == [0, 1]
    per_rank = got["ids"]
    assert len(per_rank[0]) == len(per_rank[1]) == -(-n // 2)
    flat = per_rank[0] + per_rank[1]
    assert sorted(set(flat)) == list(range(n)) and len(flat) - n == (-n) % 2  # pad by wrap only
    assert len(set(per_rank[0]) & set(per_rank[1])) == (-n) % 2  # the ranks split the epoch


def _torchrun(n_proc: int, *args) -> dict:
    """tests/_torchrun_partition.py under torchrun with ``n_proc`` gloo ranks; what rank 0 wrote."""
    out = Path(args[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n_proc}", f"--master_port={_free_port()}",
           str(REPO / "tests" / "_torchrun_partition.py"), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # two torchrun launches (5 processes); tests/test_partition.py checks the same split in-process
def test_torchrun_elastic_resume_two_ranks_on_one_and_one_on_three(stim_store, tmp_path):
    """A loader state saved 2 batches into an epoch by 2 gloo ranks is resumed by 1 process, and
    one saved by 1 process by 3 gloo ranks: the new ranks serve exactly what was left (no sample
    consumed before, none skipped; 3 ranks pad their equal shares by wrap as any epoch)."""
    path, _ = stim_store
    ds = GibletDataset(path, split="train")
    n = len(ds)

    def ids(batches) -> list[int]:
        return [i for b in batches for i in b["index"].tolist()]

    got = _torchrun(2, path, tmp_path / "two.json", 2)  # 2 ranks x 2 batches of 5
    head = sum(got["ids"], [])
    assert got["world_size"] == 2 and got["state"]["position"] == 10 and len(head) == 20
    one = GibletLoader(ds, batch_size=5, seed=11, world=World(0, 1))
    one.load_state_dict(got["state"])
    rest = ids(one)
    assert sorted(rest) == sorted(set(range(n)) - set(head))  # none lost, none repeated (one rank: no padding)

    single = GibletLoader(ds, batch_size=5, seed=11, world=World(0, 1))
    it = iter(single)
    head = ids(next(it) for _ in range(3))
    (tmp_path / "one.json").write_text(json.dumps(single.state_dict()))
    got = _torchrun(3, path, tmp_path / "three.json", "all", tmp_path / "one.json")
    per_rank, left = got["ids"], n - 15
    assert got["world_size"] == 3 and len({len(r) for r in per_rank}) == 1 and got["state"]["epoch"] == 1
    rest = sum(per_rank, [])
    assert set(rest) == set(range(n)) - set(head) and len(rest) - left == (-left) % 3  # padding only


def test_store_from_every_registered_stage(built_store):
    s = giblet.open_store(built_store)
    ds = GibletDataset(built_store, split="all", window=1)
    assert set(ds.modalities) == {"fmri"} | {m for m in ("video", "audio", "text") if m in STAGE_NAMES}
    x = ds[len(ds) - 1]
    t = int(x["tr"])
    assert t == s.n_trs() - 1
    for m in ("video", "audio", "text"):
        if m in ds.modalities:
            np.testing.assert_array_equal(x[m].numpy(), s.array(s.stimulus_name(m))[t - 1:t + 1])
    assert {k: (tuple(v.shape), v.dtype) for k, v in x.items()} == ds.sample_spec()
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=2)))
    assert batch["fmri"].shape == (4, s.n_voxels)
