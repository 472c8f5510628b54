"""Target sets beside the voxels (issue #21): atlas parcels, coordinate spheres, fsaverage5.

One tiny study is built by the engine once per module: 2 subjects on a 12 mm MNI grid
(16x19x16), BOLD written here (not by giblet.synth's generator) with a *parcel-wise* planted
signal -- every voxel of a parcel reads the parcel's mix of the movie's colour latents -- plus
drift and noise, detrended by the fMRI stage. The atlas lies on another grid (6 mm, shifted)
and has a label outside the brain. Each target is checked against nilearn called directly
on the same cleaned data.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from giblet.config import load_config
from giblet.errors import ConfigError, InputError
from giblet.normalize import ZScorer
from giblet.reader import open_store
from pipelines import engine

N_TRS = 60
SHAPE = (16, 19, 16)
AFFINE = np.array([[12.0, 0, 0, -90], [0, 12.0, 0, -126], [0, 0, 12.0, -72], [0, 0, 0, 1]])  # MNI mm
ATLAS_AFFINE = np.array([[6.0, 0, 0, -93], [0, 6.0, 0, -129], [0, 0, 6.0, -75], [0, 0, 0, 1]])
ATLAS_SHAPE = (32, 38, 32)
PARCELS = "parcels/atlas"
SURFACE = "surface/fsaverage5"
TARGETS = [{"name": "atlas", "kind": "parcels", "labels": "atlas.nii.gz", "labels_table": "atlas.tsv"},
           {"name": "power", "kind": "spheres", "coords": "power_2011", "radius_mm": 8.0},
           {"name": "fsaverage5", "kind": "surface", "n_samples": 2}]


def world(shape, affine) -> np.ndarray:
    """``(x, y, z, 3)`` mm coordinates of a grid's voxel centres."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return nib.affines.apply_affine(affine, ijk)


def brain(shape, affine) -> np.ndarray:
    """An ellipsoid brain around the MNI brain's centre."""
    xyz = world(shape, affine)
    return (((xyz - [0, -18, 18]) / [72, 102, 80]) ** 2).sum(-1) < 1


def atlas_labels(shape, affine) -> np.ndarray:
    """Octants of the brain (labels 1..8), and label 9: a cube outside the brain."""
    xyz = world(shape, affine)
    octant = 1 + (xyz[..., 0] > 0) + 2 * (xyz[..., 1] > -18) + 4 * (xyz[..., 2] > 18)
    labels = np.where(brain(shape, affine), octant, 0)
    labels[np.all(np.abs(xyz - [85, 80, 100]) < 6, axis=-1)] = 9
    return labels.astype(np.int16)


def write_bold(path: Path, regressors: np.ndarray, seed: int) -> None:
    """Raw int16-like BOLD whose brain voxels follow their parcel's planted signal."""
    rng = np.random.default_rng(seed)
    inside = brain(SHAPE, AFFINE)
    parcel = atlas_labels(SHAPE, AFFINE)
    weights = np.random.default_rng(0).normal(size=(10, 3))  # parcel -> colour latents, shared by subjects
    signal = regressors[:N_TRS, :3] @ weights.T  # (tr, parcel)
    base = np.where(inside, 900.0 + 100 * rng.random(SHAPE), 20.0)
    t = np.linspace(0, 1, N_TRS)
    data = base[..., None] * (1 + 0.05 * signal[:, parcel].transpose(1, 2, 3, 0) * inside[..., None]
                              + 0.03 * t + 0.01 * rng.standard_normal(SHAPE + (N_TRS,)))
    img = nib.Nifti1Image(data.astype(np.float32), AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((12.0, 12.0, 12.0, 1.5))
    nib.save(img, str(path))


def make_targets_study(root: Path) -> Path:
    """The module's study: giblet.synth writes the movie (colour scenes) and the config; the BOLD,
    the mask and the atlas are written here."""
    from giblet.synth import make_study

    config = make_study(root, n_subjects=2, n_trs=N_TRS, shape=SHAPE, movie_size=(32, 18), fps=5, annotations=False,
                        audio_track=False, seed=5)
    truth = np.load(root / "truth.npz")
    raw = yaml.safe_load(config.read_text())
    for i, rel in enumerate(raw["inputs"]["fmri"].values()):
        write_bold(root / rel, truth["regressors"], seed=i)
    nib.save(nib.Nifti1Image(brain(SHAPE, AFFINE).astype(np.uint8), AFFINE), str(root / "mask.nii.gz"))
    nib.save(nib.Nifti1Image(atlas_labels(ATLAS_SHAPE, ATLAS_AFFINE), ATLAS_AFFINE), str(root / "atlas.nii.gz"))
    (root / "atlas.tsv").write_text("index\tname\n" + "".join(f"{i}\toctant-{i}\n" for i in range(1, 10)))
    raw["fmri"] = {"mask_strategy": "file", "mask_file": "mask.nii.gz", "detrend": True, "targets": TARGETS}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(config path, store path, engine report)`` of the study built once."""
    root = tmp_path_factory.mktemp("targets")
    config = make_targets_study(root)
    report = engine.run(load_config(config), workers=1, progress=False, log=lambda m: None)
    return config, Path(report.store), report
