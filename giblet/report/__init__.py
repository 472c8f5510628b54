"""``giblet-preprocess report STORE``: one self-contained HTML page of QC and results per store.

Sections: the study summary (:mod:`.summary`), fMRI (:mod:`.fmri`), stimuli (:mod:`.stimuli`)
and ``giblet-evaluate`` results (:mod:`.evaluation`); each figure's caption says what a
healthy one looks like. Images are PNGs embedded as data URIs and the CSS is inline, so the
file opens anywhere without a network or a server, and needs no JavaScript.

Fast and bounded: summaries (the manifest, the ``(voxel,)`` mean/std, the ``(tr,)`` flags)
and small samples (a few frames, a few hundred TRs of codes, a few hundred voxel columns of a
few runs) -- never a whole array of a large store (``benchmarks/bench_report.py``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

from giblet.reader import open_store

__all__ = ["build_report", "default_output", "render_report"]


def default_output(store: str | Path) -> Path:
    """Beside the store, never inside it (``verify`` reports files the manifest does not
    list): ``study.zarr`` -> ``study-report.html`` in the same folder."""
    store = Path(store)
    return store.parent / f"{store.name.removesuffix('.zarr')}-report.html"


def render_report(store: str | Path, evaluations: Sequence[str | Path] = (), carpets: int = 3, seed: int = 0,
                  search: bool = True) -> str:
    """The report page of ``store`` as an HTML string.

    Args:
        evaluations: ``giblet-evaluate`` output folders of this store (others are found in the
            usual places unless ``search`` is False; :mod:`giblet.report.evaluation`).
        carpets: how many (subject, run)s get a carpet plot (those with the lowest median tSNR).
        seed: the carpet plots' voxel sample.
    """
    from giblet.report.evaluation import evaluation_section, find_evaluations
    from giblet.report.fmri import fmri_section
    from giblet.report.page import render
    from giblet.report.stimuli import stimuli_section
    from giblet.report.summary import summary_section

    t0 = time.perf_counter()
    view = open_store(store)
    found = find_evaluations(view.path, evaluations, search)
    sections = [summary_section(view), fmri_section(view, carpets=carpets, seed=seed), stimuli_section(view),
                evaluation_section(view, found)]
    subtitle = (f"{view.path.resolve()} · {len(view.subjects)} subject(s) × {len(view.runs)} run(s) · "
                f"TR {view.tr_s} s · built {view.attrs.get('aligned', '?')} · "
                f"report made {time.strftime('%Y-%m-%d %H:%M')} "
                f"in {time.perf_counter() - t0:.1f} s")
    return render(f"giblet report: {view.path.name}", subtitle, sections)


def build_report(store: str | Path, out: Optional[str | Path] = None, **kwargs) -> Path:
    """Write the report of ``store`` to ``out`` (default :func:`default_output`); returns its path.
    Keyword arguments: those of :func:`render_report`."""
    page = render_report(store, **kwargs)
    out = Path(out) if out is not None else default_output(store)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # a browser open on the old page never sees half a file
    return out
