"""``GibletLoader``: one rank's batches of each epoch, resumable mid-epoch.

It wraps ``torch.utils.data.DataLoader``: each worker computes its own share with
:func:`giblet.data.partition` (nothing but integers cross process boundaries) and yields
collated batches; the DataLoader collects them round-robin, which is exactly the rank's
sequence order (see ``giblet.data.partition``). One DataLoader stream runs across epochs,
so workers are started once per run, not once per epoch. So after ``k`` delivered samples the
consumed ones are the first ``k`` of the sequence, and ``{"epoch", "position", "seed"}``
is all it takes to resume -- with any number of workers.

All ranks deliver the same number of batches per epoch and so share one ``position``:
rank 0's ``state_dict()`` resumes every rank -- under the same world size, or another one
(elastic: the epoch's remaining samples are split over the new ranks exactly,
``giblet.data.partition`` step 5; the state's ``legs`` record the stretches of the epoch
served under earlier world sizes).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from giblet.data.chunks import WIRE_BYTES
from giblet.data.partition import ChunkLayout, Leg, partition, rank_sequence, rank_share, unit_bounds
from giblet.data.world import World, get_world, get_worker
from giblet.errors import ConfigError

# Keys of the state that fix the order of an epoch's samples (besides seed and epoch).
# ("group" also shapes the order, but a resumed loader adopts the saved one; a saved world_size
# that differs becomes a leg of the epoch: see load_state_dict.)
ORDER_KEYS = ("n_samples", "batch_size", "shuffle", "drop_last", "mix_chunks", "lanes", "chunks")
# A worker hands over up to this many bytes (and at most MAX_GROUP batches) at once: each hand-over
# is a shared-memory segment plus a file-descriptor exchange, a fixed cost that small batches feel.
TRANSFER_BYTES, MAX_GROUP = 32 * 2**20, 8


class _Stream(IterableDataset):
    """The batches one worker reads, from ``(epoch, position)`` on, epoch after epoch (endless).

    Worker ``w`` serves deliveries ``w, w + W, ...`` counted from the start of the stream.
    Epochs need not hold a multiple of ``W`` batches, so within an epoch that starts after
    ``done`` deliveries the worker takes the share of worker ``(w - done) % W`` of
    ``partition``: the round-robin that ``DataLoader`` collects in stays the sequence order
    across epoch boundaries, and the workers (with their chunk caches) live on.
    """

    def __init__(self, dataset, order: dict, epoch: int, position: int, collate_fn: Optional[Callable],
                 transform: Optional[Callable], legs: tuple = ()):
        self.dataset, self.order, self.epoch, self.position = dataset, order, epoch, position
        self.collate_fn, self.transform, self.legs = collate_fn, transform, legs  # legs: of the first epoch only

    def __iter__(self) -> Iterator:
        worker, num_workers = get_worker()
        in_worker = get_worker_info() is not None
        unit = self.order["batch_size"] * self.order["group"]
        step = unit if in_worker else self.order["batch_size"]
        epoch, position, done, legs = self.epoch, self.position, 0, self.legs
        while True:
            seq = rank_sequence(**self.order, epoch=epoch, legs=legs)  # what partition() splits, kept in units here
            bounds = unit_bounds(len(seq), position, unit)
            for u in range((worker - done) % num_workers, len(bounds) - 1, num_workers):
                a, b = bounds[u], bounds[u + 1]
                for start in range(a, b, step):  # a whole unit per hand-over; in-process, a batch at a time
                    yield self._batch(seq[start:min(start + step, b)], in_worker)
            done += len(bounds) - 1
            if len(seq) == 0 and not legs:  # nothing to serve, ever: end rather than spin
                return
            epoch, position, legs = epoch + 1, 0, ()

    def _batch(self, ids: np.ndarray, in_worker: bool):
        if self.collate_fn is None and hasattr(self.dataset, "get_batch"):
            batch = self.dataset.get_batch(ids, wire=in_worker)  # rows copied once
        else:
            batch = (self.collate_fn or default_collate)([self.dataset[int(i)] for i in ids])
        if self.transform is not None:
            batch = self.transform(_tensors(batch))
            if in_worker:
                batch = _wire(batch)
        return batch


def _tensors(batch):
    """Numpy entries of a batch (small ones sent by value) as tensors, without copying."""
    if isinstance(batch, dict):
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    return batch


def _wire(batch):
    """Small private tensors of a batch as numpy, so they cross the worker queue by value."""
    if not isinstance(batch, dict):
        return batch
    return {k: v.numpy() if isinstance(v, torch.Tensor) and not v.is_shared() and not v.requires_grad
            and v.nbytes < WIRE_BYTES else v for k, v in batch.items()}


class GibletLoader:
    """Iterate batches of one rank's share of each epoch; ``state_dict()`` resumes mid-epoch.

    Iterating runs the rest of the current epoch (from ``position``) and then advances
    ``epoch``; breaking out early keeps the position, so the next iteration continues.

    Args:
        dataset: a map-style dataset (``GibletDataset``; its ``chunk_sizes`` drive the
            chunk-aware shuffle, any other dataset is treated as one-sample chunks).
        batch_size: samples per batch (the last batch of an epoch may be smaller, unless ``drop_last``).
        num_workers: DataLoader worker processes (0: read in this process).
        seed: shuffle seed; the order of an epoch depends on (seed, epoch) only.
        shuffle, drop_last, mix_chunks, lanes: see ``giblet.data.partition``. ``lanes``
            should be a multiple of ``num_workers`` so that no two workers read one chunk;
            each process then reads ``lanes / num_workers * mix_chunks`` chunks at a time,
            which the dataset's default cache (8 chunks per array) holds for the defaults.
        world: rank and world size (default: ``giblet.data.world.get_world()``).
        collate_fn: batches a list of samples (default: the dataset's ``get_batch`` if it has
            one -- same result as ``default_collate``, one copy less -- else ``default_collate``).
        transform: applied to each collated batch (a dict of tensors) where it is made, i.e.
            in the worker: the place for per-batch work such as adding axes or targets.
        group: batches a worker reads and hands over at once (the main process splits them).
            Default: when every worker reads one lane of its own (``lanes == num_workers``)
            and batches come from the dataset's ``get_batch``, as many as fit in 32 MiB (at
            most 8); else 1 (a process alternating between lanes unit by unit would need a
            larger chunk cache). It is part of the sample order (``giblet.data.partition``,
            steps 3-4), so ``load_state_dict`` adopts the saved value.
        persistent: keep one stream of batches running across epochs (default), so workers,
            their open store and their chunk caches live for the whole run and the next
            epoch's first batches are read while this one ends. ``set_epoch`` or
            ``load_state_dict`` to another point restarts it; ``close()`` stops the workers.
            ``False``: new workers each epoch, as a plain ``DataLoader``.
        **dataloader_kwargs: passed to ``DataLoader`` (``pin_memory``, ``prefetch_factor``,
            ``multiprocessing_context``, ...).
    """

    def __init__(self, dataset, *, batch_size: int = 16, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, mix_chunks: int = 2, lanes: int = 2, world: Optional[World] = None,
                 collate_fn: Optional[Callable] = None, transform: Optional[Callable] = None,
                 group: Optional[int] = None, persistent: bool = True, **dataloader_kwargs):
        if int(num_workers) != num_workers or num_workers < 0:
            raise ConfigError(f"GibletLoader: num_workers={num_workers!r}; it must be an integer >= 0")
        self.dataset, self.num_workers = dataset, int(num_workers)
        self.world = world or get_world()
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.mix_chunks, self.lanes = mix_chunks, lanes
        self.chunk_size: ChunkLayout = getattr(dataset, "chunk_sizes", 1)
        self.collate_fn, self.transform, self.persistent = collate_fn, transform, bool(persistent)
        self.group = self._auto_group() if group is None else group
        self.dataloader_kwargs = dataloader_kwargs
        self.epoch, self.position = 0, 0
        self.legs: tuple[Leg, ...] = ()  # stretches of this epoch served under other world sizes (elastic resume)
        self._share: dict = {}  # (epoch, legs) -> this rank's samples in that epoch
        self._it: Optional[Iterator] = None  # the live stream; it always serves (epoch, position) next
        self._order(0)  # validate the arguments now, not in a worker

    # -- order ------------------------------------------------------------------------------
    def _auto_group(self) -> int:
        """Batches per hand-over: only batches made by ``get_batch`` (the loader splits those
        itself) read by workers with one lane each, as many as fit in ``TRANSFER_BYTES``."""
        if (self.collate_fn is not None or self.transform is not None or not hasattr(self.dataset, "sample_spec")
                or self.num_workers == 0 or self.lanes != self.num_workers):
            return 1
        row = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                  for shape, dtype in self.dataset.sample_spec().values())
        return int(np.clip(TRANSFER_BYTES // max(row * self.batch_size, 1), 1, MAX_GROUP))

    def _order(self, epoch: int) -> dict:
        order = dict(n_samples=len(self.dataset), rank=self.world.rank, world_size=self.world.world_size,
                     seed=self.seed, epoch=epoch, shuffle=self.shuffle, chunk_size=self.chunk_size,
                     drop_last=self.drop_last, batch_size=self.batch_size, mix_chunks=self.mix_chunks,
                     lanes=self.lanes, group=self.group)
        partition(**order)  # raises ConfigError on bad values, here rather than in a worker
        return order

    def _geometry(self) -> dict:
        chunks = self.chunk_size if np.ndim(self.chunk_size) == 0 else list(map(int, self.chunk_size))
        return {"n_samples": len(self.dataset), "world_size": self.world.world_size, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "mix_chunks": self.mix_chunks,
                "lanes": self.lanes, "group": self.group, "chunks": chunks}

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank delivers per whole epoch (equal on every rank)."""
        return rank_share(len(self.dataset), self.world.world_size, self.drop_last, self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch on this rank (equal on every rank): count LR steps with it."""
        return self.batches_per_epoch_at(self.world.world_size)

    def batches_per_epoch_at(self, world_size: int) -> int:
        """Batches of a whole epoch per rank had the run ``world_size`` ranks (an elastic resume
        keeps the LR schedule its first world size resolved)."""
        return -(-rank_share(len(self.dataset), world_size, self.drop_last, self.batch_size) // self.batch_size)

    def _epoch_samples(self) -> int:
        """Samples this rank delivers in the current epoch: a whole epoch's, or after an elastic
        resume its share of what the legs left."""
        key = (self.epoch, self.legs, self.seed, self.group)
        if key not in self._share:
            self._share = {key: self._samples_in(*key)}
        return self._share[key]

    def _samples_in(self, epoch: int, legs: tuple, seed: int, group: int) -> int:
        if not legs:
            return self.samples_per_epoch
        order = {**self._order(epoch), "seed": seed, "group": group}
        return len(rank_sequence(**order, legs=legs))  # raises ConfigError for a leg past its share

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return -(-(self._epoch_samples() - self.position) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a live stream elsewhere is stopped and restarted there)."""
        if (int(epoch), 0, ()) != (self.epoch, self.position, self.legs):
            self.close()
        self.epoch, self.position, self.legs = int(epoch), 0, ()

    # -- iteration --------------------------------------------------------------------------
    def _start(self) -> Iterator:
        """A new stream from (epoch, position): a ``DataLoader`` over :class:`_Stream`."""
        self.close()
        order = {k: v for k, v in self._order(self.epoch).items() if k != "epoch"}
        stream = _Stream(self.dataset, order, self.epoch, self.position, self.collate_fn, self.transform, self.legs)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, **self.dataloader_kwargs))

    def __iter__(self) -> Iterator:
        total = self._epoch_samples()
        if self.position >= total:  # nothing left of this epoch (e.g. a state saved at its very end)
            self.epoch, self.position, self.legs = self.epoch + 1, 0, ()
            return
        if self._it is None:
            self._it = self._start()
        it = self._it
        while True:
            for batch in self._split(_tensors(next(it))):  # small entries came by value as numpy
                # Delivered in sequence order, so this batch's size follows from the position alone.
                self.position += min(self.batch_size, total - self.position)
                if self.position == total:
                    self.epoch, self.position, self.legs = self.epoch + 1, 0, ()
                    if not self.persistent:
                        self.close()
                    yield batch
                    return
                yield batch

    def _split(self, unit):
        """The batches of one delivered unit (views: one shared-memory segment per unit)."""
        if self.group == 1 or not isinstance(unit, dict):
            yield unit
            return
        n = len(next(iter(unit.values())))
        for a in range(0, n, self.batch_size):
            yield {k: v[a:a + self.batch_size] for k, v in unit.items()}

    def close(self) -> None:
        """Stop the stream's worker processes (the next iteration starts new ones)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the DataLoader cleans up after itself
            pass

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "order", "legs"}``: ``position`` samples of ``epoch`` are
        consumed (on every rank); ``order`` records what fixed the sample order, checked on load;
        ``legs``: ``[world_size, position]`` of stretches of the epoch served under earlier world
        sizes (``giblet.data.partition`` step 5; empty unless the run was resumed elastically)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "order": self._geometry(),
                "legs": [list(leg) for leg in self.legs]}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration serves exactly the samples of ``state["epoch"]`` not yet consumed.

        The worker count may differ from the run that saved the state, and so may the world
        size: ``position`` samples consumed on each of the saved ranks become a leg of the
        epoch, and this rank serves its equal share of what is left (every rank of the new
        world computes the same split). Settings that change the order of the epoch may not
        differ, unless nothing of it was consumed yet; the saved ``group`` is adopted.
        """
        position = int(state["position"])
        legs = tuple((int(w), int(p)) for w, p in state.get("legs", ()))
        saved = state.get("order", {})
        mine = self._geometry()
        diff = {k: (saved[k], mine[k]) for k in ORDER_KEYS if k in saved and saved[k] != mine[k]}
        if (position or legs) and diff:
            shown = "; ".join(f"{k}: saved {a}, now {b}" if k != "chunks" else "chunk layout differs"
                              for k, (a, b) in diff.items())
            raise ConfigError(f"GibletLoader.load_state_dict: the saved epoch {state['epoch']} is {position} samples "
                              f"in, but the sample order differs ({shown}); resume with the saved settings, or "
                              f"start the next epoch with set_epoch({int(state['epoch']) + 1})")
        saved_world = int(saved.get("world_size", self.world.world_size))
        if position and saved_world != self.world.world_size:  # elastic: what the saved ranks consumed is a leg
            legs, position = legs + ((saved_world, position),), 0
        epoch, seed, group = int(state["epoch"]), int(state["seed"]), int(saved.get("group", self.group))
        total = self._samples_in(epoch, legs, seed, group)
        if position > total:
            raise ConfigError(f"GibletLoader.load_state_dict: position {position} is past this rank's epoch of "
                              f"{total} samples; the state belongs to another dataset")
        self.close()
        self.group, self.seed, self.epoch, self.legs, self.position = group, seed, epoch, legs, position
