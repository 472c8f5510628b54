"""Flat-buffer ZeRO-1 (giblet.training.zero) on one process: the same updates as a plain
per-parameter optimizer. The 2-rank run is in test_train.py."""
from __future__ import annotations

import pytest
import torch

from giblet.data.world import world_from_env
from giblet.errors import ConfigError
from giblet.training import distributed as D
from giblet.training.diagnostics import grad_norms
from giblet.training.schedule import OptimConfig, build_optimizer, param_groups
from giblet.training.zero import ALIGN, Zero1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(5, 300)  # 1,500 + 300 elements: neither a multiple of 256
        self.norm = torch.nn.LayerNorm(300)
        self.out = torch.nn.Linear(300, 3)
        self.scale = torch.nn.Parameter(torch.ones(3))  # a top-level parameter

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.inp(x)))) * self.scale


def _pair():
    torch.manual_seed(0)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    return a, b


def test_parameters_become_aligned_views_of_one_buffer_with_their_values():
    a, b = _pair()
    z = Zero1(a, param_groups(a, 0.1))
    base = z.flat.data_ptr()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        offset = (p.data_ptr() - base) // 4
        assert 0 <= offset < z.flat.numel() and offset % ALIGN == 0, name
        assert p.grad is not None and (p.grad.data_ptr() - z.grad.data_ptr()) // 4 == offset, name
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    groups = z.param_groups
    assert [len(g["params"]) for g in groups] == [1, 1]  # one flat leaf per group
    assert groups[0]["weight_decay"] == 0.1 and "optim_bits" not in groups[0]  # matrices: 8-bit state
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["optim_bits"] == 32  # biases, norms: fp32 state
    assert sum(g["params"][0].numel() for g in groups) == z.flat.numel()


def test_flat_steps_equal_a_per_parameter_optimizer_with_clipping():
    """Same AdamW, same clipping, same module norms as the plain path, step after step; fails if
    a gradient lands at another parameter's offset or the clip is applied twice."""
    a, b = _pair()
    z = Zero1(a, param_groups(a, 0.1))
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt_a, _ = build_optimizer(z.param_groups, cfg, torch.device("cpu"))
    opt_b, _ = build_optimizer(param_groups(b, 0.1), cfg, torch.device("cpu"))
    torch.manual_seed(1)
    for step in range(4):
        x, y = torch.randn(16, 5), torch.randn(16, 3)
        for _ in range(2):  # two micro-batches accumulate into the flat gradient
            torch.nn.functional.mse_loss(a(x), y).backward()
            torch.nn.functional.mse_loss(b(x), y).backward()
        z.reduce_gradients()
        expect = grad_norms(b)
        got = z.module_grad_norms()
        assert got.keys() == expect.keys() == {"inp", "norm", "out", "scale"}
        for k in expect:
            assert abs(got[k] - expect[k]) <= 1e-5 * expect[k], (step, k)
        clip = 0.5 if step % 2 else float("inf")  # clipped and unclipped steps
        na, nb = z.clip_grad_norm_(clip), torch.nn.utils.clip_grad_norm_(list(b.parameters()), clip)
        torch.testing.assert_close(na, nb)
        opt_a.step()
        opt_b.step()
        z.after_step()
        z.zero_grad(opt_a)
        opt_b.zero_grad(set_to_none=True)
        assert float(z.grad.abs().max()) == 0.0
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step} {name}")


def test_optimizer_state_round_trips_through_the_shard_list():
    a, _ = _pair()
    z = Zero1(a, param_groups(a, 0.1))
    opt, _ = build_optimizer(z.param_groups, OptimConfig(), torch.device("cpu"))
    a(torch.randn(2, 5)).sum().backward()
    opt.step()
    saved = z.optimizer_state(opt)
    assert list(saved) == ["zero_shards"] and len(saved["zero_shards"]) == 1
    opt2, _ = build_optimizer(z.param_groups, OptimConfig(), torch.device("cpu"))
    z.load_optimizer_state(opt2, saved)
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        torch.testing.assert_close(s1["exp_avg"], s2["exp_avg"])


def test_a_checkpoint_from_the_other_mode_is_refused_with_the_fix():
    a, b = _pair()
    z = Zero1(a, param_groups(a, 0.1))
    rt = D.Runtime(world=world_from_env({}), device=torch.device("cpu"), amp_dtype=None)
    rep = D.Replicated(b, param_groups(b, 0.1), rt)
    opt_z, _ = build_optimizer(z.param_groups, OptimConfig(), torch.device("cpu"))
    opt_r, _ = build_optimizer(rep.param_groups, OptimConfig(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="not sharded over 1 rank.*resume with the same optim.zero"):
        z.load_optimizer_state(opt_z, rep.optimizer_state(opt_r))
    with pytest.raises(ConfigError, match="sharded.*resume with optim.zero=true"):
        rep.load_optimizer_state(opt_r, z.optimizer_state(opt_z))
