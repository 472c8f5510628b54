"""The numbers and figures of docs/convergence.md, end to end, with one command.

Two planted studies where each subject has its own voxel weights (issue 19):

- **main**: ``giblet.synth.make_study(shared=0.5)``: 3 subjects x 300 TRs, every modality
  (video, audio, text), 20x24x16 grid; weights = sqrt(0.5) shared + sqrt(0.5) individual.
- **independent**: ``tests/individual_study.py`` (written without giblet.synth): video only,
  independent weights per subject, 3 subjects x 360 TRs, seed 0.

On each: ``giblet-train`` with configs/train/demo.yaml (the default), prototype.yaml (the
prototype's four choices) and demo.yaml with ``model.readout=shared``, one run at a time,
each timed; ``giblet-evaluate RUN_DIR`` on every run and ``giblet-evaluate --baseline ridge
--store STORE`` (both with the store's noise ceiling), so every r is the same per-subject
metric; and the planted *achievable* r: per subject, the mean over the store's voxels of
the expected r of the planted response with the noisy BOLD over the **val** TRs, then the
mean over subjects. On the main study also the ablations of the prototype's choices
(one change at a time; ``--no-ablations`` skips them) and giblet-diagnose's plots.

    python benchmarks/convergence.py /tmp/conv                 # ~20 min on 2 shared cores
    python benchmarks/convergence.py /tmp/conv --no-ablations  # ~10 min

Work (studies, stores, runs, evaluations) goes under WORK and is reused on a second call
(a run is redone only if its ``result.json`` is missing); ``--json`` (default
benchmarks/results/convergence_cpu.json) gets every number; ``--figures`` (default
docs/convergence) the PNGs; the tables are printed as markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

DEMO, PROTO = "configs/train/demo.yaml", "configs/train/prototype.yaml"
CONFIGS = {"demo": (DEMO, []), "prototype": (PROTO, []), "shared readout": (DEMO, ["model.readout=shared"])}
ABLATIONS = {  # one of the prototype's choices at a time (docs/convergence.md, "Which choice does what")
    "demo + raw scanner-unit fMRI targets": (DEMO, ["loss.fmri_target=raw", "log.scale_check=warn"]),
    "demo + integer codes under MSE": (DEMO, ["loss.audio=mse", "log.scale_check=warn"]),
    "demo + warm-up counted in epochs": (DEMO, ["schedule.unit=epoch", "schedule.warmup_steps=100"]),
    "demo + all weights 1.0": (DEMO, ["loss.weights.video=1.0", "loss.weights.audio=1.0", "loss.weights.text=1.0"]),
    "prototype, fMRI targets fixed": (PROTO, ["loss.fmri_target=z"]),
    "prototype, schedule fixed": (PROTO, ["schedule.unit=step", "schedule.warmup_steps=null",
                                          "schedule.warmup_epochs=2"]),
    "prototype, codes fixed": (PROTO, ["loss.audio=ce"]),
    "prototype, weights fixed": (PROTO, ["loss.weights.video=0.1", "loss.weights.audio=0.02",
                                         "loss.weights.text=0.1"]),
}
COLOURS = {"demo": "C0", "prototype": "C3", "shared readout": "C2", "ridge": "C1", "ceiling": "C7",
           "achievable": "k"}


def sh(*cmd: str, log: Path) -> float:
    """Run a command (output to ``log``); returns its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, whatever is installed
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([str(c) for c in cmd], check=False, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if done.returncode:
        raise SystemExit(f"convergence.py: {' '.join(map(str, cmd))} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - t0


# -- the studies ---------------------------------------------------------------------------------------
def main_study(work: Path) -> tuple[Path, dict]:
    """Build the main study (once); returns ``(store, achievable)``."""
    from giblet.synth import make_study

    root = work / "main"
    store = root / "study.zarr"
    if not (store / "zarr.json").exists():
        config = make_study(root, n_subjects=3, n_trs=300, seed=0, shared=0.5,
                            stages={"video": {"width": 64, "height": 36, "frame_skip": 8},
                                    "audio": {"model": "random"}})
        sh(sys.executable, "-m", "pipelines.cli", "run", config, log=root / "build.log")
    return store, planted_achievable(root / "truth.npz", store)


def planted_achievable(truth_path: Path, store: Path) -> dict:
    """``{"subjects": {s: r}, "mean": r}``: each subject's expected r over the val TRs, mean over
    the store's voxels (``giblet.synth.expected_r`` on the val rows of the planted regressors)."""
    from giblet.reader import open_store
    from giblet.synth import expected_r

    truth, view = np.load(truth_path), open_store(store)
    run, voxels = view.runs[0], tuple(view.voxels.T)
    per = {}
    for i, s in enumerate(view.subjects):
        a, b = view.split_trs("val", run, s)
        e = expected_r(truth["weights"][i], truth["inside"], truth["regressors"][a:b], float(truth["amplitude"]),
                       float(truth["noise"][i]))
        per[s] = float(e[voxels].mean())
    return {"subjects": per, "mean": float(np.mean(list(per.values())))}


def independent_study(work: Path) -> tuple[Path, dict, dict]:
    """tests/individual_study.py, seed 0; returns ``(store, achievable, hand ridge summary)``."""
    import individual_study as ind

    root = work / "independent"
    cached = root / "truth.json"
    if not cached.exists():
        config, truth = ind.make(root, seed=0)
        store = ind.build(config, truth)
        ach = {"subjects": dict(zip(truth["subjects"], truth["expected_r"].mean(1).tolist())),
               "mean": truth["achievable"]}
        cached.write_text(json.dumps({"store": str(store), "achievable": ach,
                                      "hand_ridge": ind.ridge_baseline(store)}, default=float))
    saved = json.loads(cached.read_text())
    return Path(saved["store"]), saved["achievable"], saved["hand_ridge"]


def context(truth_path: Path, store: Path) -> dict:
    """References beside the store's ridge: ridge on fewer modalities (one band for all hides the
    useful ones among 3,072 text columns) and an oracle -- least squares on the *planted*
    regressors, fit on the train TRs -- each ``{"r", "subjects"}`` on the val TRs."""
    from giblet.evaluation.features import FeatureParams
    from giblet.evaluation.metrics import pearson_r, per_subject
    from giblet.evaluation.ridge import ridge_baseline
    from giblet.reader import open_store

    out = {}
    for mods in (("video",), ("video", "audio")):
        summary = per_subject(ridge_baseline(store, params=FeatureParams(modalities=mods)).r["val"])
        out[f"ridge, {' + '.join(mods)} only"] = summary
    truth, view = np.load(truth_path), open_store(store)
    run, rs = view.runs[0], {}
    for s in view.subjects:
        (a, b), (c, d) = view.split_trs("train", run, s), view.split_trs("val", run, s)
        x = np.column_stack([truth["regressors"][: view.n_trs(run)], np.ones(view.n_trs(run))])
        y = view.fmri(s, run).astype(np.float64)
        rs[s] = pearson_r(x[c:d] @ np.linalg.lstsq(x[a:b], y[a:b], rcond=None)[0], y[c:d])
    out["oracle: least squares on the planted regressors"] = per_subject(rs)
    return {k: {"r": v["mean"], "subjects": {s: x["mean"] for s, x in v["subjects"].items()}} for k, v in out.items()}


# -- runs and evaluations ------------------------------------------------------------------------------
def train_and_evaluate(name: str, yml: str, overrides: list[str], store: Path, runs: Path, val_every: int) -> dict:
    """Train one config (timed), evaluate it; returns (and caches) its result."""
    out = runs / name.replace(" ", "_").replace(",", "").replace("+", "plus")
    result_path = out / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    wall = sh(sys.executable, "-m", "pipelines.train", yml, f"store={store}", f"out={out}", "resume=false",
              f"log.val_every={val_every}", *overrides, log=out / "train.out")
    sh(sys.executable, "-m", "pipelines.evaluate", out, log=out / "evaluate.out")
    from stats.diagnose import read_log

    log = read_log(out / "log.jsonl")
    end = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"kind": "end"' in line][-1]
    t0 = end["time"] - end["seconds"]
    evaluation = json.loads((out / "evaluation-val" / "summary.json").read_text())
    result = {"config": yml, "overrides": overrides, "wall_s": wall, "train_s": end["seconds"], "steps": end["steps"],
              "val": [{"step": v["step"], "s": v["time"] - t0, "r": v["r_mean"]} for v in log["val"]],
              "r": evaluation["mean"], "subjects": {s: v["mean"] for s, v in evaluation["subjects"].items()},
              "trainer_r": end["r_mean"], "evaluation": str(out / "evaluation-val")}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def ridge(store: Path, out: Path) -> dict:
    """``giblet-evaluate --baseline ridge`` (cached); its summary with the noise ceiling."""
    path = out / "summary.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        wall = sh(sys.executable, "-m", "pipelines.evaluate", "--baseline", "ridge", "--store", store, "--out", out,
                  log=out.parent / f"{out.name}.out")
        summary = json.loads(path.read_text())
        summary["wall_s"] = wall
        path.write_text(json.dumps(summary, indent=1))
    return json.loads(path.read_text())


def study(name: str, store: Path, achievable: dict, work: Path, val_every: int, configs: dict) -> dict:
    base = ridge(store, work / name / "ridge")
    ceiling = base["ceiling"]
    res = {"achievable": achievable,
           "ridge": {"r": base["mean"], "subjects": {s: v["mean"] for s, v in base["subjects"].items()},
                     "wall_s": base["wall_s"], "of_ceiling": base["fraction_of_ceiling"]},
           "ceiling": {"r": ceiling["mean"], "subjects": {s: v["mean"] for s, v in ceiling["subjects"].items()}},
           "runs": {}}
    for run, (yml, overrides) in configs.items():
        print(f"[{name}] {run} ...", flush=True)
        r = train_and_evaluate(run, yml, overrides, store, work / name / "runs", val_every)
        evaluation = json.loads((Path(r["evaluation"]) / "summary.json").read_text())
        r.update(of_achievable=r["r"] / achievable["mean"], of_ridge=r["r"] / res["ridge"]["r"],
                 of_ceiling=evaluation["fraction_of_ceiling"])  # giblet-evaluate's (docs/evaluation.md)
        bar = 0.8 * achievable["mean"]
        r["s_to_80"] = next((v["s"] for v in r["val"] if v["r"] >= bar), None)
        r["step_to_80"] = next((v["step"] for v in r["val"] if v["r"] >= bar), None)
        res["runs"][run] = r
    return res


# -- figures and tables --------------------------------------------------------------------------------
def figures(results: dict, work: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stats.diagnose import plot, read_log

    out.mkdir(parents=True, exist_ok=True)
    titles = {"main": "shared=0.5, every modality (3 x 300 TRs)", "independent": "independent weights, video only"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (name, res) in zip(axes, results.items()):
        for run in CONFIGS:
            v = res["runs"][run]["val"]
            ax.plot([p["step"] for p in v], [p["r"] for p in v], marker="o", ms=2.5, c=COLOURS[run], label=run)
        for ref, y in (("achievable", res["achievable"]["mean"]), ("ridge", res["ridge"]["r"]),
                       ("ceiling", res["ceiling"]["r"])):
            ax.axhline(y, ls=":" if ref == "achievable" else "--", c=COLOURS[ref], label=f"{ref} {y:.3f}")
        ax.axhline(0.8 * res["achievable"]["mean"], ls=":", c="0.6", lw=0.8, label="80 % of achievable")
        ax.set(xlabel="optimizer step", title=titles[name], ylim=(-0.1, 1.0))
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("val r (mean over subjects)")
    fig.tight_layout()
    fig.savefig(out / "val_r.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    bars = list(CONFIGS) + ["ridge", "ceiling", "achievable"]
    for ax, (name, res) in zip(axes, results.items()):
        subjects = list(res["achievable"]["subjects"])
        width = 0.8 / len(bars)
        for j, b in enumerate(bars):
            src = res["runs"][b] if b in CONFIGS else res[b]
            ax.bar(np.arange(len(subjects)) + (j - len(bars) / 2 + 0.5) * width,
                   [src["subjects"][s] for s in subjects], width, color=COLOURS[b], label=b)
        ax.set_xticks(range(len(subjects)), subjects)
        ax.axhline(0, c="k", lw=0.5)
        ax.set(title=titles[name])
    axes[0].set_ylabel("val r (mean over voxels)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "per_subject.png", dpi=110)
    plt.close(fig)

    main = results["main"]["runs"]
    folders = {run: Path(main[run]["evaluation"]) for run in ("demo", "shared readout")}
    r_maps(plt, {**folders, "ridge": work / "main" / "ridge"}, out / "r_maps.png")
    for run in ("demo", "prototype"):  # giblet-diagnose's plots of the two runs
        tmp = work / "diagnose" / run
        plot(read_log(Path(main[run]["evaluation"]).parent / "log.jsonl"), tmp)
        for png in ("lr.png", "losses.png", "grad_norms.png"):
            shutil.copy(tmp / png, out / f"{run}_{png}")


def r_maps(plt, folders: dict, path: Path, subject: str = "sub-01") -> None:
    """Glass brains of one subject's val r map (giblet-evaluate's ``r_SUBJECT.nii.gz``), one
    panel per evaluation, on one 0..1 scale (giblet-evaluate's own PNG uses a signed scale)."""
    import nibabel as nib
    from nilearn import plotting

    fig = plt.figure(figsize=(4 * len(folders), 2.6))
    for i, (name, folder) in enumerate(folders.items()):
        ax = fig.add_subplot(1, len(folders), i + 1)
        plotting.plot_glass_brain(nib.load(folder / f"r_{subject}.nii.gz"), axes=ax, figure=fig, title=name,
                                  plot_abs=False, threshold=1e-6, vmin=0, vmax=1, cmap="viridis",
                                  colorbar=i == len(folders) - 1, annotate=False, display_mode="xz")
    fig.suptitle(f"{subject}: val r per voxel (maximum projection)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def row(name: str, r: float, per_subject: list[float], res: dict, of_ceiling=None, run: dict | None = None) -> str:
    """One markdown row: r, its fractions of the achievable r, the ridge and (giblet-evaluate's
    ``fraction_of_ceiling``; n/a where the mean ceiling is ~0, i.e. subjects share no response)
    the ceiling, per subject, and for a training run its wall time and when it reached 80 %."""
    ceiling = "" if of_ceiling is None else f"{100 * of_ceiling:.0f} %" if res["ceiling"]["r"] > 0.1 else "n/a"
    cells = [name, f"{r:.3f}", f"{100 * r / res['achievable']['mean']:.1f} %",
             f"{100 * r / res['ridge']['r']:.1f} %", ceiling, *(f"{v:.3f}" for v in per_subject), "", ""]
    if run:
        cells[-2] = f"{run['wall_s']:.0f} ({run['train_s']:.0f} training)"
        cells[-1] = f"step {run['step_to_80']}, {run['s_to_80']:.1f} s" if run["step_to_80"] else "never"
    return "| " + " | ".join(cells) + " |"


def tables(results: dict) -> str:
    lines = []
    for name, res in results.items():
        subjects = list(res["achievable"]["subjects"])
        lines += [f"\n### {name}\n", "| | val r | of achievable | of ridge | of ceiling | " + " | ".join(subjects)
                  + " | train wall (s) | 80 % reached |", "|---" * (7 + len(subjects)) + "|"]
        for run, r in res["runs"].items():
            lines.append(row(run, r["r"], [r["subjects"][s] for s in subjects], res, r["of_ceiling"], r))
        refs = {"ridge": res["ridge"], "ceiling": res["ceiling"],
                "achievable": {**res["achievable"], "r": res["achievable"]["mean"]}, **res.get("context", {})}
        if "hand_ridge" in res:
            hand = res["hand_ridge"]
            refs["hand ridge (mean colour, 12 delays)"] = {"r": hand["mean"], "subjects": {
                s: v["mean"] for s, v in hand["subjects"].items()}}
        for ref, src in refs.items():
            lines.append(row(ref, src["r"], [src["subjects"][s] for s in subjects], res, src.get("of_ceiling")))
    abl = results["main"].get("ablations")
    if abl:
        lines += ["\n### ablations (main study)\n", "| run | val r | of achievable |", "|---|---|---|"]
        lines += [f"| {k} | {v['r']:.3f} | {100 * v['of_achievable']:.1f} % |" for k, v in abl.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="folder for the studies, stores, runs and evaluations")
    ap.add_argument("--no-ablations", action="store_true", help="skip the prototype-choice ablations")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks/results/convergence_cpu.json")
    ap.add_argument("--figures", type=Path, default=REPO / "docs/convergence")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    main_store, ach = main_study(work)
    results = {"main": study("main", main_store, ach, work, 23, CONFIGS)}
    results["main"]["context"] = context(work / "main" / "truth.npz", main_store)
    store, ach, hand = independent_study(work)
    results["independent"] = study("independent", store, ach, work, 27, CONFIGS)
    results["independent"]["hand_ridge"] = hand
    if not args.no_ablations:
        results["main"]["ablations"] = study("main", main_store, results["main"]["achievable"], work, 115,
                                             ABLATIONS)["runs"]
    figures(results, work, args.figures)
    args.json.write_text(json.dumps(results, indent=1))
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
