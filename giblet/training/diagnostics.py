"""What a run writes about itself, and the scale check that runs before step 1.

The log is JSON lines (``<run>/log.jsonl``), one object per record, each with a ``kind``:

- ``config``: the resolved config, model size, optimizer actually used, schedule in steps;
- ``scale_check``: one row per model input/target (batch statistics against the store's);
- ``train`` (every ``log.every`` optimizer steps): ``step``, ``epoch``, ``lr`` (the LR the
  optimizer applied), ``loss`` (weighted total), ``loss_<component>`` (unweighted),
  ``grad_norm`` (total, before clipping), ``grad_norm_<module>`` (per top-level module),
  ``data_wait`` (fraction of the interval spent waiting for batches), ``samples_per_s``;
- ``val``: ``step``, ``loss_<component>``, and Pearson r per voxel computed per subject on
  its val TRs (``giblet.evaluation.metrics``): ``r_mean`` (mean over subjects of each
  subject's mean r over the mask), ``r_median`` (median of subject medians), ``r_top10``
  (mean of subject means of their best 10 % of voxels), ``subjects`` (``{name: {"mean",
  "median", "top10", "n"}}``);
- ``profile`` (with ``log.profile_steps``): wall and device-busy ms per step, NCCL ms per
  step and the top operators (:class:`StepProfiler`; each rank's table in ``profile_rank{R}.txt``);
- ``resume``, ``end``.

A resumed run appends; readers keep the last record of each step (``stats.diagnose``).
TensorBoard scalars are written too when ``torch.utils.tensorboard`` imports.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from giblet.errors import ConfigError
from giblet.models.autoencoder import targets

SCALE_MODES = ("error", "warn", "off")


@dataclass(frozen=True)
class LogConfig:
    every: int = 10  # optimizer steps between train records
    val_every: int = 100  # optimizer steps between validations (and at the end)
    ckpt_every: int = 100  # optimizer steps between checkpoints (and at the end)
    tensorboard: bool = True  # also write TensorBoard scalars, if tensorboard is installed
    scale_check: str = "error"  # error | warn | off
    scale_tolerance: float = 5.0  # allowed factor on std, and |mean| in stds, before a mismatch
    profile_steps: int = 0  # > 0: torch.profiler over this many optimizer steps (StepProfiler)
    profile_start: int = 20  # ... starting after this many steps (past start-up)


def check_log(cfg: LogConfig, problems: list[str]) -> None:
    for name in ("every", "val_every", "ckpt_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"log.{name}: must be an integer >= 1, got {getattr(cfg, name)}")
    if cfg.scale_check not in SCALE_MODES:
        problems.append(f"log.scale_check: must be one of {', '.join(SCALE_MODES)}, got {cfg.scale_check!r}")
    if cfg.scale_tolerance <= 1:
        problems.append(f"log.scale_tolerance: must be > 1, got {cfg.scale_tolerance}")
    for name in ("profile_steps", "profile_start"):
        if getattr(cfg, name) < 0:
            problems.append(f"log.{name}: must be an integer >= 0, got {getattr(cfg, name)}")


class StepProfiler:
    """``torch.profiler`` over optimizer steps ``start+1 .. start+steps`` of one rank.

    ``after_step(step)`` is called once the optimizer has taken step ``step``. At the end
    it writes ``RUN/profile_rank{R}.txt`` (where the time went: the step's wall time, the
    device's busy time -- kernels and copies, NCCL apart -- and the top operators by self
    device and self CPU time) and returns the figures for the log. What it answers: is the
    GPU waiting for the host (busy << wall), for the gradient all-reduce (NCCL), or working.
    """

    def __init__(self, out: Path, rank: int, start: int, steps: int, device: "torch.device"):
        self.path, self.start, self.steps, self.device = Path(out) / f"profile_rank{rank}.txt", start, steps, device
        self._prof, self._t0 = None, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def after_step(self, step: int) -> Optional[dict]:
        if self.steps <= 0 or step not in (self.start, self.start + self.steps):
            return None
        from torch.profiler import ProfilerActivity, profile

        self._sync()
        if step == self.start:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
            return None
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        events = self._prof.key_averages()

        def dev(e) -> float:  # microseconds; the attribute was renamed in torch 2.4
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

        from torch.autograd import DeviceType

        # Kernels and copies only: CPU ops repeat their kernels' time, and record_function ranges
        # (DDP's forward, the optimizer step, NCCL calls) also appear on the device as annotations.
        on_device = [e for e in events
                     if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
        nccl = sum(dev(e) for e in on_device if "nccl" in e.key.lower())
        busy = sum(dev(e) for e in on_device) - nccl
        per = 1.0 / self.steps

        def cpu(e) -> float:
            return float(e.self_cpu_time_total)

        # record_function ranges (the optimizer step, DDP's forward) are not ops: their "self" CPU
        # time is the Python between the ops they hold, which would top the list on a busy host
        annotations = {e.name for e in self._prof.events() if getattr(e, "is_user_annotation", False)}
        ops = [e for e in events if e.key not in annotations]
        by_dev, by_cpu = sorted(events, key=dev, reverse=True), sorted(ops, key=cpu, reverse=True)
        summary = {"steps": self.steps, "wall_ms_per_step": wall * 1e3 * per,
                   "device_busy_ms_per_step": busy / 1e3 * per, "nccl_ms_per_step": nccl / 1e3 * per,
                   "device_busy_fraction": busy / 1e6 / wall,
                   "top_device": [[e.key, round(dev(e) / 1e3 * per, 3)] for e in by_dev[:8] if dev(e) > 0],
                   "top_cpu": [[e.key, round(cpu(e) / 1e3 * per, 3)] for e in by_cpu[:8]]}
        lines = [f"steps {self.start + 1}..{step}: wall {summary['wall_ms_per_step']:.2f} ms/step, device busy "
                 f"{summary['device_busy_ms_per_step']:.2f} ms/step ({100 * summary['device_busy_fraction']:.0f}%), "
                 f"NCCL {summary['nccl_ms_per_step']:.2f} ms/step (ms per step below)", ""]
        for title, ranked in (("by self device time", by_dev), ("by self CPU time", by_cpu)):
            lines.append(title)
            for e in ranked[:25]:
                lines.append(f"  {dev(e) / 1e3 * per:9.3f} dev {cpu(e) / 1e3 * per:9.3f} cpu "
                             f"{e.count / self.steps:8.1f}x  {e.key[:100]}")
            lines.append("")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines))
        self._prof = None
        return summary


class RunLog:
    """Appends JSON records (rank 0 only; other ranks get a no-op log)."""

    def __init__(self, path: Optional[Path], tensorboard: bool = False):
        self.path = Path(path) if path else None
        self._tb = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def write(self, kind: str, **fields) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        if self._tb is not None and "step" in fields:
            for k, v in fields.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, fields["step"])

    def close(self) -> None:
        if self.path is None:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return np.asarray(x).tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradients of each top-level module (and top-level parameters), by name."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            groups.setdefault(name.split(".")[0], []).append(p.grad.detach().float().norm())
    return {k: float(torch.stack(v).norm()) for k, v in groups.items()}


class Meter:
    """Data-wait and throughput over one logging interval."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.samples = time.perf_counter(), 0.0, 0

    def summary(self, world_size: int = 1) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"data_wait": self.wait / elapsed, "samples_per_s": self.samples * world_size / elapsed}


# -- scale check -------------------------------------------------------------------------------
def _row(name: str, x: torch.Tensor, expect_mean: float, expect_std: float, tol: float, note: str = "",
         low: float = 1.0) -> dict:
    """``low``: the std may also be this factor below ``expect_std / tol`` (pooled pixels)."""
    x = x.detach().double().flatten()
    mean, std = (float(x.mean()), float(x.std(unbiased=False))) if x.numel() else (0.0, 0.0)
    ok = (abs(mean - expect_mean) <= tol * expect_std and expect_std / tol / low <= std <= expect_std * tol)
    return {"input": name, "batch_mean": mean, "batch_std": std, "expected_mean": expect_mean,
            "expected_std": expect_std, "ok": bool(ok), "note": note}


def scale_check(batch: dict, spec, store_stats: dict, loss_cfg, tol: float = 5.0) -> list[dict]:
    """Batch statistics of every model input and target against what the store says they are.

    Inputs are put through the store's saved stats (video per channel over [0, 1] pixels,
    text per dimension): a batch of the same data comes out as z-scores, so a store whose
    stats belong to other data, another scale or another pixel range is caught. The fMRI
    target must be z-scores (the head starts at 0 and its loss weight assumes O(1)); audio
    codes must be classes inside the vocabulary, and are flagged when regressed under MSE.

    Args:
        batch: a prepared batch (``giblet.models.prepare_batch``), on CPU.
        spec: the model's ``ModelSpec``.
        store_stats: ``{"fmri_raw_mean": float, "fmri_raw_std": float}`` -- the store's typical
            raw scanner mean and std, to name raw-unit targets as such -- and, when the batch's
            video was pooled by the dataset (float [0, 1] pixels), ``"video_pool_factor"``:
            stored pixels per pooled pixel. Pooling keeps the mean and can lower the std by
            up to its square root (independent pixels), so the std's lower bound widens by it.

    Returns:
        One dict per row: ``input``, ``batch_mean``, ``batch_std``, ``expected_mean``,
        ``expected_std``, ``ok``, ``note``.
    """
    rows, tgt = [], targets(batch)
    valid = batch["stim_valid"].bool() if "stim_valid" in batch else None
    if "video" in batch and spec.video_stats is not None:
        mean, std = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in spec.video_stats)
        px = batch["video"][valid] if valid is not None else batch["video"]
        if px.dtype == torch.uint8:
            name, low, px = "video (pixels/255, z-scored with video/mean|std)", 1.0, px.double() / 255.0
        else:  # pooled by the dataset: [0, 1] pixels
            factor = float(store_stats.get("video_pool_factor", 1.0))
            name, low = f"video (pooled {factor:.3g}:1, z-scored with video/mean|std)", factor ** 0.5
        z = (px.double() - mean) / torch.where(std > 0, std, torch.ones_like(std))
        rows.append(_row(name, z, 0.0, 1.0, tol, low=low))
    if "text" in batch and spec.text_stats is not None:
        mean, std = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in spec.text_stats)
        keep = (valid & batch["has_text"].bool()) if valid is not None else batch["has_text"].bool()
        z = (batch["text"][keep].double() - mean) / torch.where(std > 0, std, torch.ones_like(std))
        z = z[:, std > 0] if z.numel() else z
        rows.append(_row("text (z-scored with text/mean|std)", z, 0.0, 1.0, tol))
    if tgt["fmri"] is not None:
        row = _row("fmri target", tgt["fmri"], 0.0, 1.0, tol)
        if not row["ok"] and abs(row["batch_mean"] - store_stats.get("fmri_raw_mean", np.nan)) < \
                3 * store_stats.get("fmri_raw_std", 0) + 1e-9 * abs(row["batch_mean"]):
            row["note"] = (f"raw scanner units (the store's raw mean is {store_stats['fmri_raw_mean']:.4g}); "
                           f"the fMRI loss expects z-scores: set loss.fmri_target=z")
        rows.append(row)
    if "audio" in tgt and spec.audio is not None:
        codes = tgt["audio"]
        vocab = spec.audio[2]
        inside = bool(codes.min() >= 0 and codes.max() < vocab) and not codes.is_floating_point()
        row = {"input": "audio codes (classes)", "batch_mean": float(codes.double().mean()),
               "batch_std": float(codes.double().std(unbiased=False)), "expected_mean": float("nan"),
               "expected_std": float("nan"), "ok": inside,
               "note": "" if inside else f"codes outside 0..{vocab - 1} or not integers"}
        if loss_cfg.audio == "mse":
            row["ok"] = False
            row["note"] = (f"integer codes regressed under MSE (target std {row['batch_std']:.3g}, loss ~ "
                           f"{float(codes.double().pow(2).mean()):.3g} at the start); codes are classes: set loss.audio=ce")
        rows.append(row)
    return rows


def format_scale_check(rows: list[dict]) -> str:
    lines = [f"{'scale check':<52} {'batch mean':>11} {'batch std':>10} {'expected':>14}  verdict"]
    for r in rows:
        expect = "classes" if math.isnan(r["expected_mean"]) else f"{r['expected_mean']:.3g} +- {r['expected_std']:.3g}"
        verdict = "ok" if r["ok"] else "MISMATCH" + (f": {r['note']}" if r["note"] else "")
        lines.append(f"{r['input']:<52} {r['batch_mean']:>11.4g} {r['batch_std']:>10.4g} {expect:>14}  {verdict}")
    return "\n".join(lines)


def enforce_scale_check(rows: list[dict], mode: str) -> None:
    """``error``: raise one ``ConfigError`` naming every mismatch; ``warn``: a warning each."""
    bad = [r for r in rows if not r["ok"]]
    if not bad or mode == "off":
        return
    msg = "; ".join(f"{r['input']}: batch mean {r['batch_mean']:.4g}, std {r['batch_std']:.4g}"
                    + (f" ({r['note']})" if r["note"] else "") for r in bad)
    if mode == "error":
        raise ConfigError(f"scale check before step 1 failed: {msg}; fix the data or the loss settings "
                          f"(log.scale_check=warn trains anyway)")
    warnings.warn(f"scale check: {msg}", stacklevel=2)
