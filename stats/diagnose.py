"""``giblet-diagnose RUN_DIR`` (or ``RUN_DIR/log.jsonl``): a training log -> a short text
verdict and PNG plots, and the run's ``giblet-evaluate`` results if there are any.

Each check reads what the run recorded (``giblet.training.diagnostics`` describes the log)
and names a cause the prototype suffered from when it sees its symptom:

- fMRI targets not z-scored (the scale check's fMRI row; raw scanner units named as such);
- integer audio codes regressed under MSE;
- a warm-up that never lets the LR reach its peak (e.g. counted in epochs);
- loss components orders of magnitude apart under equal weights (one term owns the gradient);
- gradients clipped on nearly every step (a symptom of the above);
- a flat val r; and, with ``--truth``, the fraction of the best achievable r reached.

Plots: ``lr.png`` (the LR applied), ``losses.png`` (each component, one log-scale chart),
``grad_norms.png`` (total and per module), ``val_r.png``.

Evaluation: the headline figures of each ``RUN_DIR/evaluation-<split>/summary.json`` that
``giblet-evaluate RUN_DIR`` wrote (per-subject r, fraction of the noise ceiling), or the
command that writes them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

FLAT_R = 0.1  # a run whose best val r stays below this has not learned the stimulus -> fMRI map
BALANCE_RATIO = 100.0  # weighted components further apart than this: one owns the gradient
LR_REACH = 0.5  # the LR should reach at least this fraction of its peak


@dataclass
class Report:
    verdict: str  # CONVERGED | LEARNING | FLAT
    findings: list[str] = field(default_factory=list)  # causes found, one line each
    metrics: dict = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"verdict: {self.verdict}"]
        lines += [f"  - {f}" for f in self.findings] or ["  - no known cause of trouble found"]
        lines += [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in self.metrics.items()]
        return "\n".join(lines)


def read_log(path: str | Path) -> dict:
    """``{"config": record, "scale_check": record, "profile": record or None, "train": [...],
    "val": [...]}``; of repeated steps (a resumed run appends) the last record wins."""
    out: dict = {"config": None, "scale_check": None, "profile": None, "train": {}, "val": {}}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        kind = rec.get("kind")
        if kind in ("train", "val"):
            out[kind][rec["step"]] = rec
        elif kind in ("config", "profile") or (kind == "scale_check" and out["scale_check"] is None):
            out[kind] = rec
    out["train"] = [out["train"][k] for k in sorted(out["train"])]
    out["val"] = [out["val"][k] for k in sorted(out["val"])]
    return out


def achievable_r(truth_path: str | Path, store_path: str | Path) -> float:
    """Mean of ``truth.npz: expected_r`` over the store's mask voxels (the planted ceiling),
    and over the subjects with a scan when it is per subject (``(subject, x, y, z)``)."""
    from giblet.reader import open_store

    truth = np.load(truth_path)
    expected = truth["expected_r"]
    if expected.ndim == 4:
        expected = expected[~truth["missing"].all(axis=1)] if "missing" in truth.files else expected
    ijk = open_store(store_path).voxels
    return float(expected[(Ellipsis, *ijk.T)].mean())


def diagnose(log: dict, best_r: Optional[float] = None) -> Report:
    """Run every check on a parsed log (:func:`read_log`)."""
    cfg = (log["config"] or {}).get("config", {})
    train, val = log["train"], log["val"]
    findings, metrics = [], {}
    for row in (log["scale_check"] or {}).get("rows", []):
        if row["ok"]:
            continue
        if row["input"].startswith("fmri"):
            findings.append(f"fMRI targets are not z-scores: batch mean {row['batch_mean']:.4g}, std "
                            f"{row['batch_std']:.4g} (expected 0 +- 1){' -- ' + row['note'] if row['note'] else ''}")
        elif row["input"].startswith("audio"):
            findings.append(f"audio: {row['note'] or 'codes out of range'}")
        else:
            findings.append(f"{row['input']}: batch mean {row['batch_mean']:.4g}, std {row['batch_std']:.4g} "
                            f"does not match the store's stats")
    findings += _lr_findings(log["config"] or {}, train)
    findings += _balance_findings(cfg, train)
    clip = (cfg.get("optim") or {}).get("grad_clip", 0)
    norms = np.array([r["grad_norm"] for r in train if "grad_norm" in r])
    if clip and len(norms):
        frac = float((norms > clip).mean())
        metrics["clipped_fraction"] = frac
        if frac > 0.9 and np.median(norms) > 10 * clip:
            findings.append(f"gradients clipped on {100 * frac:.0f}% of logged steps (median pre-clip norm "
                            f"{np.median(norms):.3g} vs optim.grad_clip={clip:g}): the loss scale is off")
    wait = [r["data_wait"] for r in train if "data_wait" in r]
    if wait:
        metrics["data_wait_median"] = float(np.median(wait))
        if np.median(wait) > 0.3:
            findings.append(f"input-bound: {100 * np.median(wait):.0f}% of step time waits for data; raise "
                            f"data.num_workers")
    verdict = "LEARNING"
    if val:
        rs = [v["r_mean"] for v in val]
        metrics.update(val_r_first=rs[0], val_r_last=rs[-1], val_r_best=max(rs), steps=val[-1]["step"])
        if max(rs) < FLAT_R:  # the head starts at 0, i.e. r = 0: it never moved off it
            verdict = "FLAT"
            findings.append(f"val r is flat: {rs[0]:.3f} at step {val[0]['step']}, best {max(rs):.3f}, "
                            f"last {rs[-1]:.3f} at step {val[-1]['step']}")
    if best_r is not None and val:
        frac = max(v["r_mean"] for v in val) / best_r
        metrics.update(achievable_r=best_r, fraction_of_achievable=frac)
        if frac >= 0.8:
            verdict = "CONVERGED"
    return Report(verdict=verdict, findings=findings, metrics=metrics)


def _lr_findings(header: dict, train: list[dict]) -> list[str]:
    peak = header.get("peak_lr")
    sched = header.get("schedule") or {}
    if not peak or not train:
        return []
    lrs = np.array([r["lr"] for r in train])
    reach = float(lrs.max() / peak)
    out = []
    if reach < LR_REACH:
        why = (" -- the schedule advances once per epoch (schedule.unit=epoch): the warm-up is counted in epochs"
               if sched.get("unit") == "epoch" else "")
        out.append(f"the LR never reached its peak: at most {100 * reach:.3g}% of optim.lr={peak:g} over "
                   f"{train[-1]['step']} steps (warm-up {sched.get('warmup_steps')} "
                   f"{'epochs' if sched.get('unit') == 'epoch' else 'steps'}){why}")
    elif sched.get("warmup_steps", 0) > 0.5 * sched.get("total_steps", 1):
        out.append(f"warm-up takes {sched['warmup_steps']} of {sched['total_steps']} steps")
    return out


def _balance_findings(cfg: dict, train: list[dict]) -> list[str]:
    weights = (cfg.get("loss") or {}).get("weights", {})
    if not train:
        return []
    first = train[0]
    weighted = {k[5:]: weights.get(k[5:], 0.0) * v for k, v in first.items()
                if k.startswith("loss_") and weights.get(k[5:], 0.0) > 0 and v > 0}
    if len(weighted) < 2:
        return []
    big, small = max(weighted, key=weighted.get), min(weighted, key=weighted.get)
    ratio = weighted[big] / weighted[small]
    if ratio < BALANCE_RATIO:
        return []
    same = len(set(weights.get(k) for k in weighted)) == 1
    return [f"loss components are {ratio:.2g}x apart at step {first['step']} (weighted {big} {weighted[big]:.3g} vs "
            f"{small} {weighted[small]:.3g}){' with equal weights ' + str(weights.get(big)) if same else ''}: "
            f"{big} owns the gradient; normalize targets and set loss.weights"]


# -- giblet-evaluate's results ----------------------------------------------------------------------
def evaluation_lines(run_dir: str | Path) -> list[str]:
    """One line per ``RUN_DIR/evaluation-*/summary.json`` (its headline figures and path), or
    the ``giblet-evaluate`` command to run when there is none."""
    run_dir = Path(run_dir)
    found = sorted(run_dir.glob("evaluation-*/summary.json"))
    if not found:
        return [f"evaluation: none yet; `giblet-evaluate {run_dir}` writes per-subject r maps, figures and the "
                f"fraction of the noise ceiling"]
    lines = []
    for path in found:
        try:
            s = json.loads(path.read_text())
            subjects = s["subjects"]
            line = (f"evaluation ({s['split']}, step {s['evaluated'].get('step', '?')}): mean r {s['mean']:.4f} "
                    f"(median {s['median']:.4f}, top 10% {s['top10']:.4f}; over {len(subjects)} subject(s))")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            lines.append(f"evaluation: {path} is unreadable ({type(exc).__name__}); rerun `giblet-evaluate {run_dir}`")
            continue
        frac = s.get("fraction_of_ceiling")
        line += f", {100 * frac:.1f}% of the noise ceiling" if isinstance(frac, (int, float)) else ""
        lines.append(f"{line}: {path}")
    return lines


# -- plots ------------------------------------------------------------------------------------------
def plot(log: dict, out_dir: str | Path, best_r: Optional[float] = None) -> list[Path]:
    """Write the four PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = log["train"], log["val"]
    steps = [r["step"] for r in train]
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, [r["lr"] for r in train], label="LR applied")
    peak = (log["config"] or {}).get("peak_lr")
    if peak:
        ax.axhline(peak, ls=":", c="gray", label="optim.lr (peak)")
    ax.set(xlabel="optimizer step", ylabel="LR", title="learning rate")
    ax.legend()
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    keys = sorted({k for r in train for k in r if k.startswith("loss_")})
    for i, k in enumerate(keys):
        ax.plot(steps, [max(r.get(k, math.nan), 1e-12) for r in train], c=f"C{i}", label=f"train {k[5:]}")
        vs = [(v["step"], v[k]) for v in val if k in v]
        if vs:
            ax.plot(*zip(*vs), c=f"C{i}", ls="--", label=f"val {k[5:]}")
    ax.set(yscale="log", xlabel="optimizer step", ylabel="loss (unweighted)", title="loss components")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "losses.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, [r["grad_norm"] for r in train], c="k", lw=2, label="total (pre-clip)")
    for i, k in enumerate(sorted({k for r in train for k in r if k.startswith("grad_norm_")})):
        ax.plot(steps, [max(r.get(k, math.nan), 1e-12) for r in train], lw=1, label=k[10:])
    ax.set(yscale="log", xlabel="optimizer step", ylabel="grad L2 norm", title="gradient norms")
    ax.legend(fontsize=6, ncol=3)
    save(fig, "grad_norms.png")

    fig, ax = plt.subplots(figsize=(6, 3.2))
    if val:
        ax.plot([v["step"] for v in val], [v["r_mean"] for v in val], marker="o", ms=3, label="val mean r")
    if best_r is not None:
        ax.axhline(best_r, ls=":", c="gray", label="achievable (planted)")
        ax.axhline(0.8 * best_r, ls="--", c="gray", label="80% of achievable")
    ax.set(xlabel="optimizer step", ylabel="mean per-voxel Pearson r", title="validation r")
    ax.legend()
    save(fig, "val_r.png")
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="giblet-diagnose", description="Training log -> verdict + plots.")
    p.add_argument("log", metavar="RUN_DIR", help="a giblet-train run folder, or its log.jsonl")
    p.add_argument("--out", help="folder for the PNGs (default: beside the log)")
    p.add_argument("--truth", help="giblet.synth truth.npz: report the fraction of the achievable val r")
    p.add_argument("--store", help="store of the run (default: the one in the log's config)")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = Path(args.log)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        print(f"giblet-diagnose: error: {path} does not exist; pass a giblet-train run folder or its log.jsonl",
              file=sys.stderr)
        return 1
    log = read_log(path)
    best = None
    if args.truth:
        store = args.store or ((log["config"] or {}).get("config") or {}).get("store")
        best = achievable_r(args.truth, store)
    report = diagnose(log, best)
    print(report.text())
    print("\n".join(evaluation_lines(path.parent)))
    if not args.no_plots:
        for f in plot(log, args.out or path.parent, best):
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
