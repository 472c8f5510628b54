"""Target sets beside the voxels: their time series, one unit per (subject, run) and set.

A target unit starts from the cleaned signal its voxel unit z-scored, reconstructed from what
that unit committed: ``bold * std + mean`` per voxel is the cleaned signal on the scanner's
scale (``giblet.features.fmri``: ``mean`` is the raw mean the cleaned signal was shifted to,
``std`` its std; a zero-variance voxel is its mean). Block by block of ``block_trs`` TRs it
is put back into the BOLD grid (0 outside the mask; censored TRs 0, their rows NaN after) and
handed to nilearn, as a user would call it:

- parcels: ``NiftiLabelsMasker(atlas, mask_img=mask, strategy="mean")``;
- spheres: ``NiftiSpheresMasker(coords, radius, mask_img=mask, allow_overlap=True)``;
- surface: ``vol_to_surf`` per hemisphere with ``mask_img=mask`` (samples outside the mask
  are dropped; with ``sampling: line`` or ``ball`` a sample near the mask's edge interpolates
  the 0 outside it, which scales that vertex's signal, not its z-score).

Each set is then z-scored like the voxels (``ZScorer``: per run, or per subject with
``fmri.zscore=subject``; over the served, uncensored TRs; the zero-variance rule).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from giblet import store
from giblet.errors import StoreError
from giblet.features.fmri import zero_variance_rule
from giblet.features.targets import (column_dim, definition_name, sample_surface, series_names, store_mask,
                                     surface_meshes)
from giblet.normalize import ZScorer

Extract = Callable[[nib.Nifti1Image], np.ndarray]  # 4D volume (x, y, z, b) -> (b, target)


def extractor(spec: dict, store_path: str, mask_img) -> Extract:
    """The nilearn call that turns a 4D volume into the set's ``(tr, target)`` columns, in the
    order of the committed definition (checked)."""
    import zarr

    def read(array: str) -> zarr.Array:
        return zarr.open_array(str(Path(store_path) / definition_name(spec["id"], array)), mode="r")

    kind = spec["kind"]
    if kind == "surface":
        meshes, vertex = surface_meshes(spec["mesh"]), read("vertex")[...]
        return lambda img: sample_surface(img, meshes, spec, mask_img)[vertex].T
    from nilearn.maskers import NiftiLabelsMasker, NiftiSpheresMasker

    labels = read("labels")[...]
    if kind == "parcels":
        atlas = nib.Nifti1Image(read("atlas")[...], mask_img.affine)
        masker = NiftiLabelsMasker(atlas, mask_img=mask_img, strategy="mean", standardize=None)
    else:
        coords = read("coords")
        masker = NiftiSpheresMasker(coords[...].tolist(), radius=float(coords.attrs["radius_mm"]), mask_img=mask_img,
                                    allow_overlap=True, standardize=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "labels removed by the mask": the definition recorded them
        masker.fit()

    def extract(img: nib.Nifti1Image) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = masker.transform(img)
        if kind == "parcels" and [masker.region_ids_[i] for i in range(out.shape[1])] != labels.tolist():
            raise StoreError(f"target {spec['id']}: nilearn's labels masker gave regions {masker.region_ids_} but the "
                             f"definition lists {labels.tolist()}; rebuild the target (--force)")
        return out

    return extract


def cleaned_run(store_path: str, subject: str, run: str, mask: np.ndarray, affine: np.ndarray, extract: Extract,
                n_targets: int, block_trs: int) -> tuple[np.ndarray, np.ndarray]:
    """``((tr, target) float32, (tr,) bool censored)``: one run's target series before z-scoring."""
    import zarr

    prefix = Path(store_path) / store.fmri_prefix(subject, run)
    bold = zarr.open_array(str(prefix / "bold"), mode="r")
    mean, std = (zarr.open_array(str(prefix / k), mode="r")[...] for k in ("mean", "std"))
    censored = (zarr.open_array(str(prefix / "censored"), mode="r")[...] if (prefix / "censored").is_dir()
                else np.zeros(bold.shape[0], bool))
    out = np.empty((bold.shape[0], n_targets), dtype=np.float32)
    for t0 in range(0, bold.shape[0], block_trs):
        cut = censored[t0:t0 + block_trs]
        x = bold[t0:t0 + block_trs] * std + mean  # the cleaned signal, scanner units
        x[cut] = 0.0  # no values there (NaN rows); 0 keeps nilearn from warning
        vol = np.zeros(mask.shape + (len(x),), dtype=np.float32)
        vol[mask] = x.T
        y = extract(nib.Nifti1Image(vol, affine))
        y[cut] = np.nan
        out[t0:t0 + len(x)] = y
    return out, censored


def build_series(staging: str, store_path: str, spec: dict, subject: str, runs: list[str], zscore: str,
                 zero_variance: str, chunk_trs: int, block_trs: int) -> dict:
    """Task: one target set's ``fmri/<subject>/<run>/<target id>/{bold,mean,std}`` for ``runs``
    (one run, or all of a subject's with ``fmri.zscore=subject``).

    Returns:
        The unit's meta: ``target``, ``n_targets``, ``zscore`` and per run ``n_trs``,
        ``n_censored``, ``n_zero_variance``, ``first_zero_variance_target``.
    """
    import zarr

    mask, affine, mask_img = store_mask(store_path)
    n_targets = int(zarr.open_array(str(Path(store_path) / definition_name(
        spec["id"], "vertex" if spec["kind"] == "surface" else "labels")), mode="r").shape[0])
    extract = extractor(spec, store_path, mask_img)
    data = {r: cleaned_run(store_path, subject, r, mask, affine, extract, n_targets, int(block_trs)) for r in runs}
    scaler = ZScorer()
    for x, censored in data.values():  # one group: a run (zscore=run, one run per unit) or the subject's runs
        scaler.partial_fit(x[~censored])
    label = f"target {spec['id']} {subject}/{'+'.join(runs)}"
    n_zero = zero_variance_rule(scaler, label, zero_variance, "targets",
                                "check the atlas against the mask, and the run")
    meta = {}
    for r, (x, censored) in data.items():
        _write(Path(staging), spec, subject, r, x, censored, scaler, chunk_trs, zscore)
        meta[r] = {"n_trs": int(len(x)), "n_censored": int(censored.sum()), "n_zero_variance": n_zero,
                   "first_zero_variance_target": int(np.argmax(scaler.zero_variance_)) if n_zero else None}
    return {"target": spec["id"], "n_targets": n_targets, "zscore": zscore, "runs": meta}


def _write(staging: Path, spec: dict, subject: str, run: str, x: np.ndarray, censored: np.ndarray,
           scaler: ZScorer, chunk_trs: int, zscore: str) -> None:
    names, dim = series_names(subject, run, spec["id"]), column_dim(spec["kind"])
    attrs = {"subject": subject, "run": run, "target": spec["id"], "convention": {**ZScorer.convention, "over": zscore},
             "n_zero_variance": int(scaler.zero_variance_.sum()), "n_censored": int(censored.sum())}
    bold = store.create_array(staging, names["bold"], x.shape, "float32", (chunk_trs, x.shape[1]), (store.TR, dim),
                              attrs)
    for t0 in range(0, len(x), chunk_trs):  # whole chunks only
        z = scaler.transform(x[t0:t0 + chunk_trs])
        z[censored[t0:t0 + chunk_trs]] = np.nan
        bold[t0:t0 + chunk_trs] = z
    units = {"mean": "the target's cleaned signal (see docs/store.md, Targets): its mean over the TRs the "
                     "statistics cover", "std": "population std (ddof 0) of that signal; 0 marks zero variance"}
    for name, values in (("mean", scaler.mean_), ("std", scaler.std_)):
        arr = store.create_array(staging, names[name], values.shape, "float32", values.shape, (dim,),
                                 {"units": units[name], "over": zscore})
        arr[...] = values
