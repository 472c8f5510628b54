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

VERSION = 3  # 3: every (subject, run) also stores `censored` (fmri.confounds); statistics over kept TRs


def load_bold(path: str | Path, label: str) -> nib.Nifti1Image:
    """Open one BOLD run lazily and check it is a usable 4D run of real numbers whose header
    agrees with the file (``label`` names it in errors, e.g. ``sub-01/run-1``)."""
    path = Path(path)
    if not path.exists():
        raise InputMissingError(f"{label}: BOLD file {path} does not exist; fix its path in the config")
    try:
        img = nib.load(str(path), keep_file_open=True)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(f"{label}: {path} is not a readable NIfTI image ({type(exc).__name__}: {exc}); "
                         f"replace the file or fix its path in the config") from None
    shape = img.shape
    if len(shape) != 4:
        raise InputError(f"{label}: {path} has {len(shape)} dimensions {tuple(shape)}, expected 4D (x, y, z, tr); "
                         f"pass the 4D BOLD run, not a single volume or a 5D image")
    if shape[3] < 2:
        raise InputError(f"{label}: {path} has {shape[3]} TR(s); at least 2 are needed to z-score over time")
    dtype = img.get_data_dtype()
    if dtype.names is not None or dtype.kind not in "iuf":
        raise InputError(f"{label}: {path} stores {dtype} voxels ({'RGB/structured' if dtype.names else dtype.kind}); "
                         f"BOLD must be real numbers (integers or floats) -- convert the file (e.g. take the "
                         f"magnitude of complex data) first")
    _check_declared_size(img, path, label)
    return img


def _check_declared_size(img: nib.Nifti1Image, path: Path, label: str) -> None:
    """The header's shape x dtype must fit in the file: a header that lies about its size
    would otherwise surface as a huge allocation or a read error mid-run."""
    header = img.header
    expected = int(header.get_data_offset()) + int(np.prod(img.shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    if path.suffix == ".gz":
        with open(path, "rb") as fh:  # gzip's trailer: uncompressed size mod 2**32 (of the last member)
            fh.seek(0, 2)
            if fh.tell() < 4 or expected >= 2**32:
                return
            fh.seek(-4, 2)
            actual = int.from_bytes(fh.read(4), "little")
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"{label}: {path} header declares {tuple(img.shape)} {header.get_data_dtype()} voxels "
                         f"({expected} bytes with the header) but the file holds {actual}; the file is truncated or "
                         f"its header is wrong -- re-export it")


def header_tr_s(img: nib.Nifti1Image) -> float | None:
    """The TR the NIfTI header states, in seconds (``pixdim[4]`` in its ``xyzt_units``), or None
    when the header states none: time unit unknown (nibabel writes 1.0 with unknown units by
    default) or a zero TR."""
    unit = img.header.get_xyzt_units()[1]
    scale = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(unit)
    value = float(img.header.get_zooms()[3])
    if scale is None or not np.isfinite(value) or value <= 0:
        return None
    return value * scale


def check_tr(img: nib.Nifti1Image, path: Path, label: str, tr_s: float, trust_config: bool) -> float | None:
    """Refuse a header TR that disagrees with the config's ``tr_s`` (unless ``trust_config``);
    returns the header's TR (recorded in the store)."""
    found = header_tr_s(img)
    if found is not None and abs(found - tr_s) > 1e-3 * max(tr_s, 1e-9) and not trust_config:
        raise InputError(f"{label}: {path} header says TR = {found:g} s ({img.header.get_zooms()[3]:g} "
                         f"{img.header.get_xyzt_units()[1]}), the config says tr_s = {tr_s:g} s; fix tr_s, or set "
                         f"fmri.trust_config_tr=true if the header is wrong (recorded in the store)")
    return found


def check_same_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image, label: str, ref_label: str) -> None:
    """All runs of all subjects share one voxel grid: same (x, y, z) shape and affine as the reference."""
    if img.shape[:3] != ref.shape[:3]:
        raise InputError(f"{label}: grid {img.shape[:3]} differs from {ref_label}'s {ref.shape[:3]}; "
                         f"resample every run to one space (e.g. nilearn.image.resample_to_img) first")
    if not np.allclose(img.affine, ref.affine, atol=1e-4):
        raise InputError(f"{label}: affine differs from {ref_label}'s (max difference "
                         f"{np.abs(img.affine - ref.affine).max():.4g} mm); resample every run to one space first")


def _blocks(img: nib.Nifti1Image, path: Path, label: str, block_trs: int, stop: int | None = None):
    """Yield ``(t0, block)`` with block ``(x, y, z, b)`` as read (scaled) from the file."""
    n = img.shape[3] if stop is None else min(stop, img.shape[3])
    for t0 in range(0, n, block_trs):
        t1 = min(n, t0 + block_trs)
        try:
            block = np.asanyarray(img.dataobj[..., t0:t1])
        except (EOFError, OSError, zlib.error, ValueError) as exc:
            raise InputError(f"{label}: {path} is truncated or corrupt: reading TRs {t0}-{t1 - 1} failed "
                             f"({type(exc).__name__}: {exc}); re-copy or re-export the file") from None
        yield t0, block


def _check_finite(block: np.ndarray, t0: int, label: str, path: Path) -> None:
    bad = ~np.isfinite(block)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise InputError(f"{label}: {path} holds {int(bad.sum())} NaN/inf values (first at voxel "
                         f"{tuple(int(v) for v in first[:3])}, TR {t0 + int(first[-1])}); "
                         f"repair the file (e.g. nilearn.image.clean_img) before preprocessing")


def mean_image(path: Path, label: str, block_trs: int, max_trs: int | None = None) -> nib.Nifti1Image:
    """Temporal mean of a 4D image over its first ``max_trs`` TRs (all if None), streamed.

    Only the TRs averaged are decompressed, so the mask costs a fraction of a full read.
    """
    img = load_bold(path, label)
    n = img.shape[3] if max_trs is None else min(max_trs, img.shape[3])
    total = np.zeros(img.shape[:3], dtype=np.float64)
    for t0, block in _blocks(img, path, label, block_trs, stop=n):
        _check_finite(block, t0, label, path)
        total += block.sum(axis=-1, dtype=np.float64)
    return nib.Nifti1Image((total / n).astype(np.float32), img.affine)


def mask_grid(path: str | Path, label: str) -> tuple[tuple, np.ndarray]:
    """``(shape, affine)`` of a mask from its header alone (a tenth of ``nib.load``'s time: the
    plan checks every run's fMRIPrep mask)."""
    import gzip

    path = Path(path)
    if not path.exists():
        raise InputMissingError(f"{label}: fMRIPrep brain mask {path} does not exist; fmri.mask_strategy=fmriprep "
                                f"reads each run's *_desc-brain_mask.nii.gz beside its BOLD -- use another "
                                f"fmri.mask_strategy or add the mask")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            header = nib.Nifti1Header.from_fileobj(fh)
        return tuple(header.get_data_shape()), header.get_best_affine()
    except Exception:  # not NIfTI-1 (NIfTI-2, another format): let nibabel decide
        img = nib.load(str(path))
        return tuple(img.shape), img.affine


def load_mask(path: str | Path, label: str, ref: nib.Nifti1Image, ref_label: str,
              load: bool = True) -> nib.Nifti1Image | None:
    """One run's fMRIPrep brain mask (``load=False``: only checked), checked to lie on the BOLD
    grid (``label``: subject/run)."""
    shape, affine = mask_grid(path, label)
    if shape[:3] != ref.shape[:3] or len(shape) > 3 and shape[3] > 1 or not np.allclose(affine, ref.affine, atol=1e-4):
        raise InputError(f"{label}: fMRIPrep mask {path} grid {shape} differs from the BOLD grid of {ref_label} "
                         f"{ref.shape[:3]} (or its affine does); every run must be in one space -- set bids.space, or "
                         f"resample the masks (nilearn.image.resample_to_img, interpolation='nearest')")
    return nib.load(str(path)) if load else None


def combine_masks(masks: list[tuple[str, str]], ref: nib.Nifti1Image, ref_label: str, threshold: float) -> np.ndarray:
    """``(x, y, z) bool``: voxels in at least ``threshold`` of the masks (nilearn's
    ``intersect_masks``: 1 intersection, 0 union), ``masks`` as ``[(label, path)]``."""
    from nilearn.masking import intersect_masks

    imgs = [load_mask(path, label, ref, ref_label) for label, path in masks]
    combined = intersect_masks(imgs, threshold=threshold, connected=False)
    return np.asanyarray(combined.dataobj).astype(bool).reshape(ref.shape[:3])


def compute_mask(strategy: str, reference: Path, ref_label: str, mask_file: Path | None,
                 block_trs: int, mask_trs: int | None = None, masks: list | None = None,
                 threshold: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The study's mask ``(x, y, z) bool`` and its affine ``(4, 4)``.

    ``epi``/``background`` run nilearn's ``compute_epi_mask``/``compute_background_mask`` on
    the reference run's mean image over its first ``mask_trs`` TRs, so adding a subject or
    a run never changes the mask; ``file`` loads a NIfTI mask on the same grid; ``fmriprep``
    combines every run's fMRIPrep brain mask (``masks``: ``[(label, path)]``) by
    ``threshold`` (:func:`combine_masks`), so adding a run may change it.
    """
    from nilearn.masking import compute_background_mask, compute_epi_mask

    ref_img = load_bold(reference, ref_label)
    if strategy == "fmriprep":
        mask = combine_masks(masks or [], ref_img, ref_label, threshold)
    elif strategy == "file":
        if mask_file is None or not Path(mask_file).exists():
            raise InputMissingError(f"fmri: mask file {mask_file} does not exist; fix fmri.mask_file")
        mimg = nib.load(str(mask_file))
        if mimg.shape[:3] != ref_img.shape[:3] or not np.allclose(mimg.affine, ref_img.affine, atol=1e-4):
            raise InputError(f"fmri: mask file {mask_file} grid {mimg.shape[:3]} does not match the BOLD grid "
                             f"{ref_img.shape[:3]} (or its affine differs); resample the mask to the BOLD images")
        mask = np.asanyarray(mimg.dataobj).astype(bool).reshape(ref_img.shape[:3])
    else:
        mean = mean_image(reference, ref_label, block_trs, mask_trs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn = compute_epi_mask if strategy == "epi" else compute_background_mask
            mask = np.asanyarray(fn(mean).dataobj).astype(bool)
    if not mask.any():
        if strategy == "fmriprep":
            raise InputError(f"fmri: the fMRIPrep brain masks of {len(masks or [])} runs have no voxel in common "
                             f"under fmri.mask_rule (threshold {threshold:g}); use fmri.mask_rule=fraction:0.5 or "
                             f"union, or check the runs' spaces")
        raise InputError(f"fmri: the {strategy} mask of {ref_label} ({reference}) is empty; "
                         f"set fmri.mask_strategy=background (or give fmri.mask_file)")
    return mask, ref_img.affine


def read_masked(path: Path, label: str, mask: np.ndarray, block_trs: int, stop: int | None = None) -> np.ndarray:
    """In-mask voxels of the first ``stop`` TRs (all if None), ``(tr, voxel) float32``, voxels
    in C order of the mask."""
    img = load_bold(path, label)
    if img.shape[:3] != mask.shape:
        raise InputError(f"{label}: grid {img.shape[:3]} differs from the mask's {mask.shape}; "
                         f"resample every run to one space first")
    n = img.shape[3] if stop is None else min(stop, img.shape[3])
    out = np.empty((n, int(mask.sum())), dtype=np.float32)
    for t0, block in _blocks(img, path, label, block_trs, stop=n):
        _check_finite(block, t0, label, path)
        # block[mask] is (voxel, b) in C order of the mask, matching np.argwhere(mask).
        out[t0:t0 + block.shape[-1]] = block[mask].T
    return out


def clean(x: np.ndarray, detrend: bool, high_pass: float | None, tr_s: float, block: int = 2048,
          label: str = "fmri") -> np.ndarray:
    """What ``nilearn.signal.clean(detrend=..., high_pass=..., t_r=...)`` computes, in voxel
    blocks, then re-centred on the raw voxel mean.

    Same steps and numbers as nilearn (a test checks equality): nilearn's detrend, then
    nilearn's Butterworth high-pass (``nilearn.signal.butterworth``, order 5,
    ``sosfiltfilt``). The filter is called with ``copy=True``, which filters the whole block in
    one vectorized ``sosfiltfilt``; inside ``clean`` nilearn filters voxel by voxel in place
    (~57 s for a Sherlock-sized subject, against ~10 s). The cleaned signal is then shifted to
    have exactly the raw voxel mean (the filtered signal is not exactly zero-mean), so the
    saved ``mean`` is the raw mean over the served TRs and ``denormalize`` returns the cleaned
    signal on the scanner's scale.
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
            try:
                cols = butterworth(cols, sampling_rate=1.0 / tr_s, high_pass=high_pass, copy=True)
            except ValueError as exc:  # scipy's filtfilt: too few samples for the filter's padding
                raise InputError(f"{label}: fmri.high_pass={high_pass} Hz cannot filter its {len(cols)} served TRs "
                                 f"({exc}); use longer runs or drop fmri.high_pass") from None
        x[:, v0:v0 + block] = (cols - cols.mean(axis=0) + mean).astype(np.float32)
    return x


def build_mask(staging: str, strategy: str, reference: str, ref_label: str, mask_file: str | None,
               block_trs: int, mask_trs: int | None = None, masks: list | None = None, rule: str = "intersection",
               threshold: float = 1.0) -> dict:
    """Task: write ``fmri/mask`` (x, y, z) bool and ``fmri/voxels`` (voxel, 3) int32."""
    mask, affine = compute_mask(strategy, Path(reference), ref_label,
                                Path(mask_file) if mask_file else None, block_trs, mask_trs, masks, threshold)
    voxels = np.argwhere(mask).astype(np.int32)
    attrs = {"affine": affine.tolist(), "n_voxels": int(len(voxels)), "strategy": strategy,
             "reference": ref_label, "mean_of_first_trs": mask_trs, "order": "C (np.argwhere(mask))"}
    if strategy == "fmriprep":
        attrs.update(rule=rule, n_masks=len(masks or []), mean_of_first_trs=None)
    m = store.create_array(staging, store.MASK, mask.shape, "bool", mask.shape, (store.X, store.Y, store.Z),
                           attrs, fill_value=False)
    m[...] = mask
    v = store.create_array(staging, store.VOXELS, voxels.shape, "int32", voxels.shape,
                           (store.VOXEL, store.IJK), {"affine": affine.tolist()})
    v[...] = voxels
    return {"n_voxels": int(len(voxels)), "shape": list(mask.shape)}


def array_names(subject: str, run: str) -> dict[str, str]:
    """Store paths of one (subject, run): ``bold``, ``mean``, ``std`` and ``censored``."""
    prefix = store.fmri_prefix(subject, run)
    return {k: f"{prefix}/{k}" for k in ("bold", "mean", "std", "censored")}


def build_subject(staging: str, store_path: str, subject: str, runs: list[dict], tr_s: float, detrend: bool,
                  high_pass: float | None, zero_variance: str, chunk_trs: int, block_trs: int,
                  zscore: str = "run", confounds: dict | None = None) -> dict:
    """Task: z-score one subject's runs into ``fmri/<subject>/<run>/{bold,mean,std,censored}``.

    Args:
        runs: ``[{"run", "path", "n_trs", "file_trs"}]`` -- ``n_trs`` is the TRs served (the
            first ``n_trs`` of the file: its run's stimulus covers no more).
        zscore: ``run`` -- statistics over each run's served TRs; ``subject`` -- over the
            served TRs of all ``runs`` together. Censored TRs never enter them.
        confounds: the ``fmri.confounds`` settings (``giblet.config.ConfoundsParams`` as a
            dict) when confounds are regressed (``giblet.features.confounds``).

    Returns:
        The record kept in the manifest: per run, served and file TR counts, censored count,
        zero-variance count, raw range.
    """
    mask = store.open_committed(store_path, store.MASK)[...]
    data, meta = {}, {}
    for r in runs:
        label = f"{subject}/{r['run']}"
        x = read_masked(Path(r["path"]), label, mask, block_trs, stop=r["n_trs"])
        meta[r["run"]] = {"n_trs": int(x.shape[0]), "raw_min": float(x.min()), "raw_max": float(x.max())}
        data[r["run"]] = _clean_run(x, r, label, tr_s, detrend, high_pass, confounds, meta[r["run"]])
    groups = [[r["run"]] for r in runs] if zscore == "run" else [[r["run"] for r in runs]]
    for group in groups:
        scaler = ZScorer()
        for run in group:
            _fit(scaler, *data[run], block_trs)
        n_zero = zero_variance_rule(scaler, f"{subject}/{'+'.join(group)}", zero_variance, "in-mask voxels")
        for run in group:
            _write_run(staging, subject, run, data.pop(run), scaler, chunk_trs, zscore)
            meta[run].update(n_zero_variance=n_zero, first_zero_variance_voxel=int(np.argmax(scaler.zero_variance_))
                             if n_zero else None)
    return {"runs": meta, "n_voxels": int(mask.sum()), "zscore": zscore}


def _clean_run(x: np.ndarray, r: dict, label: str, tr_s: float, detrend: bool, high_pass: float | None,
               settings: dict | None, meta: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(x, offset, censored)``: the cleaned run -- ``x + offset`` on the scanner's scale
    (``offset`` None: ``x`` is) -- and its ``(tr,) bool`` censored TRs."""
    if not settings:
        meta["n_censored"] = 0
        return clean(x, detrend, high_pass, tr_s, label=label), None, np.zeros(len(x), dtype=bool)
    from giblet.config import ConfoundsParams
    from giblet.features import confounds

    c = ConfoundsParams(**settings)
    table, censored = confounds.load(r["path"], c, r["file_trs"], len(x), label)
    residual, offset = confounds.regress(x, table, censored, detrend, high_pass, tr_s, label)
    meta.update(n_censored=int(censored.sum()), n_confounds=int(table.shape[1]),
                confounds_file=confounds.confounds_file(r["path"], label).name)
    return residual, offset, censored


def _fit(scaler: ZScorer, x: np.ndarray, offset: np.ndarray | None, censored: np.ndarray, block_trs: int) -> None:
    """Accumulate the statistics of the kept (uncensored) TRs, ``block_trs`` at a time."""
    rows = np.flatnonzero(~censored)
    for i in range(0, len(rows), block_trs):
        block = x[rows[i:i + block_trs]]
        scaler.partial_fit(block if offset is None else block.astype(np.float64) + offset)


def zero_variance_rule(scaler: ZScorer, label: str, rule: str, columns: str = "voxels",
                       all_constant_fix: str = "an empty or all-zero run? check the file") -> int:
    """``fmri.zero_variance`` over a fitted scaler's columns (voxels, or a target set's): the
    count of constant columns; an error when every column is constant, or when any is and the
    rule is ``error``. One rule for the voxels and every target set."""
    n_zero = int(scaler.zero_variance_.sum())
    if n_zero == len(scaler.zero_variance_):
        raise InputError(f"{label}: all {n_zero} {columns} are constant over the served TRs ({all_constant_fix})")
    if n_zero and rule == "error":
        raise InputError(f"{label}: {n_zero} {columns} have zero variance over tr (first: column "
                         f"{int(np.argmax(scaler.zero_variance_))}); set fmri.zero_variance=zero to keep them as 0 "
                         f"after z-scoring")
    return n_zero


def _write_run(staging: Path, subject: str, run: str, cleaned: tuple, scaler: ZScorer, chunk_trs: int,
               zscore: str) -> None:
    x, offset, censored = cleaned
    names = array_names(subject, run)
    attrs = {"subject": subject, "run": run, "convention": {**ZScorer.convention, "over": zscore},
             "n_zero_variance": int(scaler.zero_variance_.sum()), "n_censored": int(censored.sum())}
    bold = store.create_array(staging, names["bold"], x.shape, "float32", (chunk_trs, x.shape[1]),
                              (store.TR, store.VOXEL), attrs)
    for t0 in range(0, x.shape[0], chunk_trs):  # whole chunks only
        rows = x[t0:t0 + chunk_trs]
        z = scaler.transform(rows if offset is None else rows.astype(np.float64) + offset)
        z[censored[t0:t0 + chunk_trs]] = np.nan  # censored: no value (zero-variance voxels would say 0)
        bold[t0:t0 + chunk_trs] = z
    units = {"mean": "raw scanner units: the voxel mean over the TRs the statistics cover",
             "std": "raw scanner units: population std (ddof 0) of the cleaned signal; 0 marks zero variance"}
    for name, values in (("mean", scaler.mean_), ("std", scaler.std_)):
        arr = store.create_array(staging, names[name], values.shape, "float32", values.shape, (store.VOXEL,),
                                 {"units": units[name], "over": zscore})
        arr[...] = values
    cen = store.create_array(staging, names["censored"], censored.shape, "bool", censored.shape, (store.TR,),
                             {"meaning": "True: censored by fmri.confounds (scrubbing / non-steady-state); bold is "
                                         "NaN there and the statistics leave it out"}, fill_value=False)
    cen[...] = censored
