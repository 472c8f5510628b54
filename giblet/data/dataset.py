"""``GibletDataset``: (subject, TR) samples read straight from a store's Zarr chunks.

Nothing large lives in the dataset object: it holds the store path and a few integers, so
pickling it to ``DataLoader`` workers is cheap, and each process opens the store itself
on first use. Reads go through a per-process LRU cache of decoded chunks bounded by bytes,
so consecutive samples from one chunk decode it once and memory stays flat over an epoch.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from giblet.data.context import convolve_windows, frame_indices, hrf_kernel, source_trs
from giblet.data.frames import pool_frames
from giblet.errors import ConfigError, ModalityMissingError
from giblet.normalize import ZScorer
from giblet.reader import open_store

MODALITIES = ("fmri", "video", "audio", "text")
STIMULUS_ARRAYS = {"video": "video/frames", "audio": "audio/codes", "text": "text/embeddings"}
HAS_TEXT = "text/has_text"
SPLITS = ("train", "val", "all")
EDGES = ("zeros", "drop")
CACHE_CHUNK_SETS = 8  # default cache: this many TR-chunks of every array a sample reads


class ChunkCache:
    """Least-recently-used decoded chunks, bounded by their total bytes.

    The newest chunk is always kept, so the bound is ``max_bytes`` plus at most one chunk.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self.nbytes = self.hits = self.misses = 0

    def get(self, key, load: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = load()
        value.setflags(write=False)  # samples are copies or read-only views: nobody edits the cache
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            self.nbytes -= self._items.popitem(last=False)[1].nbytes
        return value


class _ArrayInfo:
    """What a reader needs to know of one stored array (small, picklable)."""

    def __init__(self, arr):
        shards = getattr(arr, "shards", None)
        self.read_trs = int((shards or arr.chunks)[0])  # TRs decoded per read: a shard or a chunk
        self.tail = tuple(int(s) for s in arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)


class GibletDataset(Dataset):
    """Map-style dataset over the (subject, TR) pairs of one split of a giblet store.

    Sample ``i`` is subject ``i // n_trs_split``, TR ``start + i % n_trs_split``: a dict of
    tensors with only the modalities served --

    - ``fmri``: ``(voxel,) float32`` z-scored (as stored);
    - ``video``: ``(frame, height, width, channel) uint8``; ``frames=n`` keeps ``n`` evenly
      spaced frames of each TR; ``video_pool=(h, w)`` serves ``(frame, h, w, channel)
      float32`` [0, 1] pixels average-pooled (:func:`pool_frames`); ``normalize=True``
      z-scores per channel over [0, 1] pixels (``float32``);
    - ``audio``: ``(codebook, code_frame) int64`` EnCodec codes (classes; never normalized);
    - ``text``: ``(embedding,) float32`` (z-scored with ``normalize=True``), and
      ``has_text`` ``() bool``;
    - ``stim_valid``: ``() bool``, False where the source TR is before TR 0 (see
      ``giblet.data.context``); with ``window=k > 0`` every stimulus entry gains a leading
      context axis of ``k + 1`` TRs, oldest first, and ``stim_valid`` is ``(k + 1,)``;
    - ``subject`` (index into ``self.subjects``), ``tr`` (TR in the store) and ``index``
      (sample id): ``() int64``.

    A store without fMRI subjects has no samples, even for stimulus-only ``modalities``:
    it raises ``ModalityMissingError`` rather than serving a dataset of length 0.

    Args:
        store_path: a store built by ``giblet-preprocess run``.
        split: ``"train"``, ``"val"`` or ``"all"`` (the store's contiguous TR ranges).
        subjects: subset of the store's subjects (default: all), served in store order.
        window: stimulus context of ``window + 1`` TRs ending at the source TR.
        lag: source TR = target TR - ``lag``.
        hrf: convolve continuous features (text) with the Glover HRF, causally.
        modalities: subset of ``("fmri", "video", "audio", "text")`` (default: all the store has).
        normalize: z-score video and text with the store's saved stats.
        frames: serve this many evenly spaced frames of each TR's stored frames (first and
            last included; :func:`giblet.data.context.frame_indices`) instead of all of them:
            a model that looks at 4 of 10 frames then copies and hands over 40 % of the video.
        video_pool: ``(height, width)``: average-pool every served frame to this size
            (:func:`pool_frames`, the op ``GibletAutoencoder`` applies to uint8 frames), once
            per decoded chunk, so the cache and every sample hold the pooled frames: a model
            that pools 90x160 frames to 18x32 reads and hands over 25x fewer pixels (as
            float32: 6x fewer bytes) and no window re-pools a frame.
        edge: ``"zeros"`` (zeros + ``stim_valid``) or ``"drop"`` (leave out target TRs whose
            context reaches before TR 0).
        cache_bytes: bound of each process's decoded-chunk cache (default: 8 TR-chunks of
            every array one sample reads: one subject's fMRI and each stimulus array).
    """

    def __init__(self, store_path: str | os.PathLike, split: str = "train", subjects: Optional[Sequence[str]] = None,
                 *, window: int = 0, lag: int = 0, hrf: bool = False, modalities: Optional[Sequence[str]] = None,
                 normalize: bool = False, edge: str = "zeros", cache_bytes: Optional[int] = None,
                 frames: Optional[int] = None, video_pool: Optional[Sequence[int]] = None):
        view = open_store(store_path)
        self.store_path = str(view.path)
        self.tr_s, self.n_trs = view.tr_s, view.n_trs
        self.window, self.lag = _nonneg("window", window), _nonneg("lag", lag)
        self.hrf, self.normalize, self.edge = bool(hrf), bool(normalize), _choice("edge", edge, EDGES)
        self.split = _choice("split", split, SPLITS)
        self.subjects = self._pick_subjects(view, subjects)
        self.modalities = self._pick_modalities(view, modalities)
        start, stop = (0, view.n_trs) if split == "all" else view.split[split]
        if edge == "drop" and self.stimulus:
            start = max(start, self.window + self.lag)
        self.trs = (int(start), int(max(start, stop)))
        self._info = {name: _ArrayInfo(view.array(name)) for name in self._array_names()}
        self.frames = self._pick_frames(frames)
        self.video_pool = self._pick_pool(video_pool)
        self._served = {name: self._served_row(name, info) for name, info in self._info.items()}
        self.chunk_sizes = self._layout()
        chunk_bytes = {n: i.read_trs * int(np.prod(self._served[n][0], dtype=np.int64)) * self._served[n][1].itemsize
                       for n, i in self._info.items()}  # as cached: frames kept and pooled
        chunk_set = sum(b for n, b in chunk_bytes.items() if not n.startswith("fmri/"))
        chunk_set += max((b for n, b in chunk_bytes.items() if n.startswith("fmri/")), default=0)
        self.cache_bytes = int(cache_bytes) if cache_bytes is not None else CACHE_CHUNK_SETS * chunk_set
        self._local: Optional[dict] = None  # per-process: store view, arrays, cache, scalers

    # -- set-up ----------------------------------------------------------------------------
    def _pick_subjects(self, view, subjects) -> list[str]:
        if not view.subjects:  # samples are (subject, TR) pairs: without subjects there are none, whatever is served
            stored = [m for m in STIMULUS_ARRAYS if view.has(m)] or ["nothing else"]
            raise ModalityMissingError(f"{view.path}: the store has no fMRI subjects (it holds {', '.join(stored)}), "
                                       f"and GibletDataset serves (subject, TR) samples; add inputs.fmri to the "
                                       f"preprocessing config and rerun giblet-preprocess")
        if subjects is None:
            return list(view.subjects)
        unknown = [s for s in subjects if s not in view.subjects]
        if unknown:
            raise ModalityMissingError(f"{view.path}: no subject(s) {', '.join(map(repr, unknown))}; "
                                       f"the store has: {', '.join(view.subjects) or 'none'}")
        return [s for s in view.subjects if s in set(subjects)]

    def _pick_modalities(self, view, modalities) -> tuple[str, ...]:
        present = ["fmri"] + [m for m, name in STIMULUS_ARRAYS.items() if view.has(name)]
        if modalities is None:
            chosen = present
        else:
            bad = [m for m in modalities if m not in MODALITIES]
            if bad:
                raise ConfigError(f"GibletDataset: unknown modalities {bad}; choose from {', '.join(MODALITIES)}")
            missing = [m for m in modalities if m not in present]
            if missing:
                raise ModalityMissingError(f"{view.path}: the store has no {', '.join(missing)} "
                                           f"(it has: {', '.join(present)}); drop them from modalities or add "
                                           f"that input to the preprocessing config and rerun")
            chosen = [m for m in MODALITIES if m in modalities]
        if self.hrf and "text" not in chosen:
            raise ConfigError(f"GibletDataset: hrf=True convolves text embeddings only (never codes or frames), "
                              f"but this dataset serves {', '.join(chosen)}; drop hrf or serve text")
        for m, stat in (("video", "video/mean"), ("text", "text/mean")):
            if self.normalize and m in chosen and not view.has(stat):
                raise ModalityMissingError(f"{view.path}: normalize=True needs {stat}, which the store lacks; "
                                           f"rebuild the {m} stage or pass normalize=False")
        return tuple(chosen)

    def _pick_frames(self, frames: Optional[int]) -> Optional[np.ndarray]:
        """Frame slots served of each TR (None: all)."""
        if frames is None:
            return None
        if "video" not in self.modalities:
            raise ConfigError(f"GibletDataset: frames={frames!r} selects video frames, but this dataset serves "
                              f"{', '.join(self.modalities)}; drop frames or serve video")
        if int(frames) != frames or frames < 1:
            raise ConfigError(f"GibletDataset: frames={frames!r}; it must be an integer >= 1 (frames per TR)")
        stored = self._info[STIMULUS_ARRAYS["video"]].tail[0]
        return None if frames >= stored else frame_indices(stored, int(frames))

    def _pick_pool(self, pool: Optional[Sequence[int]]) -> Optional[tuple[int, int]]:
        if pool is None:
            return None
        if "video" not in self.modalities:
            raise ConfigError(f"GibletDataset: video_pool={pool!r} pools video frames, but this dataset serves "
                              f"{', '.join(self.modalities)}; drop video_pool or serve video")
        stored = self._info[STIMULUS_ARRAYS["video"]].tail[1:3]
        if (len(pool) != 2 or not all(isinstance(v, (int, np.integer)) and 1 <= v for v in pool)
                or pool[0] > stored[0] or pool[1] > stored[1]):
            raise ConfigError(f"GibletDataset: video_pool={list(pool)!r}; it must be [height, width] between 1 and "
                              f"the stored frame size {list(stored)}")
        return int(pool[0]), int(pool[1])

    def _served_row(self, name: str, info: _ArrayInfo) -> tuple[tuple[int, ...], np.dtype]:
        """Shape (after the TR axis) and dtype of the rows a chunk holds once decoded, frames
        kept and pooled."""
        if name != STIMULUS_ARRAYS["video"]:
            return info.tail, info.dtype
        n_frames, height, width, channels = info.tail
        n_frames = n_frames if self.frames is None else len(self.frames)
        if self.video_pool is None:
            return (n_frames, height, width, channels), info.dtype
        return (n_frames, *self.video_pool, channels), np.dtype(np.float32)

    def _array_names(self) -> list[str]:
        names = [f"fmri/{s}/bold" for s in self.subjects] if "fmri" in self.modalities else []
        names += [STIMULUS_ARRAYS[m] for m in self.stimulus]
        return names + ([HAS_TEXT] if "text" in self.modalities else [])

    def _layout(self) -> tuple[int, ...]:
        """Lengths of runs of consecutive sample ids that share one stored fMRI chunk."""
        start, stop = self.trs
        sizes: list[int] = []
        for s in self.subjects:
            info = self._info.get(f"fmri/{s}/bold") or next(iter(self._info.values()), None)
            step = info.read_trs if info else max(stop - start, 1)
            cuts = [start] + list(range((start // step + 1) * step, stop, step)) + [stop]
            sizes += [b - a for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        return tuple(sizes)

    @property
    def stimulus(self) -> tuple[str, ...]:
        return tuple(m for m in self.modalities if m != "fmri")

    @property
    def n_trs_split(self) -> int:
        return self.trs[1] - self.trs[0]

    def __len__(self) -> int:
        return len(self.subjects) * self.n_trs_split

    # -- per-process state (never pickled) --------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_local"] = None
        return state

    def _state(self) -> dict:
        if self._local is None or self._local["pid"] != os.getpid():
            self._local = {"pid": os.getpid(), "view": open_store(self.store_path), "arrays": {},
                           "cache": ChunkCache(self.cache_bytes), "scalers": {}}
        return self._local

    @property
    def cache(self) -> ChunkCache:
        """This process's chunk cache (hits, misses, nbytes)."""
        return self._state()["cache"]

    def _chunk(self, name: str, c: int) -> np.ndarray:
        st = self._state()

        def load() -> np.ndarray:
            if name not in st["arrays"]:
                st["arrays"][name] = st["view"].array(name)
            step = self._info[name].read_trs
            rows = st["arrays"][name][c * step:(c + 1) * step]
            if name == STIMULUS_ARRAYS["video"]:  # once per chunk, not once per window that reads it
                rows = rows if self.frames is None else rows[:, self.frames]
                rows = rows if self.video_pool is None else pool_frames(torch.from_numpy(rows), self.video_pool).numpy()
            return rows

        return st["cache"].get((name, c), load)

    def _span(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo .. hi-1`` of a stored series, zeros for rows before TR 0.

        Inside one chunk this is a read-only *view* of the cached chunk: callers copy it
        (once) into the sample or batch they hand out.
        """
        (tail, dtype), first, step = self._served[name], max(lo, 0), self._info[name].read_trs
        if lo >= 0 and lo // step == (hi - 1) // step:  # the common case: one chunk, nothing to pad
            return self._chunk(name, lo // step)[lo % step:lo % step + hi - lo]
        out = np.zeros((hi - lo,) + tail, dtype=dtype)
        for c in range(first // step, (hi - 1) // step + 1) if first < hi else ():
            chunk, c0 = self._chunk(name, c), c * step
            a, b = max(first, c0), min(hi, c0 + len(chunk))
            out[a - lo:b - lo] = chunk[a - c0:b - c0]
        return out

    # -- samples ---------------------------------------------------------------------------
    def locate(self, index: int) -> tuple[int, int]:
        """``(subject index, TR)`` of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside 0..{len(self) - 1}")
        s, offset = divmod(int(index), self.n_trs_split)
        return s, self.trs[0] + offset

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v)) for k, v in self._read(index).items()}  # copies: never a cache view

    def get_batch(self, indices: Sequence[int], *, wire: bool = False) -> dict:
        """The samples ``indices`` collated (what ``default_collate`` of ``self[i]`` gives),
        copying each row once from the cache into the batch (shared memory in a worker).

        ``wire=True`` (``GibletLoader``'s workers): entries under 64 KiB stay numpy arrays,
        which cross the worker queue by value rather than as one shared-memory segment and
        one passed file descriptor each; the loader makes them tensors on arrival.
        """
        samples = [self._read(int(i)) for i in indices]
        return {k: _stack([x[k] for x in samples], wire) for k in samples[0]}

    def _read(self, index: int) -> dict[str, np.ndarray]:
        """One sample as numpy arrays, possibly read-only views of cached chunks."""
        s, t = self.locate(index)
        out = {"index": np.int64(index), "subject": np.int64(s), "tr": np.int64(t)}
        if "fmri" in self.modalities:
            out["fmri"] = self._span(f"fmri/{self.subjects[s]}/bold", t, t + 1)[0]
        if self.stimulus:
            src = source_trs(t, self.window, self.lag)
            valid = src >= 0
            stim = {"stim_valid": valid}
            for m in self.stimulus:
                stim.update(getattr(self, f"_{m}")(src, valid))
            out.update({k: v[0] for k, v in stim.items()} if self.window == 0 else stim)  # no context axis
        return out

    def _video(self, src: np.ndarray, valid: np.ndarray) -> dict:
        frames = self._span(STIMULUS_ARRAYS["video"], src[0], src[-1] + 1)  # frames kept and pooled
        if self.normalize:
            frames = self._scaler("video").transform(frames if self.video_pool else frames / 255.0)
            frames[~valid] = 0.0
        return {"video": frames}

    def _audio(self, src: np.ndarray, valid: np.ndarray) -> dict:
        return {"audio": self._span(STIMULUS_ARRAYS["audio"], src[0], src[-1] + 1).astype(np.int64)}

    def _text(self, src: np.ndarray, valid: np.ndarray) -> dict:
        name = STIMULUS_ARRAYS["text"]
        reach = len(hrf_kernel(self.tr_s)) - 1 if self.hrf else 0
        rows = self._span(name, src[0] - reach, src[-1] + 1)
        if self.normalize:
            real = np.arange(src[0] - reach, src[-1] + 1) >= 0
            rows = np.where(real[:, None], self._scaler("text").transform(rows), 0.0).astype(np.float32)
        if self.hrf:
            rows = convolve_windows(rows, hrf_kernel(self.tr_s), len(src))
        has_text = self._span(HAS_TEXT, src[0], src[-1] + 1)  # False before TR 0
        return {"text": rows.astype(np.float32, copy=False), "has_text": has_text}

    # -- normalization stats ---------------------------------------------------------------
    def _scaler(self, key: str) -> ZScorer:
        st = self._state()
        if key not in st["scalers"]:
            view = st["view"]
            if key == "video":
                st["scalers"][key] = ZScorer.from_stats(*view.video_stats())
            elif key == "text":
                st["scalers"][key] = ZScorer.from_stats(*view.text_stats())
            else:
                st["scalers"][key] = view.scaler(key)
        return st["scalers"][key]

    def scaler(self, subject: int | str) -> ZScorer:
        """The ``ZScorer`` that normalized one subject's fMRI (by name or index into ``subjects``)."""
        return self._scaler(self.subjects[subject] if isinstance(subject, int) else subject)

    @property
    def stats(self) -> dict:
        """Every normalization the served data went through: ``{"fmri": {subject: ZScorer},
        "video": ZScorer (channel,) over [0, 1] pixels, "text": ZScorer (embedding,)}``
        (stimulus entries only where the store has them)."""
        out: dict = {"fmri": {s: self.scaler(s) for s in self.subjects}}
        view = self._state()["view"]
        for m in ("video", "text"):
            if view.has(f"{m}/mean"):
                out[m] = self._scaler(m)
        return out

    def denormalize(self, z, subject):
        """Map z-scored fMRI ``(batch, voxel)`` (numpy or torch) back to scanner units.

        ``subject`` is one subject (name or index) or a ``(batch,)`` tensor of indices, e.g.
        ``batch["subject"]``. Goes through the same ``ZScorer`` that normalized the data.
        """
        if isinstance(subject, (int, str)):
            return self.scaler(subject).inverse_transform(z)
        idx = torch.as_tensor(subject).cpu().numpy() if not isinstance(subject, np.ndarray) else subject
        out = z.clone() if isinstance(z, torch.Tensor) else np.array(z, dtype=np.float32)
        for s in np.unique(idx):
            rows = torch.from_numpy(idx == s).to(z.device) if isinstance(z, torch.Tensor) else idx == s
            out[rows] = self.scaler(int(s)).inverse_transform(z[rows])
        return out

    # -- shapes ----------------------------------------------------------------------------
    @property
    def n_voxels(self) -> int:
        return int(self._state()["view"].n_voxels)

    def sample_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every entry of a sample (without the batch axis)."""
        ctx = (self.window + 1,) if self.window else ()
        spec = {k: ((), torch.int64) for k in ("index", "subject", "tr")}
        if "fmri" in self.modalities:
            spec["fmri"] = (self._info[f"fmri/{self.subjects[0]}/bold"].tail, torch.float32)
        if self.stimulus:
            spec["stim_valid"] = (ctx, torch.bool)
        dtypes = {"video": torch.float32 if self.normalize or self.video_pool else torch.uint8,
                  "audio": torch.int64, "text": torch.float32}
        for m in self.stimulus:
            spec[m] = (ctx + self._served[STIMULUS_ARRAYS[m]][0], dtypes[m])
        if "text" in self.modalities:
            spec["has_text"] = (ctx, torch.bool)
        return spec

    def __repr__(self) -> str:
        return (f"GibletDataset({Path(self.store_path).name!r}, split={self.split!r}, subjects={len(self.subjects)}, "
                f"trs={self.trs}, modalities={self.modalities}, window={self.window}, lag={self.lag}, hrf={self.hrf})")


WIRE_BYTES = 64 * 1024  # below this, a batch entry is sent by value (see GibletDataset.get_batch)


def _stack(arrays: list, wire: bool = False):
    """``np.stack`` into a new tensor -- in a DataLoader worker, one in shared memory, so that
    handing the batch to the main process copies nothing more (as ``default_collate`` does)."""
    first = np.asarray(arrays[0])
    shape = (len(arrays),) + first.shape
    if wire and first.nbytes * len(arrays) < WIRE_BYTES:
        return np.stack(arrays)
    out = torch.from_numpy(np.empty(0, dtype=first.dtype))
    if get_worker_info() is not None:
        storage = out._typed_storage()._new_shared(int(np.prod(shape)), device=out.device)
        out = out.new(storage).resize_(shape)
    else:
        out = out.new_empty(shape)
    np.stack(arrays, out=out.numpy())
    return out


def _nonneg(name: str, value: int) -> int:
    if int(value) != value or value < 0:
        raise ConfigError(f"GibletDataset: {name}={value!r}; it must be an integer >= 0 (TRs)")
    return int(value)


def _choice(name: str, value: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ConfigError(f"GibletDataset: {name}={value!r}; choose one of {', '.join(allowed)}")
    return value
