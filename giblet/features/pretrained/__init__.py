"""Pretrained features: per-TR hidden states of any Hugging Face vision, audio or language model.

An *extractor* (``features.<name>`` in the study config, ``giblet.config.ExtractorParams``)
names a model (a local ``save_pretrained`` folder or a repo id already in the offline Hugging
Face cache -- never downloaded), its layers, pooling and context. Per run it becomes one unit
``features/<name>/<run>`` whose arrays are ``stimuli/<run>/features/<name>/layer-<k>``
``(tr, embedding)``: layer ``k`` is ``hidden_states[k]`` of the model's forward with
``output_hidden_states=True`` (0: the embeddings, ``k``: after block ``k``), pooled per TR.

Modules: :mod:`.model` (find, load and run a model; batching with memory care),
:mod:`.video` / :mod:`.audio` / :mod:`.text` (each modality's inputs and TR alignment, and
its Dask task), :mod:`.parts` (task outputs -> the store's arrays). The rules are in
docs/store.md, "Pretrained features".

This module is imported by the config checks: it imports neither torch nor transformers.
"""
from __future__ import annotations

import re

from giblet import store

VERSION = 1
MODALITIES = ("video", "audio", "text")
POOLINGS = {"video": ("mean", "cls"), "audio": ("mean", "last"), "text": ("mean", "last", "cls")}
DEFAULT_POOLING = "mean"
DTYPES = ("float32", "float16", "bfloat16")
OUT_DTYPES = ("float32", "float16")
GROUP = "features"  # stimuli/<run>/features/<name>/...
MASK = "has_words"  # text extractors: True where the TR has words of its own
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SPEC = re.compile(rf"{GROUP}/({_NAME.pattern})/layer-(\d+)")


def pooling_of(params) -> str:
    """The pooling in effect (``pooling`` unset: ``mean`` for every modality)."""
    return params.pooling or DEFAULT_POOLING


def layer_name(layer: int) -> str:
    return f"layer-{int(layer)}"


def array_names(name: str, run: str, layers: list[int], modality: str) -> dict[str, str]:
    """Store paths of one (extractor, run)'s arrays: ``layer-<k>`` for each layer, and
    ``has_words`` for a text extractor."""
    prefix = f"{store.stimulus_prefix(run, GROUP)}/{name}"
    out = {layer_name(k): f"{prefix}/{layer_name(k)}" for k in layers}
    if modality == "text":
        out[MASK] = f"{prefix}/{MASK}"
    return out


def parse_spec(spec: str) -> tuple[str, int]:
    """``"features/<name>/layer-<k>"`` -> ``(name, k)``; None-safe callers check first."""
    m = SPEC.fullmatch(str(spec))
    if not m:
        from giblet.errors import ConfigError

        raise ConfigError(f"feature {spec!r}: not a stored feature array name; write features/<extractor>/layer-<k>, "
                          f"e.g. features/clip/layer-6")
    return m.group(1), int(m.group(2))


def extractor_problems(name: str, p) -> list[str]:
    """One message per bad value of extractor ``name`` (``giblet.config.ExtractorParams``)."""
    out: list[str] = []
    at = f"features.{name}"

    def check(cond: bool, msg: str) -> None:
        if not cond:
            out.append(f"{at}.{msg}")

    if not _NAME.fullmatch(name):
        out.append(f"features: extractor name {name!r} must be letters, digits, '-', '_' or '.' (it becomes a store "
                   f"path), e.g. clip")
    check(p.modality in MODALITIES, f"modality: must be one of {', '.join(MODALITIES)}, got {p.modality!r}")
    check(p.model is not None, "model: not set; give a save_pretrained directory or a repo id in the offline Hugging "
                               "Face cache")
    layers = list(p.layers)
    check(bool(layers) and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in layers),
          f"layers: must be a non-empty list of hidden-state indices >= 0 (0: embeddings), got {layers!r}")
    check(len(set(layers)) == len(layers), f"layers: {layers!r} names a layer twice")
    allowed = POOLINGS.get(p.modality, ("mean",))
    check(p.pooling is None or p.pooling in allowed,
          f"pooling: must be one of {', '.join(allowed)} for {p.modality or 'this'} models, got {p.pooling!r}")
    check(p.context_s >= 0, f"context_s: must be >= 0 seconds, got {p.context_s}")
    check(p.context_s == 0 or p.modality in ("audio", "video"),
          "context_s: only audio and video extractors take seconds of context (text: context_words)")
    check(isinstance(p.context_words, int) and p.context_words >= 0,
          f"context_words: must be an integer >= 0, got {p.context_words!r}")
    check(p.context_words == 0 or p.modality == "text", "context_words: only text extractors take words of context")
    check(p.dtype in DTYPES, f"dtype: must be one of {', '.join(DTYPES)}, got {p.dtype!r}")
    check(p.out_dtype in OUT_DTYPES, f"out_dtype: must be one of {', '.join(OUT_DTYPES)}, got {p.out_dtype!r}")
    check(p.device in ("auto", "cpu", "cuda") or str(p.device).startswith("cuda:"),
          f"device: must be auto, cpu or cuda, got {p.device!r}")
    for key in ("frames_per_tr", "batch_size", "chunk_trs", "segment_trs"):
        value = getattr(p, key)
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
              f"{key}: must be an integer >= 1, got {value!r}")
    check(p.workers is None or (isinstance(p.workers, int) and p.workers >= 1),
          f"workers: must be an integer >= 1 or null (any worker), got {p.workers!r}")
    if isinstance(p.segment_trs, int) and isinstance(p.chunk_trs, int) and p.chunk_trs >= 1 and p.segment_trs >= 1:
        check(p.segment_trs % p.chunk_trs == 0,
              f"segment_trs: {p.segment_trs} is not a multiple of chunk_trs={p.chunk_trs}; set segment_trs="
              f"{max(1, round(p.segment_trs / p.chunk_trs)) * p.chunk_trs}")
    return out


def spec_of(name: str, layer: int) -> str:
    """The name a reader, the dataset and the trainer use for one stored layer."""
    return f"{GROUP}/{name}/{layer_name(layer)}"


def task_spans(n_trs: int, segment_trs: int) -> list[tuple[int, int]]:
    """``[tr0, tr1)`` of each task: ``segment_trs`` TRs (whole chunks), the last one shorter."""
    return [(t0, min(n_trs, t0 + segment_trs)) for t0 in range(0, max(n_trs, 1), segment_trs)]
