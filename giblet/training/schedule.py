"""The optimizer and its learning-rate schedule, both counted in optimizer steps.

The prototype gave its warm-up as a number and stepped the scheduler once per *epoch*: after
15 epochs (16 hours) the LR was still at 15 % of its target. Here the schedule is a pure
function of the optimizer step (:func:`lr_factor`), a warm-up given in epochs is converted
to steps once, at start-up, and printed (:func:`resolve_schedule`). ``unit: epoch`` exists
only so ``configs/train/prototype.yaml`` can reproduce the old mistake on purpose; the
diagnostics flag any run that uses it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

UNITS = ("step", "epoch")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class ScheduleConfig:
    """How long to train and how the LR moves.

    ``warmup_steps`` wins over ``warmup_epochs`` when both are set. ``min_lr_ratio`` is
    the floor of the cosine, as a fraction of the peak LR.
    """

    epochs: float = 10.0  # run length; max_steps, when set, wins
    max_steps: Optional[int] = None
    warmup_steps: Optional[int] = None
    warmup_epochs: Optional[float] = 1.0
    min_lr_ratio: float = 0.1
    unit: str = "step"  # step (correct) | epoch (the prototype's bug, for reproducing it only)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and gradient handling. ``name: adamw8bit`` uses bitsandbytes on CUDA when importable."""

    name: str = "adamw"  # adamw | adamw8bit
    lr: float = 1e-3  # peak LR, reached at the end of warm-up
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max total grad norm; 0 disables clipping (the pre-clip norm is logged either way)
    accum_steps: int = 1  # micro-batches per optimizer step
    zero: bool = False  # ZeRO-1 over flat buffers instead of DDP: parameters and gradients live in one flat
    #   buffer each, every rank keeps the state of, and updates, 1/N of it (giblet.training.zero)


@dataclass(frozen=True)
class Schedule:
    """The schedule a run actually uses, in optimizer steps."""

    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    min_lr_ratio: float
    unit: str = "step"

    def describe(self) -> str:
        if self.unit == "epoch":
            return (f"schedule: {self.total_steps} optimizer steps ({self.steps_per_epoch}/epoch), linear warm-up "
                    f"{self.warmup_steps} EPOCHS (unit=epoch: the schedule advances once per epoch, the prototype's "
                    f"bug), cosine decay to {self.min_lr_ratio:g} x peak")
        epochs = self.warmup_steps / max(self.steps_per_epoch, 1)
        return (f"schedule: {self.total_steps} optimizer steps ({self.steps_per_epoch}/epoch), linear warm-up "
                f"{self.warmup_steps} steps (= {epochs:.3g} epochs), cosine decay to {self.min_lr_ratio:g} x peak")


def check_schedule(cfg: ScheduleConfig, optim: OptimConfig, problems: list[str]) -> None:
    """Append one message per bad value to ``problems`` (the config loader reports them all)."""
    def check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    check(cfg.unit in UNITS, f"schedule.unit: must be one of {', '.join(UNITS)}, got {cfg.unit!r}")
    check(cfg.epochs > 0, f"schedule.epochs: must be > 0, got {cfg.epochs}")
    check(cfg.max_steps is None or cfg.max_steps >= 1, f"schedule.max_steps: must be >= 1 or null, got {cfg.max_steps}")
    check(cfg.warmup_steps is None or cfg.warmup_steps >= 0,
          f"schedule.warmup_steps: must be >= 0 or null, got {cfg.warmup_steps}")
    check(cfg.warmup_epochs is None or cfg.warmup_epochs >= 0,
          f"schedule.warmup_epochs: must be >= 0 or null, got {cfg.warmup_epochs}")
    check(0.0 <= cfg.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio: must be in [0, 1], got {cfg.min_lr_ratio}")
    check(optim.name in OPTIMIZERS, f"optim.name: must be one of {', '.join(OPTIMIZERS)}, got {optim.name!r}")
    check(optim.lr > 0, f"optim.lr: must be > 0, got {optim.lr}")
    check(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
          f"optim.betas: must be two numbers in [0, 1), got {optim.betas}")
    check(optim.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0 = off), got {optim.grad_clip}")
    check(optim.accum_steps >= 1, f"optim.accum_steps: must be an integer >= 1, got {optim.accum_steps}")


def resolve_schedule(cfg: ScheduleConfig, batches_per_epoch: int, accum_steps: int = 1) -> Schedule:
    """Turn epochs into optimizer steps.

    Args:
        batches_per_epoch: micro-batches one rank draws per epoch.
        accum_steps: micro-batches per optimizer step.
    """
    steps_per_epoch = max(1, batches_per_epoch // accum_steps)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    elif cfg.warmup_epochs is not None:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
    else:
        warmup = 0
    if cfg.unit == "step":
        warmup = min(warmup, total)
    return Schedule(total_steps=int(total), warmup_steps=int(warmup), steps_per_epoch=steps_per_epoch,
                    min_lr_ratio=cfg.min_lr_ratio, unit=cfg.unit)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer ``step`` (0-based): linear warm-up, then cosine.

    Step 0 already gets ``1 / warmup_steps`` of the peak (never an all-zero first update).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_position(sched: Schedule, step: int) -> int:
    """The counter the schedule reads: the optimizer step, or (``unit: epoch``) the epoch."""
    return step if sched.unit == "step" else step // sched.steps_per_epoch


def build_scheduler(optimizer: torch.optim.Optimizer, sched: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step; its ``state_dict`` resumes it exactly."""
    def factor(step: int) -> float:
        return lr_factor(schedule_position(sched, step), sched.total_steps, sched.warmup_steps, sched.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms and embeddings' 1-d parameters are not decayed (nanoGPT)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over fp32 master weights (``groups``: :func:`param_groups`, or the flat shards of
    :class:`giblet.training.zero.Zero1`); bitsandbytes 8-bit AdamW on CUDA when asked and
    importable. A group may carry ``optim_bits: 32`` (bitsandbytes then keeps its state in fp32).

    Returns:
        ``(optimizer, name)`` where ``name`` says what actually runs (logged, so a silent
        fallback is visible).
    """
    kwargs = {"lr": cfg.lr, "betas": (float(cfg.betas[0]), float(cfg.betas[1]))}
    if cfg.name == "adamw8bit":
        if device.type != "cuda":
            warnings.warn("optim.name=adamw8bit needs CUDA; using torch AdamW on CPU", stacklevel=2)
        else:
            try:
                import bitsandbytes as bnb
            except ImportError:
                warnings.warn("optim.name=adamw8bit: bitsandbytes is not importable; using torch AdamW "
                              "(pip install bitsandbytes)", stacklevel=2)
            else:
                opt = _stream_ordered(bnb.optim.AdamW8bit)(groups, **kwargs)
                manager = bnb.optim.GlobalOptimManager.get_instance()
                for g in groups:
                    if "optim_bits" in g:
                        manager.override_config(g["params"], "optim_bits", g["optim_bits"])
                return opt, "bitsandbytes.AdamW8bit (stream-ordered)"
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, fused=fused, **kwargs), f"torch.AdamW{' (fused)' if fused else ''}"


def _stream_ordered(cls: type) -> type:
    """``cls`` (a bitsandbytes 8-bit optimizer) without its device-wide synchronize after
    every parameter.

    ``bitsandbytes.optim.Optimizer8bit.step`` (up to at least 0.50) calls
    ``torch.cuda.synchronize()`` after each parameter's update: 229 host-device round trips
    per step for the GPU config, 25-36 ms of a ~120 ms step spent blocked, and the GPU
    idle while Python prepares the next update (measured with ``log.profile_steps``; see
    docs/performance.md). Its kernels are launched on the default stream, so when the
    training loop runs on the default stream too, every later read of the parameters is
    ordered after them without any synchronize. This ``step`` is bitsandbytes' loop minus
    that call; paged optimizers, or a caller on another stream, get bitsandbytes' own
    ``step`` unchanged. A GPU test checks the updates are bit-identical.
    """

    class StreamOrdered(cls):
        @torch.no_grad()
        def step(self, closure=None):
            device = next((p.device for g in self.param_groups for p in g["params"]), None)
            if (self.is_paged or device is None or device.type != "cuda"
                    or torch.cuda.current_stream(device) != torch.cuda.default_stream(device)):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)  # queued on the default stream, in order
            return loss

    StreamOrdered.__name__ = StreamOrdered.__qualname__ = f"StreamOrdered{cls.__name__}"
    return StreamOrdered


def check_warmup(sched: Schedule) -> Optional[str]:
    """A warning when the schedule cannot reach its peak LR in the run (or ``None``)."""
    if sched.unit == "epoch":
        reach = lr_factor((sched.total_steps - 1) // sched.steps_per_epoch, sched.total_steps, sched.warmup_steps,
                          sched.min_lr_ratio)
        return (f"schedule.unit=epoch: the LR advances once per epoch, so after {sched.total_steps} steps it is at "
                f"{100 * reach:.3g} % of the peak; set schedule.unit=step")
    if sched.warmup_steps > sched.total_steps // 2:
        return (f"schedule: warm-up takes {sched.warmup_steps} of {sched.total_steps} steps; the peak LR is reached "
                f"only in the second half of the run; shorten schedule.warmup_epochs")
    return None


__all__ = ["ScheduleConfig", "OptimConfig", "Schedule", "resolve_schedule", "lr_factor", "build_scheduler",
           "build_optimizer", "check_schedule", "check_warmup", "schedule_position"]
