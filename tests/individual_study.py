"""A planted study where every subject has its own voxel weights, written without giblet.synth.

The check of issue 19, independent of the generator the rest of the suite uses (so nothing
relies on ``giblet.synth`` being kind to the model):

- a silent H.264 movie of colour scenes (1.5-4.5 s each; each frame a left-to-right
  gradient between two random colours, so the pixels vary while the frame's mean colour is
  what matters), written with a hand-written PyAV loop;
- latents ``c(t)``: the mean colour of each TR's frames (3 per TR); regressors ``x(t)``:
  their causal Glover HRF convolution (``giblet.hrf``), standardized over the run;
- BOLD of subject ``s``, voxel ``v``: ``base_v * (1 + amp * gain_v * (w[s, v] . x(t) + noise * e))``,
  ``w[s] = sqrt(shared) * W0 + sqrt(1 - shared) * W_s`` (``shared=0``: independent subjects;
  ``opposite=True``: subject 2's weights are minus subject 1's), float32 NIfTI per subject,
  a mask NIfTI (``fmri.mask_strategy: file``);
- ``truth``: ``expected_r (subject, voxel)`` over the mask's voxels in store order: the
  expected Pearson r of the planted response with the noisy BOLD over each subject's val
  TRs, and ``achievable``: its mean over voxels, then over subjects (the trainer's
  ``r_mean``, the same definition).

:func:`ridge_baseline` is the plain baseline of the issue: per subject, ridge regression
from the mean frame colour (read back from the store) with 12 TR delays, alpha by
cross-validation, scored with the trainer's metric on the val TRs.

By hand (the docs/convergence.md numbers)::

    python tests/individual_study.py /tmp/ind --trs 360 --train configs/train/demo.yaml
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

TR_S, FPS, K = 1.5, 10, 3  # 15 frames per TR; K latents (the mean colour)


def scenes(duration_s: float, rng: np.random.Generator) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """``(start_s, left colour, right colour)`` of each scene, colours in [0, 1]^3."""
    out, t = [], 0.0
    while t < duration_s:
        out.append((t, rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)))
        t += rng.uniform(1.5, 4.5)
    return out


def frame_colours(plan, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """``(frame, 3)`` left and right colours of every frame."""
    starts = np.array([s for s, _, _ in plan])
    idx = np.searchsorted(starts, np.arange(n_frames) / FPS, side="right") - 1
    return np.stack([plan[i][1] for i in idx]), np.stack([plan[i][2] for i in idx])


def write_movie(path: Path, left: np.ndarray, right: np.ndarray, size=(64, 36)) -> None:
    """A silent H.264 movie: frame ``i`` a horizontal gradient from ``left[i]`` to ``right[i]``."""
    import av

    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "12"}
        for i in range(len(left)):
            row = (1 - ramp) * left[i] + ramp * right[i]  # (1, w, 3)
            img = np.broadcast_to(np.clip(row * 255, 0, 255), (h, w, 3)).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = i
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)


def make(root: str | Path, *, n_subjects: int = 3, n_trs: int = 360, shape=(10, 12, 10), seed: int = 0,
         shared: float = 0.0, opposite: bool = False, noise: float = 1.0, amp: float = 0.02,
         val_fraction: float = 0.2, movie_size=(64, 36)) -> tuple[Path, dict]:
    """Write the study under ``root``; returns ``(config.yaml, truth)`` (see the module docstring)."""
    import nibabel as nib

    from giblet.hrf import hrf_convolve

    root = Path(root)
    (root / "bold").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_frames = int((n_trs * TR_S + 3.0) * FPS)  # the movie runs 3 s past the scan (alignment trims it)
    left, right = frame_colours(scenes(n_frames / FPS, rng), n_frames)
    write_movie(root / "movie.mp4", left, right, movie_size)
    per_tr = int(TR_S * FPS)
    mean_colour = ((left + right) / 2)[: n_trs * per_tr].reshape(n_trs, per_tr, K).mean(1)
    x = hrf_convolve(mean_colour - mean_colour.mean(0), TR_S).astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)

    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g ** 2 for g in grid) < 0.9
    n_vox = int(inside.sum())
    gain = rng.uniform(0.2, 1.5, n_vox)  # voxels differ in how strongly they respond (all subjects alike)
    base = rng.uniform(500, 1500, n_vox)
    w0 = rng.normal(0, 1 / np.sqrt(K), (n_vox, K))
    weights = np.stack([np.sqrt(shared) * w0 + np.sqrt(1 - shared) * rng.normal(0, 1 / np.sqrt(K), (n_vox, K))
                        for _ in range(n_subjects)])
    if opposite:
        weights[1] = -weights[0]
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), str(root / "mask.nii.gz"))
    n_val = int(round(val_fraction * n_trs))
    val = slice(n_trs - n_val, n_trs)
    cov = np.cov(x[val], rowvar=False, bias=True)
    expected = np.zeros((n_subjects, n_vox))
    subjects = [f"sub-{s + 1:02d}" for s in range(n_subjects)]
    for s, name in enumerate(subjects):
        signal = x @ weights[s].T  # (tr, voxel)
        bold = base * (1 + amp * gain * (signal + noise * rng.standard_normal(signal.shape)))
        img = np.full(shape + (n_trs,), 10.0, dtype=np.float32)
        img[inside] = bold.T
        out = nib.Nifti1Image(img, affine)
        out.header.set_xyzt_units("mm", "sec")
        out.header.set_zooms((3.0, 3.0, 3.0, TR_S))
        nib.save(out, str(root / "bold" / f"{name}.nii.gz"))
        sd = np.sqrt(np.einsum("vk,kl,vl->v", weights[s], cov, weights[s]))
        expected[s] = sd / np.sqrt(sd ** 2 + noise ** 2)
    config = {"output": "study.zarr", "tr_s": TR_S, "onset_s": 0.0,
              "inputs": {"fmri": {s: f"bold/{s}.nii.gz" for s in subjects}, "movie": "movie.mp4"},
              "fmri": {"mask_strategy": "file", "mask_file": "mask.nii.gz"},
              "video": {"width": movie_size[0], "height": movie_size[1], "frame_skip": 3},
              "split": {"val_fraction": val_fraction}}
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # voxels in store order: the mask's C order, as the fmri stage lists them (checked in build())
    truth = {"subjects": subjects, "expected_r": expected, "weights": weights, "ijk": np.argwhere(inside),
             "achievable": float(expected.mean(1).mean()), "n_val": n_val}
    return path, truth


def build(config: Path, truth: dict) -> Path:
    """Run giblet-preprocess's engine on the study; returns the store (voxel order checked)."""
    from giblet.config import load_config
    from giblet.reader import open_store
    from pipelines import engine

    store = Path(engine.run(load_config(config), progress=False).store)  # in-process: a small study
    view = open_store(store)
    if not np.array_equal(view.voxels, truth["ijk"]):
        raise AssertionError("the store's voxels are not the mask's in C order; truth would be misaligned")
    return store


def ridge_baseline(store: str | Path, delays: int = 12) -> dict:
    """Per subject: ridge from the mean frame colour with ``delays`` TR delays (0..delays-1),
    alpha by leave-one-out CV (per voxel), fit on the train TRs and scored on the val TRs
    (:func:`giblet.evaluation.metrics.per_subject` of the per-voxel r)."""
    from sklearn.linear_model import RidgeCV

    from giblet.evaluation.metrics import pearson_r, per_subject
    from giblet.reader import open_store

    view = open_store(store)
    run = view.runs[0]
    colour = view.video(run).astype(np.float64).mean(axis=(1, 2, 3))  # (tr, 3): mean frame colour
    colour = (colour - colour.mean(0)) / colour.std(0)
    lagged = np.concatenate([np.roll(colour, d, axis=0) * (np.arange(len(colour)) >= d)[:, None]
                             for d in range(delays)], axis=1)
    rs = {}
    for subject in view.subjects:
        y = view.fmri(subject, run)
        (a, b), (c, d) = view.split_trs("train", run, subject), view.split_trs("val", run, subject)
        model = RidgeCV(alphas=np.logspace(-2, 5, 15), alpha_per_target=True).fit(lagged[a:b], y[a:b])
        rs[subject] = pearson_r(model.predict(lagged[c:d]), y[c:d])
    return per_subject(rs)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--trs", type=int, default=360)
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", nargs="*", default=[], help="train YAMLs to run on it (configs/train/demo.yaml)")
    ap.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every train run")
    args = ap.parse_args(argv)
    config, truth = make(args.root, n_subjects=args.subjects, n_trs=args.trs, noise=args.noise, seed=args.seed)
    store = build(config, truth)
    best = truth["achievable"]
    ridge = ridge_baseline(store)
    result = {"achievable": best, "ridge": ridge["mean"], "ridge_fraction": ridge["mean"] / best, "runs": {}}
    print(f"achievable r {best:.4f}; ridge (mean colour, 12 delays) {ridge['mean']:.4f} = "
          f"{100 * ridge['mean'] / best:.1f} %", flush=True)
    from pipelines.train import load_train_config, train

    for yml in args.train:
        out = Path(args.root) / "runs" / Path(yml).stem
        t0 = time.perf_counter()
        summary = train(load_train_config(yml, [f"store={store}", f"out={out}", "resume=false", *args.set]))
        minutes = (time.perf_counter() - t0) / 60
        result["runs"][yml] = {"r": summary["r_mean"], "fraction": summary["r_mean"] / best,
                               "of_ridge": summary["r_mean"] / ridge["mean"], "minutes": minutes,
                               "subjects": summary["subjects"]}
        print(f"{yml}: r {summary['r_mean']:.4f} = {100 * summary['r_mean'] / best:.1f} % of achievable, "
              f"{100 * summary['r_mean'] / ridge['mean']:.1f} % of ridge, {minutes:.2f} min", flush=True)
    (Path(args.root) / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
