import numpy as np
import pytest
import torch

from giblet.errors import GibletError
from giblet.normalize import ZScorer


def test_streamed_blocks_equal_one_pass():
    rng = np.random.default_rng(0)
    x = rng.normal(3000, 50, size=(101, 7)).astype(np.float32)
    one = ZScorer().fit(x)
    streamed = ZScorer()
    for t0 in range(0, 101, 16):
        streamed.partial_fit(x[t0:t0 + 16])
    np.testing.assert_allclose(streamed.mean_, x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(streamed.std_, x.astype(np.float64).std(0, ddof=0), rtol=1e-5)
    np.testing.assert_allclose(streamed.std_, one.std_, rtol=1e-6)
    z = streamed.transform(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-4)


def test_zero_variance_is_zero_never_nan_and_inverts_to_mean():
    x = np.ones((20, 3), dtype=np.float32) * 700
    x[:, 1] += np.arange(20)
    s = ZScorer().fit(x)
    assert s.zero_variance_.tolist() == [True, False, True]
    z = s.transform(x)
    assert np.isfinite(z).all() and (z[:, [0, 2]] == 0).all()
    assert s.std_[0] == 0
    np.testing.assert_allclose(s.inverse_transform(z), x, rtol=1e-6)


def test_inverse_on_torch_and_from_stats():
    rng = np.random.default_rng(1)
    x = rng.normal(1000, 30, size=(50, 4))
    s = ZScorer().fit(x)
    t = ZScorer.from_stats(s.mean_, s.std_)
    back = t.inverse_transform(torch.from_numpy(s.transform(x)))
    assert isinstance(back, torch.Tensor)
    np.testing.assert_allclose(back.numpy(), x, rtol=1e-5)
    with pytest.raises(GibletError, match="not fitted"):
        ZScorer().transform(x)
