"""Target sets beside the voxels: what each set *is* (its definition, one unit per set).

Three kinds (``fmri.targets``, :class:`giblet.config.TargetConfig`), each defined once on the
study's mask and grid and stored under ``targets/<target id>/``:

- ``parcels`` -- a labels image (3D, integer labels, any grid) resampled to the BOLD grid by
  nearest neighbour (``nilearn.image.resample_to_img``), optionally named by a labels table;
- ``spheres`` -- spheres of ``radius_mm`` around MNI coordinates: one of nilearn's bundled
  tables (``power_2011``, ``dosenbach_2010``, ``seitzman_2018``) or a CSV of ``x, y, z``;
- ``surface`` -- the fsaverage5 vertices of both hemispheres (nilearn bundles the meshes),
  sampled by ``nilearn.surface.vol_to_surf``.

A target with no voxel inside the mask (a parcel the mask leaves out, a sphere outside the
field of view, a vertex whose samples all miss the mask) is *dropped*: it has no column, and
the definition unit's meta lists (or counts) it. None left is an error. The series
themselves are computed by :mod:`giblet.features.target_series`.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from giblet import store
from giblet.errors import InputError, InputMissingError

VERSION = 1
COORD_TABLES = ("power_2011", "dosenbach_2010", "seitzman_2018")  # nilearn's offline coordinate atlases
SPHERE_RADIUS_MM = 5.0  # the radius Power 2011, Dosenbach 2010 and Seitzman 2018 used
MESHES = {"fsaverage5": 10242}  # vertices per hemisphere
HEMISPHERES = ("left", "right")  # the surface's columns: left hemisphere's vertices, then the right's
# The MNI152 brain's bounding box (mm). A grid whose field of view covers less than MNI_COVER of
# it is not in MNI space (e.g. an affine with its origin at a corner).
MNI_BRAIN_BOX = np.array([[-90.0, 90.0], [-126.0, 90.0], [-72.0, 108.0]])
MNI_COVER = 0.5
NIFTI_MNI_CODE = 4  # NIFTI_XFORM_MNI_152


def definition_name(target: str, array: str) -> str:
    """Store path of one definition array, e.g. ``targets/parcels/schaefer/labels``."""
    return f"{store.TARGETS}/{target}/{array}"


def definition_arrays(kind: str, target: str) -> list[str]:
    """The arrays a definition unit commits."""
    names = {"parcels": ("labels", "n_voxels", "atlas"), "spheres": ("labels", "n_voxels", "coords"),
             "surface": ("vertex",)}[kind]
    return [definition_name(target, a) for a in names]


def series_names(subject: str, run: str, target: str) -> dict[str, str]:
    """Store paths of one target set's ``bold``, ``mean``, ``std`` for one (subject, run)."""
    prefix = store.target_prefix(subject, run, target)
    return {k: f"{prefix}/{k}" for k in ("bold", "mean", "std")}


def column_dim(kind: str) -> str:
    return store.VERTEX if kind == "surface" else store.PARCEL


# -- plan-time checks (headers and small tables only) --------------------------------------------------
def bids_space(path: str | Path) -> Optional[str]:
    """The ``space-<label>`` entity of a BIDS file name, or None."""
    m = re.search(r"(?:^|_)space-([A-Za-z0-9]+)(?:_|\.)", Path(path).name)
    return m.group(1) if m else None


def field_of_view(shape: tuple, affine: np.ndarray) -> np.ndarray:
    """``(3, 2)`` world bounding box (mm) of a grid's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, corners)
    return np.stack([world.min(0), world.max(0)], axis=1)


def mni_cover(shape: tuple, affine: np.ndarray) -> float:
    """Fraction of the MNI152 brain box the grid's field of view covers."""
    box = field_of_view(shape, affine)
    overlap = np.clip(np.minimum(box[:, 1], MNI_BRAIN_BOX[:, 1]) - np.maximum(box[:, 0], MNI_BRAIN_BOX[:, 0]), 0, None)
    return float(np.prod(overlap) / np.prod(MNI_BRAIN_BOX[:, 1] - MNI_BRAIN_BOX[:, 0]))


def check_mni(img: nib.Nifti1Image, paths: list, where: str) -> None:
    """Refuse coordinate targets (spheres, surface) on BOLD that is not in MNI space.

    The rule, first that applies: a BIDS ``space-`` entity in the BOLD file names (every run)
    must start with ``MNI``; else a header whose sform or qform code says MNI 152 passes;
    else the grid's field of view must cover at least ``MNI_COVER`` of the MNI152 brain box
    (an origin far from the MNI origin fails; native-space data centred on the head can pass:
    the documented assumption). ``assume_mni: true`` skips the check.
    """
    fix = "use MNI-space BOLD (e.g. bids.space=MNI152NLin2009cAsym) or, if it is in MNI space, set assume_mni: true"
    spaces = {str(p): bids_space(p) for p in paths if bids_space(p)}
    if spaces:
        bad = {p: s for p, s in spaces.items() if not s.startswith("MNI")}
        if bad:
            path, space = next(iter(bad.items()))
            raise InputError(f"{where}: the BOLD is in space {space} ({Path(path).name}), not MNI; its coordinates "
                             f"are MNI mm -- {fix}")
        return
    if NIFTI_MNI_CODE in (int(img.header["sform_code"]), int(img.header["qform_code"])):
        return
    cover = mni_cover(img.shape, img.affine)
    if cover < MNI_COVER:
        box = field_of_view(img.shape, img.affine)
        raise InputError(f"{where}: the BOLD grid spans x {box[0, 0]:g}..{box[0, 1]:g}, "
                         f"y {box[1, 0]:g}..{box[1, 1]:g}, z {box[2, 0]:g}..{box[2, 1]:g} mm, {cover:.0%} of the MNI152 brain box (rule: >= "
                         f"{MNI_COVER:.0%}), so it is not in MNI space; {fix}")


def check_labels_header(path: Path, where: str) -> None:
    """A labels image exists, is 3D (or 4D of one volume) and stores numbers (header only)."""
    if not path.is_file():
        raise InputMissingError(f"{where}: labels image {path} does not exist; fix its path in the config")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(f"{where}: {path} is not a readable NIfTI image ({type(exc).__name__}); give a 3D "
                         f"integer labels image") from None
    shape, dtype = img.shape, img.get_data_dtype()
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise InputError(f"{where}: labels image {path} has shape {tuple(shape)}; it must be 3D with one integer "
                         f"label per voxel (a 4D probabilistic atlas is not a labels image)")
    if dtype.names is not None or dtype.kind not in "iuf":
        raise InputError(f"{where}: labels image {path} stores {dtype}; it must hold integer labels")


def read_table(path: Path, where: str, needed: tuple[str, ...]):
    """A CSV (``.csv``) or TSV table with at least the ``needed`` columns, as a DataFrame."""
    import pandas as pd

    if not path.is_file():
        raise InputMissingError(f"{where}: table {path} does not exist; fix its path in the config")
    try:
        table = pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t")
    except Exception as exc:  # pandas raises parser errors of several types
        raise InputError(f"{where}: {path} is not a readable table ({type(exc).__name__}: {exc})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise InputError(f"{where}: {path} lacks columns {missing} (it has {list(table.columns)}); give a header "
                         f"row with {', '.join(needed)}")
    return table


def coordinate_table(coords: str, path: Optional[Path], where: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(xyz (n, 3) float64 mm, labels (n,) int32, attrs)`` of a coordinate atlas.

    ``labels`` is each row's 1-based ROI number in the published table (nilearn orders
    Dosenbach's and Seitzman's rows by network); ``attrs`` holds ``names``/``networks`` when
    the table has them."""
    if coords in COORD_TABLES:
        from nilearn import datasets

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bunch = getattr(datasets, f"fetch_coords_{coords}")()
        rois = bunch.rois
        attrs = {"table": coords}
        for key, field in (("names", "labels"), ("names", "regions"), ("networks", "networks")):
            if key not in attrs and field in bunch:
                attrs[key] = [str(v) for v in np.asarray(bunch[field])]
        return (rois[["x", "y", "z"]].to_numpy(np.float64), (np.asarray(rois.index) + 1).astype(np.int32), attrs)
    table = read_table(path, where, ("x", "y", "z"))
    xyz = table[["x", "y", "z"]].apply(lambda c: c.astype(float) if c.dtype.kind in "if" else c).to_numpy()
    if xyz.dtype.kind != "f" or not np.isfinite(xyz).all() or not len(xyz):
        raise InputError(f"{where}: {path} must hold finite numbers in x, y, z (MNI mm), one row per sphere")
    attrs = {"table": path.name}
    if "name" in table.columns:
        attrs["names"] = [str(v) for v in table["name"]]
    return xyz.astype(np.float64), np.arange(1, len(xyz) + 1, dtype=np.int32), attrs


# -- the definition unit's task --------------------------------------------------------------------
def store_mask(store_path: str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """The committed study mask ``(x, y, z) bool``, its affine, and the mask as a NIfTI (uint8)."""
    import zarr

    arr = zarr.open_array(str(Path(store_path) / store.MASK), mode="r")
    mask, affine = arr[...], np.asarray(arr.attrs["affine"], dtype=np.float64)
    return mask, affine, nib.Nifti1Image(mask.astype(np.uint8), affine)


def build_definition(staging: str, store_path: str, spec: dict) -> dict:
    """Task: write ``targets/<id>/...`` (see :func:`definition_arrays`); returns the unit's meta.

    Args:
        spec: the target's settings (:func:`giblet.config.TargetConfig` as a dict with its
            paths resolved) plus ``id``.
    """
    mask, affine, mask_img = store_mask(store_path)
    where = f"target {spec['id']}"
    define = {"parcels": _define_parcels, "spheres": _define_spheres, "surface": _define_surface}[spec["kind"]]
    arrays, meta = define(spec, mask, affine, mask_img, where)
    for name, (values, dims, attrs) in arrays.items():
        arr = store.create_array(Path(staging), definition_name(spec["id"], name), values.shape, values.dtype.name,
                                 values.shape, dims, attrs)
        arr[...] = values
    return {"target": spec["id"], "kind": spec["kind"], **meta}


def _no_overlap(where: str, what: str, n: int) -> InputError:
    return InputError(f"{where}: none of its {n} {what} overlaps the study mask (the atlas lies outside the BOLD's "
                      f"field of view, or in another space); check that the atlas and the BOLD share one space")


def _define_parcels(spec: dict, mask: np.ndarray, affine: np.ndarray, mask_img, where: str):
    from nilearn.image import resample_to_img

    path = Path(spec["labels"])
    check_labels_header(path, where)
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).reshape(img.shape[:3])
    if data.dtype.kind == "f" and (not np.isfinite(data).all() or (data != np.round(data)).any()):
        bad = data[~np.isfinite(data) | (data != np.round(data))][0]
        raise InputError(f"{where}: labels image {path} holds non-integer values (e.g. {bad:g}); a labels image "
                         f"has one integer label per voxel (0 background) -- a probabilistic atlas is not one")
    if (data < 0).any():
        raise InputError(f"{where}: labels image {path} holds negative labels (e.g. {data[data < 0][0]:g}); labels "
                         f"are integers >= 0 (0 background)")
    labels_img = nib.Nifti1Image(data.astype(np.int32), img.affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atlas = np.asarray(resample_to_img(labels_img, mask_img, interpolation="nearest", force_resample=True,
                                           copy_header=True).dataobj).astype(np.int32)
    present = np.unique(data[data != 0]).astype(np.int64)
    counts = np.bincount(atlas[mask], minlength=int(present.max(initial=0)) + 1)[present]
    kept, empty = present[counts > 0], present[counts == 0]
    if not len(kept):
        raise _no_overlap(where, f"labels of {path.name}", len(present))
    names = _label_names(spec, kept, where)
    attrs = {"source": path.name, "names": names, "empty_labels": empty.tolist()}
    arrays = {"labels": (kept.astype(np.int32), (store.PARCEL,), attrs),
              "n_voxels": (counts[counts > 0].astype(np.int32), (store.PARCEL,), {"meaning": "in-mask voxels"}),
              "atlas": (atlas, (store.X, store.Y, store.Z), {"affine": affine.tolist(), "source": path.name,
                                                             "resampling": "nearest (nilearn resample_to_img)"})}
    return arrays, {"n_targets": int(len(kept)), "n_empty": int(len(empty)), "empty": empty.tolist()}


def _label_names(spec: dict, labels: np.ndarray, where: str) -> list[str]:
    """Each label's name from the labels table (columns ``index``, ``name``), else the number."""
    if not spec.get("labels_table"):
        return [str(int(v)) for v in labels]
    table = read_table(Path(spec["labels_table"]), where, ("index", "name"))
    names = dict(zip(table["index"].astype(int), table["name"].astype(str)))
    return [names.get(int(v), str(int(v))) for v in labels]


def _define_spheres(spec: dict, mask: np.ndarray, affine: np.ndarray, mask_img, where: str):
    from nilearn.maskers.nifti_spheres_masker import apply_mask_and_get_affinity
    from scipy.spatial import cKDTree

    path = Path(spec["coords"]) if spec["coords"] not in COORD_TABLES else None
    xyz, labels, attrs = coordinate_table(spec["coords"], path, where)
    radius = float(spec.get("radius_mm") or SPHERE_RADIUS_MM)
    # nilearn's rule for a sphere's voxels: in-mask voxels within radius, plus the voxel nearest the seed
    world = nib.affines.apply_affine(affine, np.argwhere(mask))
    within = cKDTree(world).query_ball_point(xyz, r=radius, return_length=True)
    ijk = np.round(nib.affines.apply_affine(np.linalg.inv(affine), xyz)).astype(int)
    in_grid = np.all((ijk >= 0) & (ijk < mask.shape), axis=1)
    nearest = np.zeros(len(xyz), bool)
    nearest[in_grid] = mask[tuple(ijk[in_grid].T)]
    keep = (np.asarray(within) > 0) | nearest
    if not keep.any():
        raise _no_overlap(where, f"spheres of {attrs['table']}", len(xyz))
    # the masker's own sphere voxels (its transform path: with an image, where the nearest-voxel rule applies)
    probe = nib.Nifti1Image(mask[..., None].astype(np.float32), affine)
    _, adjacency = apply_mask_and_get_affinity(xyz[keep].tolist(), probe, radius, True, mask_img)
    sizes = np.asarray(adjacency.sum(axis=1)).ravel().astype(np.int32)
    attrs = {**{k: [v[i] for i in np.flatnonzero(keep)] if isinstance(v, list) else v for k, v in attrs.items()},
             "radius_mm": radius, "empty_labels": labels[~keep].tolist()}
    arrays = {"labels": (labels[keep], (store.PARCEL,), attrs),
              "n_voxels": (sizes, (store.PARCEL,), {"meaning": "in-mask voxels of the sphere (nilearn's rule)"}),
              "coords": (xyz[keep], (store.PARCEL, store.XYZ), {"units": "mm (MNI)", "radius_mm": radius})}
    return arrays, {"n_targets": int(keep.sum()), "n_empty": int((~keep).sum()), "empty": labels[~keep].tolist()}


def surface_meshes(mesh: str) -> dict:
    """``{hemisphere: (pial, white)}`` of a bundled mesh (nilearn ``load_fsaverage``)."""
    from nilearn.datasets import load_fsaverage

    fs = load_fsaverage(mesh)
    return {h: (fs["pial"].parts[h], fs["white_matter"].parts[h]) for h in HEMISPHERES}


def sample_surface(img: nib.Nifti1Image, meshes: dict, spec: dict, mask_img) -> np.ndarray:
    """``(vertex, tr)`` of both hemispheres (left first): ``nilearn.surface.vol_to_surf`` with
    the target's ``sampling``, ``radius_mm`` and ``n_samples``; samples outside ``mask_img``
    are dropped (NaN where a vertex keeps none)."""
    from nilearn.surface import vol_to_surf

    kw = {"kind": spec.get("sampling", "depth"), "n_samples": spec.get("n_samples"), "mask_img": mask_img}
    if spec.get("radius_mm"):
        kw["radius"] = float(spec["radius_mm"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nanmean of a vertex without samples: NaN, counted by the caller
        return np.concatenate([vol_to_surf(img, pial, inner_mesh=white if kw["kind"] == "depth" else None, **kw)
                               for pial, white in meshes.values()]).reshape(-1, img.shape[3] if img.ndim == 4 else 1)


def _define_surface(spec: dict, mask: np.ndarray, affine: np.ndarray, mask_img, where: str):
    ones = nib.Nifti1Image(mask.astype(np.float32), affine)
    reached = np.isfinite(sample_surface(ones, surface_meshes(spec["mesh"]), spec, mask_img)[:, 0])
    if not reached.any():
        raise _no_overlap(where, f"{spec['mesh']} vertices", len(reached))
    per_hemi = MESHES[spec["mesh"]]
    attrs = {"mesh": spec["mesh"], "hemispheres": list(HEMISPHERES), "vertices_per_hemisphere": per_hemi,
             "meaning": f"vertex index in the mesh: left hemisphere 0..{per_hemi - 1}, right {per_hemi}.."
                        f"{2 * per_hemi - 1} (right vertex = index - {per_hemi})",
             "sampling": spec.get("sampling", "depth"), "radius_mm": spec.get("radius_mm"),
             "n_samples": spec.get("n_samples")}
    vertex = np.flatnonzero(reached).astype(np.int32)
    return {"vertex": (vertex, (store.VERTEX,), attrs)}, {"n_targets": int(len(vertex)),
                                                         "n_empty": int((~reached).sum())}
