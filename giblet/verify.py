"""Re-check a built store: completeness, shapes, dtypes, chunk checksums, invariants.

``verify_store(path)`` returns a list of problems (empty: the store is sound). Each
problem names the array and, for checksum failures, the chunk file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from giblet.errors import StoreError
from giblet.fingerprint import hash_file
from giblet.reader import open_store
from giblet.store import read_manifest

Z_TOL = 1e-3  # |mean| and |std - 1| of a stored z-scored column, float32 round-off included


def _check_array(store: Path, name: str, rec: dict) -> list[str]:
    problems = []
    adir = store / name
    if not (adir / "zarr.json").exists():
        return [f"{name}: listed in manifest.json but missing on disk"]
    meta = json.loads((adir / "zarr.json").read_text())
    if meta["shape"] != rec["shape"]:
        problems.append(f"{name}: shape {meta['shape']} != manifest {rec['shape']}")
    if meta["data_type"] != rec["dtype"]:
        problems.append(f"{name}: dtype {meta['data_type']} != manifest {rec['dtype']}")
    on_disk = {p.relative_to(adir).as_posix() for p in adir.rglob("*") if p.is_file()}
    for rel in sorted(set(rec["checksums"]) - on_disk):
        problems.append(f"{name}: chunk {rel} is missing")
    for rel in sorted(on_disk - set(rec["checksums"])):
        problems.append(f"{name}: unexpected file {rel} (not written by giblet)")
    for rel, digest in sorted(rec["checksums"].items()):
        if rel in on_disk and hash_file(adir / rel) != digest:
            problems.append(f"{name}: chunk {rel} checksum mismatch (corrupted on disk); "
                            f"rerun `giblet-preprocess run CONFIG --force --only {name.split('/')[0]}`")
    return problems


def _check_zscore(view, subject: str) -> list[str]:
    bold = view.array(f"fmri/{subject}/bold")
    mean, std = view.fmri_stats(subject)
    problems = []
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std < 0).any():
        problems.append(f"fmri/{subject}: mean/std hold NaN, inf or negative values")
    s1 = np.zeros(bold.shape[1]); s2 = np.zeros(bold.shape[1])
    step = bold.chunks[0]
    for t0 in range(0, bold.shape[0], step):
        block = bold[t0:t0 + step].astype(np.float64)
        if not np.isfinite(block).all():
            problems.append(f"fmri/{subject}/bold: NaN/inf in TRs {t0}-{t0 + len(block) - 1}")
            return problems
        s1 += block.sum(0); s2 += (block**2).sum(0)
    n = bold.shape[0]
    m = s1 / n
    sd = np.sqrt(np.maximum(s2 / n - m**2, 0))
    zero = std == 0
    bad_mean = np.abs(m) > Z_TOL
    bad_std = np.where(zero, sd > 0, np.abs(sd - 1) > Z_TOL)
    if bad_mean.any() or bad_std.any():
        v = int(np.argmax(bad_mean | bad_std))
        problems.append(f"fmri/{subject}/bold: {int((bad_mean | bad_std).sum())} voxels are not z-scored "
                        f"(first: voxel {v}, mean {m[v]:.4g}, std {sd[v]:.4g}; expected 0 and 1, or 0 and 0 "
                        f"for zero-variance voxels)")
    n_zero = (view.unit_meta(f"fmri/{subject}") or {}).get("n_zero_variance")
    if n_zero is not None and n_zero != int(zero.sum()):
        problems.append(f"fmri/{subject}: manifest counts {n_zero} zero-variance voxels, std has {int(zero.sum())}")
    return problems


def _check_video(view) -> list[str]:
    """video/frames uint8 (tr, frame, y, x, 3), video/padded matching it, finite [0, 1] stats."""
    frames, padded = view.array("video/frames"), view.array("video/padded")
    meta = view.unit_meta("video")
    problems = []
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        problems.append(f"video/frames: {frames.dtype} {frames.shape}, expected uint8 (tr, frame, y, x, 3)")
    elif (frames.shape[0], frames.shape[1]) != (meta.get("n_trs"), meta.get("frames_per_tr")):
        problems.append(f"video/frames: shape {frames.shape} disagrees with the manifest's n_trs "
                        f"{meta.get('n_trs')} / frames_per_tr {meta.get('frames_per_tr')}")
    if padded.dtype != np.bool_ or padded.shape != frames.shape[:2]:
        problems.append(f"video/padded: {padded.dtype} {padded.shape}, expected bool {frames.shape[:2]}")
    elif int(padded[...].sum()) != meta.get("n_padded_frames"):
        problems.append(f"video/padded: {int(padded[...].sum())} padded slots, manifest counts "
                        f"{meta.get('n_padded_frames')}")
    mean, std = view.video_stats()
    if mean.shape != (3,) or std.shape != (3,) or mean.dtype != np.float32 or std.dtype != np.float32:
        problems.append(f"video/mean|std: {mean.dtype} {mean.shape} / {std.dtype} {std.shape}, expected float32 (3,)")
    elif not (np.isfinite(mean).all() and np.isfinite(std).all()):
        problems.append(f"video/mean|std: not finite (mean {mean}, std {std})")
    elif (mean < 0).any() or (mean > 1).any() or (std < 0).any() or (std > 0.5).any():
        problems.append(f"video/mean|std: outside [0, 1] pixel scale (mean {mean}, std {std}); were they "
                        f"computed on 0-255 values?")
    return problems


def _check_text(view) -> list[str]:
    """Embeddings float32 and finite; has_text bool (tr,); zero rows where has_text is False
    under fill=zeros; mean/std finite; the manifest's uncovered-TR count matches."""
    emb, has = view.array("text/embeddings"), view.array("text/has_text")
    if emb.dtype != np.float32 or emb.ndim != 2 or has.dtype != bool or has.shape != emb.shape[:1]:
        return [f"text: embeddings {emb.dtype} {emb.shape} / has_text {has.dtype} {has.shape}; expected float32 "
                f"(tr, embedding) and bool (tr,)"]
    problems = []
    flags = has[...]
    zero_fill = emb.attrs.get("fill", "zeros") == "zeros"
    step = emb.chunks[0]
    for t0 in range(0, emb.shape[0], step):
        block = emb[t0:t0 + step]
        if not np.isfinite(block).all():
            problems.append(f"text/embeddings: NaN/inf in TRs {t0}-{t0 + len(block) - 1}")
        bad = ~flags[t0:t0 + step] & np.any(block != 0, axis=1)
        if zero_fill and bad.any():
            problems.append(f"text/embeddings: TR {t0 + int(np.argmax(bad))} has no text (has_text False) but a "
                            f"non-zero row under fill=zeros")
    for name in ("mean", "std"):
        v = view.array(f"text/{name}")[...]
        ok = v.dtype == np.float32 and v.shape == emb.shape[1:] and np.isfinite(v).all()
        if not ok or (name == "std" and (v < 0).any()):
            problems.append(f"text/{name}: {v.dtype} {v.shape}, expected finite float32 {emb.shape[1:]} (std >= 0)")
    n_uncovered = view.unit_meta("text").get("n_uncovered_trs")
    if n_uncovered is not None and n_uncovered != int((~flags).sum()):
        problems.append(f"text: manifest counts {n_uncovered} uncovered TRs, has_text has {int((~flags).sum())}")
    return problems


def _check_audio(view) -> list[str]:
    """audio/codes int16 (tr, codebook, code_frame); codes in [0, codebook_size); as many
    codebooks as the recorded bandwidth gives (EnCodec: floor(kbps / (log2(size) * frames/s)))."""
    import math

    codes = view.array("audio/codes")
    a = codes.attrs
    try:
        size, kbps, rate, per_tr = int(a["codebook_size"]), float(a["bandwidth_kbps"]), float(a["frame_rate"]), \
            int(a["code_frames_per_tr"])
    except (KeyError, TypeError, ValueError):
        return ["audio/codes: attrs lack codebook_size, bandwidth_kbps, frame_rate or code_frames_per_tr"]
    want = max(1, math.floor(kbps * 1000 / (math.log2(size) * math.ceil(rate))))
    if codes.dtype != np.int16 or codes.ndim != 3 or codes.shape[1:] != (want, per_tr):
        return [f"audio/codes: {codes.dtype} {codes.shape}, expected int16 (tr, {want}, {per_tr}) for "
                f"{kbps:g} kbps with {size}-code codebooks"]
    problems = []
    n = (view.unit_meta("audio") or {}).get("n_trs")
    if n is not None and codes.shape[0] != n:
        problems.append(f"audio/codes: {codes.shape[0]} TRs, the manifest's n_trs is {n}")
    step = codes.chunks[0]
    for t0 in range(0, codes.shape[0], step):
        block = codes[t0:t0 + step]
        if block.size and (block.min() < 0 or block.max() >= size):
            problems.append(f"audio/codes: TRs {t0}-{t0 + len(block) - 1} hold codes in [{block.min()}, "
                            f"{block.max()}], outside [0, {size})")
    return problems


def store_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be verified at all -- not a giblet store, or one whose first run
    never finished -- or None. Worded like ``giblet.open_store``'s errors."""
    path = Path(path)
    if not path.is_dir() or not (path / "zarr.json").is_file():
        why = ("no such file or folder" if not path.exists() else "a file, not a folder" if not path.is_dir()
               else "no zarr.json")
        return f"{path}: not a giblet store ({why}); build one with `giblet-preprocess run CONFIG`"
    if read_manifest(path) is None:
        return f"{path}: no manifest.json: the store is incomplete (a run never finished); rerun it"
    return None


def verify_store(path: str | Path, invariants: bool = True) -> list[str]:
    """All problems found in the store at ``path`` (an empty list means it verified)."""
    path = Path(path)
    problem = store_problem(path)
    if problem:
        return [problem]
    manifest = read_manifest(path)
    problems: list[str] = []
    for key, entry in sorted(manifest["units"].items()):
        for name, rec in entry.get("arrays", {}).items():
            problems += _check_array(path, name, rec)
    try:
        view = open_store(path)
    except StoreError as exc:
        return problems + [str(exc)]
    if view.n_trs < 1:
        problems.append(f"{path}: n_trs is {view.n_trs}; no modality produced any TR")
    if invariants and not problems:
        if view.has("fmri/mask"):
            mask = view.mask
            if int(mask.sum()) != view.n_voxels or len(view.voxels) != view.n_voxels:
                problems.append("fmri/mask: n_voxels attribute, mask and voxels disagree")
            elif not np.array_equal(np.argwhere(mask), view.voxels):
                problems.append("fmri/voxels: not the C-order coordinates of fmri/mask")
        for subject in view.subjects:
            problems += _check_zscore(view, subject)
            bold = view.array(f"fmri/{subject}/bold")
            if bold.shape[1] != view.n_voxels:
                problems.append(f"fmri/{subject}/bold: {bold.shape[1]} voxels, mask has {view.n_voxels}")
        if view.has("video/frames"):
            problems += _check_video(view)
        if view.has("text/embeddings"):
            problems += _check_text(view)
        if view.has("audio/codes"):
            problems += _check_audio(view)
    return problems
