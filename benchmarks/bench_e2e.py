"""End to end: ``giblet-preprocess run`` on a whole study, as a user runs it, measured from outside.

Runs the real command line in a subprocess and reports its wall time (total and per stage,
from ``--report``), the peak RSS of the whole process tree (the command, its Dask workers,
and with ``--external`` the scheduler and workers this script starts: sampled every 50 ms),
the store's size on disk per array, and the median time of ``--noop`` reruns (nothing to do).

Usage (the two-run Sherlock-shaped study of ``python -m giblet.synth ROOT --preset sherlock``)::

    python benchmarks/bench_e2e.py ROOT/study.yaml --json e2e_local.json
    python benchmarks/bench_e2e.py ROOT/study.yaml --runs 1 --output inc.zarr --json e2e_run1.json
    python benchmarks/bench_e2e.py ROOT/study.yaml --output inc.zarr --keep --json e2e_add_run2.json
    python benchmarks/bench_e2e.py ROOT/study.yaml --external --output ext.zarr --json e2e_ext.json \\
        --compare ROOT/sherlock.zarr                      # dask scheduler + 2 dask workers on loopback
    python benchmarks/bench_e2e.py ROOT/study.yaml --subjects 4 --output s4.zarr --json e2e_s4.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PeakRSS, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def study_config(config: Path, subjects: int | None, output: str | None, tmp: Path,
                 runs: int | None = None) -> Path:
    """The config itself, or a copy beside it keeping the first ``subjects`` subjects, the first
    ``runs`` runs and/or another output."""
    if subjects is None and output is None and runs is None:
        return config
    cfg = yaml.safe_load(config.read_text())
    blocks = list(cfg["runs"].values()) if cfg.get("runs") else [cfg["inputs"]]
    if subjects is not None:
        keep = list(dict.fromkeys(s for b in blocks for s in b.get("fmri", {})))[:subjects]
        for b in blocks:
            b["fmri"] = {s: p for s, p in b.get("fmri", {}).items() if s in keep}
    if runs is not None and cfg.get("runs"):
        every = list(cfg["runs"])
        cfg["runs"] = dict(list(cfg["runs"].items())[:runs])
        text_cfg = cfg.setdefault("text", {}) or {}
        if cfg.get("annotations") and not text_cfg.get("run_rows") and len(every) > 1:
            # the study's one sheet covers every run: the runs kept take their own rows of it
            from giblet.config import TextParams
            from giblet.features.text import run_segments
            p = TextParams(**{k: v for k, v in text_cfg.items()
                              if k in ("columns", "start_column", "end_column", "time_unit")})
            found = run_segments(config.parent / cfg["annotations"], p.start_column, p.end_column, list(p.columns),
                                 p.time_unit)
            text_cfg["run_rows"] = {r: f"{a}-{b}" for r, (a, b) in zip(every, found) if r in cfg["runs"]}
            cfg["text"] = text_cfg
        split = cfg.get("split") or {}
        for key in ("val_runs", "test_runs"):
            if key in split:
                split[key] = [r for r in split[key] if r in cfg["runs"]]
    if output is not None:
        cfg["output"] = output
    path = config.parent / f".bench-{os.getpid()}-{config.name}"  # beside it: relative input paths still hold
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_cluster(workers: int, log_dir: Path) -> tuple[str, list[subprocess.Popen]]:
    """``dask scheduler`` + ``workers`` x ``dask worker`` (1 process, 1 thread each) on loopback."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen(dask + ["--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                              stdout=subprocess.DEVNULL, stderr=open(log_dir / "scheduler.log", "w"))]
    time.sleep(2)
    for i in range(workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1",
                                       "--nthreads", "1", "--host", "127.0.0.1", "--dashboard-address", ":0"],
                                      stdout=subprocess.DEVNULL, stderr=open(log_dir / f"worker{i}.log", "w")))
    from distributed import Client

    with Client(address, timeout="60s") as client:
        client.wait_for_workers(workers, timeout=120)
    return address, procs


def run_cli(config: Path, extra: list[str], report: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(config), "--no-progress", "--report", str(report), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench_e2e: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    sys.stderr.write(proc.stderr[-2000:])
    return wall, json.loads(report.read_text())


def array_sizes(store: Path) -> dict[str, int]:
    """Bytes on disk of every array of a store (its folder, chunks and metadata)."""
    out = {}
    for meta in store.rglob("zarr.json"):
        if ".giblet" in meta.parts or json.loads(meta.read_text()).get("node_type") != "array":
            continue
        folder = meta.parent
        out[str(folder.relative_to(store))] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return dict(sorted(out.items()))


def compare_stores(a: Path, b: Path) -> dict:
    """Every array of ``a`` equal (values, shape, dtype) to the one of ``b``."""
    import numpy as np
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(array_sizes(a))
    unequal = []
    for name in names:
        x, y = ga[name], gb[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            unequal.append(name)
            continue
        step = max(1, (64 << 20) // max(1, x.nbytes // max(1, x.shape[0]))) if x.ndim else 1
        for i in range(0, x.shape[0] if x.ndim else 1, step):  # in slabs: a few subjects of fMRI don't fit twice
            sl = slice(i, i + step) if x.ndim else ()
            if not np.array_equal(x[sl], y[sl], equal_nan=True):
                unequal.append(name)
                break
    return {"arrays": len(names), "unequal": unequal}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--subjects", type=int, help="keep only the first N subjects of the config")
    ap.add_argument("--runs", type=int, help="keep only the first N runs of the config")
    ap.add_argument("--output", help="store name (relative to the config) instead of the config's")
    ap.add_argument("--external", action="store_true", help="dask scheduler + --workers dask workers on loopback")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="reuse an existing store (default: build from scratch)")
    ap.add_argument("--noop", type=int, default=3, help="no-op reruns timed (median reported)")
    ap.add_argument("--compare", type=Path, help="a store whose arrays must equal this run's")
    ap.add_argument("--only", nargs="+", metavar="STAGE", help="build only these stages (a stage's own figures)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="giblet-e2e-"))
    config = study_config(args.config.resolve(), args.subjects, args.output, tmp, args.runs)
    cfg = yaml.safe_load(config.read_text())
    store = (config.parent / cfg["output"]).resolve()
    if store.exists() and not args.keep:
        shutil.rmtree(store)
    procs: list[subprocess.Popen] = []
    try:
        with PeakRSS() as rss:
            if args.external:
                address, procs = start_cluster(args.workers, tmp)
                extra = ["--scheduler", address]
            else:
                extra = ["--workers", str(args.workers)]
            extra += ["--only", *args.only] if args.only else []
            wall, report = run_cli(config, extra, tmp / "report.json")
        noop = [run_cli(config, extra, tmp / f"noop{i}.json")[0] for i in range(args.noop)]
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        if config != args.config.resolve():
            config.unlink()
    sizes = array_sizes(store)
    blocks = list(cfg["runs"].values()) if cfg.get("runs") else [cfg["inputs"]]
    out = {"machine": machine(), "config": str(args.config), "store": str(store),
           "subjects": len({s for b in blocks for s in b.get("fmri", {})}), "runs": len(blocks),
           "scans": sum(len(b.get("fmri", {})) for b in blocks), "ran": report["ran"],
           "scheduler": "dask scheduler + %d dask workers (loopback)" % args.workers if args.external
           else f"LocalCluster, {args.workers} worker processes x 1 thread",
           "wall_s": wall, "engine_s": report["seconds"], "units_built": len(report["ran"]),
           "stages": report["stages"], "only": args.only, "peak_rss_tree_gb": rss.gb,
           "peak_rss_breakdown_gb": rss.breakdown, "noop_s": noop,
           "noop_median_s": statistics.median(noop) if noop else None,
           "store_bytes": sum(sizes.values()), "array_bytes": sizes}
    if args.compare:
        out["compare"] = {"with": str(args.compare), **compare_stores(store, args.compare)}
    args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "array_bytes"}, indent=1))
    return out


if __name__ == "__main__":
    main()
