"""giblet.evaluation.metrics: Pearson r per target and per subject, against direct numpy computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from giblet.evaluation.metrics import SubjectCorrelation, pearson_r, per_subject, summarize


def corrcoef_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The reference: ``np.corrcoef`` column by column (0 where a column is constant)."""
    out = np.zeros(x.shape[1])
    for j in range(x.shape[1]):
        if x[:, j].std() > 0 and y[:, j].std() > 0:
            out[j] = np.corrcoef(x[:, j], y[:, j])[0, 1]
    return out


def data(seed=0, n=40, targets=7):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, targets)), rng.normal(size=(n, targets))
    y[:, 0] = 3 * x[:, 0] + 1  # r = 1
    y[:, 1] = -0.5 * x[:, 1] + 0.1 * y[:, 1]  # strongly negative
    y[:, 5] = 2.0  # a zero-variance target (a voxel z-scored to 0): r = 0 by rule
    x[:, 6] = 7.5  # a constant prediction: r = 0 by rule
    return x, y


def test_pearson_r_matches_corrcoef_and_is_zero_without_variance():
    x, y = data()
    r = pearson_r(x, y)
    assert r.dtype == np.float64 and r.shape == (7,)
    np.testing.assert_allclose(r, corrcoef_columns(x, y), rtol=1e-12, atol=1e-15)
    assert r[0] == pytest.approx(1.0) and r[1] < -0.9 and r[5] == 0.0 and r[6] == 0.0
    assert pearson_r(x[:, 2], y[:, 2]) == pytest.approx(r[2])  # one target, (tr,)
    # far from zero mean: the centred computation keeps its precision
    np.testing.assert_allclose(pearson_r(x + 1e6, y - 1e6), r, atol=1e-9)
    with pytest.raises(ValueError, match="differ"):
        pearson_r(x, y[:, :3])


def test_summaries_per_subject_and_across_subjects():
    r = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, -0.5, 0.0])  # 12 targets
    s = summarize(r)
    assert s == {"mean": pytest.approx(r.mean()), "median": pytest.approx(np.median(r)), "top10": 1.0, "n": 12}
    assert summarize(np.array([0.3, np.nan]))["n"] == 1  # targets never scored are left out
    assert summarize(np.arange(30) / 30)["top10"] == pytest.approx(np.mean([27, 28, 29]) / 30)  # the best 3 of 30
    rng = np.random.default_rng(1)
    rs = {"sub-02": rng.uniform(-1, 1, 50), "sub-01": rng.uniform(0, 1, 20), "sub-09": rng.uniform(0, 0.2, 5)}
    out = per_subject(rs)
    assert list(out["subjects"]) == ["sub-02", "sub-01", "sub-09"]
    means = [rs[k].mean() for k in rs]
    assert out["mean"] == pytest.approx(np.mean(means))  # each subject counts once, whatever its targets
    assert out["median"] == pytest.approx(np.median([np.median(v) for v in rs.values()]))
    assert out["top10"] == pytest.approx(np.mean([np.sort(v)[-max(1, len(v) // 10):].mean() for v in rs.values()]))
    assert out["mean"] != pytest.approx(np.concatenate(list(rs.values())).mean())  # not pooled over targets
    assert np.isnan(per_subject({})["mean"])


def test_subject_correlation_is_exact_per_subject_over_batches():
    rng = np.random.default_rng(2)
    n, t = 90, 7
    x, y = data(seed=3, n=n, targets=t)
    subject = rng.integers(0, 3, size=n)
    subject[::17] = -1  # rows of no subject are skipped
    acc = SubjectCorrelation(4, t)  # subject 3 never appears: a NaN row, left out of the summary
    for a in range(0, n, 11):  # odd batches, mixing subjects
        acc.update(torch.from_numpy(x[a:a + 11]).float(), torch.from_numpy(y[a:a + 11]),
                   torch.from_numpy(subject[a:a + 11]))
    r = acc.r().numpy()
    assert r.dtype == np.float64 and r.shape == (4, t)
    for s in range(3):
        rows = subject == s
        np.testing.assert_allclose(r[s], corrcoef_columns(x[rows].astype(np.float32), y[rows]), rtol=1e-6,
                                   atol=1e-7)
    assert (r[:3, 5] == 0).all() and (r[:3, 6] == 0).all()  # zero variance: 0, not NaN
    assert np.isnan(r[3]).all()
    summary = acc.summary(["a", "b", "c", "d"])
    assert list(summary["subjects"]) == ["a", "b", "c"]
    assert summary["mean"] == pytest.approx(np.mean([r[s].mean() for s in range(3)]))
    # the pooled r of the old metric is another number: one subject's offset is not a prediction
    pooled = pearson_r(x[subject >= 0], y[subject >= 0]).mean()
    assert abs(summary["mean"] - pooled) > 1e-3


def _ranks(rank: int, port: int, out: str) -> None:
    """One gloo rank: its own half of the rows (subject 2 only on rank 1), then all_reduce."""
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    x, y, subject = _shards()[rank]
    acc = SubjectCorrelation(3, x.shape[1])
    acc.update(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(subject))
    acc.all_reduce()
    torch.save(acc.r(), f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _shards():
    x, y = data(seed=4, n=60, targets=7)
    subject = np.repeat([0, 1, 0, 2], 15)
    return [(x[:30], y[:30], subject[:30]), (x[30:], y[30:], subject[30:])]


def test_all_reduce_over_two_gloo_ranks_gives_the_whole_split():
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ranks, args=(port, out), nprocs=2, join=True)
        r0, r1 = (torch.load(f"{out}/rank{k}.pt") for k in (0, 1))
    assert torch.equal(r0, r1)
    x = np.concatenate([a for a, _, _ in _shards()])
    y = np.concatenate([b for _, b, _ in _shards()])
    subject = np.concatenate([c for _, _, c in _shards()])
    for s in range(3):
        np.testing.assert_allclose(r0[s].numpy(), corrcoef_columns(x[subject == s], y[subject == s]), rtol=1e-10,
                                   atol=1e-12)
    local = SubjectCorrelation(3, 7)  # without a process group all_reduce is a no-op
    local.all_reduce()
    assert local.sums.abs().sum() == 0
