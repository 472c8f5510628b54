"""Launched by tests/test_dataset.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Each rank iterates one epoch of GibletLoader over a real store and rank 0 writes every
rank's sample ids (gathered through the process group) to the JSON path given.
"""
import json
import sys

import torch.distributed as dist

from giblet.data import GibletDataset, GibletLoader, get_world


def main(store: str, out: str) -> None:
    dist.init_process_group("gloo")
    world = get_world()
    loader = GibletLoader(GibletDataset(store, split="train"), batch_size=5, num_workers=1, seed=11)
    ids = [i for batch in loader for i in batch["index"].tolist()]
    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, {"rank": world.rank, "ids": ids})
    if world.rank == 0:
        with open(out, "w") as fh:
            json.dump({"world_size": world.world_size, "ranks": [g["rank"] for g in gathered],
                       "ids": [g["ids"] for g in sorted(gathered, key=lambda g: g["rank"])]}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
