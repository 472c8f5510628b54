"""ZeRO-1 data parallelism over flat buffers (``optim.zero=true``), in place of DDP.

The trainable parameters become views of one flat fp32 buffer and their gradients views of
another, laid out group by group (decayed, then not decayed), every parameter at an offset
that is a multiple of 256 (bitsandbytes' quantization block, so no block spans two
parameters or two shards), the whole cut into one equal contiguous shard per rank. A step
is then a fixed handful of collectives and kernels, however many parameters the model has::

    backward                 each rank's gradients accumulate in its own flat buffer
    reduce_gradients()       reduce-scatter: this rank's shard receives the mean over ranks
    clip_grad_norm_(max)     the global pre-clip norm (one scalar all-reduce); the shard is clipped
    optimizer.step()         one update per group, over this rank's shard only
    after_step()             all-gather: every rank's flat buffer holds all the new weights

Against DDP with a per-parameter optimizer this removes the host work per parameter (a
reducer hook, a copy into the bucket, one optimizer call each: 229 parameters in the GPU
config), and each rank runs 1/N of the optimizer's kernels -- for bitsandbytes' 8-bit
AdamW about half of the GPU config's device time per step on one GPU. The collectives move
as many bytes as DDP's all-reduce (reduce-scatter of the gradients, all-gather of the
weights); they run after the backward instead of beside it. With one rank nothing is sent
and the optimizer updates the whole buffer in one call per group.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from giblet.errors import ConfigError


def check_compress(compress: str) -> None:
    """``ddp.compress``, shared by DDP's all-reduce and ZeRO-1's reduce-scatter."""
    if compress not in ("none", "bf16"):
        raise ConfigError(f"ddp.compress={compress!r}; choose none or bf16")

ALIGN = 256  # elements: bitsandbytes' blockwise quantization block

# torch >= 2.13 renames the tensor collectives; older releases have only the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _layout(groups: list[dict], world_size: int) -> tuple[list[int], list[tuple[int, int]], int]:
    """Each parameter's offset in the flat buffer (a multiple of ``ALIGN``), each group's
    ``[start, end)``, and the buffer's length (a multiple of ``ALIGN * world_size``)."""
    offsets, spans, end = [], [], 0
    for g in groups:
        start = end
        for p in g["params"]:
            offsets.append(end)
            end += _round_up(p.numel(), ALIGN)
        spans.append((start, end))
    return offsets, spans, _round_up(max(end, 1), ALIGN * world_size)


class Zero1:
    """Flat-buffer ZeRO-1 over ``world_size`` ranks (the process group must be up when > 1).

    Args:
        model: on its device; its trainable parameters are re-pointed into the flat buffer
            (values kept; rank 0's are broadcast so every rank starts equal).
        groups: optimizer groups over ``model``'s parameters (``params`` plus options such as
            ``weight_decay``); one leaf per group and shard goes to the optimizer.
        compress: ``"bf16"`` reduce-scatters the gradients in bfloat16 (half the bytes; the
            mean lands in fp32).
    """

    def __init__(self, model: torch.nn.Module, groups: list[dict], world_size: int = 1, rank: int = 0,
                 compress: str = "none"):
        check_compress(compress)
        params = [p for g in groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params) or not params:
            raise ValueError("Zero1: every trainable parameter must be in exactly one group")
        if any(p.dtype != torch.float32 or p.device != params[0].device for p in params):
            raise ConfigError("optim.zero=true keeps fp32 master weights on one device; the model has other parameters")
        self.model, self.world_size, self.rank, self.compress = model, world_size, rank, compress
        offsets, spans, total = _layout(groups, world_size)
        device = params[0].device
        self.flat = torch.zeros(total, dtype=torch.float32, device=device)
        self.grad = torch.zeros_like(self.flat)
        with torch.no_grad():
            for p, off in zip(params, offsets):
                view = self.flat[off:off + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                p.grad = self.grad[off:off + p.numel()].view_as(p)  # backward accumulates into it in place
        if world_size > 1:
            dist.broadcast(self.flat, src=0)
        self.shard = total // world_size
        self.lo = rank * self.shard
        self.shard_grad = self.grad[self.lo:self.lo + self.shard] if world_size == 1 else \
            torch.zeros(self.shard, device=device)
        self.param_groups = [self._leaf_group(g, span) for g, span in zip(groups, spans)]
        # per-module norms: each parameter's piece of this rank's shard, by top-level module
        names = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
        self.modules = sorted({names[id(p)] for p in params})
        pieces = [(self._shard_part(off, off + p.numel()), self.modules.index(names[id(p)]))
                  for p, off in zip(params, offsets)]
        self._pieces = [t for t, _ in pieces if t is not None]
        self._owner = torch.tensor([m for t, m in pieces if t is not None], dtype=torch.long, device=device)

    def _shard_part(self, a: int, b: int) -> torch.Tensor | None:
        """The shard gradient's view of flat elements ``[a, b)``, or None outside this shard."""
        a, b = max(a, self.lo), min(b, self.lo + self.shard)
        return self.shard_grad[a - self.lo:b - self.lo] if a < b else None

    def _leaf_group(self, group: dict, span: tuple[int, int]) -> dict:
        """What the optimizer updates of ``group``: one flat leaf over this rank's part of it, or
        none (every rank keeps every group, so the LR scheduler's state is the same on all)."""
        leaves, grad = [], self._shard_part(*span)
        if grad is not None:
            a = max(span[0], self.lo)
            leaves = [self.flat[a:a + grad.numel()]]
            leaves[0].grad = grad
        opts = {k: v for k, v in group.items() if k != "params"}
        if all(p.dim() < 2 for p in group["params"]):
            # bitsandbytes keeps tensors under 4,096 elements (biases, norms) in 32-bit state;
            # flattened into one leaf they would pass that size
            opts.setdefault("optim_bits", 32)
        return {"params": leaves, **opts}

    # -- the step ------------------------------------------------------------------------------
    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        """Nothing to skip: gradients are only exchanged by :meth:`reduce_gradients`."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """This rank's shard of the gradients, averaged over the ranks."""
        if self.world_size == 1:
            return
        if self.compress == "bf16":
            out = torch.empty(self.shard, dtype=torch.bfloat16, device=self.flat.device)
            _reduce_scatter(out, self.grad.to(torch.bfloat16))
            self.shard_grad.copy_(out)
        else:
            _reduce_scatter(self.shard_grad, self.grad)
        self.shard_grad.mul_(1.0 / self.world_size)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global L2 norm of the averaged gradients (a tensor: no host sync), clipping the
        shard to ``max_norm`` exactly as ``torch.nn.utils.clip_grad_norm_`` would."""
        sq = torch.linalg.vector_norm(self.shard_grad).square()
        if self.world_size > 1:
            dist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm != float("inf"):
            self.shard_grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def module_grad_norms(self) -> dict[str, float]:
        """Pre-clip gradient norm of each top-level module (every rank must call it)."""
        sq = torch.zeros(len(self.modules), device=self.flat.device)
        if self._pieces:
            sq.index_add_(0, self._owner, torch.stack(torch._foreach_norm(self._pieces)).square())
        if self.world_size > 1:
            dist.all_reduce(sq)
        return dict(zip(self.modules, sq.sqrt().tolist()))

    @torch.no_grad()
    def after_step(self) -> None:
        """Every rank's full weights, from each rank's updated shard."""
        if self.world_size > 1:
            _all_gather(self.flat, self.flat[self.lo:self.lo + self.shard])

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self.grad.zero_()  # the parameters' .grad stay views of it

    # -- checkpoints ---------------------------------------------------------------------------
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """Every rank's optimizer shard, gathered on rank 0 (``None`` elsewhere); collective."""
        state = optimizer.state_dict()
        if self.world_size == 1:
            return {"zero_shards": [state]}
        shards = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(state, shards, dst=0)
        return {"zero_shards": shards} if self.rank == 0 else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        shards = saved.get("zero_shards") if isinstance(saved, dict) else None
        if shards is not None and len(shards) != self.world_size:  # flat-buffer shards are not re-split
            raise ConfigError(f"the checkpoint's ZeRO optimizer state is sharded over {len(shards)} rank(s), this run "
                              f"has {self.world_size}; ZeRO shards are not re-split, so an optim.zero=true run resumes "
                              f"only on as many ranks: resume with {len(shards)}, or start a new schedule from its "
                              f"weights with resume=weights_only")
        if shards is None:
            raise ConfigError(f"the checkpoint's optimizer state is not sharded over {self.world_size} rank(s) "
                              f"(optim.zero differs from the run that wrote it); resume with the same optim.zero")
        optimizer.load_state_dict(shards[self.rank])


__all__ = ["Zero1", "ALIGN"]
