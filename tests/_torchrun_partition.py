"""Launched by tests/test_dataset.py under `torchrun --nproc_per_node=N` (gloo, CPU).

    _torchrun_partition.py STORE OUT [BATCHES [STATE]]

Each rank iterates GibletLoader over a real store -- the whole epoch, or its first BATCHES
batches (``all``: the rest of the epoch) after loading STATE, a loader state (JSON) saved
by a run of another world size (elastic resume) -- and rank 0 writes every rank's sample
ids (gathered through the process group) and its loader state to the JSON path OUT.
"""
import json
import sys

import torch.distributed as dist

from giblet.data import GibletDataset, GibletLoader, get_world


def main(store: str, out: str, batches: str = "all", state: str = "") -> None:
    dist.init_process_group("gloo")
    world = get_world()
    loader = GibletLoader(GibletDataset(store, split="train"), batch_size=5, num_workers=1, seed=11)
    if state:
        with open(state) as fh:
            loader.load_state_dict(json.load(fh))
    it, n = iter(loader), len(loader) if batches == "all" else int(batches)
    ids = [i for _ in range(n) for i in next(it)["index"].tolist()]
    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, {"rank": world.rank, "ids": ids})
    if world.rank == 0:
        with open(out, "w") as fh:
            json.dump({"world_size": world.world_size, "ranks": [g["rank"] for g in gathered],
                       "ids": [g["ids"] for g in sorted(gathered, key=lambda g: g["rank"])],
                       "state": loader.state_dict()}, fh)
    loader.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
