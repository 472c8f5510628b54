"""Pearson r per target, per subject, and its summaries: the field's encoding-model score.

A prediction is scored against one subject's held-out BOLD at a time: ``pearson_r`` gives
one r per target (column) of that subject's ``(tr, target)`` matrices, ``summarize`` turns
the targets' r into ``mean / median / top10 / n``, and ``per_subject`` summarizes each
subject and then across subjects (a subject counts once, whatever its number of TRs).

:class:`SubjectCorrelation` (torch) is the same r accumulated over batches and DDP ranks:
float64 running sums per subject, exact whatever the batching or the sharding.

Conventions: ``r`` is 0 for a target where either side has no variance (a constant
prediction says nothing; a zero-variance voxel was z-scored to 0 by the store), so such
targets count as "not predicted" in the summaries rather than being dropped.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from giblet.errors import InputError

_TINY = 1e-12  # variance (sum of squares) below this counts as none
CEILING_FLOOR = 0.1  # per-voxel r / ceiling only where the ceiling exceeds this (below, the ratio is noise)


def pearson_r(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``pred`` with the same column of ``target``.

    Args:
        pred, target: ``(tr, target)`` (or ``(tr,)`` for one target), the same shape.

    Returns:
        ``(target,) float64``; 0 where either column has no variance.
    """
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if x.shape != y.shape:
        raise InputError(f"pearson_r: pred {x.shape} and target {y.shape} differ; give (tr, target) matrices "
                         f"of one shape")
    if x.ndim == 1:
        x, y = x[:, None], y[:, None]
    x, y = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)
    ok = (sxx > _TINY) & (syy > _TINY)
    return np.where(ok, sxy / np.sqrt(np.where(ok, sxx * syy, 1.0)), 0.0)


def summarize(r: np.ndarray) -> dict:
    """``{"mean", "median", "top10", "n"}`` of one subject's ``(target,)`` r.

    ``top10`` is the mean of the best decile of targets (at least one target): the figure
    papers quote for the voxels a stimulus drives. NaNs (targets never scored) are left out.
    """
    r = np.asarray(r, dtype=np.float64).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "top10": float("nan"), "n": 0}
    top = np.sort(r)[-max(1, r.size // 10):]
    return {"mean": float(r.mean()), "median": float(np.median(r)), "top10": float(top.mean()), "n": int(r.size)}


def per_subject(rs: Mapping[str, np.ndarray]) -> dict:
    """Each subject's summary, then the across-subject figures.

    Args:
        rs: subject name -> ``(target,)`` r of that subject.

    Returns:
        ``{"subjects": {name: summarize(r)}, "mean": mean of subject means, "median": median
        of subject medians, "top10": mean of subject top10s}`` (NaN with no subject).
    """
    subjects = {name: summarize(r) for name, r in rs.items()}
    scored = [s for s in subjects.values() if s["n"]]

    def across(key: str, how) -> float:
        return float(how([s[key] for s in scored])) if scored else float("nan")

    return {"subjects": subjects, "mean": across("mean", np.mean), "median": across("median", np.median),
            "top10": across("top10", np.mean)}



def ceiling_fraction(r: np.ndarray, ceiling: np.ndarray, floor: float = CEILING_FLOOR) -> dict:
    """One subject's r as a fraction of its noise ceiling, two ways.

    - ``fraction``: mean r / mean ceiling over the targets whose ceiling is > 0 (targets the
      other subjects predict at all): the headline, stable because it divides two means.
    - ``voxel_fraction_median``: the median over targets of r / ceiling, over the targets
      whose ceiling is > ``floor`` only -- a per-target ratio explodes (and flips sign) as
      the ceiling nears 0, and the median keeps the few near the floor from dominating.

    Args:
        r: ``(target,)`` the model's r.
        ceiling: ``(target,)`` the noise ceiling (NaN targets left out).
        floor: the ceiling a target needs for the per-target ratio.

    Returns:
        ``{"mean": mean ceiling (finite targets), "fraction", "n_positive",
        "voxel_fraction_median", "n_above_floor"}`` (NaN where no target qualifies).
    """
    r, c = np.asarray(r, dtype=np.float64).ravel(), np.asarray(ceiling, dtype=np.float64).ravel()
    if r.shape != c.shape:
        raise InputError(f"ceiling_fraction: r {r.shape} and ceiling {c.shape} differ; give one value per target")
    finite = np.isfinite(c) & np.isfinite(r)
    positive, above = finite & (c > 0), finite & (c > floor)
    nan = float("nan")
    return {"mean": float(c[finite].mean()) if finite.any() else nan,
            "fraction": float(r[positive].mean() / c[positive].mean()) if positive.any() else nan,
            "n_positive": int(positive.sum()),
            "voxel_fraction_median": float(np.median(r[above] / c[above])) if above.any() else nan,
            "n_above_floor": int(above.sum())}


class SubjectCorrelation:
    """Per-subject, per-target Pearson r accumulated over batches and DDP ranks (torch).

    Keeps float64 sums ``n, x, y, xx, yy, xy`` per subject and target, so the result is the
    exact r of all the rows it was given, whatever the batching, and :meth:`all_reduce`
    sums them over ranks (the r of the whole split, not an average of rank-local r).
    Memory: ``6 * subjects * targets`` float64 (57 MB for 17 subjects x 69,397 voxels).

    Args:
        n_subjects: subjects scored (rows of :meth:`r`; indices into the caller's list).
        n_targets: targets per subject (voxels).
        device: where the sums live (the predictions' device).
    """

    def __init__(self, n_subjects: int, n_targets: int, device="cpu"):
        import torch

        self.sums = torch.zeros(n_subjects, 6, n_targets, dtype=torch.float64, device=device)

    def update(self, pred, target, subject) -> None:
        """Add a batch.

        Args:
            pred, target: ``(batch, target)`` tensors (any float dtype).
            subject: ``(batch,)`` int64 subject indices; rows with a negative index are skipped.
        """
        import torch

        keep = subject >= 0
        x, y = pred.detach()[keep].double(), target.detach()[keep].double()
        rows = torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y], dim=1)  # (batch, 6, target)
        self.sums.index_add_(0, subject[keep], rows)

    def all_reduce(self) -> None:
        """Sum the sums over the ranks of the default process group (no-op without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def r(self):
        """``(subject, target) float64`` tensor: 0 where either side has no variance, NaN
        rows for subjects with fewer than 2 rows (no r exists)."""
        import torch

        n, sx, sy, sxx, syy, sxy = self.sums.unbind(1)
        m = n.clamp(min=1)
        cov = sxy - sx * sy / m
        vx, vy = (sxx - sx * sx / m).clamp(min=0), (syy - sy * sy / m).clamp(min=0)
        den = (vx * vy).sqrt()
        # relative to the raw sums too: float64 cancellation leaves ~1e-16 * sxx of a constant column
        ok = (vx > _TINY + 1e-12 * sxx) & (vy > _TINY + 1e-12 * syy)
        r = torch.where(ok, cov / den.clamp(min=1e-300), torch.zeros_like(den))
        return torch.where(n < 2, torch.full_like(r, float("nan")), r)

    def summary(self, names) -> dict:
        """:func:`per_subject` of :meth:`r`, subjects named by ``names`` (index order); subjects
        with fewer than 2 rows are left out."""
        r = self.r().cpu().numpy()
        return per_subject({name: r[i] for i, name in enumerate(names) if not np.isnan(r[i]).all()})
