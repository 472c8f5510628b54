"""EnCodec models for the audio stage: resolve ``audio.model`` (a local ``save_pretrained``
folder, an offline-cached repo id, or an explicit ``random``), build the seeded random
model, load it once per worker, and fingerprint its weights.

A random model is never a fallback: it is built only when the config says ``random``,
and the store records its recipe and weights hash.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from giblet.errors import ConfigError, InputError, InputMissingError

RANDOM = "random"
RANDOM_SEED = 0
RANDOM_RECIPE = 1  # bump when build_random_model changes what it builds
# The 24 kHz EnCodec architecture, spelled out so that a "random" model never depends on
# transformers' defaults and its shape is known at plan time without importing torch.
ENCODEC_24KHZ = {
    "sampling_rate": 24000, "audio_channels": 1, "upsampling_ratios": [8, 5, 4, 2], "num_filters": 32,
    "codebook_size": 1024, "codebook_dim": 128, "hidden_size": 128,
    "target_bandwidths": [1.5, 3.0, 6.0, 12.0, 24.0], "chunk_length_s": None, "normalize": False,
    "use_causal_conv": True,
}
# On CUDA, the padding op indexes with 32 bits; its largest tensor is (batch, num_filters,
# samples). Keep that under 2**30 elements (half the limit, for margin): 8 x 60 s windows at
# 24 kHz are 3.7e8, the cap allows ~23 of them.
MAX_PAD_ELEMENTS = 2**30



@dataclass(frozen=True)
class ModelInfo:
    """An EnCodec model as the plan sees it: where it is, its weights hash, its shape."""

    name: str  # "random", or the directory (a resolved path)
    fingerprint: str  # hash_tree of the directory, or a hash of the random recipe
    sampling_rate: int
    hop_length: int  # waveform samples per code frame
    codebook_size: int
    target_bandwidths: tuple

    @property
    def frame_rate(self) -> float:
        """Code frames per second (75.0 at 24 kHz)."""
        return self.sampling_rate / self.hop_length

    def n_codebooks(self, bandwidth: float) -> int:
        """Codebooks EnCodec uses at ``bandwidth`` kbps; fails for one the model does not offer."""
        if not any(math.isclose(bandwidth, b) for b in self.target_bandwidths):
            offered = ", ".join(f"{b:g}" for b in self.target_bandwidths)
            raise ConfigError(f"audio.bandwidth: {bandwidth:g} kbps is not offered by model {self.name} "
                              f"(it offers {offered}); set audio.bandwidth to one of those")
        # transformers' rule (EncodecResidualVectorQuantizer): floor(bw / (log2(codebook) * frame rate))
        per_codebook = math.log2(self.codebook_size) * math.ceil(self.frame_rate)
        return int(max(1, math.floor(bandwidth * 1000 / per_codebook)))


def _info(name: str, fingerprint: str, cfg: dict) -> ModelInfo:
    """Check that ``cfg`` (a config.json) is an EnCodec this stage can stream, and describe it."""
    get = lambda key: cfg.get(key, ENCODEC_24KHZ.get(key))  # noqa: E731 (older configs omit defaults)
    if cfg.get("model_type") != "encodec":
        raise InputError(f"audio.model: {name} holds a {cfg.get('model_type') or 'unknown'!s} model, not EnCodec; "
                         f"set audio.model to an EnCodec save_pretrained directory (e.g. facebook/encodec_24khz)")
    if get("chunk_length_s") is not None or get("normalize") or get("audio_channels") != 1:
        raise InputError(f"audio.model: {name} is a chunked/normalized or stereo EnCodec (e.g. the 48 kHz model); "
                         f"only mono stream models such as facebook/encodec_24khz are supported")
    if get("codebook_size") > np.iinfo(np.int16).max + 1:
        raise InputError(f"audio.model: {name} has {get('codebook_size')} codes per codebook; int16 holds 32768")
    return ModelInfo(name, fingerprint, int(get("sampling_rate")), int(np.prod(get("upsampling_ratios"))),
                     int(get("codebook_size")), tuple(float(b) for b in get("target_bandwidths")))


def resolve_model(value: Optional[str], root: Path, hash_dir=None) -> ModelInfo:
    """Find ``audio.model`` without loading weights: a directory, a cached HF repo id, or random.

    ``hash_dir`` fingerprints a model directory (default ``hash_tree``; the stage passes its
    stat-cached file hashes so a no-op rerun reads no weights).
    Raises:
        ConfigError: ``value`` is unset.
        InputError: the directory is missing, not a ``save_pretrained`` folder, not EnCodec,
            or the repo id is not in the offline Hugging Face cache.
    """
    from giblet.fingerprint import hash_obj, hash_tree

    if value is None:
        raise ConfigError("audio.model: not set, but the study has an audio track to encode; set audio.model=PATH "
                          "(an EnCodec save_pretrained directory or a repo id in the offline Hugging Face cache), "
                          "or audio.model=random for a random-weight model (tests and demos only)")
    if value == RANDOM:
        import importlib.metadata as md

        versions = [md.version(p) for p in ("torch", "transformers")]  # random init may change with them
        return _info(RANDOM, hash_obj(RANDOM, RANDOM_SEED, RANDOM_RECIPE, ENCODEC_24KHZ, versions),
                     {"model_type": "encodec", **ENCODEC_24KHZ})
    path = (root / Path(value).expanduser()).resolve()
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", value) or value.startswith("."):
            raise InputMissingError(f"audio.model: directory {path} does not exist; set audio.model to an EnCodec "
                                    f"save_pretrained directory, a cached repo id, or random")
        path = _from_hf_cache(value)
    if not (path / "config.json").is_file():
        raise InputError(f"audio.model: {path} is not a save_pretrained directory (no config.json); "
                         f"save the model with EncodecModel.save_pretrained(DIR) and set audio.model=DIR")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise InputError(f"audio.model: {path}/config.json is not valid JSON ({exc}); re-save the model") from None
    return _info(str(path), (hash_dir or hash_tree)(path), cfg)


def _from_hf_cache(repo_id: str) -> Path:
    """The local snapshot of ``repo_id`` in the Hugging Face cache; never the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        raise InputMissingError(f"audio.model: {repo_id!r} is neither a directory nor a repo in the offline Hugging "
                                f"Face cache ({type(exc).__name__}); on a machine with internet run "
                                f"`hf download {repo_id}` (or save_pretrained it to a directory) first") from None


def build_random_model(seed: int = RANDOM_SEED):
    """A seeded random-weight ``EncodecModel`` of the 24 kHz architecture (tests, demos).

    transformers initialises every codebook to zeros (every code would be 0) and leaves the
    weight-normed convolutions at a scale that shrinks the signal ~1000x, so this sets the
    convolutions to variance-preserving Gaussians and each codebook to 1,024 jittered
    residual vectors of the model's own encoding of seeded noise (EnCodec's k-means seeding,
    without the k-means): the codes then depend on the audio, as a trained model's do.
    """
    import torch
    from transformers import EncodecConfig, EncodecModel

    from giblet.features.media import torch_threads

    # One thread: the codebooks come from an eager encode, whose float sums change with the
    # thread count (a Dask worker has 1, a plain process all cores): the same weights everywhere.
    with torch.random.fork_rng(), torch.no_grad(), torch_threads(1):
        torch.manual_seed(seed)
        model = EncodecModel(EncodecConfig(**ENCODEC_24KHZ)).eval()
        for conv in model.modules():
            if isinstance(conv, torch.nn.Conv1d) and hasattr(conv, "parametrizations"):
                v = conv.parametrizations.weight.original1
                torch.nn.init.kaiming_normal_(v, nonlinearity="linear")
                conv.parametrizations.weight.original0.copy_(torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True))
        gen = torch.Generator().manual_seed(seed + 1)
        noise = 0.1 * torch.randn(1, 1, 2 * ENCODEC_24KHZ["sampling_rate"], generator=gen)
        residual = model.encoder(noise)[0].T  # (code_frame, codebook_dim)
        for layer in model.quantizer.layers:
            pick = torch.randint(0, residual.shape[0], (ENCODEC_24KHZ["codebook_size"],), generator=gen)
            embed = residual[pick] + 0.5 * residual.std(0) * torch.randn(len(pick), residual.shape[1], generator=gen)
            layer.codebook.embed.copy_(embed)
            layer.codebook.embed_avg.copy_(embed)
            residual = residual - layer.codebook.decode(layer.codebook.encode(residual[None]))[0]
    return model


def weights_hash(model) -> str:
    """Content hash of a model's state dict (names, dtypes, shapes and bytes)."""
    import hashlib

    import torch

    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def load_model(name: str, fingerprint: str, device: str):
    """The EnCodec model ``name`` (a directory or "random") on ``device``, in eval mode.

    Cached per process (``fingerprint`` is part of the key, so new weights reload): the
    tasks of one Dask worker share one copy.
    """
    import torch
    from transformers import EncodecModel
    from transformers.utils import logging as hf_logging

    if name == RANDOM:
        model = build_random_model()
    else:
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise in the engine's log
        try:
            model, info = EncodecModel.from_pretrained(name, local_files_only=True, output_loading_info=True)
        except Exception as exc:  # OSError (no weights), ValueError (bad config), ...
            raise InputError(f"audio.model: {name} could not be loaded as EncodecModel ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); re-save it with save_pretrained") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        missing = [k for k in info["missing_keys"] if not k.endswith(("inited", "cluster_size", "embed_avg"))]
        if missing:
            raise InputError(f"audio.model: {name} lacks {len(missing)} EnCodec weights (first: {sorted(missing)[0]}); "
                             f"it is not a complete EnCodec checkpoint: re-save it with save_pretrained")
    # Recorded in the store: a directory's weights are its files; random ones are hashed here.
    model.giblet_weights_hash = weights_hash(model) if name == RANDOM else fingerprint
    # The stage only encodes: the decoder and the codebooks' training statistics (~47 MB of the
    # 24 kHz model's 93) need not stay in every worker.
    model.decoder = None
    for layer in model.quantizer.layers:
        del layer.codebook.embed_avg, layer.codebook.cluster_size
    return model.eval().to(torch.device(device))


@functools.lru_cache(maxsize=1)
def load_spec(name: str, fingerprint: str, n_codebooks: Optional[int] = None):
    """The encoder and first ``n_codebooks`` codebooks (None: all) of model ``name`` as an
    ``encodec_torch.Spec`` (the stream path), cached per process like ``load_model``. A directory is read without importing
    transformers; "random" is built with it (``build_random_model``), then converted.

    Raises:
        encodec_torch.Unsupported: encoder weights outside EnCodec's known layout.
        InputError: missing or unreadable weights.
    """
    from giblet.features import encodec_torch

    if name != RANDOM:
        return encodec_torch.load_dir(name, fingerprint, n_codebooks)
    model = build_random_model()
    spec = encodec_torch.from_model(model, n_codebooks)
    spec.giblet_weights_hash = weights_hash(model)
    return spec
