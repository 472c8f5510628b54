"""The ``stream`` encode path: EnCodec's encoder, same weights and layers as transformers'
(read by ``giblet.features.encodec_torch``), run faster on CPU.

Why by hand: on CPU the eager encoder spends most of its time outside arithmetic. Its
convolutions see ``(batch, channel, time)`` tensors, which oneDNN reorders to and from its
blocked layout at every layer (a 32-channel layer reaches ~20 GFLOP/s against ~160 for a
matmul on one core); each reflect padding, ELU and residual add streams a whole window's
activations (64 MB per tensor for 21 s at 24 kHz) through memory; and the LSTM multiplies
one window's 512-vector by its 4 MB weights per code frame. No library runs this model
better without an export step (ONNX Runtime measured ~1.35x, and needs a traced export per
worker). So this path:

1. keeps activations channels-last, ``(batch, time, channel)``: convolutions run as
   ``conv2d`` in ``channels_last`` (1x1 ones as a matmul), with the weight-norm folded once;
2. runs the convolutional front (everything before the LSTM) over each window in chunks of
   ``CHUNK_FRAMES`` code frames that fit the cache, each with ``margin`` frames of the audio
   before it (at least the front's receptive field) that are computed and dropped. The
   chunks start on code-frame boundaries, so every layer sees the same samples, padding
   and strides as in one pass over the window: the front's output is that of the window;
3. runs the LSTM and the last layers over a group of windows at once (their batch shares
   each step's 4 MB of weights; windows right-padded with zeros: the LSTM runs forward and
   the convolutions are causal, so padding never reaches a kept frame), then the model's
   own quantizer;
4. spreads the windows' fronts, then the groups, over Python threads, each torch op
   single-threaded (``encode``).

Only causal models (``use_causal_conv``, e.g. ``facebook/encodec_24khz``) with weight-normed
convolutions qualify (``choose``; a checkpoint outside EnCodec's known layout too: ``load``);
the stage falls back to transformers' own ``encode`` otherwise, and says so. Codes equal the
eager encode's up to float rounding
(``audio.fast_path`` in docs/store.md: agreement measured and recorded), and do not change
with the number of threads.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from giblet.features.media import torch_threads

CHUNK_FRAMES = 64  # code frames per front chunk (0.85 s at 75 Hz: a 32-channel layer's tensor is ~2.6 MB)
BACK_FRAMES = 2**12  # windows x code frames per LSTM batch (its windows share each step's weights; ~8 MB)
LSTM_FRAMES = 256  # code frames per LSTM call (the state is carried from one to the next)

Step = Callable  # (batch, time, channel) tensor -> (batch, time', channel') tensor


class StreamEncoder:
    """Encode windows of one EnCodec model's input (see the module docstring).

    Args:
        spec: the model's ``giblet.features.encodec_torch.Spec`` (its layers, on CPU).
        chunk_frames: code frames per front chunk.
    """

    def __init__(self, spec, chunk_frames: int = CHUNK_FRAMES):
        import torch

        self.spec, self.chunk_frames = spec, chunk_frames
        cut = next(i for i, m in enumerate(spec.layers) if isinstance(m, torch.nn.LSTM))
        with torch.no_grad():
            self.front = [_step(m) for m in spec.layers[:cut]]
            self.lstm = spec.layers[cut]
            self.tail = [_step(m) for m in spec.layers[cut + 1:]]
        self.hop = spec.hop
        self.margin = math.ceil(_lookback(spec.layers[:cut]) / self.hop)  # frames

    def encode(self, windows: list[np.ndarray], bandwidth: float, threads: int = 1) -> list[np.ndarray]:
        """Codes of each window, as transformers' ``encode`` of that window alone.

        Windows go in groups of at most ``BACK_FRAMES`` (windows x longest) frames: a group's
        fronts, chunk by chunk, then its back (the LSTM over the group at once), all on
        ``threads`` Python threads, every torch op single-threaded. The next group's fronts
        run beside a group's back, and at most two groups' features are held (~8 MB each):
        the task's memory does not grow with its audio. Why not torch's intra-op threads:
        this path runs thousands of small ops, and an OpenMP team waits at every op's end
        for its slowest thread -- on a loaded machine, one whose core was taken away (2
        intra-op threads measured up to 10x slower than 1 at load 5). The groups do not
        depend on ``threads``, so neither do the codes.

        Args:
            windows: ``(sample,) float32`` mono waveforms; each but the last of the audio
                a whole number of code frames long.
            bandwidth: kbps.
            threads: chunks (and backs) encoded at once.

        Returns:
            per window, ``(codebook, ceil(samples / hop)) int64``.
        """
        from concurrent.futures import ThreadPoolExecutor

        import torch

        groups, group = [], []
        for i, w in enumerate(windows):
            frames = [-(-len(windows[j]) // self.hop) for j in group + [i]]
            if group and len(frames) * max(frames) > BACK_FRAMES:
                groups.append(group)
                group = []
            group.append(i)
        groups.append(group)
        chunk = _inference(self._chunk)
        back = _inference(lambda feats: self._back(feats, bandwidth))
        backs = []
        with torch_threads(1), ThreadPoolExecutor(max(1, threads), thread_name_prefix="giblet-encodec") as pool:
            for g in groups:
                if len(backs) >= 2:
                    backs[-2].result()  # two groups' features in memory at most
                parts = [[pool.submit(chunk, windows[i], *c) for c in self._chunks(len(windows[i]))] for i in g]
                feats = [torch.cat([p.result() for p in ps]) if len(ps) > 1 else ps[0].result() for ps in parts]
                backs.append(pool.submit(back, feats))
                del parts, feats
            return [c for b in backs for c in b.result()]

    def _chunks(self, n: int) -> list[tuple[int, int, int]]:
        """``(start, stop, lead)`` of a window's front chunks: near-equal (no sliver at the end),
        each computed from ``lead`` samples before ``start`` (the margin, or the window's start)."""
        frames = -(-n // self.hop)
        step = -(-frames // -(-frames // self.chunk_frames)) * self.hop
        return [(a, min(n, a + step), min(a, self.margin * self.hop)) for a in range(0, n, step)]

    def _chunk(self, wave: np.ndarray, a: int, b: int, lead: int):
        """``(frame, channel)`` front features of samples ``[a, b)`` of a window."""
        import torch

        y = torch.from_numpy(np.array(wave[a - lead: b], np.float32)).reshape(1, -1, 1)
        for f in self.front:
            y = f(y)
        return y[0, lead // self.hop:]

    def _front(self, wave: np.ndarray):
        """``(frame, channel)`` features before the LSTM of one window, chunk by chunk."""
        import torch

        parts = [self._chunk(wave, *c) for c in self._chunks(len(wave))]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _back(self, feats: list, bandwidth: float) -> list[np.ndarray]:
        """The LSTM over windows' features at once (zero-padded to the longest), then per window
        the tail and the quantizer (its distance matrix is ``(frames, codebook_size)``)."""
        import torch

        lengths = [f.shape[0] for f in feats]
        y = torch.nn.utils.rnn.pad_sequence(feats)  # (time, batch, channel): the LSTM's layout
        feats.clear()  # the caller's list: the group's fronts are freed once copied
        state = None
        for t in range(0, y.shape[0], LSTM_FRAMES):  # in time slices, the state carried: small gate buffers
            h, state = self.lstm(y[t:t + LSTM_FRAMES], state)
            y[t:t + LSTM_FRAMES] += h
        return [self._tail(y[:n, i], bandwidth) for i, n in enumerate(lengths)]

    def _tail(self, y, bandwidth: float) -> np.ndarray:
        """The layers after the LSTM and the quantizer, one window's ``(frame, channel)`` at a time."""
        y = y[None].contiguous()
        for f in self.tail:
            y = f(y)
        return self.spec.quantize(y[0], bandwidth).numpy()


def _inference(fn):
    """``fn`` under ``torch.inference_mode`` (a per-thread mode: set in the pool's threads)."""
    def run(*args):
        import torch

        with torch.inference_mode():
            return fn(*args)
    return run


# -- the layers, channels-last ---------------------------------------------------------------

def _lookback(layers) -> int:
    """Input samples before its own that the last layer's output depends on (causal layers)."""
    from giblet.features.encodec_torch import Conv, Residual

    total, stride = 0, 1  # stride: input samples per step of the current layer's input
    for m in layers:
        convs = m.block if isinstance(m, Residual) else [m]  # a 1x1 shortcut looks back nothing
        for c in (c for c in convs if isinstance(c, Conv)):
            total += (c.kernel - c.stride) * stride
            stride *= c.stride
    return total


def _step(m, inplace: bool = True) -> Step:
    """A layer as a function of ``(batch, time, channel)``; ``inplace``: an ELU may overwrite its
    input (it is a fresh tensor no one else holds: every input but a residual block's)."""
    import torch.nn.functional as F

    from giblet.features.encodec_torch import Conv, Residual

    if isinstance(m, Conv):
        return _Conv(m)
    if m == "elu":
        return lambda y: F.elu(y, inplace=inplace)
    if isinstance(m, Residual):
        block = [_step(b, inplace=i > 0) for i, b in enumerate(m.block)]  # the first reads the residual
        shortcut = None if m.shortcut is None else _step(m.shortcut)

        def residual(y):
            h = y
            for f in block:
                h = f(h)
            h += y if shortcut is None else shortcut(y)  # h: the block's own output (float + commutes exactly)
            return h
        return residual
    raise TypeError(f"unknown encoder layer {m!r}")


class _Conv:
    """A causal ``encodec_torch.Conv`` on ``(batch, time, channel)``: its padding rule, its weights
    re-laid channels-last (the Conv then reads them back: one copy held)."""

    def __init__(self, conv):
        import torch

        self.conv = conv
        w = conv.weight  # (out, in, kernel), the weight norm folded
        if w.shape[-1] == 1 and conv.stride == 1:
            self.matrix = w[:, :, 0]  # (out, in), a view: a 1x1 convolution is a matmul
            self.weight = None
        else:
            self.matrix = None
            self.weight = w.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (out, in, 1, kernel)
            conv.weight = self.weight.squeeze(2)  # the same floats (the reference makes them contiguous)

    def __call__(self, y):
        import torch.nn.functional as F

        c = self.conv
        if self.matrix is not None:
            return F.linear(y, self.matrix, c.bias)
        y = _pad(y, c.kernel - c.stride, c.extra(y.shape[1]), c.pad_mode)
        x = y.permute(0, 2, 1).unsqueeze(2)  # (batch, channel, 1, time), channels_last in memory
        out = F.conv2d(x, self.weight, c.bias, stride=(1, c.stride), dilation=(1, c.dilation))
        return out.squeeze(2).permute(0, 2, 1)


def _pad(y, left: int, right: int, mode: str):
    """transformers' ``EncodecConv1d._pad1d`` along time of ``(batch, time, channel)``."""
    import torch
    import torch.nn.functional as F

    if mode != "reflect":
        return F.pad(y, (0, 0, left, right), mode) if left or right else y
    n, extra = y.shape[1], 0
    if n <= max(left, right):  # as transformers: zeros first, so that a short input can reflect
        extra = max(left, right) - n + 1
        y = F.pad(y, (0, 0, 0, extra))
        n += extra
    parts = ([y[:, 1:left + 1].flip(1)] if left else []) + [y] + ([y[:, n - 1 - right:n - 1].flip(1)] if right else [])
    y = torch.cat(parts, 1) if len(parts) > 1 else y
    return y[:, :y.shape[1] - extra] if extra else y


# -- choosing the path, and checking it ------------------------------------------------------

def spec_of(model):
    """``model`` if it is an ``encodec_torch.Spec``, else the Spec of a transformers
    ``EncodecModel`` (built once and kept on it: tests and benchmarks pass those)."""
    from giblet.features.encodec_torch import Spec, from_model

    if isinstance(model, Spec):
        return model
    if getattr(model, "giblet_spec", None) is None:
        model.giblet_spec = from_model(model)
    return model.giblet_spec


def for_model(model) -> StreamEncoder:
    """The model's ``StreamEncoder``, built once per loaded model (it holds channels-last weights)."""
    spec = spec_of(model)
    if spec.stream is None:
        spec.stream = StreamEncoder(spec)
    return spec.stream


def choose(cfg, device: str, requested: str) -> tuple[str, Optional[str]]:
    """The path a task runs (``stream`` or ``eager``) for ``audio.fast_path`` = ``requested``
    with a model of config ``cfg`` (``encodec_torch.config_of``) on ``device``, and why it is
    not the one asked for (None when it is).

    ``auto``: ``stream`` on CPU when the model qualifies, else ``eager`` (on a GPU without a
    note: cuDNN runs the eager encoder well). ``stream``: the same, with a note whenever it
    falls back. ``eager``: transformers' ``encode``.
    """
    from giblet.features.encodec_torch import stream_reason

    if requested == "eager":
        return "eager", None
    reason = stream_reason(cfg, device)
    if reason is None:
        return "stream", None
    if requested == "auto" and device != "cpu":
        return "eager", None
    return "eager", _fallback_note(requested, reason)


def _fallback_note(requested: str, reason: str) -> str:
    return (f"audio.fast_path={requested}: the stream path cannot run this model ({reason}); "
            f"encoded with transformers' encode instead (same codes up to float rounding, slower on CPU)")


def load(name: str, fingerprint: str, device: str, requested: str,
         n_codebooks: Optional[int] = None) -> tuple[object, str, Optional[str]]:
    """The model a task encodes with, its path and the fallback note (``choose``);
    the stream path keeps the first ``n_codebooks`` codebooks (None: all).

    The stream path reads the encoder and codebooks from the folder with
    ``encodec_torch`` (transformers is not imported: ~0.3 GB less per worker); the seeded
    random model is built with transformers, then converted. The eager path loads
    transformers' ``EncodecModel`` (``encodec.load_model``). A checkpoint whose encoder
    does not fit EnCodec's known layout falls back to eager, with the reason in the note.
    """
    import json

    from giblet.features import encodec, encodec_torch

    raw = encodec.ENCODEC_24KHZ if name == encodec.RANDOM else json.loads((Path(name) / "config.json").read_text())
    path, note = choose(encodec_torch.config_of(raw), device, requested)
    if path == "stream":
        try:
            return encodec.load_spec(name, fingerprint, n_codebooks), path, None
        except encodec_torch.Unsupported as exc:
            path, note = "eager", _fallback_note(requested, str(exc))
    return encodec.load_model(name, fingerprint, device), path, note


def agreement(model, wave: np.ndarray, bandwidth: float) -> dict:
    """Encode ``wave`` (one window) with the stream path and the eager fp32 reference
    (``Spec.reference``, equal to transformers' ``encode``): the fraction of codes equal,
    and their count."""
    spec = spec_of(model)
    wave = wave[: len(wave) - len(wave) % spec.hop]
    if len(wave) == 0:
        return {}
    with torch_threads(1):  # one thread: no OpenMP team to stall on a loaded machine
        eager = spec.reference(wave, float(bandwidth))
    stream = for_model(spec).encode([wave], float(bandwidth))[0]
    return {"fast_path_agreement": round(float((stream == eager).mean()), 6), "agreement_codes": int(eager.size)}
