"""Streaming reads of a giblet store for training.

- :class:`GibletDataset`: map-style (subject, run, TR) samples read straight from Zarr chunks.
- :func:`partition`: the pure split of an epoch over ranks and dataloader workers.
- :class:`GibletLoader`: batches of one rank's share, ``state_dict()`` to resume mid-epoch.
- :func:`get_world`: rank and world size from ``torch.distributed`` / torchrun's environment.
- :func:`hrf_kernel`, :func:`hrf_convolve`: the causal Glover HRF the dataset applies.

``partition``, ``world`` and ``context`` need numpy only; the dataset and loader import
torch when first used, so numpy/xarray users never pay for (or need) PyTorch.
"""
from giblet.data.context import hrf_convolve, hrf_kernel
from giblet.data.partition import epoch_order, partition, rank_sequence, rank_share
from giblet.data.world import World, get_world, get_worker

_TORCH = {"GibletDataset": "giblet.data.dataset", "GibletLoader": "giblet.data.loader"}

__all__ = ["GibletDataset", "GibletLoader", "partition", "epoch_order", "rank_sequence", "rank_share",
           "World", "get_world", "get_worker", "hrf_kernel", "hrf_convolve"]


def __getattr__(name: str):
    if name in _TORCH:
        import importlib

        return getattr(importlib.import_module(_TORCH[name]), name)
    raise AttributeError(f"module 'giblet.data' has no attribute {name!r}")
