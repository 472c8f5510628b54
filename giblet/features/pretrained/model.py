"""The model side of the pretrained-feature stage: find a model offline, load it once per
worker through transformers' Auto classes, run batches with memory care, pool hidden states.

Finding (driver, plan time, no weights read): ``model`` is a folder (relative to the config)
holding a ``save_pretrained`` model and its processor, or a repo id resolved *only* from the
local Hugging Face cache (``snapshot_download(local_files_only=True)``); nothing is ever
downloaded. The fingerprint is ``hash_tree`` of the folder: weights, config and processor
files (per-file hashes cached by stat, so a no-op rerun reads no weights).

Loading (worker): ``AutoModel`` + ``AutoImageProcessor`` (video) / ``AutoFeatureExtractor``
(audio) / ``AutoTokenizer`` (text), ``local_files_only=True``, in the extractor's ``dtype``.
The module that is run is the model's tower for the modality: ``vision_model`` /
``text_model`` of a dual-encoder (CLIP, SigLIP), the encoder of an encoder-decoder
(Whisper, T5), else the model itself. Layer ``k`` is ``hidden_states[k]`` of its forward
with ``output_hidden_states=True``.
"""
from __future__ import annotations

import functools
import inspect
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from giblet.errors import InputError, InputMissingError
from giblet.features.media import first_line

PROCESSORS = {"video": "AutoImageProcessor", "audio": "AutoFeatureExtractor", "text": "AutoTokenizer"}
TOWERS = {"video": "vision_model", "audio": "audio_model", "text": "text_model"}
# CUDA kernels index some tensors with 32 bits. An audio window's widest early activation is
# its first convolution's output, (batch, channels, samples): wav2vec2 / HuBERT-style front
# ends have 512 channels at the input rate. Keep batch x samples x 512 under 2**30 (half the
# limit, for margin): 16 windows of 8 s at 16 kHz fit (1.0e9).
MAX_CONV_ELEMENTS = 2**30
CONV_CHANNELS = 512


@dataclass(frozen=True)
class ModelRef:
    """A model as the plan sees it: its folder and the hash of the folder's files."""

    path: str  # the resolved folder (a cache snapshot for a repo id)
    fingerprint: str
    given: str  # as written in the config


def resolve_model(where: str, value: str, root: Path, hash_dir: Callable[[Path], str]) -> ModelRef:
    """Find ``value`` (a folder, else a repo id in the offline Hugging Face cache) without
    loading it; ``where`` names the config key in messages (``features.clip.model``).

    Raises:
        InputMissingError: neither a folder nor a cached repo id.
        InputError: a folder without ``config.json``.
    """
    path = (root / Path(value).expanduser()).resolve()
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", value) or value.startswith("."):
            raise InputMissingError(f"{where}: directory {path} does not exist; save the model and its processor "
                                    f"with save_pretrained(DIR) and set {where}=DIR, or give a repo id already in "
                                    f"the Hugging Face cache")
        path = _from_hf_cache(where, value)
    if not (path / "config.json").is_file():
        raise InputError(f"{where}: {path} is not a save_pretrained directory (no config.json); save the model and "
                         f"its processor with save_pretrained(DIR) and set {where}=DIR")
    return ModelRef(str(path), hash_dir(path), value)


def _from_hf_cache(where: str, repo_id: str) -> Path:
    """The local snapshot of ``repo_id`` in the Hugging Face cache; never the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        raise InputMissingError(
            f"{where}: {repo_id!r} is neither a directory nor a repo in the offline Hugging Face cache "
            f"({type(exc).__name__}); giblet never downloads weights: on a machine with internet run `hf download "
            f"{repo_id}` into the cache the workers read (HF_HOME, with HF_HUB_OFFLINE=1 on the nodes), or "
            f"save_pretrained the model and its processor to a directory and set {where}=DIR") from None


@dataclass
class Loaded:
    """A model ready to run: its tower for the modality, its processor, device and dtype."""

    net: object  # torch.nn.Module
    processor: object
    device: str
    dtype: object  # torch.dtype
    model_type: str


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@functools.lru_cache(maxsize=1)
def load(path: str, fingerprint: str, modality: str, device: str, dtype: str, where: str) -> Loaded:
    """The model at ``path`` on ``device`` in ``dtype``, eval mode, and its processor.

    Cached per process (``fingerprint`` is part of the key: new weights reload), so the
    tasks of one Dask worker share one copy. ``where``: the extractor's config key
    (``features.clip``), for messages.
    """
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise in the engine's log
    try:
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, dtype=torch_dtype(dtype))
    except Exception as exc:  # OSError (no weights), ValueError (unknown architecture), ...
        raise InputError(f"{where}.model: {path} could not be loaded by transformers.AutoModel "
                         f"({type(exc).__name__}: {first_line(exc)}); re-save it with save_pretrained") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    kind = PROCESSORS[modality]
    try:
        processor = getattr(transformers, kind).from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{where}.model: {path} has no usable {kind} processor ({type(exc).__name__}: "
                         f"{first_line(exc)}); save the model's processor into the same folder "
                         f"(processor.save_pretrained(DIR))") from None
    if modality == "text" and not getattr(processor, "is_fast", False):
        raise InputError(f"{where}.model: {path} has a slow (Python) tokenizer; word alignment needs a fast one "
                         f"(tokenizer.json): save AutoTokenizer.from_pretrained(..., use_fast=True) into the folder")
    net = tower(model, modality).eval().to(torch.device(device))
    return Loaded(net, processor, device, torch_dtype(dtype), str(model.config.model_type))


def processor_kwargs(processor, device: str) -> dict:
    """``{"device": device}`` for a processor that can run on the model's GPU (a torchvision
    image processor, Whisper's feature extractor): preprocessing then keeps pace with the
    forward. Else ``{}`` (PIL image processors, most feature extractors: CPU only)."""
    if not device.startswith("cuda"):
        return {}
    bases = {c.__name__ for c in type(processor).__mro__}
    takes = "device" in inspect.signature(type(processor).__call__).parameters
    return {"device": device} if takes or bases & {"TorchvisionBackend", "BaseImageProcessorFast"} else {}


def tower(model, modality: str):
    """The part of ``model`` that reads ``modality`` (see the module docstring)."""
    sub = getattr(model, TOWERS[modality], None)
    if sub is not None and callable(sub):
        return sub
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return model


def release() -> None:
    """Drop this process's cached model (the engine runs it on every worker once no unit
    of the stage is left)."""
    import gc

    load.cache_clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# -- running --------------------------------------------------------------------------------------
def hidden_states(m: Loaded, inputs: dict, layers: list[int], where: str) -> list:
    """``hidden_states[k]`` for each ``k`` of ``layers`` (tensors on the device), one forward.

    Floating inputs are cast to the model's dtype; the forward runs under ``inference_mode``.
    """
    import torch

    feed = {k: (v.to(m.device, m.dtype, non_blocking=True) if v.is_floating_point() else
                v.to(m.device, non_blocking=True)) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.inference_mode():
        out = m.net(**feed, output_hidden_states=True, return_dict=True)
    states = out.hidden_states
    if states is None:
        raise InputError(f"{where}.model: the {m.model_type} model returns no hidden_states; choose a model whose "
                         f"forward supports output_hidden_states")
    bad = [k for k in layers if k >= len(states)]
    if bad:
        raise InputError(f"{where}.layers: {bad} asked for, but the {m.model_type} model has hidden states 0.."
                         f"{len(states) - 1} (0: embeddings); set layers within that range")
    return [tokens_last(states[k]) for k in layers]


def tokens_last(h):
    """Hidden state as ``(batch, token, dim)``: a convolutional ``(batch, dim, height, width)``
    map becomes its positions as tokens."""
    return h.flatten(2).transpose(1, 2) if h.dim() == 4 else h


KEEP = "_keep"  # an input entry (numpy, not fed to the model): (batch, token) bool, the tokens pooled


def pooled_layers(m: Loaded, layers: list[int], pooling: str, where: str,
                  keep: Optional[Callable[[dict, int], np.ndarray]] = None) -> "SplitOnOOM":
    """A :class:`SplitOnOOM` that maps a batch of inputs to one ``(batch, dim) float32`` array
    per layer: each layer's tokens pooled (``keep(inputs, n_tokens)``: the tokens that count,
    ``(batch, token)`` bool; default all)."""
    def fn(inputs: dict) -> list:
        states = hidden_states(m, inputs, layers, where)
        mask = None if keep is None else keep(inputs, states[0].shape[1])
        return [pool_tokens(h, pooling, mask).cpu().numpy() for h in states]

    return SplitOnOOM(fn, m.device)


class SplitOnOOM:
    """Runs ``fn(inputs) -> list of (rows, ...) arrays`` on batches of inputs (dicts of tensors
    whose first axis is the batch). On CUDA, an out-of-memory error splits the batch in
    halves (and every later batch into pieces of that size) and retries; one row that does
    not fit is an error. The results are concatenated in order."""

    def __init__(self, fn: Callable[[dict], list], device: str):
        self.fn, self.device, self.max_rows = fn, device, None

    def __call__(self, inputs: dict) -> list:
        n = _rows(inputs)
        step = min(n, self.max_rows or n)
        parts = []
        i = 0
        while i < n:
            piece = _slice(inputs, i, i + step) if step < n else inputs
            try:
                parts.append(self.fn(piece))
            except Exception as exc:
                if not (self.device.startswith("cuda") and _is_oom(exc)) or step == 1:
                    raise
                import torch

                torch.cuda.empty_cache()
                step = self.max_rows = max(1, step // 2)
                continue
            i += step
        return [np.concatenate(cols) for cols in zip(*parts)] if len(parts) > 1 else parts[0]


def _rows(inputs: dict) -> int:
    return next(len(v) for v in inputs.values() if hasattr(v, "shape"))


def _slice(inputs: dict, a: int, b: int) -> dict:
    return {k: (v[a:b] if hasattr(v, "shape") else v) for k, v in inputs.items()}


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``items`` produced by a background thread, ``depth`` ahead: decoding and
    preprocessing the next batch (PyAV, processors: mostly outside the GIL) overlaps the
    model's forward on the current one. An exception in the producer is raised here."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((None, item))
        except BaseException as exc:  # handed to the consumer
            q.put((exc, None))
            return
        q.put((None, done))

    thread = threading.Thread(target=produce, daemon=True, name="giblet-prefetch")
    thread.start()
    try:
        while True:
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def pool_tokens(h, pooling: str, keep: Optional[np.ndarray] = None):
    """Pool ``(batch, token, dim)`` to ``(batch, dim)`` float32 on the device.

    ``mean``: over the tokens (``keep``: ``(batch, token)`` bool, the tokens that count);
    ``cls``: token 0; ``last``: the last kept token.
    """
    import torch

    h = h.float()
    if pooling == "cls":
        return h[:, 0]
    if keep is None:
        return h.mean(1) if pooling == "mean" else h[:, -1]
    mask = torch.as_tensor(keep, device=h.device)
    if pooling == "mean":
        w = mask.float()
        return (h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)
    last = (mask.long() * torch.arange(mask.shape[1], device=h.device)).argmax(1)
    return h[torch.arange(len(h), device=h.device), last]
