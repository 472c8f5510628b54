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
