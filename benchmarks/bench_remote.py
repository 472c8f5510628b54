"""A store on object storage against the same store in a local folder, in one script.

A loopback S3 server (moto in server mode, ``tests/s3_server.py``) holds the remote copy;
the same config is built by the engine into ``s3://`` and into a folder (same LocalCluster
size), then read by ``GibletLoader(GibletDataset(...))`` over one epoch of the train split:

- ``build_s``: wall time of each build (remote: tasks write their chunks to the bucket, the
  driver reads every file back to checksum it, the manifest PUT commits);
- ``first_batch_s``: from nothing (the dataset opened: manifest, shapes) to the first batch
  in hand, loader workers started -- what a training run waits before its first step;
- ``samples_per_s``: over one epoch of a fresh loader (nothing cached), and
  ``steady_samples_per_s`` after its first batch; for the remote store also a second fresh
  loader reading through the local chunk cache (``cache_dir``) the first one filled;
- ``ratio``: remote / local (goal: first batch <= 5 s at Sherlock scale, remote >= 0.5 x local
  with 2 workers on a 2-core machine).

Usage::

    python benchmarks/bench_remote.py --out benchmarks/results/remote_small.json     # small, ~1 min
    python benchmarks/bench_remote.py --shape 61,73,61 --trs 946 --subjects 4 \\
        --out benchmarks/results/remote_sherlock4.json                               # Sherlock-shaped
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(config: Path, output: str, workers: int) -> float:
    from giblet.config import load_config
    from pipelines import engine

    t0 = time.perf_counter()
    engine.run(load_config(config, [f"output={output}"]), workers=workers, progress=False)
    return time.perf_counter() - t0


def epoch(store: str, workers: int, batch_size: int, cache_dir: str | None = None) -> dict:
    """One epoch of a fresh dataset and loader: time to the first batch (from opening the
    store), samples/s over the whole epoch and after the first batch (the steady state)."""
    import torch

    from giblet.data import GibletDataset, GibletLoader

    t0 = time.perf_counter()
    ds = GibletDataset(store, "train", cache_dir=cache_dir)
    loader = GibletLoader(ds, batch_size=batch_size, num_workers=workers, seed=0, persistent=False)
    n, n_first, t_first = 0, 0, None
    for batch in loader:
        float(torch.as_tensor(batch["fmri"]).sum())  # a consumer touches what it gets
        n += len(batch["fmri"])
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    t_end = time.perf_counter()
    return {"samples": n, "first_batch_s": round(t_first - t0, 3), "samples_per_s": round(n / (t_end - t0), 1),
            "steady_samples_per_s": round((n - n_first) / max(t_end - t_first, 1e-9), 1)}


def main() -> int:
    from giblet.synth import make_study
    from tests.s3_server import make_bucket, moto_server, s3_environment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="20,24,16", help="BOLD grid x,y,z (Sherlock: 61,73,61)")
    p.add_argument("--trs", type=int, default=300)
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--chunk-trs", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="build LocalCluster workers and DataLoader workers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    from benchmarks._util import machine

    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint, s3_environment(endpoint):
        tmp = Path(tmp)
        config = make_study(tmp / "study", n_subjects=args.subjects, n_trs=args.trs, shape=shape, movie=False,
                            annotations=False, seed=0, stages={"fmri": {"chunk_trs": args.chunk_trs}})
        local, remote = str(tmp / "local.zarr"), f"{make_bucket('giblet-bench')}/study.zarr"
        result = {"machine": machine(), "server": "moto (server mode, loopback)", "shape": list(shape),
                  "n_trs": args.trs, "subjects": args.subjects, "chunk_trs": args.chunk_trs, "workers": args.workers,
                  "batch_size": args.batch_size}
        result["build_s"] = {"local": round(build(config, local, args.workers), 2),
                             "remote": round(build(config, remote, args.workers), 2)}
        cache = str(tmp / "cache")
        result["local"] = epoch(local, args.workers, args.batch_size)
        result["remote"] = epoch(remote, args.workers, args.batch_size, cache_dir=cache)  # cache filled here
        result["remote_cache_warm"] = epoch(remote, args.workers, args.batch_size, cache_dir=cache)
        loc, rem, warm = result["local"], result["remote"], result["remote_cache_warm"]
        result["ratio"] = {"build_s": round(result["build_s"]["remote"] / result["build_s"]["local"], 2)}
        for key in ("first_batch_s", "samples_per_s", "steady_samples_per_s"):
            result["ratio"][key] = round(rem[key] / loc[key], 2)
            result["ratio"][f"{key}_cache_warm"] = round(warm[key] / loc[key], 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
