"""Evaluation results as brain maps and figures: per-subject NIfTI maps, PNGs, and the summary.

- :func:`to_image` / :func:`save_maps`: a ``(voxel,)`` value per store column -> a 3-D NIfTI
  on the store's mask and affine, through ``nilearn.masking.unmask`` (0 outside the mask).
- :func:`save_target_maps`: a value per column of a target set (``fmri.targets``) -> a parcel
  table (TSV) or a GIFTI per fsaverage5 hemisphere.
- :func:`plot_glass_brains`: one nilearn glass-brain panel per subject.
- :func:`plot_subject_violins`: the distribution of voxel r per subject (violins, with each
  subject's mean and, when there is one, its mean ceiling).
- :func:`plot_r_vs_ceiling`: voxel r against the voxel's noise ceiling, every subject.
- :func:`evaluation_summary`: the JSON-ready figures (``metrics.per_subject`` and
  ``metrics.ceiling_fraction`` per subject, then across subjects).

Figures are drawn with matplotlib's Agg backend (no display needed). Library code: no
argparse; ``pipelines/evaluate.py`` (``giblet-evaluate``) wires it to a run or a baseline.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np

from giblet.errors import StoreError
from giblet.evaluation.metrics import CEILING_FLOOR, ceiling_fraction, per_subject

SCATTER_POINTS = 4000  # voxels drawn per subject in the scatter (a seeded sample beyond that)
PANELS_PER_ROW = 3


def mask_image(mask: np.ndarray, affine: np.ndarray):
    """The store's mask ``(x, y, z) bool`` and ``(4, 4)`` affine as a NIfTI image (uint8)."""
    import nibabel as nib

    return nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), np.asarray(affine, dtype=np.float64))


def check_voxel_order(voxels: np.ndarray, mask: np.ndarray, where: str = "store") -> None:
    """Refuse a store whose columns are not the mask's voxels in C order (what ``unmask`` assumes).

    Args:
        voxels: ``(voxel, 3)`` ijk of each column (``StoreView.voxels``).
        mask: ``(x, y, z) bool``.
    """
    if not np.array_equal(np.asarray(voxels), np.argwhere(mask)):
        raise StoreError(f"{where}: fmri/voxels is not np.argwhere(fmri/mask) (C order), so maps would put values "
                         f"on the wrong voxels; rebuild the store with `giblet-preprocess run CONFIG --force`")


def to_image(values: np.ndarray, mask_img):
    """``(voxel,)`` values (store column order) -> a 3-D float32 NIfTI, 0 outside the mask.

    Args:
        values: ``(voxel,)``, one per voxel of the mask in C order (NaN kept as NaN).
        mask_img: :func:`mask_image`.
    """
    from nilearn.masking import unmask

    values = np.asarray(values, dtype=np.float32)
    n = int(np.asarray(mask_img.dataobj).astype(bool).sum())
    if values.shape != (n,):
        raise StoreError(f"map of shape {values.shape}; the mask has {n} voxels; give one value per voxel")
    # nilearn indexes the mask array with itself: C order, the store's column order
    img = unmask(values, mask_img)
    img.set_data_dtype(np.float32)
    return img


def save_maps(maps: Mapping[str, np.ndarray], mask_img, out_dir: str | Path, prefix: str) -> dict[str, Path]:
    """Write ``<prefix>_<name>.nii.gz`` per entry of ``maps`` (``(voxel,)`` each); returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, values in maps.items():
        paths[name] = out_dir / f"{prefix}_{name}.nii.gz"
        to_image(values, mask_img).to_filename(str(paths[name]))
    return paths


def save_target_maps(maps: Mapping[str, np.ndarray], info: dict, out_dir: str | Path, prefix: str) -> dict[str, Path]:
    """Values per column of a target set (``StoreView.target_info``), in the set's own space.

    Parcels and spheres: ``<prefix>_<name>.tsv`` per entry, one row per parcel (``label``,
    ``name``, ``n_voxels``, for spheres ``x``, ``y``, ``z`` mm, then ``value``). Surface:
    ``<prefix>_<name>_hemi-L.func.gii`` and ``..._hemi-R.func.gii`` per entry, one float32 value
    per mesh vertex (NaN at vertices the store does not serve). Returns file key -> path.
    """
    import nibabel as nib

    out_dir, arrays, attrs = Path(out_dir), info["arrays"], info["attrs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, values in maps.items():
        values = np.asarray(values, dtype=np.float32)
        if info["kind"] == "surface":
            per_hemi = int(attrs["vertices_per_hemisphere"])
            full = np.full(2 * per_hemi, np.nan, dtype=np.float32)
            full[arrays["vertex"]] = values
            for h, part in zip("LR", (full[:per_hemi], full[per_hemi:])):
                paths[f"{name}_hemi-{h}"] = out_dir / f"{prefix}_{name}_hemi-{h}.func.gii"
                img = nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(part, intent="NIFTI_INTENT_NONE")])
                nib.save(img, str(paths[f"{name}_hemi-{h}"]))
            continue
        labels = arrays["labels"]
        cols = {"label": labels, "name": attrs.get("names") or [str(v) for v in labels], "n_voxels": arrays["n_voxels"]}
        if "coords" in arrays:
            cols.update(x=arrays["coords"][:, 0], y=arrays["coords"][:, 1], z=arrays["coords"][:, 2])
        rows = ["\t".join(cols)] + ["\t".join(str(c[i]) for c in cols.values()) + f"\t{values[i]:.6g}"
                                    for i in range(len(labels))]
        rows[0] += "\tvalue"
        paths[name] = out_dir / f"{prefix}_{name}.tsv"
        paths[name].write_text("\n".join(rows) + "\n")
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI event loop
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, PANELS_PER_ROW)
    return math.ceil(n / cols), cols


def plot_glass_brains(images: Mapping[str, object], path: str | Path, title: str) -> Path:
    """One glass-brain panel per subject (a signed colour scale shared by every panel).

    Args:
        images: subject -> 3-D NIfTI (:func:`to_image`).
        path: the PNG to write.
        title: the figure's title (e.g. what was evaluated and on which split).
    """
    from nilearn import plotting

    plt = _pyplot()
    values = np.concatenate([np.asarray(img.dataobj).ravel() for img in images.values()])
    vmax = float(np.nanmax(np.abs(values))) if values.size and np.isfinite(values).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    rows, cols = _grid(len(images))
    fig = plt.figure(figsize=(4.2 * cols, 1.9 * rows + 0.5))
    for i, (name, img) in enumerate(images.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        # threshold: exact zeros (outside the mask) stay transparent
        plotting.plot_glass_brain(img, axes=ax, figure=fig, title=name, plot_abs=False, threshold=1e-6,
                                  vmin=-vmax, vmax=vmax, cmap="cold_hot", colorbar=i == len(images) - 1,
                                  annotate=False)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path, tight=False)  # nilearn's panels place their own axes


def plot_subject_violins(rs: Mapping[str, np.ndarray], path: str | Path, title: str,
                         ceilings: Optional[Mapping[str, np.ndarray]] = None, column: str = "voxel") -> Path:
    """Violins of each subject's voxel r, its mean (dot) and its mean noise ceiling (bar).

    Args:
        rs: subject -> ``(voxel,)`` r.
        path: the PNG to write.
        title: the figure's title.
        ceilings: subject -> ``(voxel,)`` ceiling (NaN voxels left out), or None.
        column: what a value is, for the axis label (``voxel``; a target set's ``parcel``, ``vertex``).
    """
    plt = _pyplot()
    names = list(rs)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 3.6))
    data = [np.asarray(rs[n], dtype=np.float64)[np.isfinite(rs[n])] for n in names]
    pos = np.arange(1, len(names) + 1)
    drawn = [(p, d) for p, d in zip(pos, data) if d.size > 1 and np.ptp(d) > 0]  # a violin needs a spread
    if drawn:
        ax.violinplot([d for _, d in drawn], positions=[p for p, _ in drawn], showextrema=False)
    ax.plot(pos, [d.mean() if d.size else np.nan for d in data], "ko", ms=4, label="mean r")
    if ceilings:
        ceil = [np.nanmean(ceilings[n]) if n in ceilings and np.isfinite(ceilings[n]).any() else np.nan
                for n in names]
        ax.hlines(ceil, pos - 0.35, pos + 0.35, colors="C3", label="mean noise ceiling")
    ax.axhline(0, c="gray", lw=0.5)
    ax.set_xticks(pos, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set(ylabel=f"Pearson r per {column}", title=title)
    ax.legend(fontsize=7, loc="upper right")
    return _save(plt, fig, path)


def plot_r_vs_ceiling(rs: Mapping[str, np.ndarray], ceilings: Mapping[str, np.ndarray], path: str | Path,
                      title: str, seed: int = 0) -> Path:
    """Voxel r (y) against the voxel's noise ceiling (x), a colour per subject, with y = x.

    At most :data:`SCATTER_POINTS` voxels per subject are drawn (a seeded random sample).
    """
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    lo, hi = 0.0, 0.0
    for i, name in enumerate(n for n in rs if n in ceilings):
        r, c = np.asarray(rs[name], np.float64), np.asarray(ceilings[name], np.float64)
        keep = np.flatnonzero(np.isfinite(r) & np.isfinite(c))
        if keep.size > SCATTER_POINTS:
            keep = np.sort(rng.choice(keep, SCATTER_POINTS, replace=False))
        if keep.size:
            ax.scatter(c[keep], r[keep], s=4, alpha=0.5, c=f"C{i % 10}", label=name, rasterized=True)
            lo, hi = min(lo, c[keep].min(), r[keep].min()), max(hi, c[keep].max(), r[keep].max())
    ax.plot([lo, hi], [lo, hi], c="gray", ls="--", lw=1, label="r = ceiling")
    ax.axvline(CEILING_FLOOR, c="gray", ls=":", lw=1, label=f"ceiling floor {CEILING_FLOOR}")
    ax.set(xlabel="noise ceiling (leave-one-subject-out ISC)", ylabel="Pearson r", title=title)
    ax.legend(fontsize=6, markerscale=2)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluation_summary(rs: Mapping[str, np.ndarray], ceilings: Optional[Mapping[str, np.ndarray]] = None,
                       floor: float = CEILING_FLOOR) -> dict:
    """The figures of ``summary.json``.

    Args:
        rs: subject -> ``(voxel,)`` r.
        ceilings: subject -> ``(voxel,)`` noise ceiling (subjects without one left out), or None.
        floor: ceiling floor of the per-voxel fraction (:func:`~giblet.evaluation.metrics.ceiling_fraction`).

    Returns:
        :func:`~giblet.evaluation.metrics.per_subject` of ``rs`` (``subjects``, ``mean``,
        ``median``, ``top10``), and with ceilings ``ceiling``: ``{"subjects": {name:
        ceiling_fraction(...)}, "fraction": mean over subjects, "voxel_fraction_median": mean
        over subjects, "floor"}``. NaN becomes None (JSON null).
    """
    out = per_subject(rs)
    if ceilings:
        per = {n: ceiling_fraction(rs[n], ceilings[n], floor) for n in rs if n in ceilings}

        def across(key):
            vals = [p[key] for p in per.values() if np.isfinite(p[key])]
            return float(np.mean(vals)) if vals else float("nan")

        out["ceiling"] = {"subjects": per, "fraction": across("fraction"),
                          "voxel_fraction_median": across("voxel_fraction_median"),
                          "mean": across("mean"), "floor": floor}
    return json_ready(out)


def json_ready(obj):
    """``obj`` with NaN / inf floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
