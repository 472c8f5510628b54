"""Streaming reads of a giblet store for training (PyTorch).

- :class:`GibletDataset`: map-style (subject, TR) samples read straight from Zarr chunks.
- :func:`partition`: the pure split of an epoch over ranks and dataloader workers.
- :class:`GibletLoader`: batches of one rank's share, ``state_dict()`` to resume mid-epoch.
- :func:`get_world`: rank and world size from ``torch.distributed`` / torchrun's environment.
- :func:`hrf_kernel`, :func:`hrf_convolve`: the causal Glover HRF the dataset applies.
"""
from giblet.data.context import hrf_convolve, hrf_kernel
from giblet.data.dataset import GibletDataset
from giblet.data.loader import GibletLoader
from giblet.data.partition import epoch_order, partition, rank_sequence, rank_share
from giblet.data.world import World, get_world, get_worker

__all__ = ["GibletDataset", "GibletLoader", "partition", "epoch_order", "rank_sequence", "rank_share",
           "World", "get_world", "get_worker", "hrf_kernel", "hrf_convolve"]
