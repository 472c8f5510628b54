"""``GibletLoader``: one rank's batches of each epoch, resumable mid-epoch.

It wraps ``torch.utils.data.DataLoader``: each worker computes its own share with
:func:`giblet.data.partition` (nothing but integers cross process boundaries) and yields
collated batches; the DataLoader collects them round-robin, which is exactly the rank's
sequence order (see ``giblet.data.partition``). So after ``k`` delivered samples the
consumed ones are the first ``k`` of the sequence, and ``{"epoch", "position", "seed"}``
is all it takes to resume -- with any number of workers.

All ranks deliver the same number of batches per epoch and so share one ``position``:
rank 0's ``state_dict()`` resumes every rank.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from giblet.data.partition import ChunkLayout, partition, rank_share
from giblet.data.world import World, get_world, get_worker
from giblet.errors import ConfigError

# Keys of the state that fix the order of an epoch's samples (besides seed and epoch).
ORDER_KEYS = ("n_samples", "world_size", "batch_size", "shuffle", "drop_last", "mix_chunks", "lanes", "chunks")


class _EpochStream(IterableDataset):
    """The batches one worker reads: an iterable view over a map-style dataset."""

    def __init__(self, dataset, order: dict, position: int, collate_fn: Optional[Callable]):
        self.dataset, self.order, self.position, self.collate_fn = dataset, order, position, collate_fn

    def __iter__(self) -> Iterator:
        worker, num_workers = get_worker()
        ids = partition(**self.order, worker=worker, num_workers=num_workers, position=self.position)
        step = self.order["batch_size"]
        for start in range(0, len(ids), step):
            yield self._batch(ids[start:start + step])

    def _batch(self, ids: np.ndarray):
        if self.collate_fn is None and hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(ids, wire=get_worker_info() is not None)  # rows copied once
        return (self.collate_fn or default_collate)([self.dataset[int(i)] for i in ids])


class GibletLoader:
    """Iterate batches of one rank's share of each epoch; ``state_dict()`` resumes mid-epoch.

    Iterating runs the rest of the current epoch (from ``position``) and then advances
    ``epoch``; breaking out early keeps the position, so the next iteration continues.

    Args:
        dataset: a map-style dataset (``GibletDataset``; its ``chunk_sizes`` drive the
            chunk-aware shuffle, any other dataset is treated as one-sample chunks).
        batch_size: samples per batch (the last batch of an epoch may be smaller).
        num_workers: DataLoader worker processes (0: read in this process).
        seed: shuffle seed; the order of an epoch depends on (seed, epoch) only.
        shuffle, drop_last, mix_chunks, lanes: see ``giblet.data.partition``. ``lanes``
            should be a multiple of ``num_workers`` so that no two workers read one chunk;
            each process then reads ``lanes / num_workers * mix_chunks`` chunks at a time,
            which the dataset's default cache (8 chunks per array) holds for the defaults.
        world: rank and world size (default: ``giblet.data.world.get_world()``).
        collate_fn: batches a list of samples (default: the dataset's ``get_batch`` if it has
            one -- same result as ``default_collate``, one copy less -- else ``default_collate``).
        **dataloader_kwargs: passed to ``DataLoader`` (``pin_memory``, ``prefetch_factor``,
            ``multiprocessing_context``, ...).
    """

    def __init__(self, dataset, *, batch_size: int = 16, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, mix_chunks: int = 2, lanes: int = 2, world: Optional[World] = None,
                 collate_fn: Optional[Callable] = None, **dataloader_kwargs):
        if int(num_workers) != num_workers or num_workers < 0:
            raise ConfigError(f"GibletLoader: num_workers={num_workers!r}; it must be an integer >= 0")
        self.dataset, self.num_workers = dataset, int(num_workers)
        self.world = world or get_world()
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.mix_chunks, self.lanes = mix_chunks, lanes
        self.chunk_size: ChunkLayout = getattr(dataset, "chunk_sizes", 1)
        self.collate_fn = collate_fn
        self.dataloader_kwargs = dataloader_kwargs
        self.epoch, self.position = 0, 0
        self._order(0)  # validate the arguments now, not in a worker

    # -- order ------------------------------------------------------------------------------
    def _order(self, epoch: int) -> dict:
        order = dict(n_samples=len(self.dataset), rank=self.world.rank, world_size=self.world.world_size,
                     seed=self.seed, epoch=epoch, shuffle=self.shuffle, chunk_size=self.chunk_size,
                     drop_last=self.drop_last, batch_size=self.batch_size, mix_chunks=self.mix_chunks,
                     lanes=self.lanes)
        partition(**order)  # raises ConfigError on bad values, here rather than in a worker
        return order

    def _geometry(self) -> dict:
        chunks = self.chunk_size if np.ndim(self.chunk_size) == 0 else list(map(int, self.chunk_size))
        return {"n_samples": len(self.dataset), "world_size": self.world.world_size, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "mix_chunks": self.mix_chunks,
                "lanes": self.lanes, "chunks": chunks}

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank delivers per epoch (equal on every rank)."""
        return rank_share(len(self.dataset), self.world.world_size, self.drop_last)

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch on this rank (equal on every rank): count LR steps with it."""
        return -(-self.samples_per_epoch // self.batch_size)

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return -(-(self.samples_per_epoch - self.position) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self.position = int(epoch), 0

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        stream = _EpochStream(self.dataset, self._order(self.epoch), self.position, self.collate_fn)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, **self.dataloader_kwargs)
        total = self.samples_per_epoch
        for batch in loader:
            # Delivered in sequence order, so this batch's size follows from the position alone.
            self.position += min(self.batch_size, total - self.position)
            if isinstance(batch, dict):  # small entries came by value as numpy (get_batch(wire=True))
                batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "order"}``: ``position`` samples of ``epoch`` are consumed;
        ``order`` records what fixed the sample order, checked on load."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "order": self._geometry()}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration serves exactly the samples of ``state["epoch"]`` not yet consumed.

        The worker count may differ from the run that saved the state. Settings that change
        the order of the epoch may not, unless nothing of it was consumed yet (``position`` 0).
        """
        position = int(state["position"])
        saved = state.get("order", {})
        mine = self._geometry()
        diff = {k: (saved[k], mine[k]) for k in ORDER_KEYS if k in saved and saved[k] != mine[k]}
        if position and diff:
            shown = "; ".join(f"{k}: saved {a}, now {b}" if k != "chunks" else "chunk layout differs"
                              for k, (a, b) in diff.items())
            raise ConfigError(f"GibletLoader.load_state_dict: the saved epoch {state['epoch']} is {position} samples "
                              f"in, but the sample order differs ({shown}); resume with the saved settings, or "
                              f"start the next epoch with set_epoch({int(state['epoch']) + 1})")
        if position > self.samples_per_epoch:
            raise ConfigError(f"GibletLoader.load_state_dict: position {position} is past this rank's epoch of "
                              f"{self.samples_per_epoch} samples; the state belongs to another dataset")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), position
