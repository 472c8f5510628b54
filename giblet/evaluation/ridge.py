"""A ridge regression baseline from a store, scored the field's way.

Per subject: the store's stimulus features (:mod:`giblet.evaluation.features`: z-scored over
the training TRs, FIR-delayed within each run) at the (run, TR) samples the subject serves
in the training split -> the subject's z-scored targets ``view.fmri(subject, run)`` (the
voxels, or with ``target=`` the columns of a target set: parcels, spheres, vertices), less
the TRs the store marks censored for the subject (``view.censored``: no fMRI there); one
ridge penalty per target chosen by cross-validation over ``alphas``; then the Pearson r per
target between prediction and target over the subject's val (and test) TRs, concatenated
over runs.

- CV folds never shuffle TRs (neighbouring TRs share their HRF tails): leave-one-run-out
  when the subject has >= 2 training runs, else ``n_blocks`` contiguous blocks of its TRs.
- Solver (himalaya, the field's ridge package): ``RidgeCV`` (primal, SVD of the design)
  when there are at least as many training samples as features, else ``KernelRidgeCV``
  with a linear kernel (dual: the cost goes with samples, not features) -- the same ridge
  solution either way, whichever is cheaper. One band for all modalities: banded ridge
  (``MultipleKernelRidgeCV``, a random search over band weights) measured ~8x the time of
  one-band ``KernelRidgeCV`` at 10 search iterations on 2 CPU cores (69 s vs 8.6 s for 1,580
  TRs x 3,360 features x 4,000 targets): hours for a Sherlock-sized store, so it is left out.
- Memory: one subject at a time; its targets are read once (the split's rows only) and
  fitted in blocks of ``target_block`` targets, so the solver's working set is bounded by
  ``samples x target_block``, not by the number of targets.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from giblet.errors import StoreError
from giblet.evaluation.features import FeatureParams, StoreFeatures, store_features
from giblet.evaluation.metrics import pearson_r

DEFAULT_ALPHAS = tuple(float(a) for a in 10.0 ** np.arange(-2, 8))  # 1e-2 .. 1e7
EVAL_SPLITS = ("val", "test")


@dataclass
class RidgeResult:
    """What :func:`ridge_baseline` found.

    Attributes:
        r: split (``val``, ``test``) -> subject -> ``(target,) float32`` Pearson r over the
            subject's TRs of that split (a subject without TRs in a split is absent).
        alphas: subject -> ``(target,) float32`` the CV-chosen penalty of each target.
        predictions: split -> subject -> ``(tr, target) float32`` (the split's TRs of each of
            the subject's runs, in run order), if asked for.
        fit_s: subject -> seconds spent reading, fitting and scoring.
        solver: subject -> ``"primal"`` or ``"dual"``.
        skipped: subject -> why it was left out (fewer than 2 training TRs).
    """

    r: dict[str, dict[str, np.ndarray]]
    alphas: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: Optional[dict[str, dict[str, np.ndarray]]] = None
    fit_s: dict[str, float] = field(default_factory=dict)
    solver: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Samples:
    """One subject's samples in one split: ``x`` ``(tr, feature)``, ``y`` ``(tr, target)``,
    and the TR count of each run they come from (in run order)."""

    x: np.ndarray
    y: np.ndarray
    lengths: list[int]


def subject_samples(view, features: StoreFeatures, subject: str, split: str,
                    target: Optional[str] = None) -> Optional[Samples]:
    """The subject's ``split`` TRs of every run it has, censored TRs left out (None if it has none).

    Args:
        view: the open store.
        features: its design matrices (:func:`~giblet.evaluation.features.store_features`).
        subject: a subject of the store.
        split: ``train``, ``val`` or ``test``.
        target: a target set's id (``y`` holds its columns); None: the voxels.
    """
    xs, ys, lengths = [], [], []
    for run in view.subject_runs(subject):
        a, b = view.split_trs(split, run, subject)
        keep = ~view.censored(subject, run)[a:b]  # censored TRs have no fMRI (NaN): neither fitted nor scored
        if b > a and keep.any():
            xs.append(features.runs[run][a:b][keep])
            ys.append(view.fmri(subject, run, slice(a, b), target=target)[keep])
            lengths.append(int(keep.sum()))
    if not lengths:
        return None
    return Samples(np.concatenate(xs), np.concatenate(ys), lengths)


def cv_folds(lengths: list[int], n_blocks: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds over concatenated runs, never shuffled.

    Args:
        lengths: TRs of each training run, in the order they are concatenated.
        n_blocks: contiguous blocks when there is only one run.

    Returns:
        ``[(train_index, test_index), ...]``: leave-one-run-out with >= 2 runs, else
        ``min(n_blocks, tr)`` contiguous blocks of the one run.
    """
    from sklearn.model_selection import KFold, LeaveOneGroupOut

    groups = np.repeat(np.arange(len(lengths)), lengths)
    if len(lengths) >= 2:
        return list(LeaveOneGroupOut().split(groups, groups=groups))
    return list(KFold(n_splits=max(2, min(n_blocks, len(groups)))).split(groups))


def _model(n_samples: int, n_features: int, alphas, folds, batch: int):
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV

    batch = min(batch, 2048)  # himalaya's CV holds (alphas x TRs x batch) predictions at once
    params = {"n_targets_batch": batch, "n_targets_batch_refit": batch}
    if n_samples >= n_features:
        return "primal", RidgeCV(alphas=np.asarray(alphas), fit_intercept=True, cv=folds, solver_params=params)
    return "dual", KernelRidgeCV(alphas=np.asarray(alphas), kernel="linear", fit_intercept=True, cv=folds,
                                 solver_params=params, warn=False)


def fit_subject(train: Samples, evals: dict[str, Samples], alphas=DEFAULT_ALPHAS, n_blocks: int = 5,
                target_block: int = 8192, keep_predictions: bool = False):
    """Fit one subject's ridge on ``train`` and score it on each of ``evals``.

    Args:
        train: the training samples.
        evals: split -> samples to score on.
        alphas: candidate penalties; each target gets the one with the best CV score.
        n_blocks: CV blocks when the subject has one training run.
        target_block: targets fitted at once (bounds the solver's memory).
        keep_predictions: also return the predictions.

    Returns:
        ``(r, alphas, predictions, solver)``: split -> ``(target,)`` r, ``(target,)`` chosen
        alphas, split -> ``(tr, target)`` predictions (or None), and ``"primal"``/``"dual"``.
    """
    from himalaya.backend import get_backend

    backend = get_backend()
    folds = cv_folds(train.lengths, n_blocks)
    n_targets = train.y.shape[1]
    best = np.zeros(n_targets, np.float32)
    preds = {s: np.zeros(e.y.shape, np.float32) for s, e in evals.items()}
    solver = "primal"
    for v0 in range(0, n_targets, target_block):
        cols = slice(v0, min(v0 + target_block, n_targets))
        solver, model = _model(*train.x.shape, alphas, folds, target_block)
        model.fit(train.x, train.y[:, cols])
        best[cols] = backend.to_numpy(model.best_alphas_)
        for s, e in evals.items():
            preds[s][:, cols] = backend.to_numpy(model.predict(e.x))
    r = {s: pearson_r(preds[s], e.y).astype(np.float32) for s, e in evals.items()}
    return r, best, (preds if keep_predictions else None), solver


def _check_splits(view) -> list[str]:
    splits = [s for s in EVAL_SPLITS if view.split[s]]
    if not splits:
        raise StoreError(f"{view.path}: the split has no val or test TR (split rule "
                         f"{view.align.get('split_rule')}); set split.val_fraction > 0 or split.val_runs in the "
                         f"config and rerun `giblet-preprocess run CONFIG` (the split rebuilds nothing)")
    if not view.subjects:
        raise StoreError(f"{view.path}: the store has no fMRI subject to fit; add runs.<run>.fmri to the config "
                         f"and rerun `giblet-preprocess run CONFIG`")
    return splits


def ridge_baseline(store, *, subjects: Optional[list[str]] = None, params: FeatureParams = FeatureParams(),
                   alphas=DEFAULT_ALPHAS, n_blocks: int = 5, target_block: int = 8192,
                   predictions: bool = False, features: Optional[StoreFeatures] = None,
                   target: Optional[str] = None) -> RidgeResult:
    """Per-subject ridge from the store's stimulus features to each subject's targets.

    Args:
        store: a store path or an open ``StoreView``.
        subjects: the subjects to fit (default: all).
        params: which features (:class:`~giblet.evaluation.features.FeatureParams`).
        alphas: candidate ridge penalties (per target, chosen by CV on the training TRs).
        n_blocks: contiguous CV blocks for a subject with one training run.
        target_block: targets fitted at once.
        predictions: keep the ``(tr, target)`` predictions.
        features: precomputed design matrices (default: computed from ``params``).
        target: a target set's id (``view.targets``, e.g. ``parcels/schaefer``): fit its columns
            instead of the voxels (same features, splits and CV). None or ``"voxels"``: the voxels.

    Returns:
        :class:`RidgeResult` with ``r[split][subject]`` ``(target,)`` for ``val`` and ``test``.

    Raises:
        StoreError: no val/test TR, no subject, no stimulus, or no training TR;
            ModalityMissingError (a ``StoreError``): a target set the store does not serve.
    """
    from giblet.reader import StoreView, open_store

    view = store if isinstance(store, StoreView) else open_store(store)
    splits = _check_splits(view)
    target = view.target(target)  # before any fitting: an unknown set fails at once
    features = features or store_features(view, params)
    out = RidgeResult(r={s: {} for s in splits}, predictions={s: {} for s in splits} if predictions else None)
    for subject in subjects or view.subjects:
        t0 = time.perf_counter()
        train = subject_samples(view, features, subject, "train", target)
        if train is None or len(train.y) < 2:
            out.skipped[subject] = "fewer than 2 training TRs"
            continue
        evals = {s: e for s in splits if (e := subject_samples(view, features, subject, s, target)) is not None}
        r, best, preds, solver = fit_subject(train, evals, alphas, n_blocks, target_block, predictions)
        for s in evals:
            out.r[s][subject] = r[s]
            if predictions:
                out.predictions[s][subject] = preds[s]
        out.alphas[subject], out.solver[subject] = best, solver
        out.fit_s[subject] = time.perf_counter() - t0
    return out
