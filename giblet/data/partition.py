"""How one epoch's samples are split over ranks and dataloader workers: pure functions of integers.

Everything here is a function of its integer arguments only (no clock, no global RNG, no
torch), so every rank computes the same global order on its own and the split can be
tested over many geometries without a process group (mosaicml/streaming's ``partition``).

One epoch, step by step (:func:`epoch_order`, then :func:`rank_share`, then :func:`partition`;
step 5 only when a run is resumed with another number of ranks):

1. **Chunk-aware shuffle.** Sample ids ``0 .. n-1`` are grouped into *chunks*: runs of
   consecutive ids stored in one Zarr chunk (the dataset passes its layout as
   ``chunk_size``). The chunk order is shuffled; consecutive shuffled chunks are grouped
   ``mix_chunks`` at a time into *blocks*; samples are shuffled within each block. With
   ``mix_chunks=1`` this is exactly "shuffle chunk order, then within chunks"; larger
   values mix more (subject, time) stretches into each batch and need that many chunks
   in a reader's cache at once. The generator is ``np.random.default_rng([seed, epoch])``.
2. **Equal length per rank.** Every rank gets ``ceil(n / world_size)`` samples: the
   shuffled order is *padded by wrapping* (its first few samples are served twice this
   epoch). With ``drop_last=True`` every rank gets ``floor(n / world_size)`` rounded down to
   whole batches (every batch the same shape, as ``torch.compile`` wants), and the end of
   the shuffled order sits out this epoch (different samples each epoch). Rank ``r`` takes
   the ``r``-th contiguous slice, so it reads whole chunks.
3. **Lanes.** A rank's slice is cut into batches of ``batch_size`` and the batches into
   ``lanes`` contiguous stretches, whose *units* of ``group`` batches are interleaved
   (lane 0's unit 0, lane 1's unit 0, ..., lane 0's unit 1, ...). That interleaving is
   the rank's *sequence*: the order a loader delivers batches in.
4. **Workers.** The sequence is cut into units of ``group * batch_size`` samples (a
   worker reads and hands over a unit at a time: fewer, larger transfers). After
   skipping the first ``position`` samples (already consumed; the unit they end in is
   cut short), unit ``i`` of the rest goes to worker ``i % num_workers`` -- the order in
   which ``torch.utils.data.DataLoader`` collects worker outputs, so the delivered order
   *is* the sequence, whatever the number of workers. When ``num_workers`` divides
   ``lanes``, each worker reads its own lanes only: no chunk is decompressed by two workers.

So the samples consumed after ``position`` deliveries are always the first ``position``
of the rank's sequence, which depends on (seed, epoch, n, chunk layout, world_size,
batch_size, mix_chunks, lanes, group) and *not* on ``num_workers``: a run resumed with
another worker count gets exactly the remaining samples.

5. **Elastic resume** (:func:`remaining_order`). Every rank has consumed the same
   ``position`` (ranks deliver equal counts), so the samples of the epoch consumed by all
   ``N`` ranks are the union of the first ``position`` of each rank's sequence: a pure
   function of the integers above, nothing per rank needs recording. A run resumed with
   ``M != N`` ranks records that stretch as a *leg* ``(N, position)`` and splits what it
   left -- the epoch's order minus the consumed ids (minus, with ``drop_last``, the samples
   the ``N``-rank split had set aside), still in epoch order, so slices stay chunk-contiguous
   -- over ``M`` ranks by steps 2-4, as if it were a fresh epoch of that many samples. No
   sample consumed before is served again and none left is skipped, except by the same rule
   as any epoch: padding repeats up to ``M - 1`` ids of the remainder, ``drop_last`` sets
   out fewer than ``M * batch_size`` of them. A later change of world size in the same epoch
   adds another leg; the next epoch starts whole, over the new world size.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from giblet.errors import ConfigError

ChunkLayout = Union[int, Sequence[int]]
Leg = tuple[int, int]  # (world_size, position): a stretch of an epoch served under another world size


def _check(name: str, value: int, low: int) -> int:
    if int(value) != value or value < low:
        raise ConfigError(f"partition: {name}={value!r}; it must be an integer >= {low}")
    return int(value)


def chunk_sizes(n_samples: int, chunk_size: ChunkLayout) -> np.ndarray:
    """Lengths of the chunks that tile ``0 .. n_samples-1``.

    Args:
        chunk_size: one int (uniform chunks, the last one shorter) or the lengths of each
            chunk in id order (they must sum to ``n_samples``).

    Returns:
        ``(n_chunks,) int64``.
    """
    if np.ndim(chunk_size) == 0:
        size = _check("chunk_size", chunk_size, 1)
        full, rest = divmod(n_samples, size)
        return np.array([size] * full + ([rest] if rest else []), dtype=np.int64)
    sizes = np.asarray(chunk_size, dtype=np.int64)
    if sizes.sum() != n_samples or (sizes < 1).any():
        raise ConfigError(f"partition: chunk sizes sum to {int(sizes.sum())} (min {int(sizes.min(initial=0))}), "
                          f"not n_samples={n_samples}; pass positive lengths that tile the samples")
    return sizes


def epoch_order(n_samples: int, *, seed: int, epoch: int, shuffle: bool = True,
                chunk_size: ChunkLayout = 1, mix_chunks: int = 1) -> np.ndarray:
    """The global order of one epoch (step 1 of the module docstring).

    Returns:
        ``(n_samples,) int64`` permutation of the sample ids.
    """
    _check("n_samples", n_samples, 0)
    _check("mix_chunks", mix_chunks, 1)
    if not shuffle or n_samples == 0:
        return np.arange(n_samples, dtype=np.int64)
    sizes = chunk_sizes(n_samples, chunk_size)
    rng = np.random.default_rng([_check("seed", seed, 0), _check("epoch", epoch, 0)])
    chunk_rank = np.empty(len(sizes), dtype=np.int64)
    chunk_rank[rng.permutation(len(sizes))] = np.arange(len(sizes))
    block = np.repeat(chunk_rank // mix_chunks, sizes)
    # lexsort: primary key the block (shuffled chunk order), secondary a random key.
    return np.lexsort((rng.random(n_samples), block)).astype(np.int64)


def rank_share(n_samples: int, world_size: int, drop_last: bool = False, batch_size: int = 1) -> int:
    """Samples per rank per epoch: ``ceil(n / world_size)``, or with ``drop_last``
    ``floor(n / world_size)`` rounded down to a multiple of ``batch_size``."""
    _check("world_size", world_size, 1)
    if drop_last:
        return n_samples // world_size // _check("batch_size", batch_size, 1) * batch_size
    return -(-n_samples // world_size)


def rank_sequence(n_samples: int, *, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool = True,
                  chunk_size: ChunkLayout = 1, drop_last: bool = False, batch_size: int = 1,
                  mix_chunks: int = 1, lanes: int = 1, group: int = 1, legs: Sequence[Leg] = ()) -> np.ndarray:
    """Every sample rank ``rank`` serves this epoch, in delivery order (steps 1-3).

    ``legs``: earlier stretches of this epoch served under other world sizes (elastic
    resume, step 5); the sequence is then this rank's share of what they left.

    Returns:
        ``(rank_share(len(order), world_size, drop_last, batch_size),) int64`` sample ids, where
        ``order`` is the epoch's order (``n_samples`` long), or what ``legs`` left of it.
    """
    order = epoch_order(n_samples, seed=seed, epoch=epoch, shuffle=shuffle, chunk_size=chunk_size,
                        mix_chunks=mix_chunks)
    split = dict(drop_last=drop_last, batch_size=batch_size, lanes=lanes, group=group)
    return split_order(remaining_order(order, legs, **split), rank=rank, world_size=world_size, **split)


def split_order(order: np.ndarray, *, rank: int, world_size: int, drop_last: bool = False, batch_size: int = 1,
                lanes: int = 1, group: int = 1) -> np.ndarray:
    """Steps 2-3 on a given ``order``: rank ``rank``'s equal share of it, as its delivery sequence.

    Returns:
        ``(rank_share(len(order), world_size, drop_last, batch_size),) int64`` ids of ``order``.
    """
    _check("world_size", world_size, 1)
    if not 0 <= rank < world_size:
        raise ConfigError(f"partition: rank={rank} is outside 0..{world_size - 1} (world_size={world_size}); "
                          f"take rank and world_size from giblet.data.world.get_world()")
    batch_size, lanes, group = _check("batch_size", batch_size, 1), _check("lanes", lanes, 1), _check("group", group, 1)
    per_rank = rank_share(len(order), world_size, drop_last, batch_size)
    if per_rank == 0:
        return np.zeros(0, dtype=np.int64)
    padded = np.resize(order, per_rank * world_size)  # np.resize repeats cyclically: pad by wrap
    mine = padded[rank * per_rank:(rank + 1) * per_rank]
    batches = [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]
    per_lane = -(-len(batches) // lanes)
    lane_units = [[np.concatenate(lane[u:u + group]) for u in range(0, len(lane), group)]
                  for lane in (batches[j * per_lane:(j + 1) * per_lane] for j in range(lanes)) if lane]
    n_units = max(map(len, lane_units))
    return np.concatenate([lane[u] for u in range(n_units) for lane in lane_units if u < len(lane)])


def remaining_order(order: np.ndarray, legs: Sequence[Leg], *, drop_last: bool = False, batch_size: int = 1,
                    lanes: int = 1, group: int = 1) -> np.ndarray:
    """What an epoch's ``order`` still has to serve after ``legs`` (step 5), in its order.

    Args:
        order: ``(k,) int64`` distinct ids: the epoch's order (:func:`epoch_order`).
        legs: ``(world_size, position)`` pairs, oldest first: ``order`` was split over
            ``world_size`` ranks (steps 2-3) and every rank consumed the first ``position``
            samples of its sequence; the next leg splits what that left, and so on.

    Returns:
        ``(j,) int64`` distinct ids: those the legs' splits serve (all of ``order`` when padding;
        with ``drop_last``, the part the split keeps) minus those consumed.
    """
    for world_size, position in legs:
        world_size, position = _check("world_size", world_size, 1), _check("position", position, 0)
        per_rank = rank_share(len(order), world_size, drop_last, batch_size)
        if position > per_rank:
            raise ConfigError(f"partition: a leg of {world_size} rank(s) consumed {position} samples each, past the "
                              f"{per_rank} each had; the saved loader state belongs to another dataset")
        consumed = np.concatenate([np.zeros(0, dtype=np.int64)] + [
            split_order(order, rank=r, world_size=world_size, drop_last=drop_last, batch_size=batch_size,
                        lanes=lanes, group=group)[:position] for r in range(world_size)])
        served = order[:per_rank * world_size] if drop_last else order  # padding only repeats ids
        order = served[~np.isin(served, consumed)]
    return order


def unit_bounds(n: int, position: int, unit: int) -> np.ndarray:
    """Start and end of the delivery units of a sequence of ``n`` samples after ``position``:
    cut at multiples of ``unit`` (the first one short when ``position`` is inside a unit).

    Returns:
        ``(k + 1,) int64``: unit ``i`` is ``[bounds[i], bounds[i + 1])``.
    """
    if position >= n:
        return np.array([n], dtype=np.int64)
    return np.array([position, *range((position // unit + 1) * unit, n, unit), n], dtype=np.int64)


def partition(n_samples: int, *, rank: int, world_size: int, worker: int = 0, num_workers: int = 1,
              seed: int = 0, epoch: int = 0, shuffle: bool = True, chunk_size: ChunkLayout = 1,
              drop_last: bool = False, batch_size: int = 1, mix_chunks: int = 1, lanes: int = 1,
              group: int = 1, position: int = 0, legs: Sequence[Leg] = ()) -> np.ndarray:
    """The sample ids one (rank, worker) reads this epoch, in order.

    Args:
        n_samples: samples in the epoch (e.g. ``len(GibletDataset(...))``).
        rank, world_size: this process and the number of processes (see ``giblet.data.world``).
        worker, num_workers: this dataloader worker and the worker count (0 workers = 1).
        seed, epoch: the only inputs of the shuffle.
        shuffle: False keeps id order (still split and padded the same way).
        chunk_size: the storage layout, an int or per-chunk lengths (see :func:`chunk_sizes`).
        drop_last: drop instead of pad to equalize ranks, and keep whole batches only (step 2).
        batch_size: samples handed to a worker at a time.
        mix_chunks: chunks shuffled together (step 1).
        lanes: interleaved stretches of each rank's slice (step 3).
        group: batches per unit, the amount a worker reads and hands over at once (steps 3-4).
        position: samples of this rank's sequence already consumed (resume point).
        legs: earlier stretches of this epoch under other world sizes (step 5); ``position``
            then counts in the sequence of what they left.

    Returns:
        ``(k,) int64`` sample ids; worker ``w`` reads units ``w, w + num_workers, ...`` of
        ``rank_sequence(...)[position:]`` (:func:`unit_bounds`), one after the other.
    """
    num_workers = _check("num_workers", num_workers, 1)
    if not 0 <= worker < num_workers:
        raise ConfigError(f"partition: worker={worker} is outside 0..{num_workers - 1}")
    seq = rank_sequence(n_samples, rank=rank, world_size=world_size, seed=seed, epoch=epoch, shuffle=shuffle,
                        chunk_size=chunk_size, drop_last=drop_last, batch_size=batch_size,
                        mix_chunks=mix_chunks, lanes=lanes, group=group, legs=legs)
    position = _check("position", position, 0)
    if position > len(seq):
        raise ConfigError(f"partition: position={position} is past the end of this rank's epoch "
                          f"({len(seq)} samples); the saved loader state belongs to another dataset or world size")
    bounds = unit_bounds(len(seq), position, group * batch_size)
    mine = [seq[a:b] for a, b in zip(bounds[worker:-1:num_workers], bounds[worker + 1::num_workers])]
    return np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
