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
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "std": float(x.std())}


def scale_report(view: StoreView, max_trs: int = 64) -> list[dict]:
    """One row per model input: name, dtype, shape, and min/max/mean/std of a TR sample."""
    trs = np.unique(np.linspace(0, max(view.n_trs - 1, 0), num=min(max_trs, view.n_trs)).astype(int))
    rows = []
    for subject in view.subjects:
        bold = view.array(f"fmri/{subject}/bold")
        rows.append({"input": f"fmri/{subject} (z-scored)", "dtype": str(bold.dtype), "shape": bold.shape,
                     **_summary(bold.get_orthogonal_selection((trs, slice(None))))})
        mean, std = view.fmri_stats(subject)
        rows.append({"input": f"fmri/{subject} raw mean", "dtype": "float32", "shape": mean.shape, **_summary(mean)})
        rows.append({"input": f"fmri/{subject} raw std", "dtype": "float32", "shape": std.shape, **_summary(std)})
    stim = (("video/frames", "video/mean", "video/std", 1 / 255.0), ("text/embeddings", "text/mean", "text/std", 1.0))
    for name, mean_name, std_name, scale in stim:
        if view.has(name):
            arr = view.array(name)
            sample = arr.get_orthogonal_selection((trs,) + (slice(None),) * (arr.ndim - 1)) * scale
            rows.append({"input": f"{name} stored" + (" (/255)" if scale != 1 else ""), "dtype": str(arr.dtype),
                         "shape": arr.shape, "stored": True, **_summary(sample)})
            if view.has(mean_name) and view.has(std_name):  # what the trainer feeds the model
                mean, std = view.array(mean_name)[...], view.array(std_name)[...]
                fed = (sample - mean) / np.where(std > 0, std, 1.0)
                rows.append({"input": f"{name} as fed (z-scored)", "dtype": "float32", "shape": arr.shape,
                             **_summary(fed)})
    if view.has("audio/codes"):
        arr = view.array("audio/codes")
        sample = arr.get_orthogonal_selection((trs, slice(None), slice(None)))
        rows.append({"input": "audio/codes [integer classes]", "dtype": str(arr.dtype), "shape": arr.shape,
                     "stored": True, **_summary(sample)})
    return rows


def format_report(view: StoreView) -> str:
    rows = scale_report(view)
    head = f"{'input':<34} {'dtype':<8} {'shape':<24} {'min':>10} {'max':>10} {'mean':>10} {'std':>10}"
    lines = [f"store {view.path}: n_trs {view.n_trs}, tr_s {view.tr_s}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['input']:<34} {r['dtype']:<8} {str(tuple(r['shape'])):<24} {r['min']:>10.4g} "
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
