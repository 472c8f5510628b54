"""``giblet-preprocess stats``: the data-scale report per modality.

The prototype fed fMRI in raw scanner units (thousands) beside stimulus features of
order 1; this report puts every model input's scale side by side so that a mismatch is
visible before any training. Statistics use an evenly spaced sample of TRs.
"""
from __future__ import annotations

import numpy as np

from giblet.reader import StoreView


def _summary(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)] if np.isnan(x).any() else x  # censored fMRI TRs are NaN rows: not data
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "std": float(x.std())}


def _trs(n: int, max_trs: int) -> np.ndarray:
    return np.unique(np.linspace(0, max(n - 1, 0), num=min(max_trs, n)).astype(int))


def scale_report(view: StoreView, max_trs: int = 64) -> list[dict]:
    """One row per model input and run: name, dtype, shape, and min/max/mean/std of a TR sample."""
    rows = []
    for subject in view.subjects:
        for run in view.subject_runs(subject):
            bold = view.array(f"fmri/{subject}/{run}/bold")
            trs = _trs(bold.shape[0], max_trs)
            rows.append({"input": f"fmri/{subject}/{run} (z-scored)", "dtype": str(bold.dtype), "shape": bold.shape,
                         **_summary(bold.get_orthogonal_selection((trs, slice(None))))})
            mean, std = view.fmri_stats(subject, run)
            rows.append({"input": f"fmri/{subject}/{run} raw mean", "dtype": "float32", "shape": mean.shape,
                         **_summary(mean)})
            rows.append({"input": f"fmri/{subject}/{run} raw std", "dtype": "float32", "shape": std.shape,
                         **_summary(std)})
    stim = (("video", "frames", view.video_stats, 1 / 255.0), ("text", "embeddings", view.text_stats, 1.0))
    for modality, name, stats, scale in stim:
        for run in view.modality_runs(modality):
            arr = view.array(view.stimulus_name(modality, run, name))
            trs = _trs(view.n_trs(run), max_trs)
            sample = arr.get_orthogonal_selection((trs,) + (slice(None),) * (arr.ndim - 1)) * scale
            label = f"{modality}/{run}/{name}"
            rows.append({"input": f"{label} stored" + (" (/255)" if scale != 1 else ""), "dtype": str(arr.dtype),
                         "shape": arr.shape, "stored": True, **_summary(sample)})
            mean, std = stats()  # what the trainer feeds the model: z-scored with the training TRs' stats
            fed = (sample - mean) / np.where(std > 0, std, 1.0)
            rows.append({"input": f"{label} as fed (z-scored)", "dtype": "float32", "shape": arr.shape,
                         **_summary(fed)})
    for run in view.modality_runs("audio"):
        arr = view.array(view.stimulus_name("audio", run))
        sample = arr.get_orthogonal_selection((_trs(view.n_trs(run), max_trs), slice(None), slice(None)))
        rows.append({"input": f"audio/{run}/codes [integer classes]", "dtype": str(arr.dtype), "shape": arr.shape,
                     "stored": True, **_summary(sample)})
    return rows


def format_report(view: StoreView) -> str:
    rows = scale_report(view)
    head = f"{'input':<40} {'dtype':<8} {'shape':<24} {'min':>10} {'max':>10} {'mean':>10} {'std':>10}"
    runs = ", ".join(f"{r} {view.n_trs(r)} TRs" for r in view.runs)
    lines = [f"store {view.path}: {runs}; tr_s {view.tr_s}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['input']:<40} {r['dtype']:<8} {str(tuple(r['shape'])):<24} {r['min']:>10.4g} "
                     f"{r['max']:>10.4g} {r['mean']:>10.4g} {r['std']:>10.4g}")
    fed = [r["std"] for r in rows if not r.get("stored") and "raw" not in r["input"] and r["std"] > 0]
    if fed:
        ratio = max(fed) / min(fed)
        verdict = "ok" if ratio < 10 else "MISMATCH: normalize before training"
        lines.append(f"largest/smallest std among continuous inputs as fed to a model: {ratio:.3g} ({verdict})")
    raw = [abs(r["mean"]) for r in rows if "raw mean" in r["input"]]
    stim = [r["std"] for r in rows if r.get("stored") and "classes" not in r["input"] and r["std"] > 0]
    if raw and stim:
        lines.append(f"for comparison: raw fMRI values (~{max(raw):.4g} scanner units) are {max(raw) / min(stim):.3g}x "
                     f"the smallest stored stimulus std -- what an unnormalized model would see; "
                     f"audio codes are classes, never scaled")
    return "\n".join(lines)
