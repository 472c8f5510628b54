"""The planted BOLD of a generated study: a brain-shaped baseline, the response to the
planted regressors with drift and noise, int16 NIfTI written like scanner output, and the
expected r of each voxel (the best any model can do). Used by :func:`giblet.synth.make_study`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def brain(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' mask and a raw baseline image (~600-1400 inside, ~15 outside)."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum((g / 0.8) ** 2 for g in grid))
    inside = r < 1.0
    base = np.where(inside, 1000 + 400 * np.cos(3 * grid[0]) * np.sin(2 * grid[1]), 15.0)
    base = base * rng.uniform(0.95, 1.05, size=shape)
    return inside, base


def write_bold(path: Path, data: np.ndarray, affine: np.ndarray, tr_s: float) -> None:
    """Write float data as int16 NIfTI with slope/intercept scaling, like scanner output."""
    import nibabel as nib

    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    zooms = list(img.header.get_zooms()[:3]) + [tr_s]
    img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def make_bold(shape, n_trs, tr_s, regressors, weights, inside, base, rng, amplitude=0.03, noise=0.01,
              drift: float = 0.02, block: int = 64) -> np.ndarray:
    """``(x, y, z, tr)`` float32 raw BOLD: ``base * (1 + drift + amplitude * weights . x + noise * e)``.

    Args:
        regressors: ``(>= n_trs, N_LATENT)`` the planted regressors ``x`` (standardized).
        weights: ``(x, y, z, N_LATENT)``; zero outside ``inside``.
        noise: std of the white noise ``e`` as a fraction of ``base``.
        drift: largest linear drift over the scan (fraction of ``base``), plus a slow cosine
            of up to half of it; drawn per voxel.

    Built in blocks of TRs so a Sherlock-sized scan (61x73x61x1030) needs one float32 copy,
    not several float64 ones.
    """
    t = np.arange(n_trs) / max(n_trs - 1, 1)
    lin = rng.uniform(-drift, drift, size=shape).astype(np.float32)
    cos = rng.uniform(0, drift / 2, size=shape).astype(np.float32)
    x = np.asarray(regressors[:n_trs], dtype=np.float32)
    w = (weights * inside[..., None]).astype(np.float32)
    base32 = base.astype(np.float32)
    out = np.empty(tuple(shape) + (n_trs,), dtype=np.float32)
    for t0 in range(0, n_trs, block):
        tb = slice(t0, min(n_trs, t0 + block))
        response = np.tensordot(w, x[tb].T, axes=([3], [0]))  # (x, y, z, b)
        slow = lin[..., None] * t[tb].astype(np.float32) + cos[..., None] * np.cos(2 * np.pi * t[tb]).astype(np.float32)
        sig = base32[..., None] * (1.0 + slow + amplitude * response)
        sig += rng.standard_normal(size=sig.shape, dtype=np.float32) * (noise * base32[..., None])
        out[..., tb] = sig
    return out


def write_scan(path, shape, n_trs, tr_s, regressors, weights, inside, base, key, amplitude, noise, drift,
                affine) -> None:
    """One subject's scan of one run: :func:`make_bold` with its own seed ``key``, written by
    :func:`write_bold` (a picklable job for the study's worker processes)."""
    data = make_bold(shape, n_trs, tr_s, regressors, weights, inside, base, np.random.default_rng(key), amplitude,
                     noise, drift)
    write_bold(path, data, affine, tr_s)


def expected_r(weights: np.ndarray, inside: np.ndarray, regressors: np.ndarray, amplitude: float,
               noise: float) -> np.ndarray:
    """``(x, y, z) float32`` expected correlation of each voxel's planted response with its
    drift-free BOLD, over the TRs of ``regressors`` (``(tr, K)``, the subject's TRs)."""
    cov = np.cov(regressors, rowvar=False, bias=True)
    sd = amplitude * np.sqrt(np.maximum(np.einsum("...k,kl,...l->...", weights, cov, weights), 0.0))
    return np.where(inside, sd / np.sqrt(sd**2 + noise**2), 0.0).astype(np.float32)
