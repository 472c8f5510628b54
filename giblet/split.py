"""The train / val / test split: the one place it is computed.

Two rules (``split`` block of the config, recorded in the store's align record):

- **by run** (``val_runs`` / ``test_runs``): those runs are held out whole -- leave-run-out,
  what the field reports; every other run is training data.
- **by fraction** (``val_fraction``, default 0.2 when no run is held out): the last
  ``val_fraction`` of each remaining run's TR grid is val, contiguous, so val TRs never sit
  between train TRs whose HRF tails reach them. ``n_val = floor(val_fraction * n + 1/2)``
  (round half up, never banker's rounding), at most ``n - 1``.

Every consumer -- the align step, the reader, the dataset, statistics over training TRs --
asks this module; nothing else computes a split.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

SPLITS = ("train", "val", "test")


def n_val_trs(n_trs: int, val_fraction: float) -> int:
    """Val TRs at the end of a run of ``n_trs`` TRs: ``floor(val_fraction * n + 1/2)``, at most ``n - 1``."""
    if n_trs <= 0 or val_fraction <= 0:
        return 0
    return min(int(math.floor(val_fraction * n_trs + 0.5)), n_trs - 1)


def fraction_split(n_trs: int, val_fraction: float) -> dict[str, tuple[int, int]]:
    """``{"train": (0, a), "val": (a, n)}`` of one run (a split with no TR is left out)."""
    cut = n_trs - n_val_trs(n_trs, val_fraction)
    out = {"train": (0, cut), "val": (cut, n_trs)}
    return {k: v for k, v in out.items() if v[1] > v[0]}


def effective_val_fraction(val_fraction: Optional[float], held_out: Sequence[str]) -> float:
    """``val_fraction`` as set, else 0.2 -- or 0 when runs are held out whole."""
    if val_fraction is not None:
        return float(val_fraction)
    return 0.0 if held_out else 0.2


def plan_split(n_trs: Mapping[str, int], val_runs: Sequence[str] = (), test_runs: Sequence[str] = (),
               val_fraction: Optional[float] = None) -> dict[str, dict[str, tuple[int, int]]]:
    """TR ranges of every split in every run.

    Args:
        n_trs: run -> length of its TR grid.
        val_runs, test_runs: runs held out whole (names in ``n_trs``; unknown ones ignored:
            the config check names them).
        val_fraction: the last fraction of each other run that is val (None: see
            :func:`effective_val_fraction`).

    Returns:
        ``{run: {split: (start, stop)}}``, only non-empty ranges.
    """
    fraction = effective_val_fraction(val_fraction, list(val_runs) + list(test_runs))
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for run, n in n_trs.items():
        n = int(n)
        if run in test_runs:
            out[run] = {"test": (0, n)} if n else {}
        elif run in val_runs:
            out[run] = {"val": (0, n)} if n else {}
        else:
            out[run] = fraction_split(n, fraction)
    return out


def split_ranges(plan: Mapping[str, Mapping[str, Sequence[int]]], split: str) -> dict[str, tuple[int, int]]:
    """``{run: (start, stop)}`` of one split (``"all"``: every run whole) from :func:`plan_split`'s result."""
    if split == "all":
        return {run: (min(r[0] for r in parts.values()), max(r[1] for r in parts.values()))
                for run, parts in plan.items() if parts}
    return {run: (int(parts[split][0]), int(parts[split][1])) for run, parts in plan.items() if split in parts}
