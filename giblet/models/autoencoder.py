"""The multimodal autoencoder: stimulus encoders -> shared per-TR bottleneck -> fMRI head + decoders.

Data flow for one sample (a causal window of ``W = window + 1`` stimulus TRs ending at the
target TR minus ``lag``, oldest first; see ``giblet.data.context``)::

    video (W, F, H, Wd, C) uint8 --pool + z-score--> MLP --+
    audio (W, codebook, code_frame) int64 --embed--> MLP --+--> tokens (W, d_model)
    text  (W, embedding) --z-score--> MLP -----------------+        | + position
    features (W, embedding) --z-score, mask--> MLP --------+   (stored pretrained-model layers)
                                                   transformer blocks over the W tokens
                                                                    |
                                            bottleneck (W, d_bottleneck)   <- shared
                                  /                                              \\
        fMRI head: per-channel temporal filter over W                 decoders: the newest token
        (initialised to the Glover HRF) -> readout -> (voxel,)         -> each stimulus modality
        (shared head + the subject's correction; giblet.models.readout)

**fMRI is a target, never an input.** The model is an encoding model: it must predict the
brain's response from what the subject saw and heard. Given the BOLD it is asked to
predict, a network copies it (val r near 1, nothing learned about the stimulus), and
given past BOLD it mostly learns the signal's autocorrelation; neither tells us anything
about the stimulus -> brain mapping, and neither exists when predicting a new movie.

Why the head looks like this: BOLD is a causal convolution of neural activity with a
slow haemodynamic response (peak ~5 s, undershoot ~15 s), so the voxels are read out
from an HRF-weighted sum of per-TR latents. The filter starts at the Glover HRF and is
learned; ``temporal_init: uniform`` starts it flat instead.

Why the readout is per subject: brains differ, and a head shared by every subject predicts
their average (on a study where each subject has its own voxel weights that is ~1/sqrt(S)
of what is achievable). ``readout: subject`` (the default) adds a centred low-rank
correction per training subject to one shared head, so the shared head is exactly the
average subject and is what a subject unseen in training gets; ``readout: shared`` keeps
the shared head only. Design, parameter cost and the temporal filter's place:
:mod:`giblet.models.readout`. The batch's ``subject`` holds indices into
``ModelSpec.subjects``; map a dataset's by name (:meth:`GibletAutoencoder.subject_table`).

Why the decoders read the newest token: the reconstructions keep the bottleneck a
description of the stimulus (the autoencoder part) without asking one vector to hold a
whole window. Video is reconstructed at the pooled resolution the encoder sees; audio
codes are classes, so the audio decoder emits logits per codebook and code frame (or,
with ``loss.audio: mse``, the prototype's float regression of codes).

Video is average-pooled to ``video_pool`` by the dataset in the DataLoader workers, once
per decoded chunk (``GibletDataset(video_pool=...)``; the trainer's ``data.pool_video``,
the default): a batch of 90x160 frames pooled to 18x32 crosses to the device as 6x fewer
bytes than the uint8 frames. Given uint8 frames instead, the model pools them itself (on
the GPU when there is one) with the same function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from giblet.data.context import frame_indices
from giblet.data.frames import pool_frames
from giblet.errors import ConfigError
from giblet.hrf import hrf_kernel  # the one Glover kernel (dataset, model, synth); re-exported by giblet.models
from giblet.models.readout import READOUTS, SubjectReadout, subject_table

TEMPORAL_INITS = ("hrf", "uniform")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes of the model; everything data-dependent (voxels, codebooks, window) comes from :class:`ModelSpec`."""

    d_model: int = 128  # width of the per-TR tokens and the transformer blocks
    n_layers: int = 2  # transformer blocks over the window's tokens (0: encoders feed the bottleneck directly)
    n_heads: int = 4
    mlp_ratio: float = 4.0
    d_bottleneck: int = 64  # the shared per-TR latent
    dropout: float = 0.0
    video_frames: int = 2  # frames per TR the model sees (evenly spaced among the stored ones)
    video_pool: list[int] = field(default_factory=lambda: [6, 8])  # (height, width) after average pooling
    audio_embed: int = 32  # per-codebook code embedding width
    audio_segments: int = 4  # code frames of a TR are pooled into this many segments
    temporal_init: str = "hrf"  # hrf | uniform: start of the fMRI head's temporal filter
    readout: str = "subject"  # subject (shared head + a correction per training subject) | shared
    readout_rank: int = 8  # rank of each subject's correction (>= d_bottleneck: a full head per subject)


def check_model(cfg: AutoencoderConfig, problems: list[str]) -> None:
    """Append one message per bad value to ``problems``."""
    for name in ("d_model", "n_heads", "d_bottleneck", "video_frames", "audio_embed", "audio_segments",
                 "readout_rank"):
        value = getattr(cfg, name)
        if not (isinstance(value, int) and value >= 1):
            problems.append(f"model.{name}: must be an integer >= 1, got {value!r}")
    if not (isinstance(cfg.n_layers, int) and cfg.n_layers >= 0):
        problems.append(f"model.n_layers: must be an integer >= 0, got {cfg.n_layers!r}")
    if isinstance(cfg.d_model, int) and isinstance(cfg.n_heads, int) and cfg.n_heads >= 1 and cfg.d_model % cfg.n_heads:
        problems.append(f"model.d_model: {cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}")
    if len(cfg.video_pool) != 2 or not all(isinstance(v, int) and v >= 1 for v in cfg.video_pool):
        problems.append(f"model.video_pool: must be [height, width] >= 1, got {cfg.video_pool!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"model.dropout: must be in [0, 1), got {cfg.dropout}")
    if cfg.temporal_init not in TEMPORAL_INITS:
        problems.append(f"model.temporal_init: must be one of {', '.join(TEMPORAL_INITS)}, got {cfg.temporal_init!r}")
    if cfg.readout not in READOUTS:
        problems.append(f"model.readout: must be one of {', '.join(READOUTS)}, got {cfg.readout!r}")


@dataclass(frozen=True)
class ModelSpec:
    """What the data dictates: read from the store and the dataset, never hand-edited.

    Attributes:
        n_voxels: width of the fMRI head (the store's mask).
        window, lag: the dataset's causal context (``window + 1`` tokens).
        tr_s: TR in seconds (for the HRF).
        video: stored ``(frames_per_tr, height, width, channel)`` or None.
        audio: ``(codebooks, code_frames, vocab)`` or None.
        text: embedding width or None.
        features: the width of each served pretrained-feature layer (``GibletDataset(features=...)``,
            side by side in that order) or None.
        video_stats, text_stats, features_stats: the store's ``(mean, std)`` (per channel over
            [0, 1] pixels; per embedding dim; per feature dim, the layers' side by side), used to
            z-score inside the model.
        audio_loss: ``"ce"`` (logits) or ``"mse"`` (the prototype's float regression).
        subjects: the training subjects' names, in the order of the per-subject readouts
            (a checkpoint's weights fit only the same list).
    """

    n_voxels: int
    window: int = 0
    lag: int = 0
    tr_s: float = 1.5
    video: Optional[tuple] = None
    audio: Optional[tuple] = None
    text: Optional[int] = None
    video_stats: Optional[tuple] = None
    text_stats: Optional[tuple] = None
    features: Optional[tuple[int, ...]] = None
    features_stats: Optional[tuple] = None
    audio_loss: str = "ce"
    subjects: tuple[str, ...] = ()

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in ("video", "audio", "text", "features") if getattr(self, m) is not None)


def select_frames(frames: torch.Tensor, n: int) -> torch.Tensor:
    """Keep ``n`` evenly spaced frames of ``(..., frame, H, W, C)`` (cheap: done in loader workers)."""
    total = frames.shape[-4]
    if n >= total:
        return frames
    return frames.index_select(-4, torch.from_numpy(frame_indices(total, n)))


def _mlp(d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


class _Standardize(nn.Module):
    """z-score with fixed store statistics; zero-std features map to 0 (the ``ZScorer`` rule)."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = torch.as_tensor(np.asarray(mean), dtype=torch.float32), torch.as_tensor(np.asarray(std), dtype=torch.float32)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", torch.where(std > 0, 1.0 / std.clamp(min=1e-12), torch.zeros_like(std)),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class VideoPool(nn.Module):
    """Frames ``(..., frame, H, W, C)`` -> ``(..., frame * h * w * C)`` z-scored average-pooled pixels.

    Takes uint8 frames (pooled here, on the GPU when there is one) or frames the dataset
    already pooled (``GibletDataset(video_pool=...)``: float [0, 1] pixels, kept as they are):
    both go through :func:`giblet.data.frames.pool_frames`, so the two give the same input.
    """

    def __init__(self, pool: tuple[int, int], stats: Optional[tuple]):
        super().__init__()
        self.pool = tuple(pool)
        mean, std = stats if stats is not None else (np.full(3, 0.5), np.full(3, 0.25))
        self.norm = _Standardize(mean, std)  # per channel: the last axis

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.norm(pool_frames(frames, self.pool))  # (..., frame, h, w, C)
        return x.reshape(*frames.shape[:-4], -1)  # frames folded into features


class AudioEncoder(nn.Module):
    """Codes ``(..., codebook, code_frame)`` -> the mean code embedding of each segment of the TR
    (over its code frames and codebooks, one table per codebook) -> MLP.

    One ``embedding_bag`` per batch: the ``(..., codebook, code_frame, d)`` embeddings are never
    materialized (10^2 x less memory than embedding every code, and as cheap backward).
    """

    def __init__(self, n_codebooks: int, code_frames: int, vocab: int, d_embed: int, segments: int, d_out: int,
                 dropout: float):
        super().__init__()
        self.vocab, self.segments, self.n_codebooks, self.code_frames = vocab, segments, n_codebooks, code_frames
        self.embed = nn.EmbeddingBag(n_codebooks * vocab, d_embed, mode="mean")
        self.register_buffer("offset", torch.arange(n_codebooks) * vocab, persistent=False)
        starts = torch.searchsorted(segment_of_frame(code_frames, segments), torch.arange(segments))
        self.register_buffer("bag_starts", starts * n_codebooks, persistent=False)  # first code of each segment
        self.proj = _mlp(segments * d_embed, d_out, d_out, dropout)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        lead = codes.shape[:-2]
        idx = codes.clamp(0, self.vocab - 1).transpose(-1, -2) + self.offset  # (..., code_frame, codebook)
        idx = idx.reshape(-1)
        per = self.code_frames * self.n_codebooks  # codes of one TR
        offsets = (torch.arange(idx.numel() // per, device=codes.device).unsqueeze(1) * per + self.bag_starts).reshape(-1)
        e = self.embed(idx, offsets)  # (n * segments, d_embed)
        return self.proj(e.view(*lead, -1))


class AudioDecoder(nn.Module):
    """Bottleneck ``(batch, d)`` -> one distribution over codes per codebook and segment.

    Returns ``(batch, codebook, segment, vocab)`` logits; each segment stands for its
    ``code_frames / segments`` code frames (``giblet.training.losses.audio_ce`` scores every
    frame against its segment's distribution -- computed from code counts, so the logits
    never get a code-frame axis: 112 / segments times less memory). With ``loss: mse`` (the
    prototype) it returns ``(batch, codebook, code_frame)`` floats instead.
    """

    def __init__(self, d_in: int, d_hidden: int, n_codebooks: int, code_frames: int, vocab: int, d_embed: int,
                 segments: int, loss: str):
        super().__init__()
        self.segments, self.code_frames, self.d_embed, self.loss = segments, code_frames, d_embed, loss
        self.body = _mlp(d_in, d_hidden, segments * d_embed)
        n_out = vocab if loss == "ce" else 1
        self.out = nn.Parameter(torch.randn(n_codebooks, d_embed, n_out) / math.sqrt(d_embed))
        self.bias = nn.Parameter(torch.zeros(n_codebooks, 1, n_out))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(z).view(-1, self.segments, self.d_embed)
        out = torch.einsum("bsd,kdv->bksv", h, self.out) + self.bias
        if self.loss == "ce":
            return out
        return out.squeeze(-1)[..., segment_of_frame(self.code_frames, self.segments, z.device)]


def segment_of_frame(code_frames: int, segments: int, device=None) -> torch.Tensor:
    """``(code_frame,) int64``: the segment each code frame of a TR belongs to (equal split, in order)."""
    return torch.arange(code_frames, device=device) * segments // code_frames


class GibletAutoencoder(nn.Module):
    """See the module docstring. ``forward(batch)`` takes a prepared batch (:func:`prepare_batch`)."""

    def __init__(self, cfg: AutoencoderConfig, spec: ModelSpec):
        super().__init__()
        if not spec.modalities:
            raise ConfigError("GibletAutoencoder: the store has no stimulus modality (video, audio or text); "
                              "fMRI is a target, so the model needs at least one stimulus input")
        self.cfg, self.spec = cfg, spec
        d, db, p = cfg.d_model, cfg.d_bottleneck, cfg.dropout
        n_tok = spec.window + 1
        if spec.video is not None:
            frames, _, _, channels = spec.video
            n_pix = min(cfg.video_frames, frames) * channels * cfg.video_pool[0] * cfg.video_pool[1]
            self.video_pool = VideoPool(tuple(cfg.video_pool), spec.video_stats)
            self.enc_video = _mlp(n_pix, d, d, p)
            self.dec_video = _mlp(db, d, n_pix)
        if spec.audio is not None:
            n_cb, n_frames, vocab = spec.audio
            self.enc_audio = AudioEncoder(n_cb, n_frames, vocab, cfg.audio_embed, cfg.audio_segments, d, p)
            self.dec_audio = AudioDecoder(db, d, n_cb, n_frames, vocab, cfg.audio_embed, cfg.audio_segments,
                                          spec.audio_loss)
        if spec.text is not None:
            mean, std = spec.text_stats if spec.text_stats is not None else (np.zeros(spec.text), np.ones(spec.text))
            self.text_norm = _Standardize(mean, std)
            self.enc_text = _mlp(spec.text, d, d, p)
            self.dec_text = _mlp(db, d, spec.text)
        if spec.features is not None:
            width = sum(spec.features)
            mean, std = spec.features_stats if spec.features_stats is not None else (np.zeros(width), np.ones(width))
            self.features_norm = _Standardize(mean, std)
            block = np.repeat(np.arange(len(spec.features)), spec.features)  # the layer each column belongs to
            self.register_buffer("feature_layer", torch.as_tensor(block), persistent=False)
            self.enc_features = _mlp(width, d, d, p)
            self.dec_features = _mlp(db, d, width)
        self.position = nn.Parameter(torch.zeros(n_tok, d))
        self.token_norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, int(cfg.mlp_ratio * d), p, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.trunk = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False) if cfg.n_layers else nn.Identity()
        self.bottleneck = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, db))
        self.temporal = nn.Parameter(self._temporal_init(n_tok).repeat(db, 1))  # (d_bottleneck, W)
        n_subjects = len(spec.subjects) if cfg.readout == "subject" else 0
        self.fmri_head = SubjectReadout(db, spec.n_voxels, n_subjects, cfg.readout_rank)

    def _temporal_init(self, n_tok: int) -> torch.Tensor:
        if self.cfg.temporal_init == "uniform":
            return torch.full((n_tok,), 1.0 / n_tok)
        kernel = hrf_kernel(self.spec.tr_s)
        delays = self.spec.lag + np.arange(n_tok)[::-1]  # token w is (lag + W-1-w) TRs before the target
        w = np.where(delays < len(kernel), kernel[np.minimum(delays, len(kernel) - 1)], 0.0)
        return torch.tensor(w, dtype=torch.float32)

    def subject_table(self, names, device=None) -> torch.Tensor:
        """A dataset's subject indices -> this model's, by name (-1: unseen, the shared
        prediction): ``batch["subject"] = table[batch["subject"]]``; see
        :func:`giblet.models.readout.subject_table`."""
        return subject_table(self.spec.subjects, names, device)

    # -- forward -------------------------------------------------------------------------------
    def encode(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Prepared batch -> bottleneck ``(batch, W, d_bottleneck)`` and the normalized stimulus."""
        valid = batch["stim_valid"].unsqueeze(-1).float()  # (B, W, 1): no stimulus before TR 0
        tokens, normalized = 0.0, {}
        if self.spec.video is not None:
            normalized["video"] = v = self.video_pool(batch["video"])
            tokens = tokens + self.enc_video(v) * valid
        if self.spec.audio is not None:
            tokens = tokens + self.enc_audio(batch["audio"]) * valid
        if self.spec.text is not None:
            normalized["text"] = t = self.text_norm(batch["text"])
            tokens = tokens + self.enc_text(t) * (valid * batch["has_text"].unsqueeze(-1).float())
        if self.spec.features is not None:  # a layer's columns are 0 where it has no input (text without words)
            keep = batch["features_mask"][..., self.feature_layer].float()
            normalized["features"] = f = self.features_norm(batch["features"]) * keep
            tokens = tokens + self.enc_features(f) * valid
        h = self.trunk(self.token_norm(tokens) + self.position)
        return self.bottleneck(h), normalized

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns ``fmri`` ``(batch, voxel)``, ``recon_<m>`` for each stimulus modality (of the
        newest TR) and ``target_<m>`` (the z-scored, pooled stimulus they are compared with).

        ``batch["subject"]`` ``(batch,)`` int64: indices into ``spec.subjects`` (map a
        dataset's with :meth:`subject_table`); -1, or no ``subject`` key: the shared
        (average-subject) prediction."""
        z, normalized = self.encode(batch)
        out = {"fmri": self.fmri_head(torch.einsum("bwd,dw->bd", z, self.temporal), batch.get("subject"))}
        last = z[:, -1]
        for m in self.spec.modalities:
            out[f"recon_{m}"] = getattr(self, f"dec_{m}")(last)
            if m in normalized:
                out[f"target_{m}"] = normalized[m][:, -1].detach()
        return out


def prepare_batch(samples: list[dict], video_frames: int, denormalize=None) -> dict[str, torch.Tensor]:
    """Collate ``GibletDataset`` samples into the model's input (runs in DataLoader workers).

    Keeps ``video_frames`` frames per TR (uint8; pooling happens in the model) and gives
    every stimulus entry a context axis even with ``window=0``. The fMRI target is the
    stored z-scores (``fmri``); only with ``denormalize`` (e.g. ``GibletDataset.denormalize``,
    the prototype's raw scanner units) is a separate ``target_fmri`` added. Nothing else is
    duplicated: the decoders' targets are slices of the inputs (:func:`targets`).
    """
    from torch.utils.data import default_collate

    if "video" in samples[0]:
        samples = [{**s, "video": select_frames(s["video"], video_frames)} for s in samples]
    return finish_batch(default_collate(samples), denormalize)


def finish_batch(batch: dict, denormalize=None) -> dict[str, torch.Tensor]:
    """The model's input from a collated batch whose frames are already selected (e.g.
    ``GibletDataset(frames=n).get_batch``): the context axis even with ``window=0``, and the
    raw ``target_fmri`` only with ``denormalize``. ``GibletLoader(transform=...)`` runs it in
    the workers."""
    if "stim_valid" in batch and batch["stim_valid"].dim() == 1:  # window=0: add the context axis
        for k in ("video", "audio", "text", "has_text", "stim_valid", "features", "features_mask"):
            if k in batch:
                batch[k] = batch[k].unsqueeze(1)
    if denormalize is not None and "fmri" in batch:
        batch["target_fmri"] = denormalize(batch["fmri"], batch["subject"], batch.get("run"))
    return batch


def targets(batch: dict) -> dict[str, torch.Tensor]:
    """What the losses compare with, as views of a prepared batch: ``fmri`` (z-scores, or the
    raw ``target_fmri``), and for the newest TR of the window ``valid`` (stimulus exists),
    ``audio`` codes and ``has_text``."""
    out = {"fmri": batch.get("target_fmri", batch.get("fmri"))}
    if "stim_valid" in batch:
        out["valid"] = batch["stim_valid"][:, -1]
    if "audio" in batch:
        out["audio"] = batch["audio"][:, -1]
    if "has_text" in batch:
        out["has_text"] = batch["has_text"][:, -1]
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
