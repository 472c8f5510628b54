"""Stimulus features of a store for linear baselines: a few cheap numbers per TR and modality,
z-scored over the training TRs and FIR-delayed within each run.

Per TR of each run's grid (``view.n_trs(run)``):

- **video** (``3 + gh * gw + 1`` columns): the mean colour (R, G, B in [0, 1]) of the TR's
  frames; the mean luminance (Rec. 601 weights) of each cell of a coarse ``gh x gw`` grid
  (area pooling, default 4 x 4); and motion energy, the mean absolute luminance difference
  between consecutive frame slots of the TR. Padded slots (repeats, ``video/padded``) are
  left out of all three, unless every slot of a TR is padded.
- **audio** (``audio_dim`` columns, default 16): the histogram of the EnCodec codes of the
  first ``audio_codebooks`` codebook(s) (default 1: the coarsest residual level, which
  carries most of the signal) over the TR's code frames, as fractions, projected on its
  first principal components over the training TRs. Code indices are arbitrary labels
  (neighbouring codes are not similar sounds), so their counts are reduced by PCA rather
  than by binning neighbouring indices.
- **text**: the stored embeddings, zeros where no annotation covers the TR (whatever
  ``text.fill`` stored there).
- **stored pretrained features** (``arrays``: ``features/<extractor>/layer-<k>``, one band
  each, named by it): the stored layer, zeros where the TR has no input of its own (a text
  extractor's TRs without words). Given ``arrays`` and no ``modalities``, the design matrix
  holds those layers only.

A run without a modality that other runs have gets zeros for it. Each column is then
z-scored with its mean and std over the *training* TRs of every run (a constant column is
0), and delayed: ``x_d[t] = x[t - d]`` for each delay ``d`` (default 1 .. ceil(12 s / TR),
the span of the HRF), **within each run** -- the first ``d`` TRs of a run get 0 (the
training mean), never the end of the previous run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from giblet.errors import ConfigError, StoreError
from giblet.normalize import ZScorer

MODALITIES = ("video", "audio", "text")
HRF_SPAN_S = 12.0  # the canonical HRF has decayed by ~12 s after a stimulus
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # Rec. 601


@dataclass(frozen=True)
class FeatureParams:
    """How stimulus features are made (see the module docstring)."""

    modalities: Optional[tuple[str, ...]] = None  # None: every modality the store has
    delays: Optional[tuple[int, ...]] = None  # TRs; None: 1 .. ceil(HRF_SPAN_S / tr_s)
    grid: tuple[int, int] = (4, 4)  # video luminance grid (rows, columns)
    audio_codebooks: int = 1  # histograms of the first k codebooks
    audio_dim: int = 16  # principal components of the code histograms kept
    block_trs: int = 32  # TRs of video decoded into memory at once
    arrays: tuple[str, ...] = ()  # stored pretrained-feature layers, each its own band


@dataclass
class StoreFeatures:
    """Design matrices of a store, one per run.

    Attributes:
        runs: run -> ``(tr, feature) float32`` over the run's whole TR grid, z-scored and delayed.
        bands: modality (or feature layer) -> its columns (a slice), in ``MODALITIES`` order, then
            the layers in the order given.
        delays: the FIR delays in TRs; columns of a band are ordered (delay, base feature).
    """

    runs: dict[str, np.ndarray]
    bands: dict[str, slice]
    delays: tuple[int, ...]

    @property
    def n_features(self) -> int:
        return next(iter(self.runs.values())).shape[1]


def default_delays(tr_s: float) -> tuple[int, ...]:
    """``(1, ..., ceil(12 s / tr_s))``: delays covering the HRF (8 at a 1.5 s TR)."""
    return tuple(range(1, math.ceil(HRF_SPAN_S / tr_s - 1e-9) + 1))


def fir(x: np.ndarray, delays: tuple[int, ...]) -> np.ndarray:
    """Delayed copies of one run's features, zero-padded at the run's start.

    Args:
        x: ``(tr, feature)`` of one run.
        delays: non-negative TR delays.

    Returns:
        ``(tr, len(delays) * feature)`` float32; block ``i`` holds ``x`` shifted down by ``delays[i]``.
    """
    n, k = x.shape
    out = np.zeros((n, len(delays) * k), dtype=np.float32)
    for i, d in enumerate(delays):
        if d < n:
            out[d:, i * k:(i + 1) * k] = x[:n - d]
    return out


def _pool(lum: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area means of ``(..., h, w)`` over a ``grid`` of near-equal cells -> ``(..., gh * gw)``."""
    h, w = lum.shape[-2:]
    rows = np.linspace(0, h, min(grid[0], h) + 1).astype(int)
    cols = np.linspace(0, w, min(grid[1], w) + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(lum, rows[:-1], axis=-2), cols[:-1], axis=-1)
    cells = sums / (np.diff(rows)[:, None] * np.diff(cols)[None, :])
    return cells.reshape(*lum.shape[:-2], -1)


def video_features(frames: np.ndarray, padded: Optional[np.ndarray] = None,
                   grid: tuple[int, int] = (4, 4)) -> np.ndarray:
    """Mean colour, a coarse luminance grid and motion energy per TR.

    Args:
        frames: ``(tr, frame, height, width, channel)`` uint8 RGB.
        padded: ``(tr, frame)`` bool, True where a slot repeats an earlier frame (left out).
        grid: luminance grid (rows, columns).

    Returns:
        ``(tr, 3 + rows * columns + 1)`` float32, values in [0, 1].
    """
    n, f = frames.shape[:2]
    use = np.ones((n, f), bool) if padded is None else ~np.asarray(padded, bool)
    use[~use.any(1)] = True  # a TR of repeats only: its one picture
    weight = use / use.sum(1, keepdims=True)
    colour = frames.mean(axis=(2, 3), dtype=np.float32) / 255  # (tr, frame, channel)
    lum = (frames.astype(np.float32) / 255) @ LUMA  # (tr, frame, h, w)
    cells = _pool(lum, grid)
    pairs = use[:, 1:]  # a difference counts where its later slot is a real frame
    diff = np.abs(np.diff(lum, axis=1)).mean(axis=(2, 3)) if f > 1 else np.zeros((n, 0), np.float32)
    motion = (diff * pairs).sum(1) / np.maximum(pairs.sum(1), 1)
    return np.concatenate([np.einsum("tf,tfc->tc", weight, colour), np.einsum("tf,tfk->tk", weight, cells),
                           motion[:, None]], axis=1).astype(np.float32)


def audio_histograms(codes: np.ndarray, codebook_size: int, n_codebooks: int = 1) -> np.ndarray:
    """Per-TR histograms of EnCodec codes.

    Args:
        codes: ``(tr, codebook, code_frame)`` integer codes in ``[0, codebook_size)``.
        n_codebooks: histograms of the first ``n_codebooks`` codebooks, side by side.

    Returns:
        ``(tr, n_codebooks * codebook_size)`` float32: the fraction of the TR's code frames
        holding each code.
    """
    n, books, frames = codes.shape
    k = min(n_codebooks, books)
    flat = codes[:, :k].astype(np.int64) + codebook_size * np.arange(k)[None, :, None]
    rows = np.repeat(np.arange(n), k * frames)
    hist = np.zeros((n, k * codebook_size), dtype=np.float32)
    np.add.at(hist, (rows, flat.reshape(-1)), np.float32(1.0 / max(frames, 1)))
    return hist


def text_features(embeddings: np.ndarray, has_text: np.ndarray) -> np.ndarray:
    """``(tr, embedding)`` float32: the embeddings, zeros where ``has_text`` ``(tr,)`` is False."""
    return np.where(np.asarray(has_text, bool)[:, None], embeddings, 0).astype(np.float32)


def _video(view, run: str, params: FeatureParams) -> np.ndarray:
    n, step = view.n_trs(run), max(1, params.block_trs)
    parts = [video_features(view.video(run, slice(t, t + step)), view.video_padded(run, slice(t, t + step)),
                            params.grid) for t in range(0, n, step)]
    return np.concatenate(parts) if parts else np.zeros((0, 4 + params.grid[0] * params.grid[1]), np.float32)


def _audio(view, run: str, params: FeatureParams) -> np.ndarray:
    size = int(view.array(view.stimulus_name("audio", run)).attrs.get("codebook_size") or 0)
    if not size:  # not recorded: the largest code any run holds (every run needs the same width)
        size = 1 + max(int(view.audio_codes(r).max(initial=0)) for r in view.modality_runs("audio"))
    return audio_histograms(view.audio_codes(run), size, params.audio_codebooks)


def _text(view, run: str, params: FeatureParams) -> np.ndarray:
    return text_features(view.text(run), view.has_text(run))


READERS = {"video": _video, "audio": _audio, "text": _text}


def _train_rows(view, runs: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of every run's training TRs, stacked ``(train tr, feature)``."""
    train = view.split["train"]
    return np.concatenate([x[slice(*train[r])] for r, x in runs.items() if r in train])


def _pca(runs: dict[str, np.ndarray], train: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    """Projection of every run on the first ``dim`` principal axes of the training rows."""
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    axes = vt[:dim].T
    return {r: ((x - mean) @ axes).astype(np.float32) for r, x in runs.items()}


def _zscore(runs: dict[str, np.ndarray], train: np.ndarray) -> dict[str, np.ndarray]:
    """Every run z-scored with the training rows' statistics (``ZScorer``: constant columns -> 0)."""
    scaler = ZScorer().fit(train)
    return {r: scaler.transform(x) for r, x in runs.items()}


def _modalities(view, params: FeatureParams) -> list[str]:
    if params.modalities is None and params.arrays:
        return []
    want = list(params.modalities or [m for m in MODALITIES if view.has_modality(m)])
    unknown = [m for m in want if m not in MODALITIES]
    if unknown:
        raise ConfigError(f"features: modality {unknown[0]!r} is not one of {', '.join(MODALITIES)}")
    missing = [m for m in want if not view.has_modality(m)]
    if missing or not want:
        have = ", ".join(m for m in MODALITIES if view.has_modality(m)) or "none"
        raise StoreError(f"{view.path}: no {missing[0] if missing else 'stimulus'} in this store to compute features "
                         f"from (it has: {have}); choose modalities it has, or add the input to the config and rerun")
    return [m for m in MODALITIES if m in want]


def store_features(view, params: FeatureParams = FeatureParams()) -> StoreFeatures:
    """Every run's z-scored, FIR-delayed design matrix (see the module docstring).

    Args:
        view: an open store (``giblet.open_store``).
        params: which modalities and how.

    Returns:
        ``StoreFeatures``: per run ``(tr, feature) float32`` over the run's TR grid.

    Raises:
        StoreError: a modality the store lacks, or a split with no training TR.
    """
    modalities = _modalities(view, params)
    if not view.split["train"]:
        raise StoreError(f"{view.path}: the split has no training TR (split rule {view.align.get('split_rule')}); "
                         f"hold out fewer runs or a smaller split.val_fraction and rerun `giblet-preprocess run`")
    delays = tuple(params.delays) if params.delays is not None else default_delays(view.tr_s)
    blocks, bands, start = {r: [] for r in view.runs}, {}, 0
    for m in modalities + list(params.arrays):
        raw = _modality(view, m, params) if m in MODALITIES else _stored_layer(view, m)
        if m == "audio":
            raw = _pca(raw, _train_rows(view, raw), params.audio_dim)
        base = _zscore(raw, _train_rows(view, raw))
        for r in view.runs:
            blocks[r].append(fir(base[r], delays))
        width = blocks[view.runs[0]][-1].shape[1]
        bands[m], start = slice(start, start + width), start + width
    return StoreFeatures({r: np.concatenate(b, axis=1) for r, b in blocks.items()}, bands, delays)


def _stored_layer(view, spec: str) -> dict[str, np.ndarray]:
    """One stored pretrained-feature layer in every run (zeros in runs without it and where the
    TR has no input of its own)."""
    have = view.feature_runs(spec)
    if not have:
        view.feature(spec, view.runs[0])  # the clear "no such layer" error
    out = {r: view.feature(spec, r) * view.feature_mask(spec, r)[:, None] for r in have}
    width = next(iter(out.values())).shape[1]
    return {r: out.get(r, np.zeros((view.n_trs(r), width), np.float32)) for r in view.runs}


def _modality(view, modality: str, params: FeatureParams) -> dict[str, np.ndarray]:
    """Raw features of one modality in every run (zeros in runs without it)."""
    have = set(view.modality_runs(modality))
    out = {r: READERS[modality](view, r, params) for r in view.runs if r in have}
    width = next(iter(out.values())).shape[1]
    return {r: out.get(r, np.zeros((view.n_trs(r), width), np.float32)) for r in view.runs}
