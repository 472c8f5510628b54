"""Stimulus context for a target TR: causal windows, fixed lags and the canonical HRF.

For a target TR ``t`` the stimulus comes from the *source* TRs
``t - lag - window, ..., t - lag`` (oldest first): never from the future of ``t``.

Before TR 0 there is no stimulus. Rule: source TRs ``< 0`` are served as zeros and
flagged ``False`` in the sample's ``stim_valid`` mask (``GibletDataset(edge="zeros")``,
the default), or the target TRs whose context reaches before TR 0 are left out of the
dataset (``edge="drop"``). Zeros are never mistaken for data: models mask them (e.g. an
``ignore_index`` for audio codes, where 0 is a valid code).

The HRF (``hrf=True``) is nilearn's Glover kernel, convolved causally with *continuous*
features only (text embeddings): integer audio codes are classes, and averaging them is
meaningless. Video frames are not convolved either: an HRF-weighted blur of ~20 TRs of
movie is not an image any encoder expects and would read 20x more data per sample --
give a video model a ``window`` and let it learn the delay, or convolve its features
with :func:`hrf_kernel` inside the model.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

HRF_LENGTH_S = 32.0  # seconds of response kept; the Glover undershoot is < 1e-3 of the peak beyond


@lru_cache(maxsize=8)
def hrf_kernel(tr_s: float, time_length: float = HRF_LENGTH_S) -> np.ndarray:
    """The Glover HRF sampled once per TR, starting at lag 0, scaled to unit sum.

    nilearn's ``glover_hrf(oversampling=1)`` samples a grid of ``time_length / (n - 1)``
    seconds, not ``tr_s``; sampling the default 50x grid every 50th point keeps the peak
    at its true delay. Unit sum: a sustained stimulus keeps its level after convolution.

    Returns:
        ``(ceil(time_length / tr_s),) float64``; peaks 4-6 s after lag 0.
    """
    from nilearn.glm.first_level import glover_hrf

    oversampling = 50
    fine = glover_hrf(t_r=float(tr_s), oversampling=oversampling, time_length=float(time_length))
    kernel = np.asarray(fine[::oversampling], dtype=np.float64)
    kernel = kernel / kernel.sum()
    kernel.setflags(write=False)  # shared by lru_cache: callers must not change it
    return kernel


def frame_indices(total: int, n: int) -> np.ndarray:
    """``n`` evenly spaced frame slots of ``total`` (first and last included; all if ``n >= total``)."""
    if n >= total:
        return np.arange(total, dtype=np.int64)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def source_trs(t: int, window: int, lag: int) -> np.ndarray:
    """``(window + 1,) int64`` source TRs of target ``t``, oldest first (may be negative)."""
    return np.arange(t - lag - window, t - lag + 1, dtype=np.int64)


def convolve_windows(rows: np.ndarray, kernel: np.ndarray, n_out: int) -> np.ndarray:
    """Causal convolution evaluated at the last ``n_out`` positions of ``rows``.

    Args:
        rows: ``(n_out + len(kernel) - 1, ...)`` consecutive TRs ending at the last source
            TR (zeros where the TR is before 0).
        kernel: ``(k,)`` response to an impulse, lag 0 first.
        n_out: number of source TRs to evaluate.

    Returns:
        ``(n_out, ...) float32`` where ``out[p] = sum_j kernel[j] * rows[p + k - 1 - j]``.
    """
    k = len(kernel)
    windows = np.lib.stride_tricks.sliding_window_view(rows, k, axis=0)[:n_out]  # (n_out, ..., k)
    return (windows.astype(np.float64) @ kernel[::-1]).astype(np.float32)


def hrf_convolve(x: np.ndarray, tr_s: float) -> np.ndarray:
    """Causal HRF convolution of a whole ``(tr, ...)`` series (zeros before TR 0).

    The same numbers ``GibletDataset(hrf=True)`` serves, for use without PyTorch.

    Returns:
        ``(tr, ...) float32``.
    """
    kernel = hrf_kernel(tr_s)
    pad = np.zeros((len(kernel) - 1,) + x.shape[1:], dtype=x.dtype)
    return convolve_windows(np.concatenate([pad, x]), kernel, len(x))
