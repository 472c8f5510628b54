"""Confound regression for fMRIPrep BOLD, through nilearn (``fmri.confounds``; docs/bids.md).

- **Which confounds**: ``nilearn.interfaces.fmriprep.load_confounds_strategy`` (a named
  preset, ``fmri.confounds.strategy``: ``simple``, ``scrubbing``, ``compcor``,
  ``ica_aroma``) or ``load_confounds`` (``fmri.confounds.components``: a strategy list such
  as ``[motion, wm_csf, high_pass, scrub, non_steady_state]``), each with
  ``fmri.confounds.options`` as keyword arguments. nilearn finds the
  ``desc-confounds_timeseries.tsv`` beside the BOLD file, picks its columns and returns the
  ``sample_mask``: the volumes kept after scrubbing (high motion) and non-steady-state
  removal. The rest of the run's volumes are *censored*.
- **Cut to the served TRs**: confounds and censoring are computed over the whole file, as
  nilearn does, then cut to the first ``n`` TRs the unit serves.
- **Regression**: one ``nilearn.signal.clean`` call with the confounds, the sample mask and
  the ``fmri.detrend`` / ``fmri.high_pass`` settings (``standardize=None``), in blocks of
  voxels (every step of ``clean`` is per voxel but the confound projection, which depends
  on the confounds only, so the blocks give what one call over all voxels gives). The
  Butterworth filter runs vectorized (``butterworth__copy=True``), the same numbers as
  nilearn's default voxel-by-voxel loop. Censored TRs come back as NaN rows; the kept rows
  come back centred, beside the raw voxel mean over the kept TRs (the store's ``mean``):
  float32 residuals of order the signal's std keep ~1e-7 of a std, where float32 values of
  the scanner's ~1000 would keep only ~1e-5.
"""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from giblet.errors import InputError, InputMissingError

PRESETS = ("simple", "scrubbing", "compcor", "ica_aroma")
COMPONENTS = ("motion", "high_pass", "wm_csf", "global_signal", "compcor", "ica_aroma", "tedana", "scrub",
              "non_steady_state")
# load_confounds' keyword arguments besides img_files and strategy (checked against nilearn's
# signature by a test): validated at config load without importing nilearn (~1.5 s of sklearn).
OPTIONS = ("motion", "scrub", "fd_threshold", "std_dvars_threshold", "wm_csf", "global_signal", "compcor",
           "n_compcor", "ica_aroma", "tedana", "demean")


def active(c) -> bool:
    """Whether ``fmri.confounds`` asks for any regression."""
    return c.strategy is not None or bool(c.components)


def _functions():
    from nilearn.interfaces.fmriprep import load_confounds, load_confounds_strategy

    return load_confounds, load_confounds_strategy


def settings_problems(c) -> list[str]:
    """What is wrong with an ``fmri.confounds`` block (one message each; empty: fine)."""
    problems = []
    if c.strategy is not None and c.components:
        problems.append("fmri.confounds: give strategy (a nilearn preset) or components (a load_confounds strategy "
                        "list), not both")
    if c.strategy is not None and c.strategy not in PRESETS:
        problems.append(f"fmri.confounds.strategy: {c.strategy!r} is not a nilearn preset; choose one of "
                        f"{', '.join(PRESETS)} (or list components)")
    bad = [x for x in c.components if x not in COMPONENTS]
    if bad:
        problems.append(f"fmri.confounds.components: {bad} are not load_confounds strategies; choose from "
                        f"{', '.join(COMPONENTS)}")
    if c.options and not active(c):
        problems.append("fmri.confounds.options: given without fmri.confounds.strategy or .components; set one")
    for key in c.options:
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            problems.append(f"fmri.confounds.options.{key}: not an option of nilearn's load_confounds"
                            + (f"; did you mean {close[0]!r}?" if close else f" ({', '.join(OPTIONS)})"))
    return problems


def describe(c) -> dict:
    """The settings as recorded in the unit's meta (the parameters are in its params)."""
    how = f"load_confounds_strategy({c.strategy!r})" if c.strategy else f"load_confounds({list(c.components)})"
    return {"confounds_call": how, "confounds_options": dict(c.options)}


def confounds_file(bold: str | Path, label: str) -> Path:
    """The fMRIPrep confounds table of ``bold``: beside it, the BOLD's entities without
    ``space``/``res``/``den``/``desc``, ``desc-confounds_timeseries.tsv`` (fMRIPrep >= 20.2) or
    ``desc-confounds_regressors.tsv`` (older). :func:`load` checks that nilearn reads this file.

    Raises:
        InputMissingError: neither exists.
    """
    from giblet.bids import derivative_file

    tried = [derivative_file(bold, "confounds", kind, ".tsv", drop=("space", "res", "den"))
             for kind in ("timeseries", "regressors")]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise InputMissingError(f"{label}: no fMRIPrep confounds file {tried[0]} beside the BOLD {Path(bold).name}; "
                                f"fmri.confounds needs fMRIPrep's *_desc-confounds_timeseries.tsv -- point "
                                f"bids.derivatives at the fMRIPrep output, or drop fmri.confounds")
    return found


def load(bold: str | Path, c, n_file: int, n: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """The confounds and censored TRs of one run, cut to its first ``n`` (served) TRs.

    Args:
        bold: the fMRIPrep BOLD file; ``n_file``: its TR count.
        c: the ``fmri.confounds`` settings.

    Returns:
        ``(confounds (n, k) float64, censored (n,) bool)``.

    Raises:
        InputError: nilearn cannot build the confounds (missing columns, a wrong option), or
            the table's length differs from the BOLD's, or every served TR is censored.
    """
    from nilearn.interfaces.fmriprep.load_confounds_utils import get_confounds_file

    load_confounds, load_strategy = _functions()
    tsv = confounds_file(bold, label)
    try:
        theirs = Path(get_confounds_file(str(bold), flag_full_aroma=False, flag_tedana=False))
    except ValueError as exc:  # e.g. two candidate tables
        theirs = f"none ({str(exc).splitlines()[0]})"
    if theirs != tsv:  # the fingerprint hashes ours: they must be the same file
        raise InputError(f"{label}: nilearn would read the confounds {theirs}, giblet hashed {tsv}; keep one fMRIPrep "
                         f"confounds table beside {Path(bold).name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if c.strategy:
                table, kept = load_strategy(str(bold), denoise_strategy=c.strategy, **c.options)
            else:
                table, kept = load_confounds(str(bold), strategy=tuple(c.components), **c.options)
    except (ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{label}: {tsv}: nilearn cannot build the confounds of fmri.confounds ({first}); use a "
                         f"strategy this fMRIPrep output supports (e.g. fmri.confounds.options.motion=basic, or fewer "
                         f"components) or rerun fMRIPrep") from None
    values = np.asarray(table, dtype=np.float64)
    if len(values) != n_file:
        raise InputError(f"{label}: {tsv} has {len(values)} rows but the BOLD has {n_file} TRs; they come from "
                         f"different fMRIPrep runs -- use the confounds file of this BOLD")
    censored = np.ones(n_file, dtype=bool)
    censored[np.arange(n_file) if kept is None else np.asarray(kept, dtype=np.int64)] = False
    censored = censored[:n]
    if (~censored).sum() < 2:
        raise InputError(f"{label}: {int(censored.sum())} of its {n} served TRs are censored by fmri.confounds "
                         f"(scrubbing / non-steady-state, {tsv}); fewer than 2 remain to z-score -- relax the "
                         f"scrubbing (fmri.confounds.options.fd_threshold) or leave the run out")
    if (~censored).sum() <= values.shape[1] + 1:
        raise InputError(f"{label}: fmri.confounds gives {values.shape[1]} confounds ({tsv.name}) for {int((~censored).sum())} "
                         f"kept TRs; regressing them would leave no signal -- use fewer confounds (e.g. "
                         f"fmri.confounds.strategy=simple with fmri.confounds.options.motion=basic) or longer runs")
    return values[:n], censored


def regress(x: np.ndarray, confounds: np.ndarray, censored: np.ndarray, detrend: bool, high_pass: Optional[float],
            tr_s: float, label: str = "fmri", block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``nilearn.signal.clean`` with confounds and censoring, in voxel blocks (module docstring).

    Args:
        x: ``(tr, voxel) float32`` raw BOLD of the served TRs.
        confounds: ``(tr, k) float64``; ``censored``: ``(tr,) bool``.

    Returns:
        ``(residual, mean)``: ``(tr, voxel) float32`` the cleaned signal centred over the kept
        TRs, NaN rows at censored TRs; ``(voxel,) float64`` the raw mean over the kept TRs
        (``residual + mean`` is the cleaned signal on the scanner's scale).
    """
    from nilearn.signal import clean as nl_clean

    keep = ~censored
    mask = np.flatnonzero(keep) if censored.any() else None
    out = np.full(x.shape, np.nan, dtype=np.float32)
    means = np.empty(x.shape[1], dtype=np.float64)
    for v0 in range(0, x.shape[1], block):
        cols = x[:, v0:v0 + block].astype(np.float64)
        means[v0:v0 + block] = cols[keep].mean(axis=0)
        try:
            cleaned = nl_clean(cols, detrend=detrend, standardize=None, confounds=confounds, sample_mask=mask,
                               high_pass=high_pass, t_r=tr_s, butterworth__copy=True)
        except ValueError as exc:  # e.g. scipy's filtfilt: too few TRs for the filter's padding
            raise InputError(f"{label}: nilearn.signal.clean failed on its {int(keep.sum())} kept TRs ({exc}); use "
                             f"longer runs, or drop fmri.high_pass") from None
        out[keep, v0:v0 + block] = cleaned - cleaned.mean(axis=0)
    return out, means
