"""The ridge baseline (giblet.evaluation.features + ridge) on a study made here, not by giblet.synth.

Two runs of a movie of random block patterns; BOLD that is a NOISELESS linear map of the
store's own FIR-delayed features (a different map per subject), written back as NIfTI and
rebuilt -- so the ridge must recover it -- plus one subject whose BOLD is the same signal
shuffled in time within each run (nothing to recover). ``fmri.zscore=subject``: one affine
map per voxel over both runs, so the planted map stays exactly linear after z-scoring.
"""
from __future__ import annotations

import av
import numpy as np
import pytest
import yaml

import giblet
from giblet.errors import ConfigError, StoreError
from giblet.evaluation.features import (FeatureParams, audio_histograms, default_delays, fir, store_features,
                                        text_features, video_features)
from giblet.evaluation.ridge import cv_folds, ridge_baseline
from tests.test_cli import cli
from tests.conftest import write_nifti as _write_nifti

SHAPE, TR, FPS = (4, 3, 2), 1.5, 8
RUN_TRS = {"run-1": 96, "run-2": 80}
PARAMS = FeatureParams(delays=(1, 2, 3), grid=(2, 2))  # (3 + 4 + 1) x 3 = 24 features


def write_movie(path, n_trs, rng):
    """H.264, 32x18 at 8 fps: a new random 3x4 pattern of colours every 6 frames (0.75 s)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 32, 18, "yuv420p"
        for i in range(int(n_trs * TR * FPS)):
            if i % 6 == 0:
                image = np.kron(rng.integers(20, 236, (3, 4, 3)), np.ones((6, 8, 1))).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_nifti(path, data):
    _write_nifti(path, data, TR)


def planted_bold(x, weights):
    """``(tr, feature) @ (feature, voxel)`` around 1000 -> ``SHAPE + (tr,)``."""
    y = 1000 + 5 * x @ weights
    return y.T.reshape(SHAPE + (len(x),))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ridge")
    rng = np.random.default_rng(3)
    n_vox = int(np.prod(SHAPE))
    write_nifti(root / "mask.nii.gz", np.ones(SHAPE, np.uint8))
    runs = {}
    for run, n in RUN_TRS.items():
        write_movie(root / f"{run}.mp4", n, rng)
        runs[run] = {"movie": f"{run}.mp4", "fmri": {}}
        for subject in ("sub-01", "sub-02", "sub-03"):
            write_nifti(root / f"{subject}_{run}.nii.gz", rng.normal(1000, 10, SHAPE + (n,)))
            runs[run]["fmri"][subject] = f"{subject}_{run}.nii.gz"
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump({
        "output": "study.zarr", "tr_s": TR, "runs": runs,
        "fmri": {"mask_strategy": "file", "mask_file": "mask.nii.gz", "zscore": "subject", "chunk_trs": 16},
        "video": {"width": 32, "height": 18, "chunk_trs": 16, "segment_trs": 32}}, sort_keys=False))
    assert (r := cli("run", config, "--no-progress")).returncode == 0, r.stderr
    store = root / "study.zarr"
    features = store_features(giblet.open_store(store), PARAMS)  # the store's own features, planted back
    weights = {s: rng.normal(size=(features.n_features, n_vox)) for s in ("sub-01", "sub-02")}
    for run, x in features.runs.items():
        for s, w in weights.items():
            write_nifti(root / f"{s}_{run}.nii.gz", planted_bold(x, w))
        shuffled = planted_bold(x, weights["sub-01"])[..., rng.permutation(len(x))]
        write_nifti(root / f"sub-03_{run}.nii.gz", shuffled)
    assert (r := cli("run", config, "--no-progress")).returncode == 0, r.stderr
    return store


def test_ridge_recovers_planted_weights_on_held_out_trs(built):
    res = ridge_baseline(built, params=PARAMS, predictions=True)
    assert set(res.r) == {"val"} and set(res.r["val"]) == {"sub-01", "sub-02", "sub-03"}
    for subject in ("sub-01", "sub-02"):
        assert res.r["val"][subject].shape == (int(np.prod(SHAPE)),)
        assert res.r["val"][subject].min() > 0.99, (subject, res.r["val"][subject])
        assert res.solver[subject] == "primal"
    view = giblet.open_store(built)
    val = np.concatenate([view.fmri("sub-02", run, slice(*view.split["val"][run])) for run in view.runs])
    np.testing.assert_allclose(res.predictions["val"]["sub-02"], val, atol=0.05)  # z-scores, also in scale


def test_ridge_fails_on_targets_shuffled_in_time(built):
    res = ridge_baseline(built, params=PARAMS, subjects=["sub-03"])
    assert res.r["val"]["sub-03"].mean() < 0.25, res.r["val"]["sub-03"]


def test_more_features_than_trs_take_the_dual_solver_and_target_blocks_change_nothing(built):
    """More features than training TRs: the kernel (dual) solver; the noiseless map still holds."""
    params = FeatureParams(delays=tuple(range(1, 19)), grid=(2, 2))  # 8 x 18 = 144 features > 140 TRs
    blocked = ridge_baseline(built, params=params, subjects=["sub-01"], target_block=10)
    assert blocked.solver["sub-01"] == "dual"
    assert np.median(blocked.r["val"]["sub-01"]) > 0.9
    whole = ridge_baseline(built, params=params, subjects=["sub-01"])  # targets in blocks change nothing
    np.testing.assert_allclose(blocked.r["val"]["sub-01"], whole.r["val"]["sub-01"], atol=1e-5)
    np.testing.assert_array_equal(blocked.alphas["sub-01"], whole.alphas["sub-01"])


def test_features_are_zscored_on_train_trs_and_delayed_within_each_run(built):
    view = giblet.open_store(built)
    now = store_features(view, FeatureParams(delays=(0,), grid=(2, 2)))
    train = np.concatenate([now.runs[r][slice(*view.split["train"][r])] for r in view.runs])
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(0), 1, atol=1e-3)
    delayed = store_features(view, PARAMS)
    assert delayed.bands == {"video": slice(0, 24)} and delayed.delays == (1, 2, 3)
    for run in view.runs:
        x, x0 = delayed.runs[run], now.runs[run]
        assert (x[0] == 0).all() and (x[:2, 8:] == 0).all() and (x[:3, 16:] == 0).all()  # nothing from the run before
        np.testing.assert_array_equal(x[3:, 16:], x0[:-3])


def test_errors_name_the_store_and_the_fix(built):
    with pytest.raises(StoreError, match="no text in this store"):
        store_features(giblet.open_store(built), FeatureParams(modalities=("text",)))
    with pytest.raises(ConfigError, match="'smell'"):
        store_features(giblet.open_store(built), FeatureParams(modalities=("smell",)))


def test_fir_pads_each_run_start_with_zeros():
    x = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    out = fir(x, (0, 2))
    np.testing.assert_array_equal(out[:, :3], x)
    np.testing.assert_array_equal(out[:2, 3:], 0)
    np.testing.assert_array_equal(out[2:, 3:], x[:2])
    assert default_delays(1.5) == tuple(range(1, 9)) and default_delays(2.0) == tuple(range(1, 7))


def test_video_features_by_hand():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 3, 4, 6, 3), dtype=np.uint8)
    padded = np.array([[False, False, True], [False, False, False]])
    feats = video_features(frames, padded, grid=(2, 3))
    f = frames.astype(np.float64) / 255
    lum = f @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(feats[0, :3], f[0, :2].mean(axis=(0, 1, 2)), atol=1e-6)  # the repeat left out
    np.testing.assert_allclose(feats[1, :3], f[1].mean(axis=(0, 1, 2)), atol=1e-6)
    cell = lum[1, :, 2:4, 4:6].mean()  # grid cell (1, 2): rows 2-3, columns 4-5
    np.testing.assert_allclose(feats[1, 3 + 5], cell, atol=1e-6)
    np.testing.assert_allclose(feats[0, -1], np.abs(lum[0, 1] - lum[0, 0]).mean(), atol=1e-6)
    np.testing.assert_allclose(feats[1, -1], np.abs(np.diff(lum[1], axis=0)).mean(), atol=1e-6)


def test_audio_histograms_and_text_by_hand():
    codes = np.array([[[0, 1, 1, 3], [2, 2, 2, 2]], [[3, 3, 3, 3], [0, 1, 2, 3]]], dtype=np.int16)
    h = audio_histograms(codes, codebook_size=4, n_codebooks=2)
    np.testing.assert_allclose(h[0], [0.25, 0.5, 0, 0.25, 0, 0, 1, 0])
    np.testing.assert_allclose(h[1], [0, 0, 0, 1, 0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(audio_histograms(codes, 4)[:, :4], h[:, :4])
    emb = np.ones((3, 2), np.float32)
    np.testing.assert_array_equal(text_features(emb, np.array([True, False, True])), [[1, 1], [0, 0], [1, 1]])


def test_cv_folds_never_shuffle_trs():
    by_run = cv_folds([5, 3, 4])
    assert [list(test) for _, test in by_run] == [list(range(5)), [5, 6, 7], [8, 9, 10, 11]]
    blocks = cv_folds([10], n_blocks=3)
    tests = [list(test) for _, test in blocks]
    assert tests == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for train, test in blocks:
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(10))
