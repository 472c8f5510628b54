"""All-reduce bandwidth between the GPUs of one host (NCCL), for a gradient of the GPU config's size.

The floor of DDP's per-step cost: every optimizer step all-reduces every gradient once.
Run under torchrun (one process per GPU)::

    torchrun --nproc_per_node 2 benchmarks/bench_allreduce.py --numel 893000000 --dtype float32
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=893_000_000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    x = torch.ones(args.numel, dtype=getattr(torch, args.dtype), device="cuda")
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.repeats
    nbytes = x.numel() * x.element_size()
    if rank == 0:  # bus bandwidth as nccl-tests defines it: 2 (n - 1) / n x bytes / time
        print(f"all_reduce {nbytes / 1e9:.2f} GB {args.dtype} over {world} GPUs: {seconds * 1e3:.1f} ms, "
              f"bus bandwidth {2 * (world - 1) / world * nbytes / seconds / 1e9:.0f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
