"""GPU-only checks (skipped without CUDA; CI has none): run them on a GPU host with
``python -m pytest -q tests/test_gpu.py``."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _count_syncs(monkeypatch) -> list:
    calls: list = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_stream_ordered_adamw8bit_matches_bitsandbytes_bit_for_bit_without_syncs(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from giblet.training.schedule import _stream_ordered

    torch.manual_seed(0)
    shapes = [(512, 256), (300,), (4096, 33), (7,)]  # 8-bit blockwise states, and 32-bit ones (< 4096 elements)
    start = [torch.randn(s, device="cuda") for s in shapes]
    stock, ours = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_stock, opt_ours = bnb.optim.AdamW8bit(stock, **kw), _stream_ordered(bnb.optim.AdamW8bit)(ours, **kw)
    syncs = _count_syncs(monkeypatch)
    for _ in range(5):
        for a, b in zip(stock, ours):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        before = len(syncs)
        opt_stock.step()
        stock_syncs = len(syncs) - before
        opt_ours.step()
        assert len(syncs) - before == stock_syncs  # ours adds none
    assert stock_syncs == len(shapes)  # bitsandbytes: one device-wide sync per parameter
    for a, b, s in zip(stock, ours, start):
        assert torch.equal(a, b) and not torch.equal(a, s)
        sa, sb = opt_stock.state[a], opt_ours.state[b]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # another stream: bitsandbytes' own step, with its syncs
        for b in ours:
            b.grad = torch.randn_like(b)
        before = len(syncs)
        opt_ours.step()
    assert len(syncs) - before == len(shapes)


def test_zero1_flat_adamw8bit_updates_every_parameter_as_bitsandbytes_does_per_parameter():
    """optim.zero's flat leaves on one GPU: each parameter starts on a 256-element block, so the
    8-bit blockwise states of the decayed leaf are the per-parameter ones side by side, and the
    1-d leaf keeps 32-bit state like bitsandbytes does for tensors under 4,096 elements."""
    pytest.importorskip("bitsandbytes")
    from giblet.training.schedule import OptimConfig, build_optimizer, param_groups
    from giblet.training.zero import Zero1

    torch.manual_seed(0)
    shapes = [(512, 256), (4100, 3), (300,), (7,)]  # 8-bit (one with a partial last block), 32-bit
    flat_model, plain_model = (torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s)) for s in shapes]).cuda()
                               for _ in range(2))
    plain_model.load_state_dict(flat_model.state_dict())
    z = Zero1(flat_model, param_groups(flat_model, 0.1))
    cfg = OptimConfig(name="adamw8bit", lr=1e-2, weight_decay=0.1)
    dev = torch.device("cuda")
    (opt_flat, name), (opt_plain, _) = (build_optimizer(g, cfg, dev) for g in (z.param_groups,
                                                                              param_groups(plain_model, 0.1)))
    assert name.startswith("bitsandbytes.AdamW8bit")
    for _ in range(5):
        for a, b in zip(flat_model, plain_model):
            b.grad = torch.randn_like(b)
            a.grad.copy_(b.grad)  # the flat gradient buffer's view
        opt_flat.step()
        opt_plain.step()
        z.zero_grad(opt_flat)
    torch.cuda.synchronize()
    leaves = [g["params"][0] for g in z.param_groups]
    assert opt_flat.state[leaves[0]]["state1"].dtype == torch.uint8  # 8-bit, blockwise
    assert opt_flat.state[leaves[1]]["state1"].dtype == torch.float32  # the 1-d leaf: 32-bit
    for a, b in zip(flat_model, plain_model):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
