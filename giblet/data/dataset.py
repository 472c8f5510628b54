"""``GibletDataset``: (subject, TR) samples read straight from a store's Zarr chunks.

Nothing large lives in the dataset object: it holds the store path and a few integers, so
pickling it to ``DataLoader`` workers is cheap, and each process opens the store itself
on first use. Reads go through a per-process LRU cache of decoded chunks bounded by bytes,
so consecutive samples from one chunk decode it once and memory stays flat over an epoch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from giblet.data.chunks import ArrayInfo, ChunkCache, stack
from giblet.data.context import convolve_windows, frame_indices, hrf_kernel, source_trs
from giblet.data.frames import pool_frames
from giblet.errors import ConfigError, ModalityMissingError
from giblet.manifest import STIMULI, VOXELS_TARGET, fmri_prefix, target_prefix
from giblet.normalize import ZScorer
from giblet.reader import STIMULUS_ARRAYS, open_store

MODALITIES = ("fmri", "video", "audio", "text")
SPLITS = ("train", "val", "test", "all")
EDGES = ("zeros", "drop")
CACHE_CHUNK_SETS = 8  # default cache: this many TR-chunks of every array a sample reads


class GibletDataset(Dataset):
    """Map-style dataset over the (subject, run, TR) triples of one split of a giblet store.

    Samples are laid out (subject, run) pair after pair, in store order, each pair's TRs of
    the split consecutive (cut to the TRs served for that subject in that run). TRs the store
    marks censored for a subject (``StoreView.censored``: scrubbed or non-steady-state
    volumes, ``fmri.confounds``) are left out of that subject's samples. A sample is
    a dict of tensors with only the modalities served --

    - ``fmri``: ``(voxel,) float32`` z-scored (as stored), or the ``(parcel,)`` / ``(vertex,)``
      columns of the target set ``target`` (``fmri.targets``; ``StoreView.targets``);
    - ``video``: ``(frame, height, width, channel) uint8``; ``frames=n`` keeps ``n`` evenly
      spaced frames of each TR; ``video_pool=(h, w)`` serves ``(frame, h, w, channel)
      float32`` [0, 1] pixels average-pooled (:func:`pool_frames`); ``normalize=True``
      z-scores per channel over [0, 1] pixels (``float32``);
    - ``audio``: ``(codebook, code_frame) int64`` EnCodec codes (classes; never normalized);
    - ``text``: ``(embedding,) float32`` (z-scored with ``normalize=True``), and
      ``has_text`` ``() bool``;
    - ``features`` (with ``features=[...]``): ``(embedding,) float32``, the named stored
      pretrained-feature layers side by side, in the order given; ``features_mask``
      ``(n_features,) bool``, per layer False where the TR has no input of its own (a text
      extractor's TRs without words; the rows there are zeros, also after ``normalize``,
      which z-scores each layer with ``StoreView.feature_stats``);
    - ``stim_valid``: ``() bool``, False where the source TR is before the run's TR 0 (see
      ``giblet.data.context``); with ``window=k > 0`` every stimulus entry gains a leading
      context axis of ``k + 1`` TRs, oldest first, and ``stim_valid`` is ``(k + 1,)``. A
      window or the HRF never reaches into another run: each run's stimulus starts at its
      own TR 0;
    - ``subject`` (index into ``self.subjects``), ``run`` (index into ``self.runs``), ``tr``
      (TR in the run) and ``index`` (sample id): ``() int64``.

    A store without fMRI subjects raises ``ModalityMissingError`` with ``modalities=None``
    (never a dataset of length 0); stimulus-only ``modalities`` serve the split's (run, TR)
    samples, ``subject`` -1.

    Args:
        store_path: a store built by ``giblet-preprocess run``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (the store's record of ``giblet.split``).
        subjects: subset of the store's subjects (default: all), served in store order.
        runs: subset of the store's runs (default: all), served in store order.
        window: stimulus context of ``window + 1`` TRs ending at the source TR.
        lag: source TR = target TR - ``lag``.
        hrf: convolve continuous features (text, pretrained features) with the Glover HRF, causally.
        modalities: subset of ``("fmri", "video", "audio", "text")`` (default: all the store has).
            Without ``fmri`` the samples are the (run, TR) pairs of the split (``subject`` -1).
        normalize: z-score video, text and pretrained features with the store's saved stats.
        features: stored pretrained-feature layers to serve, ``features/<extractor>/layer-<k>``
            (``StoreView.feature_names()``); every served run must store them.
        frames: serve this many evenly spaced frames of each TR's stored frames (first and
            last included; :func:`giblet.data.context.frame_indices`) instead of all of them:
            a model that looks at 4 of 10 frames then copies and hands over 40 % of the video.
            Required when runs store different frame counts per TR (movies of other frame rates).
        video_pool: ``(height, width)``: average-pool every served frame to this size
            (:func:`pool_frames`, the op ``GibletAutoencoder`` applies to uint8 frames), once
            per decoded chunk, so the cache and every sample hold the pooled frames.
        edge: ``"zeros"`` (zeros + ``stim_valid``) or ``"drop"`` (leave out target TRs whose
            context reaches before the run's TR 0).
        cache_bytes: bound of each process's decoded-chunk cache (default: 8 TR-chunks of
            every array one sample reads: one fMRI run and each stimulus array).
        storage_options, cache_dir: a store on object storage (``store_path`` a URL): its
            fsspec options (default: the environment's) and an optional local folder that
            keeps every chunk read, shared by the processes (``giblet.open_store``).
        target: what ``fmri`` serves: ``"voxels"`` (default) or a target set's id, e.g.
            ``"parcels/schaefer"`` or ``"surface/fsaverage5"`` (``n_voxels`` is then its column
            count, and ``scaler`` / ``denormalize`` its statistics).
    """

    def __init__(self, store_path: str | os.PathLike, split: str = "train", subjects: Optional[Sequence[str]] = None,
                 *, runs: Optional[Sequence[str]] = None, window: int = 0, lag: int = 0, hrf: bool = False,
                 modalities: Optional[Sequence[str]] = None, normalize: bool = False, edge: str = "zeros",
                 cache_bytes: Optional[int] = None, frames: Optional[int] = None,
                 video_pool: Optional[Sequence[int]] = None, storage_options: Optional[dict] = None,
                 cache_dir: Optional[str | os.PathLike] = None, target: str = VOXELS_TARGET,
                 features: Optional[Sequence[str]] = None):
        self._open = {"storage_options": storage_options, "cache_dir": cache_dir}  # each process opens its own view
        view = open_store(store_path, **self._open)
        self.target = view.target(target) or VOXELS_TARGET
        self.store_path = str(view.path)
        self.tr_s = view.tr_s
        self.window, self.lag = _nonneg("window", window), _nonneg("lag", lag)
        self.hrf, self.normalize, self.edge = bool(hrf), bool(normalize), _choice("edge", edge, EDGES)
        self.split = _choice("split", split, SPLITS)
        self.runs = _pick(view, "run", view.runs, runs)
        self.features = self._pick_features(view, features)
        self.modalities = self._pick_modalities(view, modalities) + (("features",) if self.features else ())
        self.subjects = _pick(view, "subject", view.subjects, subjects) if "fmri" in self.modalities else []
        self.pairs = self._pairs(view)  # (subject index or -1, run index, first TR, stop TR)
        if not self.pairs:
            raise ModalityMissingError(f"{view.path}: split {split!r} of runs {self.runs} and subjects "
                                       f"{self.subjects or 'any'} holds no sample (split by run: "
                                       f"{ {k: sorted(v) for k, v in view.split.items()} }); choose another split, "
                                       f"runs or subjects")
        self.offsets = np.cumsum([0] + [b - a for _, _, a, b in self.pairs])
        self._info = {name: ArrayInfo(view.array(name)) for name in self._array_names(view)}
        self.frames = self._pick_frames(frames)
        self.video_pool = self._pick_pool(video_pool)
        self._served = {name: self._served_row(name, info) for name, info in self._info.items()}
        self.chunk_sizes = self._layout()
        chunk_bytes = {n: i.read_trs * int(np.prod(self._served[n][0], dtype=np.int64)) * self._served[n][1].itemsize
                       for n, i in self._info.items()}  # as cached: frames kept and pooled
        per_run = [sum(b for n, b in chunk_bytes.items() if n.startswith(f"{STIMULI}/{r}/")) for r in self.runs]
        chunk_set = max(per_run, default=0)
        chunk_set += max((b for n, b in chunk_bytes.items() if n.startswith("fmri/")), default=0)
        self.cache_bytes = int(cache_bytes) if cache_bytes is not None else CACHE_CHUNK_SETS * chunk_set
        self._local: Optional[dict] = None  # per-process: store view, arrays, cache, scalers

    # -- set-up ----------------------------------------------------------------------------
    def _pick_modalities(self, view, modalities) -> tuple[str, ...]:
        present = (["fmri"] if view.subjects else []) + [m for m in STIMULUS_ARRAYS
                                                          if any(view.has(_stim(view, m, r)) for r in self.runs)]
        if modalities is None:
            if "fmri" not in present:
                raise ModalityMissingError(f"{view.path}: the store has no fMRI (no subject's BOLD was built; it has: "
                                           f"{', '.join(present) or 'nothing'}); add runs.<run>.fmri (or inputs.fmri) "
                                           f"to the config and rerun, or pass modalities= without 'fmri'")
            chosen = present
        else:
            bad = [m for m in modalities if m not in MODALITIES]
            if bad:
                raise ConfigError(f"GibletDataset: unknown modalities {bad}; choose from {', '.join(MODALITIES)}")
            missing = [m for m in modalities if m not in present]
            if missing:
                raise ModalityMissingError(f"{view.path}: the store has no {', '.join(missing)} "
                                           f"(it has: {', '.join(present) or 'nothing'}); drop them from modalities or "
                                           f"add that input to the preprocessing config and rerun")
            chosen = [m for m in MODALITIES if m in modalities]
        for m in chosen:
            lacking = [r for r in self.runs if m != "fmri" and not view.has(_stim(view, m, r))]
            if lacking:
                raise ModalityMissingError(f"{view.path}: runs {lacking} have no {m}; serve runs that all have it "
                                           f"(runs=...) or drop {m} from modalities")
        if self.hrf and "text" not in chosen and not self.features:
            raise ConfigError(f"GibletDataset: hrf=True convolves text embeddings and pretrained features only (never "
                              f"codes or frames), but this dataset serves {', '.join(chosen)}; drop hrf or serve text "
                              f"or features")
        return tuple(chosen)

    def _pairs(self, view) -> list[tuple[int, int, int, int]]:
        """Every (subject, run) stretch of the split, in store order (subject -1: no fMRI served),
        cut around the subject's censored TRs (``view.censored``: they have no fMRI to serve)."""
        out = []
        for si, subject in enumerate(self.subjects or [None]):
            for ri, run in enumerate(self.runs):
                if subject is not None and not view.has_run(subject, run):
                    continue  # a subject may lack a run
                start, stop = view.split_trs(self.split, run, subject)
                if self.edge == "drop" and self.stimulus:
                    start = max(start, self.window + self.lag)
                if stop <= start:
                    continue
                censored = view.censored(subject, run)[start:stop] if subject is not None else np.zeros(0, bool)
                for a, b in _kept_spans(censored, int(start), int(stop)):
                    out.append((si if subject is not None else -1, ri, a, b))
        return out

    def _array_names(self, view) -> list[str]:
        names = sorted({self._bold(self.subjects[s], self.runs[r]) for s, r, _, _ in self.pairs if s >= 0})
        for run in self.runs:
            names += [_stim(view, m, run) for m in self.stimulus if m != "features"]
            names += [n for spec in self.features for n in _feature_arrays(view, spec, run)]
            names += [_stim(view, "text", run, "has_text")] if "text" in self.modalities else []
        return names

    def _pick_frames(self, frames: Optional[int]) -> Optional[dict]:
        """Frame slots served of each TR, per run (None: all)."""
        stored = {r: self._info[self._name("video", r)].tail[0] for r in range(len(self.runs))} \
            if "video" in self.modalities else {}
        if frames is None:
            if len(set(stored.values())) > 1:
                raise ConfigError(f"GibletDataset: runs store different frames per TR "
                                  f"({ {self.runs[r]: n for r, n in stored.items()} }: movies of other frame rates); "
                                  f"pass frames=N (at most {min(stored.values())})")
            return None
        if "video" not in self.modalities:
            raise ConfigError(f"GibletDataset: frames={frames!r} selects video frames, but this dataset serves "
                              f"{', '.join(self.modalities)}; drop frames or serve video")
        if int(frames) != frames or frames < 1:
            raise ConfigError(f"GibletDataset: frames={frames!r}; it must be an integer >= 1 (frames per TR)")
        if frames > min(stored.values()) and len(set(stored.values())) > 1:
            raise ConfigError(f"GibletDataset: frames={frames} but some run stores only {min(stored.values())} "
                              f"frames per TR; pass frames <= {min(stored.values())}")
        if all(frames >= n for n in stored.values()):
            return None
        return {r: frame_indices(n, int(frames)) for r, n in stored.items()}

    def _pick_pool(self, pool: Optional[Sequence[int]]) -> Optional[tuple[int, int]]:
        if pool is None:
            return None
        if "video" not in self.modalities:
            raise ConfigError(f"GibletDataset: video_pool={pool!r} pools video frames, but this dataset serves "
                              f"{', '.join(self.modalities)}; drop video_pool or serve video")
        stored = self._info[self._name("video", 0)].tail[1:3]
        if (len(pool) != 2 or not all(isinstance(v, (int, np.integer)) and 1 <= v for v in pool)
                or pool[0] > stored[0] or pool[1] > stored[1]):
            raise ConfigError(f"GibletDataset: video_pool={list(pool)!r}; it must be [height, width] between 1 and "
                              f"the stored frame size {list(stored)}")
        return int(pool[0]), int(pool[1])

    def _served_row(self, name: str, info: ArrayInfo) -> tuple[tuple[int, ...], np.dtype]:
        """Shape (after the TR axis) and dtype of the rows a chunk holds once decoded, frames
        kept and pooled."""
        if not name.endswith("/video/frames"):
            return info.tail, info.dtype
        n_frames, height, width, channels = info.tail
        run = self.runs.index(name.split("/")[1])
        n_frames = n_frames if self.frames is None else len(self.frames[run])
        if self.video_pool is None:
            return (n_frames, height, width, channels), info.dtype
        return (n_frames, *self.video_pool, channels), np.dtype(np.float32)

    def _layout(self) -> tuple[int, ...]:
        """Lengths of runs of consecutive sample ids that share one stored chunk (fMRI's, or
        the first stimulus array's when no fMRI is served)."""
        sizes: list[int] = []
        for s, r, start, stop in self.pairs:
            name = self._bold(self.subjects[s], self.runs[r]) if s >= 0 else self._name(self.stimulus[0], r)
            step = self._info[name].read_trs
            cuts = [start] + list(range((start // step + 1) * step, stop, step)) + [stop]
            sizes += [b - a for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        return tuple(sizes)

    def _bold(self, subject: str, run: str) -> str:
        """The ``bold`` array served for one (subject, run): the voxels' or the target set's."""
        prefix = fmri_prefix(subject, run) if self.target == VOXELS_TARGET else target_prefix(subject, run, self.target)
        return f"{prefix}/bold"

    def _name(self, modality: str, run: int, array: Optional[str] = None) -> str:
        if modality == "features":  # array: a spec, features/<extractor>/layer-<k> (default: the first)
            return f"{STIMULI}/{self.runs[run]}/{array or self.features[0]}"
        return f"{STIMULI}/{self.runs[run]}/{modality}/{array or STIMULUS_ARRAYS[modality]}"

    def _pick_features(self, view, features: Optional[Sequence[str]]) -> tuple[str, ...]:
        """The feature layers served, checked: stored by every served run."""
        from giblet.features.pretrained import parse_spec

        chosen = tuple([features] if isinstance(features, str) else features or ())
        for spec in chosen:
            parse_spec(spec)
            lacking = [r for r in self.runs if r not in view.feature_runs(spec)]
            if lacking:
                raise ModalityMissingError(f"{view.path}: runs {lacking} do not store {spec} (stored: "
                                           f"{', '.join(view.feature_names()) or 'none'}); serve runs that have it "
                                           f"(runs=...), or add the extractor to the config and rerun")
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"GibletDataset: features={list(chosen)} names a layer twice")
        return chosen

    @property
    def stimulus(self) -> tuple[str, ...]:
        return tuple(m for m in self.modalities if m != "fmri")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    # -- per-process state (never pickled) --------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_local"] = None
        return state

    def _state(self) -> dict:
        if self._local is None or self._local["pid"] != os.getpid():
            self._local = {"pid": os.getpid(), "view": open_store(self.store_path, **self._open), "arrays": {},
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
            if name.endswith("/video/frames"):  # once per chunk, not once per window that reads it
                keep = None if self.frames is None else self.frames[self.runs.index(name.split("/")[1])]
                rows = rows if keep is None else rows[:, keep]
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
    def locate(self, index: int) -> tuple[int, int, int]:
        """``(subject index, run index, TR)`` of sample ``index`` (subject -1 without fMRI)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside 0..{len(self) - 1}")
        p = int(np.searchsorted(self.offsets, index, side="right")) - 1
        s, r, start, _ = self.pairs[p]
        return s, r, start + int(index - self.offsets[p])

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
        return {k: stack([x[k] for x in samples], wire) for k in samples[0]}

    def _read(self, index: int) -> dict[str, np.ndarray]:
        """One sample as numpy arrays, possibly read-only views of cached chunks."""
        s, r, t = self.locate(index)
        out = {"index": np.int64(index), "subject": np.int64(s), "run": np.int64(r), "tr": np.int64(t)}
        if "fmri" in self.modalities:
            out["fmri"] = self._span(self._bold(self.subjects[s], self.runs[r]), t, t + 1)[0]
        if self.stimulus:
            src = source_trs(t, self.window, self.lag)
            valid = src >= 0
            stim = {"stim_valid": valid}
            for m in self.stimulus:
                stim.update(getattr(self, f"_{m}")(r, src, valid))
            out.update({k: v[0] for k, v in stim.items()} if self.window == 0 else stim)  # no context axis
        return out

    def _video(self, run: int, src: np.ndarray, valid: np.ndarray) -> dict:
        frames = self._span(self._name("video", run), src[0], src[-1] + 1)  # frames kept and pooled
        if self.normalize:
            frames = self._scaler("video").transform(frames if self.video_pool else frames / 255.0)
            frames[~valid] = 0.0
        return {"video": frames}

    def _audio(self, run: int, src: np.ndarray, valid: np.ndarray) -> dict:
        return {"audio": self._span(self._name("audio", run), src[0], src[-1] + 1).astype(np.int64)}

    def _text(self, run: int, src: np.ndarray, valid: np.ndarray) -> dict:
        reach = len(hrf_kernel(self.tr_s)) - 1 if self.hrf else 0
        rows = self._span(self._name("text", run), src[0] - reach, src[-1] + 1)
        if self.normalize:
            real = np.arange(src[0] - reach, src[-1] + 1) >= 0
            rows = np.where(real[:, None], self._scaler("text").transform(rows), 0.0).astype(np.float32)
        if self.hrf:
            rows = convolve_windows(rows, hrf_kernel(self.tr_s), len(src))
        has_text = self._span(self._name("text", run, "has_text"), src[0], src[-1] + 1)  # False before TR 0
        return {"text": rows.astype(np.float32, copy=False), "has_text": has_text}

    def _features(self, run: int, src: np.ndarray, valid: np.ndarray) -> dict:
        """Each served layer's rows (z-scored with ``normalize``; zeros where its mask is False
        or before TR 0; HRF-convolved with ``hrf``), side by side, and the per-layer masks."""
        reach = len(hrf_kernel(self.tr_s)) - 1 if self.hrf else 0
        lo, hi = src[0] - reach, src[-1] + 1
        blocks, masks = [], []
        for spec in self.features:
            rows = self._span(self._name("features", run, spec), lo, hi).astype(np.float32)
            mask = np.arange(lo, hi) >= 0
            words = _mask_name(self._name("features", run, spec))
            if words in self._info:
                mask &= self._span(words, lo, hi)
            if self.normalize:
                rows = np.where(mask[:, None], self._scaler(spec).transform(rows), 0.0).astype(np.float32)
            if self.hrf:
                rows = convolve_windows(rows, hrf_kernel(self.tr_s), len(src))
            blocks.append(rows)
            masks.append(mask[reach:])
        return {"features": np.concatenate(blocks, axis=-1), "features_mask": np.stack(masks, axis=-1)}

    # -- normalization stats ---------------------------------------------------------------
    def _scaler(self, key) -> ZScorer:
        st = self._state()
        if key not in st["scalers"]:
            view = st["view"]
            if key == "video":
                st["scalers"][key] = ZScorer.from_stats(*view.video_stats())
            elif isinstance(key, str) and key.startswith("features/"):
                st["scalers"][key] = ZScorer.from_stats(*view.feature_stats(key))
            elif key == "text":
                st["scalers"][key] = ZScorer.from_stats(*view.text_stats())
            else:
                st["scalers"][key] = view.scaler(*key, target=self.target)
        return st["scalers"][key]

    def _index(self, names: list[str], value, what: str) -> int:
        if isinstance(value, str):
            if value not in names:
                raise ModalityMissingError(f"GibletDataset: no {what} {value!r}; it serves {', '.join(names)}")
            return names.index(value)
        return int(value)

    def scaler(self, subject: int | str, run: int | str | None = None) -> ZScorer:
        """The ``ZScorer`` that normalized one (subject, run) of fMRI (names or indices into
        ``subjects`` / ``runs``; ``run`` may be left out when one run is served)."""
        if run is None:
            if len(self.runs) != 1:
                raise ModalityMissingError(f"GibletDataset: {len(self.runs)} runs are served ({', '.join(self.runs)}); "
                                           f"say which run's statistics (run=...)")
            run = 0
        s, r = self._index(self.subjects, subject, "subject"), self._index(self.runs, run, "run")
        return self._scaler((self.subjects[s], self.runs[r]))

    @property
    def stats(self) -> dict:
        """Every normalization the served data went through: ``{"fmri": {subject: {run: ZScorer}},
        "video": ZScorer (channel,) over [0, 1] pixels, "text": ZScorer (embedding,)}``
        (stimulus entries only for the modalities served)."""
        view = self._state()["view"]
        out: dict = {"fmri": {s: {r: self.scaler(s, r) for r in self.runs if view.has_run(s, r)}
                              for s in self.subjects}}
        for m in ("video", "text"):
            if m in self.modalities:
                out[m] = self._scaler(m)
        if self.features:
            out["features"] = {spec: self._scaler(spec) for spec in self.features}
        return out

    def denormalize(self, z, subject, run=None):
        """Map z-scored fMRI ``(batch, voxel)`` (numpy or torch) back to scanner units.

        ``subject`` and ``run`` are one name or index each, or ``(batch,)`` tensors of indices,
        e.g. ``batch["subject"]``, ``batch["run"]`` (``run`` may be left out when one run is
        served). Goes through the same ``ZScorer`` that normalized the data.
        """
        if isinstance(subject, (int, str, np.integer)) and (run is None or isinstance(run, (int, str, np.integer))):
            return self.scaler(subject, run).inverse_transform(z)
        n = len(z)
        sub = _indices(subject, n)
        runs = np.zeros(n, dtype=np.int64) if run is None else _indices(run, n)
        if run is None and len(self.runs) != 1:
            self.scaler(0)  # the clear "say which run" error
        out = z.clone() if isinstance(z, torch.Tensor) else np.array(z, dtype=np.float32)
        for s, r in sorted(set(zip(sub.tolist(), runs.tolist()))):
            rows = (sub == s) & (runs == r)
            rows = torch.from_numpy(rows).to(z.device) if isinstance(z, torch.Tensor) else rows
            out[rows] = self.scaler(int(s), int(r)).inverse_transform(z[rows])
        return out

    # -- shapes ----------------------------------------------------------------------------
    @property
    def n_voxels(self) -> int:
        """Columns of the ``fmri`` served: voxels, or the target set's parcels / vertices."""
        return int(self._state()["view"].n_columns(self.target))

    def sample_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every entry of a sample (without the batch axis)."""
        ctx = (self.window + 1,) if self.window else ()
        spec = {k: ((), torch.int64) for k in ("index", "subject", "run", "tr")}
        if "fmri" in self.modalities:
            spec["fmri"] = ((self.n_voxels,), torch.float32)
        if self.stimulus:
            spec["stim_valid"] = (ctx, torch.bool)
        dtypes = {"video": torch.float32 if self.normalize or self.video_pool else torch.uint8,
                  "audio": torch.int64, "text": torch.float32}
        for m in self.stimulus:
            if m == "features":
                width = sum(self._served[self._name(m, 0, f)][0][0] for f in self.features)
                spec[m] = (ctx + (width,), torch.float32)
                spec["features_mask"] = (ctx + (len(self.features),), torch.bool)
                continue
            spec[m] = (ctx + self._served[self._name(m, 0)][0], dtypes[m])
        if "text" in self.modalities:
            spec["has_text"] = (ctx, torch.bool)
        return spec

    def __repr__(self) -> str:
        return (f"GibletDataset({Path(self.store_path).name!r}, split={self.split!r}, subjects={len(self.subjects)}, "
                f"runs={self.runs}, samples={len(self)}, modalities={self.modalities}, window={self.window}, "
                f"lag={self.lag}, hrf={self.hrf}, target={self.target!r})")


def _kept_spans(censored: np.ndarray, start: int, stop: int) -> list[tuple[int, int]]:
    """``[start, stop)`` without its censored TRs, as contiguous ``(a, b)`` spans (``censored``
    covers ``start .. stop - 1``; empty: nothing censored)."""
    if not censored.any():
        return [(start, stop)]
    keep = np.r_[False, ~censored, False].astype(np.int8)
    edges = np.flatnonzero(np.diff(keep))
    return [(start + int(a), start + int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _mask_name(array: str) -> str:
    """The ``has_words`` array beside a stored feature layer (text extractors only)."""
    from giblet.features.pretrained import MASK

    return f"{array.rsplit('/', 1)[0]}/{MASK}"


def _feature_arrays(view, spec: str, run: str) -> list[str]:
    """A layer's array in ``run`` and, for a text extractor, its ``has_words``."""
    name = f"{STIMULI}/{run}/{spec}"
    return [name] + ([_mask_name(name)] if view.has(_mask_name(name)) else [])


def _stim(view, modality: str, run: str, array: Optional[str] = None) -> str:
    return view.stimulus_name(modality, run, array)


def _pick(view, what: str, present: list[str], chosen: Optional[Sequence[str]]) -> list[str]:
    """``chosen`` names (default: all ``present``), checked and in store order."""
    if chosen is None:
        return list(present)
    if isinstance(chosen, str):
        chosen = [chosen]
    unknown = [c for c in chosen if c not in present]
    if unknown:
        raise ModalityMissingError(f"{view.path}: no {what}(s) {', '.join(map(repr, unknown))}; "
                                   f"the store has: {', '.join(present) or 'none'}")
    return [p for p in present if p in set(chosen)]


def _indices(value, n: int) -> np.ndarray:
    """``(n,) int64`` from a tensor, array or one index."""
    if isinstance(value, torch.Tensor):
        value = value.cpu().numpy()
    return np.broadcast_to(np.asarray(value, dtype=np.int64), (n,))


def _nonneg(name: str, value: int) -> int:
    if int(value) != value or value < 0:
        raise ConfigError(f"GibletDataset: {name}={value!r}; it must be an integer >= 0 (TRs)")
    return int(value)


def _choice(name: str, value: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ConfigError(f"GibletDataset: {name}={value!r}; choose one of {', '.join(allowed)}")
    return value
