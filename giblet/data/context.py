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
with :func:`hrf_kernel` inside the model. The kernel and :func:`hrf_convolve` are defined
once, in :mod:`giblet.hrf`.
"""
from __future__ import annotations

import numpy as np

# The HRF lives in giblet.hrf (shared with the model and giblet.synth); these names stay
# importable from here, where the dataset and ``giblet.data`` take them.
from giblet.hrf import HRF_LENGTH_S, convolve_windows, hrf_convolve, hrf_kernel  # noqa: F401


def frame_indices(total: int, n: int) -> np.ndarray:
    """``n`` evenly spaced frame slots of ``total`` (first and last included; all if ``n >= total``)."""
    if n >= total:
        return np.arange(total, dtype=np.int64)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def source_trs(t: int, window: int, lag: int) -> np.ndarray:
    """``(window + 1,) int64`` source TRs of target ``t``, oldest first (may be negative)."""
    return np.arange(t - lag - window, t - lag + 1, dtype=np.int64)
