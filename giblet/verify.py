"""Re-check a built store: everything ``open_store`` serves, metadata included.

``verify_store(path)`` returns a list of problems (empty: the store is sound). It checks
the manifest (its digest and paths), every file of every array (chunks and ``zarr.json``)
against its checksum, every group's ``zarr.json`` against the align record, the align
record against the units it summarizes (TR counts, what each subject serves, the split,
recomputed with ``giblet.split``), the root attributes against the align record, and the
invariants of the data (z-scores per (subject, run), codes in range, ...). Each problem
names the array, group or unit and, for checksum failures, the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from giblet.errors import StoreError
from giblet.fingerprint import hash_file
from giblet.location import is_remote, store_location
from giblet.manifest import (ALIGN_KEY, DERIVED_KEY, FORMAT, GROUP_META, group_meta_path, group_names, is_target_unit,
                             member, read_manifest)
from giblet.reader import open_store
from giblet.split import plan_split

Z_TOL = 1e-3  # |mean| and |std - 1| of a stored z-scored column, float32 round-off included


def _check_array(store: Path, name: str, rec: dict) -> list[str]:
    problems = []
    adir = member(store, name)
    if not (adir / GROUP_META).exists():
        return [f"{name}: listed in manifest.json but missing on disk"]
    meta = json.loads((adir / GROUP_META).read_text())
    if meta.get("shape") != rec["shape"]:
        problems.append(f"{name}: shape {meta.get('shape')} != manifest {rec['shape']}")
    if meta.get("data_type") != rec["dtype"]:
        problems.append(f"{name}: dtype {meta.get('data_type')} != manifest {rec['dtype']}")
    on_disk = {p.relative_to(adir).as_posix() for p in adir.rglob("*") if p.is_file()}
    for rel in sorted(set(rec["checksums"]) - on_disk):
        problems.append(f"{name}: file {rel} is missing")
    for rel in sorted(on_disk - set(rec["checksums"])):
        problems.append(f"{name}: unexpected file {rel} (not written by giblet)")
    for rel, digest in sorted(rec["checksums"].items()):
        if rel in on_disk and hash_file(adir / rel) != digest:
            what = "metadata (zarr.json: attributes, shape or codecs edited?)" if rel == GROUP_META else f"chunk {rel}"
            problems.append(f"{name}: {what} checksum mismatch (changed on disk); rerun "
                            f"`giblet-preprocess run CONFIG --force --only {name.split('/')[0]}`")
    return problems


def _group_digest(store: Path, group: str) -> str | None:
    path = group_meta_path(store, group)
    return hash_file(path) if path.is_file() else None


def _check_groups(store, manifest: dict) -> list[str]:
    """Every group's ``zarr.json`` (the root's attributes included) against the align record."""
    recorded = manifest[ALIGN_KEY].get("groups") or {}
    arrays = [a for e in manifest["units"].values() for a in e.get("arrays", {})]
    problems = []
    for group in group_names(arrays):
        label = f"group {group or '/'} ({group + '/' if group else ''}{GROUP_META})"
        digest = _files(store)[2](store, group)
        if digest is None:
            problems.append(f"{label}: missing; readers such as xarray cannot open the group -- rerun "
                            f"`giblet-preprocess run CONFIG` (it writes the group metadata again)")
        elif group not in recorded:
            problems.append(f"{label}: not covered by the align record; rerun `giblet-preprocess run CONFIG`")
        elif digest != recorded[group]:
            problems.append(f"{label}: checksum mismatch (group metadata or the study attributes edited); rerun "
                            f"`giblet-preprocess run CONFIG` (it writes the group metadata again)")
    return problems


def _check_align(manifest: dict, root_attrs: dict) -> list[str]:
    """The align record agrees with the units it summarizes; the root attributes with the record."""
    align, units = manifest[ALIGN_KEY], manifest["units"]
    problems = []
    for run, rec in align.get("runs", {}).items():
        stim = {k: int((e.get("meta") or {})["n_trs"]) for k, e in units.items()
                if e.get("run") == run and e.get("stage") != "fmri" and (e.get("meta") or {}).get("n_trs") is not None}
        served = {k.split("/")[1]: int(e["meta"]["runs"][run]["n_trs"]) for k, e in units.items()
                  if e.get("stage") == "fmri" and not is_target_unit(k)
                  and run in (e.get("meta") or {}).get("runs", {})}
        want = min(stim.values()) if stim else max(served.values(), default=0)
        want = min(want, max(served.values())) if served else want
        if rec.get("n_trs") != want:
            problems.append(f"align: run {run} n_trs {rec.get('n_trs')} but its units give {want}")
        if rec.get("subjects") != served:
            problems.append(f"align: run {run} serves {rec.get('subjects')} but its fMRI units stored {served}")
    rule = align.get("split_rule", {})
    lengths = {r: v.get("n_trs", 0) for r, v in align.get("runs", {}).items()}
    want = plan_split(lengths, rule.get("val_runs", []), rule.get("test_runs", []), rule.get("val_fraction"))
    for run, rec in align.get("runs", {}).items():
        got = {k: tuple(v) for k, v in (rec.get("split") or {}).items()}
        if got != want.get(run):
            problems.append(f"align: run {run} split {got} but the split rule {rule} gives {want.get(run)}")
    for key in ("format", "tr_s", "runs", "run_order", "subjects", "split_rule"):
        if root_attrs.get(key) != align.get(key):
            problems.append(f"root attributes: {key} {root_attrs.get(key)!r} differs from the manifest's align "
                            f"record {align.get(key)!r} (edited?)")
    return problems


def _moments(x: np.ndarray, s1, s2) -> None:
    s1 += x.sum(0)
    s2 += (x ** 2).sum(0)


def _check_zscore(view, subject: str, runs: list[str], target: str | None = None) -> list[str]:
    """``runs``: one run (zscore=run) or all of a subject's runs (zscore=subject), whose
    served TRs together must have per-voxel mean 0 and std 1 (0 and 0 where std is 0);
    ``target``: the same for a target set's columns (censored TRs are the voxels')."""
    where = f"/{target}" if target else ""
    label = f"fmri/{subject}/{'+'.join(runs)}{where}"
    mean, std = view.fmri_stats(subject, runs[0], target=target)
    n_cols = view.n_columns(target)
    problems = []
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std < 0).any():
        problems.append(f"{label}: mean/std hold NaN, inf or negative values")
    s1, s2, n = np.zeros(n_cols), np.zeros(n_cols), 0
    for run in runs:
        bold = view.array(f"fmri/{subject}/{run}{where}/bold")
        if bold.shape != (view.n_trs(run, subject), n_cols):
            problems.append(f"fmri/{subject}/{run}{where}/bold: shape {bold.shape}, expected "
                            f"({view.n_trs(run, subject)}, {n_cols}) (served TRs, columns)")
            return problems
        censored, problem = _censored(view, subject, run, bold.shape[0])
        if problem:
            return problems + [problem]
        step = bold.chunks[0]
        for t0 in range(0, bold.shape[0], step):
            block = bold[t0:t0 + step].astype(np.float64)
            cut = censored[t0:t0 + step]
            if not np.isfinite(block[~cut]).all():
                return problems + [f"fmri/{subject}/{run}{where}/bold: NaN/inf in TRs {t0}-{t0 + len(block) - 1}"]
            if not np.isnan(block[cut]).all():
                return problems + [f"fmri/{subject}/{run}{where}/bold: censored TRs in {t0}-{t0 + len(block) - 1} "
                                   f"hold values (censored TRs are NaN rows)"]
            _moments(block[~cut], s1, s2)
        n += int((~censored).sum())
    m = s1 / n
    sd = np.sqrt(np.maximum(s2 / n - m**2, 0))
    zero = std == 0
    bad_mean = np.abs(m) > Z_TOL
    bad_std = np.where(zero, sd > 0, np.abs(sd - 1) > Z_TOL)
    if bad_mean.any() or bad_std.any():
        v = int(np.argmax(bad_mean | bad_std))
        problems.append(f"{label}/bold: {int((bad_mean | bad_std).sum())} voxels are not z-scored over their served "
                        f"TRs (first: voxel {v}, mean {m[v]:.4g}, std {sd[v]:.4g}; expected 0 and 1, or 0 and 0 "
                        f"for zero-variance voxels)")
    return problems


def _check_targets(view) -> list[str]:
    """Every target set's series unit: built from the voxel unit the store now holds, and
    z-scored over the same served TRs (``_check_zscore``)."""
    problems = []
    for key, entry in sorted(view.manifest["units"].items()):
        if not is_target_unit(key) or key.count("/") == 2:
            continue  # a definition unit (targets/<kind>/<name>): its arrays are checked by checksum
        target, rest = entry["meta"]["target"], key.split("/", 3)[3]
        voxels = view.manifest["units"].get(f"fmri/{rest}") or {}
        if entry.get("params", {}).get("voxel_unit") != voxels.get("fingerprint"):
            problems.append(f"{key}: computed from voxel unit fingerprint {entry.get('params', {}).get('voxel_unit')} "
                            f"but the store's fmri/{rest} is {voxels.get('fingerprint')}; rerun `giblet-preprocess run "
                            f"CONFIG --only fmri`")
            continue
        problems += _check_zscore(view, rest.split("/")[0], list(entry["meta"]["runs"]), target)  # the unit's runs
    return problems


def _censored(view, subject: str, run: str, n: int) -> tuple[np.ndarray, str | None]:
    """The (subject, run)'s ``censored`` flags and a problem with them (shape, dtype, the
    manifest's count), or None."""
    name = f"fmri/{subject}/{run}/censored"
    if not view.has(name):
        return np.zeros(n, dtype=bool), None
    arr = view.array(name)
    if arr.dtype != np.bool_ or arr.shape != (n,):
        return np.zeros(n, dtype=bool), f"{name}: {arr.dtype} {arr.shape}, expected bool ({n},) (one per served TR)"
    flags = arr[...]
    key = f"fmri/{subject}/{run}" if view.manifest["units"].get(f"fmri/{subject}/{run}") else f"fmri/{subject}"
    want = ((view.unit_meta(key).get("runs") or {}).get(run) or {}).get("n_censored", 0)
    if int(flags.sum()) != want:
        return flags, f"{name}: {int(flags.sum())} TRs censored, the manifest counts {want}"
    if flags.all():
        return flags, f"{name}: every served TR is censored"
    return flags, None


def _check_video(view, run: str) -> list[str]:
    """frames uint8 (tr, frame, y, x, 3), padded matching it, moments equal to the frames'."""
    from giblet.features.video import pixel_moments

    frames, padded = view.array(view.stimulus_name("video", run)), view.array(view.stimulus_name("video", run, "padded"))
    moments = view.array(view.stimulus_name("video", run, "moments"))
    meta = view.unit_meta(f"video/{run}")
    problems, label = [], f"stimuli/{run}/video"
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        return [f"{label}/frames: {frames.dtype} {frames.shape}, expected uint8 (tr, frame, height, width, 3)"]
    if (frames.shape[0], frames.shape[1]) != (meta.get("n_trs"), meta.get("frames_per_tr")):
        problems.append(f"{label}/frames: shape {frames.shape} disagrees with the manifest's n_trs "
                        f"{meta.get('n_trs')} / frames_per_tr {meta.get('frames_per_tr')}")
    if padded.dtype != np.bool_ or padded.shape != frames.shape[:2]:
        problems.append(f"{label}/padded: {padded.dtype} {padded.shape}, expected bool {frames.shape[:2]}")
    elif int(padded[...].sum()) != meta.get("n_padded_frames"):
        problems.append(f"{label}/padded: {int(padded[...].sum())} padded slots, manifest counts "
                        f"{meta.get('n_padded_frames')}")
    if moments.shape != (frames.shape[0], 2, 3):
        return problems + [f"{label}/moments: shape {moments.shape}, expected ({frames.shape[0]}, 2, 3)"]
    step = frames.chunks[0]
    for t0 in range(0, frames.shape[0], step):
        if not np.array_equal(pixel_moments(frames[t0:t0 + step]), moments[t0:t0 + step]):
            problems.append(f"{label}/moments: TRs {t0}-{t0 + step - 1} do not match the frames' pixel sums")
            break
    return problems


def _check_text(view, run: str) -> list[str]:
    """Embeddings float32 and finite; has_text bool (tr,); zero rows where has_text is False
    under fill=zeros; the manifest's uncovered-TR count matches."""
    emb, has = view.array(view.stimulus_name("text", run)), view.array(view.stimulus_name("text", run, "has_text"))
    label = f"stimuli/{run}/text"
    if emb.dtype != np.float32 or emb.ndim != 2 or has.dtype != bool or has.shape != emb.shape[:1]:
        return [f"{label}: embeddings {emb.dtype} {emb.shape} / has_text {has.dtype} {has.shape}; expected float32 "
                f"(tr, embedding) and bool (tr,)"]
    problems = []
    flags = has[...]
    zero_fill = emb.attrs.get("fill", "zeros") == "zeros"
    step = emb.chunks[0]
    for t0 in range(0, emb.shape[0], step):
        block = emb[t0:t0 + step]
        if not np.isfinite(block).all():
            problems.append(f"{label}/embeddings: NaN/inf in TRs {t0}-{t0 + len(block) - 1}")
        bad = ~flags[t0:t0 + step] & np.any(block != 0, axis=1)
        if zero_fill and bad.any():
            problems.append(f"{label}/embeddings: TR {t0 + int(np.argmax(bad))} has no text (has_text False) but a "
                            f"non-zero row under fill=zeros")
    n_uncovered = view.unit_meta(f"text/{run}").get("n_uncovered_trs")
    if n_uncovered is not None and n_uncovered != int((~flags).sum()):
        problems.append(f"{label}: manifest counts {n_uncovered} uncovered TRs, has_text has {int((~flags).sum())}")
    return problems


def _check_audio(view, run: str) -> list[str]:
    """codes int16 (tr, codebook, code_frame); codes in [0, codebook_size); as many codebooks
    as the recorded bandwidth gives (EnCodec: floor(kbps / (log2(size) * frames/s)))."""
    import math

    codes = view.array(view.stimulus_name("audio", run))
    a, label = codes.attrs, f"stimuli/{run}/audio/codes"
    try:
        size, kbps, rate, per_tr = int(a["codebook_size"]), float(a["bandwidth_kbps"]), float(a["frame_rate"]), \
            int(a["code_frames_per_tr"])
    except (KeyError, TypeError, ValueError):
        return [f"{label}: attrs lack codebook_size, bandwidth_kbps, frame_rate or code_frames_per_tr"]
    want = max(1, math.floor(kbps * 1000 / (math.log2(size) * math.ceil(rate))))
    if codes.dtype != np.int16 or codes.ndim != 3 or codes.shape[1:] != (want, per_tr):
        return [f"{label}: {codes.dtype} {codes.shape}, expected int16 (tr, {want}, {per_tr}) for "
                f"{kbps:g} kbps with {size}-code codebooks"]
    problems = []
    n = (view.unit_meta(f"audio/{run}") or {}).get("n_trs")
    if n is not None and codes.shape[0] != n:
        problems.append(f"{label}: {codes.shape[0]} TRs, the manifest's n_trs is {n}")
    step = codes.chunks[0]
    for t0 in range(0, codes.shape[0], step):
        block = codes[t0:t0 + step]
        if block.size and (block.min() < 0 or block.max() >= size):
            problems.append(f"{label}: TRs {t0}-{t0 + len(block) - 1} hold codes in [{block.min()}, "
                            f"{block.max()}], outside [0, {size})")
    return problems


def _check_invariants(view) -> list[str]:
    problems = []
    if view.has("fmri/mask"):
        mask = view.mask
        if int(mask.sum()) != view.n_voxels or len(view.voxels) != view.n_voxels:
            problems.append("fmri/mask: n_voxels attribute, mask and voxels disagree")
        elif not np.array_equal(np.argwhere(mask), view.voxels):
            problems.append("fmri/voxels: not the C-order coordinates of fmri/mask")
    for subject in view.subjects:
        runs = view.subject_runs(subject)
        by_subject = view.unit_meta(f"fmri/{subject}").get("zscore") == "subject"
        for group in ([runs] if by_subject else [[r] for r in runs]):
            problems += _check_zscore(view, subject, group)
    problems += _check_targets(view)
    for run in view.runs:
        for modality, check in (("video", _check_video), ("text", _check_text), ("audio", _check_audio)):
            if view.has(view.stimulus_name(modality, run)):
                problems += check(view, run)
    return problems


def _files(store):
    """How files are checked where the store lives: (array check, group check, group digest)."""
    if is_remote(store):
        from giblet import objstore

        return objstore.check_array, _check_groups, objstore.group_digest
    return _check_array, _check_groups, _group_digest


def store_problem(path, storage_options: dict | None = None) -> str | None:
    """Why ``path`` cannot be verified at all -- not a giblet store, or one whose first run
    never finished -- or None. Worded like ``giblet.open_store``'s errors."""
    path = store_location(path, storage_options)
    if is_remote(path):
        if not path.exists(GROUP_META):
            return f"{path}: not a giblet store (no zarr.json); build one with `giblet-preprocess run CONFIG`"
    elif not path.is_dir() or not (path / "zarr.json").is_file():
        why = ("no such file or folder" if not path.exists() else "a file, not a folder" if not path.is_dir()
               else "no zarr.json")
        return f"{path}: not a giblet store ({why}); build one with `giblet-preprocess run CONFIG`"
    if read_manifest(path) is None:
        return f"{path}: no manifest.json: the store is incomplete (a run never finished); rerun it"
    return None


def verify_store(path, invariants: bool = True, storage_options: dict | None = None) -> list[str]:
    """All problems found in the store at ``path`` (a folder or a URL; an empty list means it verified)."""
    path = store_location(path, storage_options)
    check_array, check_groups, group_digest = _files(path)
    try:
        problem = store_problem(path)
        manifest = read_manifest(path)
    except StoreError as exc:  # an edited, foreign or other-format manifest
        return [str(exc)]
    if problem:
        return [problem]
    problems: list[str] = []
    for key, entry in sorted(manifest["units"].items()) + sorted((manifest.get(DERIVED_KEY) or {}).items()):
        for name, rec in entry.get("arrays", {}).items():
            problems += check_array(path, name, rec)
        for group, digest in (entry.get("groups") or {}).items():  # a derived result's own groups
            if group_digest(path, group) != digest:
                problems.append(f"group {group} ({key}): zarr.json missing or changed; recompute {key}")
    if ALIGN_KEY not in manifest:
        return problems + [f"{path}: store is incomplete (manifest.json has no align record); run "
                           f"`giblet-preprocess run CONFIG` to finish it"]
    problems += check_groups(path, manifest)
    try:
        view = open_store(path)
    except StoreError as exc:
        return problems + [str(exc)]
    try:
        attrs = view.attrs
    except Exception as exc:  # an edited root zarr.json that no longer parses
        attrs = {"error": f"{type(exc).__name__}: {exc}"}
    problems += _check_align(manifest, attrs)
    if view.align.get("format") != FORMAT:
        problems.append(f"align: format {view.align.get('format')!r}, expected {FORMAT}")
    if not view.runs or any(view.n_trs(r) < 1 for r in view.runs):
        problems.append(f"{path}: a run has no TR ({ {r: view.n_trs(r) for r in view.runs} }); no modality produced "
                        f"any TR")
    if invariants and not problems:
        problems += _check_invariants(view)
    return problems
