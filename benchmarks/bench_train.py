"""Training throughput on 1 and N processes: steps/s, samples/s, data-wait fraction, peak GPU memory.

Runs the real trainer (``pipelines.train`` under ``torch.distributed.run``) for a fixed number
of optimizer steps at each process count and reads the figures back from the runs' own
``log.jsonl`` (so it measures exactly what a user's run does, data loading included). The
baseline is the 1-process run of the same script and store: the N-process figure is reported
as a ratio to it (ideal: N).

Figures: steps/s and samples/s over the logged steps after ``--skip`` warm-up steps (first
CUDA kernels, DataLoader worker start-up), median data-wait fraction, peak GPU memory per
rank, and what actually ran (optimizer class, autocast dtype, world size).

On a GPU machine (needs torch, numpy, pyyaml, zarr + giblet; no dask/nibabel/nilearn)::

    python benchmarks/bench_train.py --store /data/sherlock.zarr --config configs/train/gpu.yaml \\
        --device cuda --nproc 1 2 --steps 120 --json gpu_train.json

Settings compared in one call, interleaved (1, 2, 1, 2 processes of each variant per repeat, so
drift on a shared host hits all of them alike; a variant's 2-process median is also given
against the median of *every* 1-process run, the right baseline when the variants differ only
in settings that act with several processes)::

    python benchmarks/bench_train.py --store /data/sherlock.zarr --device cuda --repeats 3 \
        --variant ddp ddp.bucket_cap_mb=250 --variant zero ddp.bucket_cap_mb=250 optim.zero=true \
        --variant simple ddp.bucket_cap_mb=250 env:NCCL_PROTO=Simple --json variants.json

``--side-by-side`` also runs N independent 1-process trainers at once (one GPU each): the host's
share of the N-process loss (N side by side vs 1 alone) apart from DDP's (N-process run vs N side
by side)::

    python benchmarks/bench_train.py --store /data/sherlock.zarr --device cuda --repeats 2 --side-by-side \\
        --override ddp.bucket_cap_mb=250 --json sbs.json

On this CPU (gloo, the demo config)::

    python benchmarks/bench_train.py --store giblet-demo/demo.zarr --config configs/train/demo.yaml \\
        --device cpu --nproc 1 2 --steps 60 --json cpu_train.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, args, out: Path, overrides: list[str], env_extra: dict | None = None):
    """Start one trainer run (``torch.distributed.run``) with ``overrides`` (``KEY=VALUE`` for the
    trainer, ``env:NAME=VALUE`` for its environment); its output goes to files in ``out``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.update(o[4:].split("=", 1) for o in overrides if o.startswith("env:"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "pipelines.train", str(args.config), f"store={args.store}",
           f"out={out}", f"device={args.device}", f"schedule.max_steps={args.steps}", f"log.every={args.every}",
           f"log.val_every={10 ** 9}", f"log.ckpt_every={10 ** 9}", "log.tensorboard=false", "resume=false",
           *[o for o in overrides if not o.startswith("env:")]]
    if args.profile:
        last = args.steps - args.profile
        cmd += [f"log.profile_steps={args.profile}", f"log.profile_start={last}"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
        return subprocess.Popen(cmd, cwd=REPO, stdout=so, stderr=se, env=env), time.perf_counter()


def run(nproc: int, args, out: Path, overrides: list[str]) -> dict:
    """One trainer run; its figures from its log."""
    proc, t0 = _launch(nproc, args, out, overrides)
    return _collect(proc, t0, nproc, args, out)


def run_side_by_side(n: int, args, out: Path, overrides: list[str]) -> dict:
    """``n`` independent 1-process runs at once, one per GPU (``CUDA_VISIBLE_DEVICES``): what the
    host gives each process when ``n`` share it, without any communication between them."""
    started = [_launch(1, args, out / f"alone{i}", overrides,
                       {"CUDA_VISIBLE_DEVICES": str(i)} if args.device == "cuda" else None) for i in range(n)]
    runs = [_collect(p, t0, 1, args, out / f"alone{i}") for i, (p, t0) in enumerate(started)]
    bad = [r for r in runs if "error" in r]
    if bad:
        return {**bad[0], "nproc": f"{n}x1"}
    return {**runs[0], "nproc": f"{n}x1", "profile": None,
            "steps_per_s": float(np.mean([r["steps_per_s"] for r in runs])),  # per process
            "samples_per_s": sum(r["samples_per_s"] for r in runs),
            "steady_samples_per_s": sum(r["steady_samples_per_s"] for r in runs),
            "members_samples_per_s": [r["samples_per_s"] for r in runs], "wall_s": max(r["wall_s"] for r in runs)}


def _collect(proc: subprocess.Popen, t0: float, nproc: int, args, out: Path) -> dict:
    """Wait for a run; its figures from its ``log.jsonl`` (or its error)."""
    proc.wait()
    wall = time.perf_counter() - t0
    last = args.steps - args.profile  # the profiled steps (at the end) are left out of the throughput
    if proc.returncode != 0:  # recorded; the other runs of the call go on
        text = (out / "stderr.txt").read_text() or (out / "stdout.txt").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith("giblet-train")] or [text[-3000:]]
        return {"nproc": nproc, "error": f"exit {proc.returncode}: " + "\n".join(lines), "wall_s": wall}
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    header = next(r for r in recs if r["kind"] == "config")
    train = [r for r in recs if r["kind"] == "train" and args.skip < r["step"] <= last]
    if len(train) < 2:
        raise SystemExit(f"bench_train: too few logged steps after --skip {args.skip}; raise --steps")
    steps = train[-1]["step"] - train[0]["step"]
    seconds = train[-1]["time"] - train[0]["time"]
    batch = header["config"]["data"]["batch_size"] * header["config"]["optim"]["accum_steps"]
    # Steady state: logging intervals that stay inside one epoch. An interval that crosses an
    # epoch boundary includes the start of the next epoch's DataLoader workers; N ranks cross
    # N times as many boundaries per step as one, so this separates that cost from scaling.
    pairs = list(zip(train[:-1], train[1:]))
    inside = [(a, b) for a, b in pairs if a["epoch"] == b["epoch"]]
    s_steps = sum(b["step"] - a["step"] for a, b in inside)
    s_secs = sum(b["time"] - a["time"] for a, b in inside)
    waits = [r["data_wait"] for r in train[1:]] or [train[0]["data_wait"]]
    return {"nproc": nproc, "steps_per_s": steps / seconds, "samples_per_s": steps * batch * nproc / seconds,
            "steady_steps_per_s": s_steps / s_secs if s_secs else float("nan"),
            "steady_samples_per_s": s_steps * batch * nproc / s_secs if s_secs else float("nan"),
            "epoch_boundaries": train[-1]["epoch"] - train[0]["epoch"],
            "data_wait_median": float(np.median(waits)), "data_wait_mean": float(np.mean(waits)),
            "data_wait_max": float(np.max(waits)),
            "peak_gpu_mem_gb": max((r.get("gpu_mem_gb", 0.0) for r in train), default=0.0),
            "optimizer": header["optimizer"], "autocast": header["autocast"], "device": header["device"],
            "world_size": header["world_size"], "n_params": header["n_params"], "wall_s": wall,
            "last_loss": train[-1]["loss"], "profile": next((r for r in recs if r["kind"] == "profile"), None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--config", default=str(REPO / "configs" / "train" / "gpu.yaml"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the figures")
    p.add_argument("--every", type=int, default=10, help="log.every of the runs")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="extra trainer overrides")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the --nproc list this many times, interleaved; figures are per-count medians")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile the last N steps (torch.profiler; left out of the throughput); each rank's "
                        "table is copied next to --json")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="a named set of overrides (repeatable; env:NAME=VALUE sets an environment variable); "
                        "variants run interleaved with each other, every repeat")
    p.add_argument("--budget", type=float, default=0, metavar="S",
                   help="start no run that would end after S seconds (judged by the longest run so far); "
                        "the JSON is rewritten after every run, so a cut-off call keeps what it measured")
    p.add_argument("--side-by-side", action="store_true",
                   help="also run N independent 1-process trainers at once (N = the largest --nproc; one GPU "
                        "each, no communication): splits the N-process loss into the host's share (N alone "
                        "vs 1 alone) and DDP's (N-process run vs N alone)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    args.store = str(Path(args.store).resolve())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    variants = {v[0]: args.override + v[1:] for v in args.variant} if args.variant else {"default": args.override}
    runs, t_begin = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        counts = [*args.nproc, *([f"{max(args.nproc)}x1"] if args.side_by_side else [])]
        order = [(v, n) for _ in range(args.repeats) for v in variants for n in counts]  # interleaved: drift
        for k, (name, n) in enumerate(order):  # hits every variant and process count alike
            longest = max((r["wall_s"] for r in runs), default=0.0)
            if args.budget and time.perf_counter() - t_begin + longest > args.budget:
                print(f"bench_train: --budget {args.budget:g} s reached; {len(order) - k} run(s) not started",
                      flush=True)
                break
            folder = Path(tmp) / f"run{len(runs) + 1}"
            if isinstance(n, str):  # "Nx1": N independent 1-process runs at once
                r = {**run_side_by_side(max(args.nproc), args, folder, variants[name]), "variant": name}
            else:
                r = {**run(n, args, folder, variants[name]), "variant": name}
            runs.append(r)
            if "error" in r:
                print(f"[{name}] {n} process(es): FAILED {r['error'][-1500:]}", flush=True)
            else:
                _report(r, name, n, args, folder, len(runs))
            if args.json:
                Path(args.json).write_text(json.dumps(_summary(runs, variants, args, final=False), indent=2))
    summary = _summary(runs, variants, args, final=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")


def _report(r: dict, name: str, n: int, args, folder: Path, index: int) -> None:
    """Print one run's figures; keep its profile tables next to the JSON."""
    if args.profile and args.json:  # each rank's table, next to the JSON
        for f in sorted(folder.glob("profile_rank*.txt")):
            dest = Path(args.json).with_name(f"{Path(args.json).stem}_run{index}_{n}proc_{f.name}")
            dest.write_text(f.read_text())
    if r["profile"]:
        pr = r["profile"]
        print(f"  profile (rank 0): wall {pr['wall_ms_per_step']:.1f} ms/step, device busy "
              f"{pr['device_busy_ms_per_step']:.1f} ms/step ({100 * pr['device_busy_fraction']:.0f}%), "
              f"NCCL {pr['nccl_ms_per_step']:.1f} ms/step; top CPU: "
              + ", ".join(f"{k[:40]} {v:.1f}" for k, v in pr["top_cpu"][:4]), flush=True)
    print(f"[{name}] {n} process(es): {r['steps_per_s']:.3g} steps/s, {r['samples_per_s']:.4g} samples/s "
          f"(within epochs: {r['steady_samples_per_s']:.4g}; {r['epoch_boundaries']} epoch boundaries), "
          f"data wait median {100 * r['data_wait_median']:.1f}% mean {100 * r['data_wait_mean']:.1f}% "
          f"max {100 * r['data_wait_max']:.0f}%, peak GPU mem {r['peak_gpu_mem_gb']:.2f} GB, "
          f"{r['optimizer']}, autocast {r['autocast']}, {r['n_params'] / 1e6:.0f} M params", flush=True)


def _summary(runs: list[dict], variants: dict, args, final: bool) -> dict:
    """Every run (failed ones with their error) and per-variant medians and ratios."""
    ok = [r for r in runs if "error" not in r]
    per_variant = {name: {"overrides": variants[name],
                          "results": _summarize([r for r in ok if r["variant"] == name], args.nproc)}
                   for name in variants}
    # Every first-count run, whatever the variant: the baseline when variants differ only in
    # settings that act with several processes (DDP, ZeRO), as a 1-process run ignores them.
    first = [r["samples_per_s"] for r in ok if r["nproc"] == args.nproc[0]]
    pooled = float(np.median(first)) if first else float("nan")
    summary = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.node()}",
               "date": time.strftime("%Y-%m-%d"), "store": args.store, "config": args.config, "steps": args.steps,
               "skip": args.skip, "overrides": args.override, "repeats": args.repeats, "complete": final,
               "results": next(iter(per_variant.values()))["results"], "variants": per_variant,
               "failed_runs": [r for r in runs if "error" in r],
               "pooled_first_count_samples_per_s": first, "pooled_first_count_median": pooled}
    try:
        import torch

        if torch.cuda.is_available():
            summary["gpu"] = torch.cuda.get_device_name(0)
        summary["torch"] = torch.__version__
    except ImportError:
        pass
    for name, v in per_variant.items():
        if not v["results"] or v["results"][0]["nproc"] != args.nproc[0]:
            continue  # no baseline run (yet) for this variant
        base = v["results"][0]
        alone = [r for r in ok if r["variant"] == name and isinstance(r["nproc"], str)]
        if alone:  # N side by side vs 1 alone: the host; the N-process run vs N side by side: DDP
            n = max(args.nproc)
            top = next((r for r in v["results"] if r["nproc"] == n), None)
            m = float(np.median([r["samples_per_s"] for r in alone]))
            v["side_by_side"] = {"nproc": n, "all_samples_per_s": [r["samples_per_s"] for r in alone],
                                 "members_samples_per_s": [r["members_samples_per_s"] for r in alone],
                                 "median_samples_per_s": m, "host_factor": m / (n * base["median_samples_per_s"]),
                                 "ddp_factor": top["median_samples_per_s"] / m if top else float("nan")}
            if final:
                sb = v["side_by_side"]
                print(f"[{name}] {n} independent 1-process runs side by side: {m:.4g} samples/s = "
                      f"{sb['host_factor']:.3g} x {n} x the lone run (the host's share); the {n}-process run is "
                      f"{sb['ddp_factor']:.3g} x that (DDP's share)")
        for r in v["results"][1:]:
            r["speedup_vs_pooled_first"] = r["median_samples_per_s"] / pooled
            if final:
                print(f"[{name}] {r['nproc']} vs {base['nproc']} process(es): {r['speedup_vs_first']:.3g}x median "
                      f"samples/s, {r['steady_speedup_vs_first']:.3g}x within epochs (ideal "
                      f"{r['nproc'] / base['nproc']:.3g}x)"
                      + (f"; {r['speedup_vs_pooled_first']:.3g}x against the median of all {len(first)} "
                         f"{base['nproc']}-process runs" if len(per_variant) > 1 else ""))
    return summary


def _summarize(runs: list[dict], counts: list[int]) -> list[dict]:
    """Per process count: a middle run's details with median figures; ratios of the medians
    to the first count (equal to the runs' own figures with one repeat)."""
    results = []
    for n in dict.fromkeys(counts):
        mine = sorted((r for r in runs if r["nproc"] == n), key=lambda r: r["samples_per_s"])
        if not mine:
            continue
        results.append({**mine[(len(mine) - 1) // 2], "all_samples_per_s": [r["samples_per_s"] for r in mine],
                        "median_samples_per_s": float(np.median([r["samples_per_s"] for r in mine])),
                        "median_steady_samples_per_s": float(np.median([r["steady_samples_per_s"] for r in mine]))})
    for r in results:
        r["speedup_vs_first"] = r["median_samples_per_s"] / results[0]["median_samples_per_s"]
        r["steady_speedup_vs_first"] = r["median_steady_samples_per_s"] / results[0]["median_steady_samples_per_s"]
    return results


if __name__ == "__main__":
    main()
