"""Average pooling of video frames, one function for the dataset and the model.

``GibletDataset(video_pool=...)`` pools frames in the DataLoader workers; the model's
``VideoPool`` pools uint8 frames it is given (on the GPU when there is one). Both call
:func:`pool_frames`, so a model sees the same input whichever side pooled.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pool_frames(frames: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(..., height, width, channel)`` frames -> ``(..., h, w, channel) float32`` [0, 1] pixels,
    average-pooled to ``size = (h, w)`` (``adaptive_avg_pool2d``). uint8 input is divided by
    255; float input is taken as [0, 1] pixels already (pooling to its own size keeps it)."""
    lead, (height, width, channels) = frames.shape[:-3], frames.shape[-3:]
    x = frames.reshape(-1, height, width, channels).permute(0, 3, 1, 2).float()  # (N, C, H, W)
    x = x.div_(255.0) if frames.dtype == torch.uint8 else x
    if (height, width) != tuple(size):
        x = F.adaptive_avg_pool2d(x, tuple(size))
    return x.permute(0, 2, 3, 1).reshape(*lead, *size, channels)
