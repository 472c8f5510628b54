"""Normalization as an estimator (nilearn/sklearn style): ``fit`` -> ``mean_``, ``std_``.

The preprocessing stages normalize with :class:`ZScorer` and the trainer and
``open_store(...).denormalize`` map model output back through the *same* class, so the
two directions cannot drift apart.

Convention (recorded in the store as ``ZScorer.convention``): statistics over axis 0
(time), population standard deviation (``ddof=0``), accumulated in float64 with Chan's
parallel update so that streaming blocks gives the same answer as one pass. A feature
whose standard deviation is 0 (or below ``eps`` times its magnitude) is *zero-variance*:
``transform`` maps it to 0 and ``inverse_transform`` maps anything back to its mean --
never a division by zero.
"""
from __future__ import annotations

import numpy as np

from giblet.errors import GibletError


class ZScorer:
    """Per-feature z-score of ``(sample, feature)`` arrays.

    Args:
        eps: relative tolerance under which a feature counts as zero-variance
            (``std <= eps * max(|mean|, 1)``); float32 input cannot resolve less.
    """

    convention = {"axis": "tr", "ddof": 0, "accumulate": "float64", "zero_variance": "z=0, std stored as 0"}

    def __init__(self, eps: float = 1e-6):
        self.eps = eps
        self.n_ = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def partial_fit(self, x: np.ndarray) -> "ZScorer":
        """Accumulate statistics of one block ``(sample, feature)``."""
        x = np.asarray(x, dtype=np.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return self
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        if self._mean is None:
            self.n_, self._mean, self._m2 = n_b, mean_b, m2_b
        else:
            n = self.n_ + n_b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n_b / n)
            self._m2 = self._m2 + m2_b + delta**2 * (self.n_ * n_b / n)
            self.n_ = n
        self._finish()
        return self

    def fit(self, x: np.ndarray) -> "ZScorer":
        self.n_, self._mean, self._m2 = 0, None, None
        return self.partial_fit(x)

    def _finish(self) -> None:
        std = np.sqrt(self._m2 / self.n_)
        self.zero_variance_ = std <= self.eps * np.maximum(np.abs(self._mean), 1.0)
        std[self.zero_variance_] = 0.0
        self.mean_ = self._mean.astype(np.float32)
        self.std_ = std.astype(np.float32)
        # transform() uses the float64 statistics: with the float32-rounded mean, a voxel whose std
        # is tiny next to its mean (1e-5 of it) would be z-scored off-centre by ~1e-3 of a std.
        self._exact = (self._mean, std)

    @classmethod
    def from_stats(cls, mean: np.ndarray, std: np.ndarray) -> "ZScorer":
        """A fitted scaler from saved statistics (e.g. a store's ``mean``/``std`` arrays)."""
        z = cls()
        z.mean_ = np.asarray(mean, dtype=np.float32)
        z.std_ = np.asarray(std, dtype=np.float32)
        z.zero_variance_ = z.std_ == 0
        return z

    def _check(self) -> None:
        if not hasattr(self, "mean_"):
            raise GibletError("ZScorer: not fitted; call fit()/partial_fit() or ZScorer.from_stats()")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` as float32 (float64 statistics when fitted here, the saved float32
        ones after ``from_stats``); zero-variance features become 0."""
        self._check()
        mean, std = getattr(self, "_exact", (self.mean_, self.std_))
        safe = np.where(self.zero_variance_, 1.0, np.asarray(std, dtype=np.float64))
        z = (np.asarray(x, dtype=np.float64) - mean) / safe
        z[..., self.zero_variance_] = 0.0
        return z.astype(np.float32)

    def inverse_transform(self, z):
        """``z * std + mean``: model output back to the original units.

        Works on numpy arrays and on torch tensors (the trainer de-normalizes with this).
        """
        self._check()
        if type(z).__module__.startswith("torch"):
            import torch

            std = torch.as_tensor(self.std_, dtype=z.dtype, device=z.device)
            mean = torch.as_tensor(self.mean_, dtype=z.dtype, device=z.device)
            return z * std + mean
        return (np.asarray(z, dtype=np.float64) * self.std_ + self.mean_).astype(np.float32)
