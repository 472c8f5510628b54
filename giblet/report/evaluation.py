"""The evaluation section: ``giblet-evaluate`` results of this store, when there are any.

``giblet-evaluate`` writes its results in a folder of its own (``RUN_DIR/evaluation-<split>``
or ``./giblet-evaluation-ridge-<split>``; docs/evaluation.md), not in the store, and records
the store's path in ``summary.json``. The report takes the folders given with
``--evaluation`` and looks in the usual places (:data:`PATTERNS`, under the store's folder and
the working directory: one level of globbing, never a recursive walk) for summaries of this
store. Its figures (per-subject r maps, r vs the noise ceiling) are embedded as written.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

from giblet.errors import InputError
from giblet.reader import StoreView
from giblet.report.page import Section, figure, heading, para, table

PATTERNS = ("giblet-evaluation-*/summary.json", "*/evaluation-*/summary.json", "runs/*/evaluation-*/summary.json")
FIGURES = {
    "glass_brain": ("Each subject's Pearson r per voxel on the held-out TRs, as a glass brain (one signed scale).",
                    "positive r in the regions the stimulus drives (visual and auditory cortex for a movie), alike "
                    "across subjects; speckle everywhere or a map of one sign all over is noise or a misalignment."),
    "per_subject": ("The distribution of voxel r per subject (violin), its mean (dot) and its mean noise ceiling "
                    "(red bar).",
                    "every subject's violin above 0 with a positive tail, means well below the ceiling bars; one "
                    "subject far below the rest deserves a look at its fMRI above."),
    "r_vs_ceiling": ("Voxel r (y) against the voxel's noise ceiling (x), a colour per subject.",
                     "a cloud rising with the ceiling, below the dashed r = ceiling line for most voxels; voxels "
                     "with a ceiling near 0 should have r near 0."),
}


def _store_of(summary: dict, path: Path) -> list[Path]:
    """Where ``summary["store"]`` may point: as written, or relative to the folder
    ``giblet-evaluate`` most likely ran in (the output folder's parent)."""
    s = Path(str(summary.get("store", "")))
    return [s] if s.is_absolute() else [Path.cwd() / s, path.parent.parent / s]


def _load(path: Path) -> Optional[dict]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) and "store" in out and "subjects" in out else None


def _same(summary: dict, path: Path, store: Path) -> bool:
    target = store.resolve()
    return any(p.resolve() == target for p in _store_of(summary, path))


def find_evaluations(store: Path, dirs: Sequence[str | Path] = (), search: bool = True) -> list[tuple[Path, dict]]:
    """``(summary.json path, summary)`` of each evaluation of ``store``.

    Args:
        dirs: ``giblet-evaluate`` output folders given by the user; each must hold a
            ``summary.json`` of this store (else ``InputError``).
        search: also look for summaries of this store in :data:`PATTERNS` under the store's
            folder and the working directory (others' summaries are skipped).
    """
    found: dict[Path, dict] = {}
    for d in dirs:
        path = Path(d) / "summary.json"
        summary = _load(path)
        if summary is None:
            raise InputError(f"--evaluation {d}: no readable giblet-evaluate summary.json there; pass the --out "
                             f"folder of a giblet-evaluate run")
        if not _same(summary, path, store):
            raise InputError(f"--evaluation {d}: it evaluates the store {summary['store']}, not {store}; pass an "
                             f"evaluation of this store, or report on that store")
        found[path.resolve()] = summary
    if search:
        for base in dict.fromkeys([store.resolve().parent, Path.cwd().resolve()]):
            for pattern in PATTERNS:
                for path in sorted(base.glob(pattern)):
                    summary = _load(path)
                    if summary is not None and _same(summary, path, store):
                        found.setdefault(path.resolve(), summary)
    return list(found.items())


def evaluation_section(view: StoreView, evaluations: list[tuple[Path, dict]]) -> Section:
    sec = Section("evaluation", "Evaluation")
    if not evaluations:
        return sec.add(para("No giblet-evaluate results of this store were found (searched: --evaluation folders, "
                            f"and {', '.join(PATTERNS)} under the store's folder and the working directory). "
                            "Run giblet-evaluate, then this report again.", "muted"))
    for path, summary in evaluations:
        sec.add(*one_evaluation(view, path, summary))
    return sec


def _title(summary: dict) -> str:
    what = summary.get("evaluated") or {}
    if what.get("kind") == "model":
        return f"model {what.get('run_dir')} (step {what.get('step')}), split {summary.get('split')}"
    return f"{what.get('kind', 'evaluation')}, split {summary.get('split')}"


def stale(view: StoreView, path: Path) -> bool:
    """True when ``summary.json`` was written before the store was last aligned (rebuilt)."""
    try:
        aligned = datetime.fromisoformat(str(view.attrs.get("aligned")))
    except ValueError:
        return False
    return path.stat().st_mtime < aligned.timestamp()


def one_evaluation(view: StoreView, path: Path, summary: dict) -> list[str]:
    out = [heading(_title(summary)), para(f"from {path}")]
    if stale(view, path):
        out.append(para("This evaluation was written before the store was last rebuilt: its figures may describe "
                        "other data. Rerun giblet-evaluate.", "note"))
    ceil = (summary.get("ceiling") or {}).get("subjects") or {}
    rows = [[name, (summary.get("n_trs") or {}).get(name), s.get("mean"), s.get("median"), s.get("top10"),
             (ceil.get(name) or {}).get("mean"), (ceil.get(name) or {}).get("fraction")]
            for name, s in (summary.get("subjects") or {}).items()]
    rows.append(["across subjects", None, summary.get("mean"), summary.get("median"), summary.get("top10"),
                 (summary.get("ceiling") or {}).get("mean"), summary.get("fraction_of_ceiling")])
    out.append(table(["subject", "TRs", "mean r", "median r", "top-10% r", "mean ceiling", "fraction of ceiling"],
                     rows))
    if summary.get("ceiling_note"):
        out.append(para(summary["ceiling_note"], "muted"))
    files = ((summary.get("files") or {}).get("figures")) or {}
    for key, (caption, healthy) in FIGURES.items():
        png = Path(files[key]) if key in files else None
        if png is not None and png.is_file():
            out.append(figure(png.read_bytes(), caption, key.replace("_", " "), healthy))
        elif png is not None:
            out.append(para(f"{key}: {png} is missing (moved or deleted); rerun giblet-evaluate.", "note"))
    return out
