"""Image preprocessing in torch on the model's device, by the image processor's own settings.

Hugging Face image processors work image by image on the CPU (the PIL backend: ~10 ms a
frame at 224 px) or, with torchvision, per call with Python overhead per image. For the
plain "resize, (centre-crop), rescale, normalise" processors (ViT, DeiT, CLIP, SigLIP, BiT)
the same arithmetic is a few batched torch ops: one uint8 tensor per batch goes to the
device, is resized there (``interpolate(antialias=True)``: the closest torch has to PIL's
resampling), cropped, rescaled and normalised. Any other processor (or setting we do not
read) returns ``None`` from :func:`spec_of` and the caller keeps the processor itself:
it stays the reference (tests/test_pretrained.py checks that both paths agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

# processor classes whose __call__ is exactly resize -> [centre crop] -> rescale -> normalise
SUPPORTED = ("ViTImageProcessor", "DeiTImageProcessor", "CLIPImageProcessor", "SiglipImageProcessor",
             "BitImageProcessor")
MODES = {2: "bilinear", 3: "bicubic"}  # PIL resampling ids -> torch interpolate modes
TORCH = "torch"
PROCESSOR = "processor"


@dataclass(frozen=True)
class ImagePrep:
    """The settings read from an image processor (see :func:`spec_of`)."""

    size: tuple  # ("hw", h, w) or ("short", edge)
    mode: Optional[str]  # interpolate mode, None: no resize
    crop: Optional[tuple[int, int]]  # (h, w) or None
    scale: float  # 1.0 when do_rescale is False
    mean: tuple  # () when do_normalize is False
    std: tuple


def _get(d, key):
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def spec_of(processor) -> Optional[ImagePrep]:
    """The processor's settings if :func:`prepare` reproduces it, else None."""
    name = type(processor).__name__.removesuffix("Fast").removesuffix("Pil")
    if name not in SUPPORTED or getattr(processor, "do_pad", False):
        return None
    mode, size = None, None
    if getattr(processor, "do_resize", True):
        resample = getattr(processor, "resample", None)
        resample = getattr(resample, "value", resample)
        mode = MODES.get(resample if isinstance(resample, int) else None)
        s = processor.size
        h, w, short = _get(s, "height"), _get(s, "width"), _get(s, "shortest_edge")
        if mode is None or _get(s, "longest_edge"):
            return None
        size = ("hw", int(h), int(w)) if h and w else ("short", int(short)) if short else None
        if size is None:
            return None
    crop = None
    if getattr(processor, "do_center_crop", False):
        c = processor.crop_size
        crop = (int(_get(c, "height")), int(_get(c, "width")))
    normalize = getattr(processor, "do_normalize", True)
    return ImagePrep(size=size or ("none",), mode=mode, crop=crop,
                     scale=float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0,
                     mean=tuple(map(float, processor.image_mean)) if normalize else (),
                     std=tuple(map(float, processor.image_std)) if normalize else ())


def target_hw(spec: ImagePrep, h: int, w: int) -> tuple[int, int]:
    """The resized ``(h, w)`` (HF's rule for ``shortest_edge``: the long side ``int(edge * long / short)``)."""
    if spec.mode is None:
        return h, w
    if spec.size[0] == "hw":
        return spec.size[1], spec.size[2]
    edge = spec.size[1]
    return (edge, int(edge * w / h)) if h <= w else (int(edge * h / w), edge)


def fits(spec: ImagePrep, h: int, w: int) -> bool:
    """Whether the crop fits in the resized ``(h, w)`` frame (else HF pads: the processor's job)."""
    th, tw = target_hw(spec, h, w)
    return spec.crop is None or (spec.crop[0] <= th and spec.crop[1] <= tw)


def prepare(frames: list[np.ndarray], spec: ImagePrep, device: str) -> dict:
    """``{"pixel_values": (batch, 3, h, w) float32}`` on ``device`` from ``(h, w, 3) uint8`` RGB frames."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.stack(frames))
    if device.startswith("cuda"):
        x = x.pin_memory()
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    h, w = target_hw(spec, x.shape[2], x.shape[3])
    if (h, w) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(h, w), mode=spec.mode, antialias=True, align_corners=False)
        x = x.clamp_(0, 255) if spec.mode == "bicubic" else x  # PIL clips bicubic overshoot to uint8
    if spec.crop is not None:
        ch, cw = spec.crop
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[:, :, top:top + ch, left:left + cw]
    x = x * spec.scale
    if spec.mean:
        mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return {"pixel_values": x.contiguous()}
