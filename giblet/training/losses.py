"""Losses that are comparable by construction (the val metric: giblet.evaluation.metrics).

Each component starts near a known scale, so a weight means what it says:

- ``fmri``: MSE on z-scored voxels (about 1 for a model predicting 0);
- ``video``: MSE on the z-scored, pooled frames of the newest TR of the window (about 1);
- ``text``: MSE on z-scored embeddings, only where an annotation covers the TR (about 1);
- ``features``: MSE on the z-scored pretrained-feature layers (about 1; a layer without input
  at the TR is 0 in both the target and, once learnt, the reconstruction);
- ``audio``: cross-entropy per codebook over the code classes, averaged over codebooks and
  code frames (``ln(vocab)`` = 6.9 nats for 1024 codes at the start; hence its smaller
  default weight).

The prototype's choices are kept as flags so ``configs/train/prototype.yaml`` can
reproduce them: ``fmri_target: raw`` (targets de-normalized to scanner units, ~1000x
larger) and ``audio: mse`` (integer codes as floats under MSE, ~10^5 at the start).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from giblet.models.autoencoder import targets

FMRI_TARGETS = ("z", "raw")
AUDIO_LOSSES = ("ce", "mse")
COMPONENTS = ("fmri", "video", "audio", "text", "features")


@dataclass(frozen=True)
class LossConfig:
    """Per-modality weights (explicit: a modality the store has must have one) and loss kinds."""

    weights: dict[str, float] = field(default_factory=lambda: {"fmri": 1.0, "video": 0.1, "audio": 0.02,
                                                                "text": 0.1, "features": 0.1})
    fmri_target: str = "z"  # z (store's z-scores) | raw (de-normalized scanner units: the prototype)
    audio: str = "ce"  # ce (codes are classes) | mse (codes as floats: the prototype)


def check_losses(cfg: LossConfig, modalities: Optional[tuple] = None, problems: Optional[list] = None) -> list[str]:
    """Messages for bad values; with ``modalities``, also for a present modality without a weight."""
    problems = [] if problems is None else problems
    if cfg.fmri_target not in FMRI_TARGETS:
        problems.append(f"loss.fmri_target: must be one of {', '.join(FMRI_TARGETS)}, got {cfg.fmri_target!r}")
    if cfg.audio not in AUDIO_LOSSES:
        problems.append(f"loss.audio: must be one of {', '.join(AUDIO_LOSSES)}, got {cfg.audio!r}")
    unknown = [k for k in cfg.weights if k not in COMPONENTS]
    if unknown:
        problems.append(f"loss.weights: unknown component(s) {unknown}; known: {', '.join(COMPONENTS)}")
    bad = {k: v for k, v in cfg.weights.items() if not v >= 0}
    if bad:
        problems.append(f"loss.weights: must be >= 0, got {bad}")
    for m in modalities or ():
        if m not in cfg.weights:
            problems.append(f"loss.weights.{m}: the store has {m} but no weight is set; set loss.weights.{m}=W "
                            f"(0 turns its decoder's loss off)")
    return problems


def fmri_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over ``(batch, voxel)``, in whatever units the target is in."""
    return F.mse_loss(pred.float(), target.float())


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over ``(batch, ...)`` rows where ``mask`` ``(batch,)`` is True (0 if none)."""
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    weight = mask.float()
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


def audio_ce(logits: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the code classes, averaged over codebooks and code frames of rows where
    ``mask`` ``(batch,)`` is True.

    Args:
        logits: ``(batch, codebook, segment, vocab)``: one distribution per segment of the TR;
            code frame ``f`` of ``code_frame`` belongs to segment ``f * segment // code_frame``
            (``segment == code_frame`` is plain per-frame cross-entropy).
        codes: ``(batch, codebook, code_frame)`` int64.

    The sum over a segment's frames of ``-log p(code)`` is computed as the segment's code
    counts against its log-probabilities: the same number, without expanding the logits
    to every code frame.
    """
    b, k, s, v = logits.shape
    t = codes.shape[-1]
    seg = torch.arange(t, device=codes.device) * s // t
    counts = torch.zeros(b, k, s * v, device=logits.device, dtype=torch.float32)
    counts.scatter_add_(2, seg * v + codes.clamp(0, v - 1), torch.ones(codes.shape, device=codes.device))
    logp = torch.log_softmax(logits.float(), dim=-1).reshape(b, k, s * v)
    per = -(counts * logp).sum(-1).mean(1) / t  # (batch,)
    weight = mask.float()
    return (per * weight).sum() / weight.sum().clamp(min=1.0)


def compute_losses(outputs: dict, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total and each unweighted component.

    Args:
        outputs: the model's ``forward`` dict: ``fmri``, ``recon_<m>`` and ``target_<m>``
            (the z-scored, pooled stimulus the model saw, for video and text).
        batch: the prepared batch (``giblet.models.autoencoder.prepare_batch``); its targets
            are read through ``giblet.models.autoencoder.targets``.

    Returns:
        ``(total, {component: loss})``; log the components with ``.item()``.
    """
    tgt = targets(batch)
    parts: dict[str, torch.Tensor] = {"fmri": fmri_loss(outputs["fmri"], tgt["fmri"])}
    valid = tgt.get("valid")
    if "recon_video" in outputs:
        parts["video"] = masked_mse(outputs["recon_video"], outputs["target_video"], valid)
    if "recon_text" in outputs:
        parts["text"] = masked_mse(outputs["recon_text"], outputs["target_text"], valid & tgt["has_text"])
    if "recon_features" in outputs:
        parts["features"] = masked_mse(outputs["recon_features"], outputs["target_features"], valid)
    if "recon_audio" in outputs:
        if cfg.audio == "ce":
            parts["audio"] = audio_ce(outputs["recon_audio"], tgt["audio"], valid)
        else:  # the prototype: integer codes regressed as floats
            parts["audio"] = masked_mse(outputs["recon_audio"], tgt["audio"].float(), valid)
    total = sum(cfg.weights.get(k, 0.0) * v for k, v in parts.items())
    return total, parts
