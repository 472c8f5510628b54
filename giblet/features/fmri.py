"""fMRI stage: shared mask, streamed NIfTI reads, optional cleaning, per-voxel z-score.

Each subject's 4D image is read through nibabel's ``dataobj`` in blocks of TRs (a TR block
is contiguous in a NIfTI file, so sequential blocks stream through gzip once); only the
in-mask voxels of each block are kept, as float32. Peak memory is one subject's masked
``(tr, voxel)`` matrix plus one block, whatever the number of subjects.
"""
from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from giblet import store
from giblet.errors import InputError, InputMissingError
from giblet.normalize import ZScorer

VERSION = 1


def load_bold(path: str | Path, subject: str) -> nib.Nifti1Image:
    """Open one subject's BOLD image lazily and check it is a usable 4D run."""
    path = Path(path)
    if not path.exists():
        raise InputMissingError(f"{subject}: BOLD file {path} does not exist; fix inputs.fmri.{subject} in the config")
    try:
        img = nib.load(str(path), keep_file_open=True)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(f"{subject}: {path} is not a readable NIfTI image ({type(exc).__name__}: {exc}); "
                         f"replace the file or fix inputs.fmri.{subject}") from None
    shape = img.shape
    if len(shape) != 4:
        raise InputError(f"{subject}: {path} has {len(shape)} dimensions {tuple(shape)}, expected 4D (x, y, z, tr); "
                         f"pass the 4D BOLD run, not a single volume or a 5D image")
    if shape[3] < 2:
        raise InputError(f"{subject}: {path} has {shape[3]} TR(s); at least 2 are needed to z-score over time")
    return img


def check_same_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image, subject: str, ref_subject: str) -> None:
    """All subjects share one voxel grid: same (x, y, z) shape and affine as the reference."""
    if img.shape[:3] != ref.shape[:3]:
        raise InputError(f"{subject}: grid {img.shape[:3]} differs from {ref_subject}'s {ref.shape[:3]}; "
                         f"resample every subject to one space (e.g. nilearn.image.resample_to_img) first")
    if not np.allclose(img.affine, ref.affine, atol=1e-4):
        raise InputError(f"{subject}: affine differs from {ref_subject}'s (max difference "
                         f"{np.abs(img.affine - ref.affine).max():.4g} mm); resample every subject to one space first")


def _blocks(img: nib.Nifti1Image, path: Path, subject: str, block_trs: int, stop: int | None = None):
    """Yield ``(t0, block)`` with block ``(x, y, z, b)`` as read (scaled) from the file."""
    n = img.shape[3] if stop is None else stop
    for t0 in range(0, n, block_trs):
        t1 = min(n, t0 + block_trs)
        try:
            block = np.asanyarray(img.dataobj[..., t0:t1])
        except (EOFError, OSError, zlib.error, ValueError) as exc:
            raise InputError(f"{subject}: {path} is truncated or corrupt: reading TRs {t0}-{t1 - 1} failed "
                             f"({type(exc).__name__}: {exc}); re-copy or re-export the file") from None
        yield t0, block


def _check_finite(block: np.ndarray, t0: int, subject: str, path: Path) -> None:
    bad = ~np.isfinite(block)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise InputError(f"{subject}: {path} holds {int(bad.sum())} NaN/inf values (first at voxel "
                         f"{tuple(int(v) for v in first[:3])}, TR {t0 + int(first[-1])}); "
                         f"repair the file (e.g. nilearn.image.clean_img) before preprocessing")


def mean_image(path: Path, subject: str, block_trs: int, max_trs: int | None = None) -> nib.Nifti1Image:
    """Temporal mean of a 4D image over its first ``max_trs`` TRs (all if None), streamed.

    Only the TRs averaged are decompressed, so the mask costs a fraction of a full read.
    """
    img = load_bold(path, subject)
    n = img.shape[3] if max_trs is None else min(max_trs, img.shape[3])
    total = np.zeros(img.shape[:3], dtype=np.float64)
    for t0, block in _blocks(img, path, subject, block_trs, stop=n):
        _check_finite(block, t0, subject, path)
        total += block.sum(axis=-1, dtype=np.float64)
    return nib.Nifti1Image((total / n).astype(np.float32), img.affine)


def compute_mask(strategy: str, reference: Path, ref_subject: str, mask_file: Path | None,
                 block_trs: int, mask_trs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The shared mask ``(x, y, z) bool`` and its affine ``(4, 4)``.

    ``epi``/``background`` run nilearn's ``compute_epi_mask``/``compute_background_mask`` on
    the reference subject's mean image over its first ``mask_trs`` TRs, so adding a subject
    never changes the mask;
    ``file`` loads a NIfTI mask on the same grid.
    """
    from nilearn.masking import compute_background_mask, compute_epi_mask

    ref_img = load_bold(reference, ref_subject)
    if strategy == "file":
        if mask_file is None or not Path(mask_file).exists():
            raise InputMissingError(f"fmri: mask file {mask_file} does not exist; fix fmri.mask_file")
        mimg = nib.load(str(mask_file))
        if mimg.shape[:3] != ref_img.shape[:3] or not np.allclose(mimg.affine, ref_img.affine, atol=1e-4):
            raise InputError(f"fmri: mask file {mask_file} grid {mimg.shape[:3]} does not match the BOLD grid "
                             f"{ref_img.shape[:3]} (or its affine differs); resample the mask to the BOLD images")
        mask = np.asanyarray(mimg.dataobj).astype(bool).reshape(ref_img.shape[:3])
    else:
        mean = mean_image(reference, ref_subject, block_trs, mask_trs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn = compute_epi_mask if strategy == "epi" else compute_background_mask
            mask = np.asanyarray(fn(mean).dataobj).astype(bool)
    if not mask.any():
        raise InputError(f"fmri: the {strategy} mask of {ref_subject} ({reference}) is empty; "
                         f"set fmri.mask_strategy=background (or give fmri.mask_file)")
    return mask, ref_img.affine


def read_masked(path: Path, subject: str, mask: np.ndarray, block_trs: int) -> np.ndarray:
    """In-mask voxels of every TR, ``(tr, voxel) float32``, voxels in C order of the mask."""
    img = load_bold(path, subject)
    if img.shape[:3] != mask.shape:
        raise InputError(f"{subject}: grid {img.shape[:3]} differs from the mask's {mask.shape}; "
                         f"resample every subject to one space first")
    out = np.empty((img.shape[3], int(mask.sum())), dtype=np.float32)
    for t0, block in _blocks(img, path, subject, block_trs):
        _check_finite(block, t0, subject, path)
        # block[mask] is (voxel, b) in C order of the mask, matching np.argwhere(mask).
        out[t0:t0 + block.shape[-1]] = block[mask].T
    return out


def clean(x: np.ndarray, detrend: bool, high_pass: float | None, tr_s: float, block: int = 8192) -> np.ndarray:
    """What ``nilearn.signal.clean(detrend=..., high_pass=..., t_r=...)`` computes, in voxel
    blocks, mean kept.

    Same steps and numbers (a test checks equality): nilearn's detrend, then nilearn's
    Butterworth high-pass (``nilearn.signal.butterworth``, order 5, ``sosfiltfilt``). The
    filter is called with ``copy=True``, which filters the whole block in one vectorized
    ``sosfiltfilt``; inside ``clean`` nilearn filters voxel by voxel in place (~57 s for a
    Sherlock-sized subject, against ~10 s). The voxel mean is added back so that the saved
    ``mean`` stays in scanner units and ``denormalize`` returns values on the raw scale.
    """
    from nilearn.signal import butterworth
    from nilearn.signal import clean as nl_clean

    if not detrend and high_pass is None:
        return x
    for v0 in range(0, x.shape[1], block):
        cols = x[:, v0:v0 + block].astype(np.float64)
        mean = cols.mean(axis=0)
        if detrend:
            cols = nl_clean(cols, detrend=True, standardize=None, standardize_confounds=False)
        if high_pass is not None:
            cols = butterworth(cols, sampling_rate=1.0 / tr_s, high_pass=high_pass, copy=True)
        x[:, v0:v0 + block] = (cols + mean).astype(np.float32)
    return x


def build_mask(staging: str, strategy: str, reference: str, ref_subject: str, mask_file: str | None,
               block_trs: int, mask_trs: int | None = None) -> dict:
    """Task: write ``fmri/mask`` (x, y, z) bool and ``fmri/voxels`` (voxel, 3) int32."""
    mask, affine = compute_mask(strategy, Path(reference), ref_subject,
                                Path(mask_file) if mask_file else None, block_trs, mask_trs)
    voxels = np.argwhere(mask).astype(np.int32)
    attrs = {"affine": affine.tolist(), "n_voxels": int(len(voxels)), "strategy": strategy,
             "reference": ref_subject, "mean_of_first_trs": mask_trs, "order": "C (np.argwhere(mask))"}
    m = store.create_array(Path(staging), "fmri/mask", mask.shape, "bool", mask.shape, (store.X, store.Y, store.Z),
                           attrs, fill_value=False)
    m[...] = mask
    v = store.create_array(Path(staging), "fmri/voxels", voxels.shape, "int32", voxels.shape,
                           (store.VOXEL, store.IJK), {"affine": affine.tolist()})
    v[...] = voxels
    return {"n_voxels": int(len(voxels)), "shape": list(mask.shape)}


def build_subject(staging: str, store_path: str, subject: str, path: str, tr_s: float, detrend: bool,
                  high_pass: float | None, zero_variance: str, chunk_trs: int, block_trs: int) -> dict:
    """Task: z-score one subject into ``fmri/<subject>/{bold,mean,std}``.

    Returns the per-subject record kept in the manifest (TR count, zero-variance count).
    """
    import zarr

    mask = zarr.open_array(str(Path(store_path) / "fmri/mask"), mode="r")[...]
    x = read_masked(Path(path), subject, mask, block_trs)
    raw_min, raw_max = float(x.min()), float(x.max())
    x = clean(x, detrend, high_pass, tr_s)
    scaler = ZScorer()
    for t0 in range(0, x.shape[0], block_trs):
        scaler.partial_fit(x[t0:t0 + block_trs])
    n_zero = int(scaler.zero_variance_.sum())
    if n_zero == x.shape[1]:
        raise InputError(f"{subject}: all {n_zero} in-mask voxels of {path} are constant over time "
                         f"(an empty or all-zero run?); check the file")
    first_zero = int(np.argmax(scaler.zero_variance_)) if n_zero else None
    if n_zero and zero_variance == "error":
        raise InputError(f"{subject}: {n_zero} voxels have zero variance over tr (first: voxel {first_zero}); "
                         f"set fmri.zero_variance=zero to keep them as 0 after z-scoring")
    prefix = f"fmri/{subject}"
    attrs = {"subject": subject, "convention": ZScorer.convention, "n_zero_variance": n_zero}
    bold = store.create_array(Path(staging), f"{prefix}/bold", x.shape, "float32", (chunk_trs, x.shape[1]),
                              (store.TR, store.VOXEL), attrs)
    for t0 in range(0, x.shape[0], chunk_trs):  # whole chunks only
        bold[t0:t0 + chunk_trs] = scaler.transform(x[t0:t0 + chunk_trs])
    for name, values in (("mean", scaler.mean_), ("std", scaler.std_)):
        arr = store.create_array(Path(staging), f"{prefix}/{name}", values.shape, "float32", values.shape,
                                 (store.VOXEL,), {"units": "raw scanner units"})
        arr[...] = values
    return {"n_trs": int(x.shape[0]), "n_voxels": int(x.shape[1]), "n_zero_variance": n_zero,
            "first_zero_variance_voxel": first_zero, "raw_min": raw_min, "raw_max": raw_max}
