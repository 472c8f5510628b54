"""EnCodec's encoder and quantizer in plain torch, read from a ``save_pretrained`` folder
without importing transformers.

Why: an audio worker that imports transformers' modelling code and builds the whole
``EncodecModel`` (decoder, codebook statistics, weight-norm parametrizations) holds ~0.3 GB
it never encodes with. This module reads only the encoder's and the codebooks' tensors
(``safetensors``, or a ``pytorch_model.bin``), folds each weight norm once, and describes the
encoder as a list of layers (``Spec``) that two runners share:

* ``reference`` -- the eager fp32 encode, op for op as transformers' ``EncodecModel.encode``
  (``(batch, channel, time)`` layout, ``conv1d`` after the same padding, the LSTM's residual,
  the quantizer's distance formula): tests assert its codes and embeddings are *equal* to
  transformers' own, and the stage records the stream path's agreement against it;
* ``giblet.features.encodec_stream.StreamEncoder`` -- the fast CPU path.

The layer list is built from ``config.json`` the way ``EncodecEncoder.__init__`` builds it;
a checkpoint whose encoder weights do not fit that list raises ``Unsupported`` (the stage
then falls back to transformers' own model, and says so).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np

from giblet.errors import InputError

# transformers' EncodecConfig defaults (tests/test_audio_speed.py checks them against the
# installed transformers): older config.json files omit keys that equal them.
DEFAULTS = {
    "sampling_rate": 24000, "audio_channels": 1, "num_filters": 32, "upsampling_ratios": [8, 5, 4, 2],
    "kernel_size": 7, "last_kernel_size": 7, "residual_kernel_size": 3, "dilation_growth_rate": 2,
    "num_residual_layers": 1, "compress": 2, "num_lstm_layers": 2, "use_conv_shortcut": True, "pad_mode": "reflect",
    "norm_type": "weight_norm", "use_causal_conv": True, "hidden_size": 128, "codebook_size": 1024,
    "codebook_dim": None, "target_bandwidths": [1.5, 3.0, 6.0, 12.0, 24.0], "normalize": False,
    "chunk_length_s": None,
}


class Unsupported(Exception):
    """The model has a layer or setting these runners do not reproduce (the stage falls back)."""


def config_of(cfg: dict) -> SimpleNamespace:
    """``config.json`` with transformers' defaults filled in, as attributes."""
    full = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k not in DEFAULTS}}
    full["codebook_dim"] = full["codebook_dim"] or full["hidden_size"]
    return SimpleNamespace(**full)


def stream_reason(cfg: SimpleNamespace, device: str) -> Optional[str]:
    """Why the stream path cannot run a model of config ``cfg`` on ``device`` (None: it can)."""
    if not cfg.use_causal_conv:
        return "the model is not causal (use_causal_conv=false): its chunks would need right context"
    if cfg.norm_type != "weight_norm":
        return f"norm_type={cfg.norm_type}: only weight-normed convolutions stream"
    if device != "cpu":
        return "the model is not on the CPU"
    if cfg.normalize or cfg.chunk_length_s is not None or cfg.audio_channels != 1:
        return "a chunked/normalized or stereo model"
    return None


# -- the layers --------------------------------------------------------------------------------

@dataclass
class Conv:
    """A causal ``EncodecConv1d``, its weight norm folded: ``weight`` is ``(out, in, kernel)``."""

    weight: object  # torch.Tensor
    bias: object
    stride: int
    dilation: int
    pad_mode: str

    @property
    def kernel(self) -> int:
        """The effective (dilated) kernel length."""
        return (self.weight.shape[-1] - 1) * self.dilation + 1

    def extra(self, n: int) -> int:
        """Right padding that makes the last frame whole (transformers' rule, in integers)."""
        pad_total = self.kernel - self.stride
        frames = -(-(n - self.kernel + pad_total) // self.stride)
        return frames * self.stride + self.kernel - pad_total - n

    def __call__(self, x):
        """``(batch, channel, time)``, as transformers' ``EncodecConv1d.forward``."""
        import torch.nn.functional as F

        x = pad1d(x, self.kernel - self.stride, self.extra(x.shape[-1]), self.pad_mode)
        return F.conv1d(x, self.weight.contiguous(), self.bias, self.stride, dilation=self.dilation)


def pad1d(x, left: int, right: int, mode: str):
    """transformers' ``EncodecConv1d._pad1d`` on the last axis (zeros first for a short reflect)."""
    import torch.nn.functional as F

    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    if extra:
        x = F.pad(x, (0, extra))
    x = F.pad(x, (left, right), mode)
    return x[..., : x.shape[-1] - extra]


@dataclass
class Residual:
    """``EncodecResnetBlock``: ELU/conv pairs, plus a 1x1 shortcut convolution (or identity)."""

    block: list  # "elu" and Conv, in order
    shortcut: Optional[Conv]


@dataclass
class Spec:
    """One EnCodec model's encoder and codebooks, ready to encode (see the module docstring)."""

    config: SimpleNamespace
    layers: list  # Conv | Residual | "elu" | torch.nn.LSTM, in order
    codebooks: list  # per quantizer, (codebook_size, codebook_dim) float32
    giblet_weights_hash: str = ""  # recorded in the store (the name transformers models carry too)
    stream: object = field(default=None, repr=False)  # its StreamEncoder, built once

    @property
    def hop(self) -> int:
        return int(np.prod(self.config.upsampling_ratios))

    def n_codebooks(self, bandwidth: float) -> int:
        """transformers' rule (``get_num_quantizers_for_bandwidth``), frame rate rounded up."""
        per = math.log2(self.config.codebook_size) * math.ceil(self.config.sampling_rate / self.hop)
        return int(max(1, math.floor(bandwidth * 1000 / per)))

    def embeddings(self, x):
        """``(batch, 1, sample)`` -> ``(batch, dim, frame)``: transformers' ``encoder`` forward."""
        import torch.nn.functional as F

        for layer in self.layers:  # an ELU overwrites its input where no one else holds it (same floats)
            if isinstance(layer, Residual):
                h = x
                for i, part in enumerate(layer.block):
                    h = F.elu(h, inplace=i > 0) if part == "elu" else part(h)
                x = (x if layer.shortcut is None else layer.shortcut(x)) + h
            elif layer == "elu":
                x = F.elu(x, inplace=True)
            elif isinstance(layer, Conv):
                x = layer(x)
            else:  # the LSTM, on (time, batch, channel), with its residual
                y = x.permute(2, 0, 1)
                x = (layer(y)[0] + y).permute(1, 2, 0)
        return x

    def quantize(self, y, bandwidth: float):
        """``(frame, dim)`` -> ``(codebook, frame) int64``: the residual quantizer's encode."""
        import torch
        import torch.nn.functional as F

        n = self.n_codebooks(bandwidth)
        if n > len(self.codebooks):
            raise InputError(f"audio.model: {n} codebooks are needed at {bandwidth:g} kbps, the checkpoint has "
                             f"{len(self.codebooks)}; lower audio.bandwidth or re-save the model")
        codes = []
        for embed in self.codebooks[:n]:
            dist = -(y.pow(2).sum(1, keepdim=True) - 2 * y @ embed.t() + embed.t().pow(2).sum(0, keepdim=True))
            ind = dist.max(dim=-1).indices
            y = (y - F.embedding(ind, embed)).contiguous()
            codes.append(ind)
        return torch.stack(codes)

    def reference(self, wave: np.ndarray, bandwidth: float) -> np.ndarray:
        """``(sample,) float32`` -> ``(codebook, ceil(samples / hop)) int64``: transformers'
        ``encode`` of the waveform (one window, fp32, this process's torch threads)."""
        import torch

        with torch.inference_mode():
            x = self.embeddings(torch.from_numpy(np.array(wave, np.float32))[None, None])
            return self.quantize(x[0].T.contiguous(), bandwidth).numpy()


# -- reading a checkpoint ---------------------------------------------------------------------

def layout(cfg: SimpleNamespace) -> list[tuple]:
    """The encoder's layers as ``EncodecEncoder.__init__`` builds them: ``("conv", kernel,
    stride)``, ``("res", dilation)``, ``("elu",)``, ``("lstm",)``."""
    out = [("conv", cfg.kernel_size, 1)]
    for ratio in reversed(cfg.upsampling_ratios):
        out += [("res", cfg.dilation_growth_rate ** j) for j in range(cfg.num_residual_layers)]
        out += [("elu",), ("conv", 2 * ratio, ratio)]
    return out + [("lstm",), ("elu",), ("conv", cfg.last_kernel_size, 1)]


def from_tensors(cfg: SimpleNamespace, names: set, get: Callable[[str], object], weights_hash: str = "",
                 n_codebooks: Optional[int] = None) -> Spec:
    """A ``Spec`` from checkpoint tensor ``names`` read with ``get`` (the encoder, and the first
    ``n_codebooks`` codebooks -- None: all; 3 kbps needs 4 of the 24 kHz model's 32).

    Raises:
        Unsupported: encoder weights that do not fit ``layout(cfg)`` (an unknown variant).
        InputError: missing weights (not a complete EnCodec checkpoint).
    """
    import torch

    used = set()

    def take(key: str):
        if key not in names:
            raise InputError(f"audio.model: the checkpoint lacks EnCodec weight {key}; it is not a complete EnCodec "
                             f"checkpoint: re-save it with save_pretrained")
        used.add(key)
        return get(key).float()

    def conv(prefix: str, kernel: int, stride: int = 1, dilation: int = 1) -> Conv:
        p = f"{prefix}.conv."
        if f"{p}parametrizations.weight.original1" in names:  # torch's parametrization (transformers >= 4.36)
            g, v = take(f"{p}parametrizations.weight.original0"), take(f"{p}parametrizations.weight.original1")
        else:  # older checkpoints (e.g. the hub's facebook/encodec_24khz): weight_g / weight_v
            g, v = take(f"{p}weight_g"), take(f"{p}weight_v")
        if v.shape[-1] != kernel:
            raise Unsupported(f"{p}weight has kernel {v.shape[-1]}, the config says {kernel}")
        bias = take(f"{p}bias") if f"{p}bias" in names else None
        return Conv(torch._weight_norm(v, g, 0), bias, stride, dilation, cfg.pad_mode)

    layers = []
    for i, (kind, *arg) in enumerate(layout(cfg)):
        p = f"encoder.layers.{i}"
        if kind == "conv":
            layers.append(conv(p, *arg))
        elif kind == "res":
            block = ["elu", conv(f"{p}.block.1", cfg.residual_kernel_size, dilation=arg[0]), "elu",
                     conv(f"{p}.block.3", 1)]
            layers.append(Residual(block, conv(f"{p}.shortcut", 1) if cfg.use_conv_shortcut else None))
        elif kind == "elu":
            layers.append("elu")
        else:
            dim = cfg.num_filters * 2 ** len(cfg.upsampling_ratios)
            lstm = torch.nn.LSTM(dim, dim, cfg.num_lstm_layers)
            lstm.load_state_dict({k: take(f"{p}.lstm.{k}") for k in lstm.state_dict()})
            layers.append(lstm.eval().requires_grad_(False))
    extra = sorted(n for n in names if n.startswith("encoder.") and n not in used)
    if extra:
        raise Unsupported(f"encoder weight {extra[0]} (and {len(extra) - 1} more) is not in EnCodec's known layout")
    books = []
    while f"quantizer.layers.{len(books)}.codebook.embed" in names and len(books) < (n_codebooks or 1 << 30):
        books.append(take(f"quantizer.layers.{len(books)}.codebook.embed").contiguous())
    if not books:
        raise InputError("audio.model: the checkpoint has no codebooks (quantizer.layers.0.codebook.embed); "
                         "re-save it with save_pretrained")
    return Spec(cfg, layers, books, weights_hash)


def load_dir(path: str, fingerprint: str, n_codebooks: Optional[int] = None) -> Spec:
    """The ``Spec`` of a ``save_pretrained`` folder (``fingerprint``: its weights hash, recorded;
    ``n_codebooks``: see ``from_tensors``). Reads only the tensors it needs."""
    import torch

    folder = Path(path)
    cfg = config_of(json.loads((folder / "config.json").read_text()))
    try:
        files = sorted(folder.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            handles = [safe_open(f, "pt") for f in files]
            where = {k: h for h in handles for k in h.keys()}
            with torch.no_grad():
                return from_tensors(cfg, set(where), lambda k: where[k].get_tensor(k), fingerprint, n_codebooks)
        if not (folder / "pytorch_model.bin").is_file():  # e.g. sharded .bin files: transformers reads those
            raise Unsupported(f"no model.safetensors or pytorch_model.bin in {folder}")
        try:  # memory-mapped: only the tensors taken are read
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) torch.save file cannot be mapped
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        with torch.no_grad():
            return from_tensors(cfg, set(state), state.__getitem__, fingerprint, n_codebooks)
    except (OSError, RuntimeError, ValueError) as exc:  # no weights file, a corrupt one, a bad shape
        raise InputError(f"audio.model: {path} could not be loaded as EncodecModel ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); re-save it with save_pretrained") from None


def from_model(model, n_codebooks: Optional[int] = None) -> Spec:
    """The ``Spec`` of a transformers ``EncodecModel`` (the seeded random model; tests)."""
    import torch

    state = model.state_dict()
    with torch.no_grad():
        return from_tensors(config_of(model.config.to_dict()), set(state), lambda k: state[k].detach().clone(),
                            getattr(model, "giblet_weights_hash", ""), n_codebooks)
