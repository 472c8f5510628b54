"""Process group, device and data parallelism: one process, or many under ``torchrun``.

Ranks come from torchrun's environment through :func:`giblet.data.world.world_from_env`:
``RANK`` is the global rank (it picks the data shard and who writes checkpoints),
``LOCAL_RANK`` only picks the GPU on this node. The backend is NCCL when the device is a
GPU, gloo on CPU. Nothing here runs at import.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from giblet.data.world import World, world_from_env
from giblet.errors import ConfigError
from giblet.training.diagnostics import grad_norms
from giblet.training.zero import Zero1, check_compress  # noqa: F401  (check_compress: part of this API)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its place in the world, its device and its autocast dtype."""

    world: World
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32 throughout

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on GPU (parameters and optimizer state stay fp32), nothing otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def pick_device(name: str, world: World) -> torch.device:
    """``auto``: this node's GPU ``LOCAL_RANK`` when CUDA is available, else CPU."""
    if name not in DEVICES:
        raise ConfigError(f"device: must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no GPU (torch.cuda.is_available() is False); set device=cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                          f"launch torchrun with --nproc_per_node <= the GPU count")
    return torch.device("cuda", world.local_rank)


def pick_amp(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def setup(device: str = "auto", precision: str = "auto", timeout_s: float = 1800) -> Runtime:
    """Initialize the process group (when ``WORLD_SIZE > 1``) and pick the device."""
    world = world_from_env()
    dev = pick_device(device, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    return Runtime(world=world, device=dev, amp_dtype=pick_amp(precision, dev))


def cleanup(together: bool = False) -> None:
    """Leave the process group; ``together`` (the end of a run every rank reaches): after a
    barrier, since a rank that closes its gloo connections while another still uses them can
    abort that one on a busy machine. On an error path no barrier: the other ranks may be gone."""
    if dist.is_available() and dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()


@dataclass(frozen=True)
class DDPConfig:
    """``DistributedDataParallel`` knobs (used only with several ranks; ``compress`` also by ZeRO-1)."""

    bucket_cap_mb: float = 25.0  # gradient all-reduce bucket size; larger = fewer, longer collectives
    gradient_as_bucket_view: bool = True  # grads live in the buckets: no copy per step, less memory
    static_graph: bool = False  # same graph every step: lets DDP skip per-step bookkeeping
    compress: str = "none"  # "bf16": all-reduce (ZeRO-1: reduce-scatter) gradients in bfloat16 (half the bytes;
    #   fp32 master weights stay)
    bucket_divide: bool = True  # divide by the world size once per bucket (a comm hook), not once per parameter


def wrap(model: torch.nn.Module, rt: Runtime, cfg: DDPConfig = DDPConfig()) -> torch.nn.Module:
    """DistributedDataParallel when there are several ranks; the bare model otherwise."""
    check_compress(cfg.compress)
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [rt.device.index] if rt.device.type == "cuda" else None
    # broadcast_buffers=False: the model's buffers are constants from the store (z-score stats,
    # index offsets), equal on every rank; broadcasting them would add a collective to every forward.
    ddp = DDP(model, device_ids=ids, bucket_cap_mb=cfg.bucket_cap_mb, broadcast_buffers=False,
              gradient_as_bucket_view=cfg.gradient_as_bucket_view, static_graph=cfg.static_graph)
    # Without a hook DDP divides every parameter's gradient by the world size as it lands in its
    # bucket: one kernel launch and a hook's worth of CPU per parameter per step (~230 for the
    # GPU config). PyTorch's default all-reduce hook divides each bucket once instead; same sums.
    if cfg.compress == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        ddp.register_comm_hook(None, bf16_compress_hook)
    elif cfg.bucket_divide:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, allreduce_hook)
    return ddp


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside ``torch.compile`` and/or DDP wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps (all but the last)."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


class Replicated:
    """Every rank holds and updates all the parameters: DDP all-reduces the gradients during
    the backward (the bare model on one process). The step interface :class:`Zero1` shares."""

    def __init__(self, model: torch.nn.Module, groups: list[dict], rt: Runtime, cfg: DDPConfig = DDPConfig()):
        self.model = wrap(model, rt, cfg)
        self.param_groups = groups
        self._bare, self._params = model, [p for g in groups for p in g["params"]]

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        return maybe_no_sync(self.model, skip)

    def reduce_gradients(self) -> None:
        """Nothing left to do: DDP averaged the gradients during the backward."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm)

    def module_grad_norms(self) -> dict[str, float]:
        return grad_norms(self._bare)

    def after_step(self) -> None:
        pass

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        if "zero_shards" in saved:
            raise ConfigError("the checkpoint's optimizer state is sharded (written with optim.zero=true); "
                              "resume with optim.zero=true")
        optimizer.load_state_dict(saved)


def data_parallel(model: torch.nn.Module, groups: list[dict], rt: Runtime, cfg: DDPConfig = DDPConfig(),
                  zero: bool = False):
    """How the ranks share a step: :class:`Replicated` (DDP), or flat-buffer ZeRO-1 with ``zero``."""
    if not zero:
        return Replicated(model, groups, rt, cfg)

    return Zero1(model, groups, rt.world.world_size, rt.world.rank, compress=cfg.compress)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (a list of one on a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch; ranks differ (dropout), the data order does not (it is seeded apart)."""
    s = int(seed) * 1000 + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    """This process's RNG states as ``weights_only``-loadable values (tensors, ints, lists)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate()),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def env_summary() -> dict:
    """The launch environment, for the log's header (which variables torchrun set)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: os.environ[k] for k in keys if k in os.environ}
