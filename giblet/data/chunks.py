"""Reading a store in decoded chunks: the byte-bounded chunk cache each reading process keeps,
what a reader needs to know of an array, and batches stacked straight into (shared) tensors.
``giblet.data.dataset`` reads through these; ``giblet.data.loader`` sends small entries by value.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from torch.utils.data import get_worker_info


class ChunkCache:
    """Least-recently-used decoded chunks, bounded by their total bytes.

    The newest chunk is always kept, so the bound is ``max_bytes`` plus at most one chunk.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self.nbytes = self.hits = self.misses = 0

    def get(self, key, load: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = load()
        value.setflags(write=False)  # samples are copies or read-only views: nobody edits the cache
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            self.nbytes -= self._items.popitem(last=False)[1].nbytes
        return value


class ArrayInfo:
    """What a reader needs to know of one stored array (small, picklable)."""

    def __init__(self, arr):
        shards = getattr(arr, "shards", None)
        self.read_trs = int((shards or arr.chunks)[0])  # TRs decoded per read: a shard or a chunk
        self.tail = tuple(int(s) for s in arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)


WIRE_BYTES = 64 * 1024  # below this, a batch entry is sent by value (see ``GibletDataset.get_batch``)


def stack(arrays: list, wire: bool = False):
    """``np.stack`` into a new tensor -- in a DataLoader worker, one in shared memory, so that
    handing the batch to the main process copies nothing more (as ``default_collate`` does)."""
    first = np.asarray(arrays[0])
    shape = (len(arrays),) + first.shape
    if wire and first.nbytes * len(arrays) < WIRE_BYTES:
        return np.stack(arrays)
    out = torch.from_numpy(np.empty(0, dtype=first.dtype))
    if get_worker_info() is not None:
        storage = out._typed_storage()._new_shared(int(np.prod(shape)), device=out.device)
        out = out.new(storage).resize_(shape)
    else:
        out = out.new_empty(shape)
    np.stack(arrays, out=out.numpy())
    return out
