"""The study summary: what the store holds, how each unit was made, where its inputs came from.

Everything here comes from the manifest and the root attributes (no array is read).
"""
from __future__ import annotations

from giblet.reader import StoreView
from giblet.report.page import Section, compact, details, heading, para, table

MODALITIES = ("video", "audio", "text")
UNITS_OPEN = 16  # more units than this: the per-unit table starts collapsed


def pair_meta(view: StoreView, subject: str, run: str) -> dict:
    """The fMRI unit's per-run meta of (subject, run) (``fmri.zscore=subject`` stores one unit
    per subject, with every run in its ``runs``); empty when the store does not record it."""
    for key in (f"fmri/{subject}/{run}", f"fmri/{subject}"):
        runs = view.unit_meta(key).get("runs") or {}
        if run in runs:
            return runs[run]
    return {}


def split_text(split: dict) -> str:
    return ", ".join(f"{name} {a}–{b}" for name, (a, b) in split.items()) or "none"


def summary_section(view: StoreView) -> Section:
    sec = Section("summary", "Study summary")
    align, attrs = view.align, view.attrs
    modalities = {m: view.modality_runs(m) for m in MODALITIES}
    facts = [("store", str(view.path.resolve())), ("format", align.get("format")),
             ("manifest generation", view.generation), ("last aligned", attrs.get("aligned")),
             ("TR (s)", view.tr_s), ("runs", len(view.runs)), ("subjects", len(view.subjects)),
             ("voxels in the mask", view.n_voxels if view.has("fmri/mask") else None),
             *((f"{m} runs", ", ".join(r) or "none") for m, r in modalities.items())]
    sec.add(table(None, facts))
    sec.add(heading("Subjects × runs"), para(
        "Each cell: TRs served (of the TRs in the BOLD file; censored TRs in brackets). A dash: no scan "
        "for that run. Header: the run's TR grid, its length and its split into train / val / test TRs."),
        subjects_table(view))
    sec.add(heading("Units: fingerprints and parameters"), para(
        "A unit is rebuilt when its fingerprint changes: stage, stage version, non-default parameters and the "
        "content hashes of its inputs."))
    units = units_table(view)
    sec.add(units if len(view.manifest["units"]) <= UNITS_OPEN
            else details(f"{len(view.manifest['units'])} units", units))
    versions = attrs.get("versions") or {}
    sec.add(heading("Library versions"), table(["library", "version"], sorted(versions.items())) if versions
            else para("not recorded in this store", "muted"))
    sec.add(heading("Inputs"), *inputs_blocks(view))
    return sec


def subjects_table(view: StoreView) -> str:
    runs = view.align["runs"]
    header = ["subject"] + [f"{r}: {runs[r]['n_trs']} TRs, {runs[r]['n_trs'] * view.tr_s:.0f} s, "
                            f"{split_text(runs[r].get('split') or {})}" for r in view.runs]
    rows = []
    for s in view.subjects:
        row = [s]
        for r in view.runs:
            if not view.has_run(s, r):
                row.append(None)
                continue
            meta = pair_meta(view, s, r)
            served, file_trs, cens = view.n_trs(r, s), meta.get("file_trs"), meta.get("n_censored") or 0
            row.append(f"{served}" + (f" of {file_trs}" if file_trs is not None else "")
                       + (f" [{cens} censored]" if cens else ""))
        rows.append(row)
    return table(header, rows)


def units_table(view: StoreView) -> str:
    rows = []
    for key, e in sorted(view.manifest["units"].items()):
        inputs = ", ".join(f"{k} {v}" for k, v in sorted((e.get("inputs") or {}).items()))
        rows.append([key, e.get("stage"), e.get("version"), e.get("fingerprint"), compact(e.get("params") or {}),
                     inputs or None, e.get("completed")])
    return table(["unit", "stage", "version", "fingerprint", "parameters (non-default)", "input hashes",
                  "completed"], rows)


def inputs_blocks(view: StoreView) -> list[str]:
    """Where the inputs came from: the config (paths as written, relative to its folder), the
    BIDS dataset it was expanded from, and what each stimulus unit read."""
    cfg = view.attrs.get("config") or {}
    out = [table(None, [("config", cfg.get("config_path")), ("output", cfg.get("output"))])]
    bids = cfg.get("bids")
    if bids:
        out.append(table(["BIDS", ""], [(k, compact(v) if isinstance(v, (dict, list)) else v)
                                        for k, v in bids.items() if v not in (None, [], {})]))
    runs = cfg.get("runs") or {}
    if runs:
        files = [[r, rc.get("movie"), rc.get("audio"), rc.get("annotations") or cfg.get("annotations")]
                 for r, rc in runs.items()]
        out.append(table(["run", "movie", "audio", "annotations"], files))
        bold = [[s] + [(runs.get(r) or {}).get("fmri", {}).get(s) for r in view.runs] for s in view.subjects]
        out.append(details(f"BOLD files ({sum(v is not None for row in bold for v in row[1:])})",
                           table(["subject"] + view.runs, bold)))
    elif cfg.get("inputs"):
        out.append(para(f"inputs: {compact(cfg['inputs'])}"))
    read = []
    for m in MODALITIES:
        for r in view.modality_runs(m):
            meta = view.unit_meta(f"{m}/{r}")
            src = meta.get("source") if m != "text" else meta.get("annotations")
            if isinstance(src, dict):
                src = ", ".join(f"{k} {v}" for k, v in src.items())
            extra = {"video": ("fps", "frames_per_tr", "n_padded_frames"),
                     "audio": ("model", "bandwidth_kbps", "n_codebooks"),
                     "text": ("model", "n_used_rows", "n_uncovered_trs")}[m]
            read.append([f"{m}/{r}", src, ", ".join(f"{k} {meta[k]}" for k in extra if k in meta) or None])
    if read:
        out.append(table(["stimulus unit", "source as read", "facts"], read))
    if not (runs or cfg.get("inputs") or read):
        out.append(para("this store records no input paths", "muted"))
    return out
