"""Throughput of GibletLoader / DataLoader(GibletDataset) against a raw zarr read loop.

On a Sherlock-shaped store (61x73x61 grid with an epi mask, 946 TRs, a few subjects):

- baseline: a loop that reads every stored chunk of the train split with zarr
  (``arr[c0:c1]``: file read + zstd decode), one process -- the floor any reader pays;
  also the same loop split over ``--workers`` processes (same parallelism as the loader),
  and inside ``--workers`` DataLoader workers handing each decoded chunk to the main
  process (the same hand-over every DataLoader reader pays);
- ``GibletLoader(GibletDataset(...), num_workers=W)``: a shuffled (chunk-aware) epoch, batches,
  in the steady state of a run (its persistent workers already started by an untimed epoch);
  also its first epoch alone (worker start-up included), and with ``group=1`` (one
  hand-over per batch instead of per unit of batches);
- ``DataLoader(GibletDataset(...), num_workers=W)``: the plain PyTorch path, sequential;
- ``GibletLoader`` with 0 workers (reads in the main process: no inter-process copy);
- ``transfer_only``: DataLoader workers handing over batches of the same size without
  reading anything -- the floor the worker->main shared-memory hand-over costs on this host.

Every reader's consumer sums each delivered array once (a model reads its batch; a shared-
memory batch that is never touched would cost the main process nothing). Reported:
samples/s, MB/s of fMRI delivered, CPU-seconds (all processes), the ratio to each baseline,
and every worker's peak RSS (``psutil``, sampled in the worker). With ``--device cuda`` each batch is
also copied to the GPU (pinned memory, non-blocking), as a training loop would.

Usage::

    python benchmarks/bench_dataset.py --out /tmp/bench_dataset.json            # builds the store once
    python benchmarks/bench_dataset.py --build direct --device cuda --out ...    # GPU host, no Dask
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE, N_TRS, CHUNK_TRS = (61, 73, 61), 946, 16


# -- the store ---------------------------------------------------------------------------------
def build_engine(root: Path, subjects: int) -> Path:
    """giblet.synth study -> giblet-preprocess engine (the real fMRI stage, LocalCluster)."""
    from giblet.config import load_config
    from giblet.synth import make_study
    from pipelines import engine

    config = make_study(root, n_subjects=subjects, n_trs=N_TRS, shape=SHAPE, movie=False, annotations=False, seed=0)
    return engine.run(load_config(config), workers=2, progress=False).store


def build_direct(root: Path, subjects: int) -> Path:
    """The same layout written straight through giblet.store (zarr + numpy only: for GPU hosts)."""
    from giblet import store as gs
    from giblet.synth import brain

    path = root / "study.zarr"
    writer = gs.StoreWriter(path)
    writer.create()
    rng = np.random.default_rng(0)
    mask, _ = brain(SHAPE, rng)
    voxels = np.argwhere(mask).astype(np.int32)
    units = {"fmri/mask": {"fmri/mask": (mask, mask.shape, (gs.X, gs.Y, gs.Z)),
                           "fmri/voxels": (voxels, voxels.shape, (gs.VOXEL, gs.IJK))}}
    for s in range(subjects):
        p = f"fmri/sub-{s + 1:02d}"
        units[p] = {f"{p}/bold": (None, (CHUNK_TRS, len(voxels)), (gs.TR, gs.VOXEL)),
                    f"{p}/mean": (np.full(len(voxels), 1000, np.float32), (len(voxels),), (gs.VOXEL,)),
                    f"{p}/std": (np.full(len(voxels), 20, np.float32), (len(voxels),), (gs.VOXEL,))}
    for key, arrays in units.items():
        fp = f"bench{len(key):011d}"
        staging = writer.staging_dir(key, fp)
        for name, (data, chunks, dims) in arrays.items():
            shape = (N_TRS, len(voxels)) if data is None else data.shape
            attrs = {"affine": np.eye(4).tolist(), "n_voxels": len(voxels)} if name == "fmri/mask" else None
            dtype = "float32" if data is None else str(data.dtype)
            arr = gs.create_array(staging, name, shape, dtype, chunks, dims, attrs=attrs)
            if data is None:
                for t0 in range(0, N_TRS, CHUNK_TRS):  # whole chunks, like the fMRI stage
                    arr[t0:t0 + CHUNK_TRS] = rng.standard_normal((min(CHUNK_TRS, N_TRS - t0), len(voxels)),
                                                                  dtype=np.float32)
            else:
                arr[...] = data
        writer.commit(key, {"stage": "fmri", "version": 1, "fingerprint": fp, "params": {}, "inputs": {},
                            "deps": [], "meta": {"n_trs": N_TRS}}, staging, list(arrays))
    n_val = round(0.2 * N_TRS)
    split = {"train": [0, N_TRS - n_val], "val": [N_TRS - n_val, N_TRS]}
    units_fp = {k: e["fingerprint"] for k, e in writer.manifest["units"].items()}
    writer.write_align({"fingerprint": "bench", "n_trs": N_TRS, "split": split, "units": units_fp},
                       {"schema_version": gs.SCHEMA_VERSION, "tr_s": 1.5, "onset_s": 0.0, "n_trs": N_TRS,
                        "split": split, "subjects": [k.split("/")[1] for k in units if k != "fmri/mask"]})
    return path


def ensure_store(cache: Path, subjects: int, how: str) -> Path:
    import giblet

    root = cache / f"{how}-s{subjects}"
    path = root / "study.zarr"
    try:
        giblet.open_store(path)
        return path
    except giblet.StoreError:
        pass
    t0 = time.perf_counter()
    print(f"building the {how} store under {root} (once) ...", file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    path = build_engine(root, subjects) if how == "engine" else build_direct(root, subjects)
    print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def cpu_seconds() -> float:
    """CPU time of this process (all threads), its reaped children (pool / DataLoader workers)
    and its live ones (a persistent loader's workers)."""
    import resource

    import psutil

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            live += t.user + t.system
        except psutil.Error:  # exited in between: counted as reaped (or lost, a few ms)
            pass
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + live


# -- the baseline ------------------------------------------------------------------------------
def chunk_jobs(path: Path) -> list[tuple[str, int, int]]:
    """(array, t0, t1) of every stored chunk the train split touches, subject by subject."""
    import giblet

    s = giblet.open_store(path)
    a, b = s.split["train"]
    jobs = []
    for subject in s.subjects:
        step = s.array(f"fmri/{subject}/bold").chunks[0]
        for c in range(a // step, (b - 1) // step + 1):
            jobs.append((f"fmri/{subject}/bold", c * step, (c + 1) * step))
    return jobs


def _raw_read(args) -> tuple[int, int, float]:
    path, jobs, a, b = args
    import zarr

    cpu0 = time.process_time()  # all threads of this process (zarr decodes in its own threads)
    root = zarr.open_group(str(path), mode="r")
    rows = nbytes = 0
    for name, t0, t1 in jobs:
        x = root[name][t0:t1]  # file read + decode, into a numpy array
        lo, hi = max(t0, a), min(t1, b)
        x[lo - t0:hi - t0].sum()  # the consumer reads what it gets once (as every reader here)
        rows += max(hi - lo, 0)
        nbytes += max(hi - lo, 0) * x.shape[1] * x.itemsize
    return rows, nbytes, time.process_time() - cpu0


def raw_loop(path: Path, jobs, split, processes: int) -> dict:
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    if processes == 1:
        rows, nbytes, _ = _raw_read((path, jobs, *split))
    else:
        with mp.get_context("fork").Pool(processes) as pool:
            parts = pool.map(_raw_read, [(path, jobs[i::processes], *split) for i in range(processes)])
        rows, nbytes, _ = map(sum, zip(*parts))
    return {"seconds": time.perf_counter() - t0, "samples": rows, "bytes": nbytes, "cpu_s": cpu_seconds() - cpu0}


# -- the dataset -------------------------------------------------------------------------------
def _probe_dataset_class():
    import psutil

    from giblet.data import GibletDataset

    class Probe(GibletDataset):
        """Records this process's peak RSS every few samples (to a file named by pid)."""

        probe_dir: str = ""

        def _read(self, index):  # both __getitem__ and get_batch (GibletLoader) read through here
            out = super()._read(index)
            st = self._state()
            n = st["probe_n"] = st.get("probe_n", 0) + 1
            if n % 8 == 0:
                rss = psutil.Process().memory_info().rss
                first = st.setdefault("probe_first", rss)
                st["probe_peak"] = max(st.get("probe_peak", 0), rss)
                Path(self.probe_dir, f"{os.getpid()}.json").write_text(json.dumps(
                    {"peak_rss": st["probe_peak"], "first_rss": first, "samples": n,
                     "cache_bytes": self.cache_bytes, "cache_peak": self.cache.nbytes}))
            return out

    return Probe


def _ipc_stream_class():
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    class Transfer(IterableDataset):
        """Batches of the same size as the loader's, made without reading: the worker->main copy alone."""

        def __init__(self, n_batches: int, shape: tuple):
            self.n_batches, self.shape = n_batches, shape

        def __iter__(self):
            info = get_worker_info()
            w, nw = (info.id, info.num_workers) if info else (0, 1)
            src = np.ones(self.shape, np.float32)
            for _ in range(w, self.n_batches, nw):
                out = torch.from_numpy(np.empty(0, np.float32))
                if info is not None:  # into shared memory, as default_collate does
                    out = out.new(out._typed_storage()._new_shared(src.size, device=out.device)).resize_(self.shape)
                else:
                    out = out.new_empty(self.shape)
                out.numpy()[:] = src
                yield {"fmri": out}

    return Transfer


def _raw_stream_class():
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    class RawChunks(IterableDataset):
        """The raw loop inside DataLoader workers: each decoded chunk is handed over as one batch."""

        def __init__(self, path, jobs, split):
            self.path, self.jobs, self.split = path, jobs, split

        def __iter__(self):
            import zarr

            info = get_worker_info()
            w, nw = (info.id, info.num_workers) if info else (0, 1)
            root = zarr.open_group(str(self.path), mode="r")
            a, b = self.split
            for name, t0, t1 in self.jobs[w::nw]:
                x = root[name][max(t0, a):min(t1, b)]
                yield {"fmri": torch.from_numpy(x)}

    return RawChunks


def raw_dataloader(path: Path, jobs, split, workers: int) -> dict:
    """Baseline with the same worker->main hand-over as any DataLoader reader pays."""
    from torch.utils.data import DataLoader

    t0, cpu0 = time.perf_counter(), cpu_seconds()
    rows = nbytes = 0
    for batch in DataLoader(_raw_stream_class()(path, jobs, split), batch_size=None, num_workers=workers):
        rows += batch["fmri"].shape[0]
        nbytes += batch["fmri"].numel() * 4
        batch["fmri"].numpy().sum()
    return {"seconds": time.perf_counter() - t0, "samples": rows, "bytes": nbytes, "workers_rss": [],
            "cpu_s": cpu_seconds() - cpu0}


def ipc_floor(n_samples: int, n_voxels: int, workers: int, batch_size: int) -> dict:
    """Moving the same bytes from worker processes to the main one, with no reading at all."""
    from torch.utils.data import DataLoader

    Transfer = _ipc_stream_class()
    n_batches = -(-n_samples // batch_size)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    nbytes = 0
    for batch in DataLoader(Transfer(n_batches, (batch_size, n_voxels)), batch_size=None, num_workers=workers):
        nbytes += batch["fmri"].numel() * 4
        batch["fmri"].numpy().sum()
    return {"seconds": time.perf_counter() - t0, "samples": n_batches * batch_size, "bytes": nbytes,
            "workers_rss": [], "cpu_s": cpu_seconds() - cpu0}


def run_loader(path: Path, kind: str, workers: int, batch_size: int, device: str, probe: bool = False,
               warm: bool = False, group=None) -> dict:
    """One timed epoch; ``warm``: after an untimed one on the same (persistent) loader, as every
    epoch but the first of a run; with ``probe`` (an untimed extra run) each process records its peak RSS."""
    import torch
    from torch.utils.data import DataLoader

    from giblet.data import GibletDataset, GibletLoader, World

    probe_dir = tempfile.mkdtemp(prefix="giblet-bench-rss-")
    ds = _probe_dataset_class()(path, split="train") if probe else GibletDataset(path, split="train")
    ds.probe_dir = probe_dir
    pin = device == "cuda"
    if kind == "GibletLoader":
        loader = GibletLoader(ds, batch_size=batch_size, num_workers=workers, world=World(0, 1), pin_memory=pin,
                              lanes=max(2, workers), group=group, persistent=warm)  # lanes: no chunk decoded twice
    else:
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=pin)
    for batch in (loader if warm else ()):  # the untimed first epoch (workers start, caches fill)
        batch["fmri"].numpy().sum()
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    samples = nbytes = 0
    for batch in loader:
        x = batch["fmri"]
        x = x.to("cuda", non_blocking=True) if device == "cuda" else x
        x.sum() if device == "cuda" else x.numpy().sum()  # read once (numpy sum on CPU, as the raw loop)
        samples += x.shape[0]
        nbytes += x.numel() * x.element_size()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0  # the workers are joined or still live
    if kind == "GibletLoader":
        loader.close()
    rss = [json.loads(p.read_text()) for p in Path(probe_dir).glob("*.json")]
    return {"seconds": seconds, "samples": samples, "bytes": nbytes, "workers_rss": rss, "cpu_s": cpu}


def rates(r: dict) -> dict:
    return {"samples_per_s": r["samples"] / r["seconds"], "MB_per_s": r["bytes"] / r["seconds"] / 1e6,
            "samples_per_cpu_s": r["samples"] / r["cpu_s"], "cpu_s": r["cpu_s"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--cache", default="/tmp/giblet-bench-dataset", help="where the store is built once")
    ap.add_argument("--build", choices=["engine", "direct"], default="engine",
                    help="engine: giblet.synth + the real fMRI stage; direct: same layout via giblet.store (zarr only)")
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each reader (median reported)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args(argv)

    import torch

    import giblet
    from giblet.data import GibletDataset, GibletLoader

    path = ensure_store(Path(args.cache), args.subjects, args.build)
    s = giblet.open_store(path)
    jobs, split = chunk_jobs(path), s.split["train"]
    _raw_read((path, jobs, *split))  # warm the page cache: every reader then reads from memory
    W = args.workers
    readers = {
        "raw_1proc": lambda: raw_loop(path, jobs, split, 1),
        f"raw_{W}proc": lambda: raw_loop(path, jobs, split, W),
        f"raw_DataLoader_{W}workers": lambda: raw_dataloader(path, jobs, split, W),
        "GibletLoader": lambda: run_loader(path, "GibletLoader", W, args.batch_size, args.device, warm=True),
        "GibletLoader_first_epoch": lambda: run_loader(path, "GibletLoader", W, args.batch_size, args.device),
        "GibletLoader_group1": lambda: run_loader(path, "GibletLoader", W, args.batch_size, args.device, warm=True,
                                                  group=1),
        "DataLoader": lambda: run_loader(path, "DataLoader", W, args.batch_size, args.device),
        "GibletLoader_0workers": lambda: run_loader(path, "GibletLoader", 0, args.batch_size, args.device),
        "transfer_only": lambda: ipc_floor(len(s.subjects) * (split[1] - split[0]), s.n_voxels, W, args.batch_size),
    }
    runs: dict[str, list] = {k: [] for k in readers}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every reader alike
        for name, read in readers.items():
            runs[name].append(read())
    med = {k: min(v, key=lambda r: abs(r["seconds"] - statistics.median(x["seconds"] for x in v)))
           for k, v in runs.items()}  # the median pass (its own CPU and bytes with it)
    probes = {kind: run_loader(path, "GibletLoader" if kind.startswith("GibletLoader") else "DataLoader",
                               0 if kind.endswith("0workers") else W, args.batch_size, args.device, probe=True,
                               warm=kind == "GibletLoader")
              for kind in ("GibletLoader", "DataLoader", "GibletLoader_0workers")}
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "store": str(path), "build": args.build,
        "subjects": len(s.subjects), "n_trs": s.n_trs, "n_voxels": s.n_voxels, "train_trs": split,
        "chunk_trs": int(s.array(f"fmri/{s.subjects[0]}/bold").chunks[0]), "workers": args.workers,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "group": GibletLoader(GibletDataset(path, split="train"), batch_size=args.batch_size, num_workers=W,
                              lanes=max(2, W)).group,  # batches per hand-over of the GibletLoader rows
        "results": {k: {**rates(r), "seconds": r["seconds"], "samples": r["samples"],
                        "all_seconds": [x["seconds"] for x in runs[k]]} for k, r in med.items()},
    }
    for kind in ("GibletLoader", "GibletLoader_first_epoch", "GibletLoader_group1", "DataLoader",
                 "GibletLoader_0workers", "transfer_only"):
        res = out["results"][kind]
        rss = probes.get(kind, {}).get("workers_rss", [])
        res["ratio_vs_raw_1proc"] = res["samples_per_s"] / out["results"]["raw_1proc"]["samples_per_s"]
        res["ratio_vs_raw_parallel"] = res["samples_per_s"] / out["results"][f"raw_{args.workers}proc"]["samples_per_s"]
        res["cpu_ratio_vs_raw_1proc"] = res["samples_per_cpu_s"] / out["results"]["raw_1proc"]["samples_per_cpu_s"]
        raw_dl = out["results"][f"raw_DataLoader_{args.workers}workers"]
        res["ratio_vs_raw_DataLoader"] = res["samples_per_s"] / raw_dl["samples_per_s"]
        res["cpu_ratio_vs_raw_DataLoader"] = res["samples_per_cpu_s"] / raw_dl["samples_per_cpu_s"]
        res["worker_peak_rss_MiB"] = sorted(round(w["peak_rss"] / 2**20, 1) for w in rss)
        res["worker_rss_growth_MiB"] = sorted(round((w["peak_rss"] - w["first_rss"]) / 2**20, 1) for w in rss)
        res["cache_bound_MiB"] = round(rss[0]["cache_bytes"] / 2**20, 1) if rss else None
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
