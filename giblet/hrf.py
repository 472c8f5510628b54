"""The canonical haemodynamic response, defined once: nilearn's Glover HRF sampled once per
TR, and the causal convolution of a whole series with it.

The training dataset (``giblet.data``: ``hrf=True``), the model's temporal filter
(``giblet.models``) and the planted response of ``giblet.synth`` all use these numbers.
numpy + nilearn only: no PyTorch. nilearn is imported on the first call, not at import
(``nilearn.glm`` takes ~1.5 s to import), so importing this module costs nothing.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

HRF_LENGTH_S = 32.0  # seconds of response kept; the Glover undershoot is < 1e-3 of the peak beyond
_OVERSAMPLING = 50  # nilearn's default grid: tr_s / 50 apart, so every 50th sample lands on a TR


def hrf_kernel(tr_s: float, time_length: float = HRF_LENGTH_S) -> np.ndarray:
    """The Glover HRF sampled once per TR, starting at lag 0, scaled to unit sum.

    nilearn's ``glover_hrf(oversampling=1)`` samples a grid of ``time_length / (n - 1)``
    seconds, not ``tr_s`` (1.6 s apart at TR 1.5, 2.13 s at TR 2: the peak lands at 6.2 or
    6.6 s instead of 5 s); sampling the default 50x grid every 50th point keeps the peak at
    its true delay. Unit sum: a sustained stimulus keeps its level after convolution.

    Returns:
        ``(ceil(time_length / tr_s),) float64``, read-only and shared by every caller with
        the same arguments (cached); peaks 4-6 s after lag 0.
    """
    return _kernel(float(tr_s), float(time_length))


@lru_cache(maxsize=16)
def _kernel(tr_s: float, time_length: float) -> np.ndarray:
    from nilearn.glm.first_level import glover_hrf

    fine = glover_hrf(t_r=tr_s, oversampling=_OVERSAMPLING, time_length=time_length)
    kernel = np.asarray(fine[::_OVERSAMPLING], dtype=np.float64)
    kernel = kernel / kernel.sum()
    kernel.setflags(write=False)  # shared through the cache: callers must not change it
    return kernel


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
