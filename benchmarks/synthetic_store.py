"""A schema-exact store of any size, written through giblet's own commit path (zarr + numpy only).

For machines without the preprocessing stack (e.g. a GPU host with only torch): the arrays
have the documented names, dtypes, dims, chunking and scales (z-scored fMRI with raw-unit
mean/std, uint8 frames, int16 codes in [0, 1024), unit-norm text embeddings), so the
dataset and trainer see a store like a real one. The values are random, not a study.

    python benchmarks/synthetic_store.py OUT.zarr --subjects 2 --trs 946 1030 --voxels 69397
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from giblet import store as gs
from giblet.fingerprint import hash_obj


def _unit(writer, key, stage, arrays: dict, meta: dict, run=None) -> None:
    staging = writer.staging_dir(key, hash_obj(key))
    for name, (data, chunks, dims, attrs) in arrays.items():
        arr = gs.create_array(staging, name, data.shape, str(data.dtype), chunks, dims, attrs)
        step = chunks[0]
        for t0 in range(0, data.shape[0], step):  # whole chunks only
            arr[t0:t0 + step] = data[t0:t0 + step]
    entry = {"stage": stage, "version": 0, "fingerprint": hash_obj(key, "synthetic"), "params": {},
             "inputs": {}, "deps": [], "meta": meta, "run": run}
    writer.commit(key, entry, staging, list(arrays))


def build(out: Path, subjects: int, trs, voxels: int, frames: int = 10, hw=(90, 160),
          codebooks: int = 4, code_frames: int = 112, text_dim: int = 384, seed: int = 0) -> Path:
    """``trs``: one TR count or one per run (runs ``run-1``, ``run-2``, ...)."""
    from giblet.split import plan_split

    rng = np.random.default_rng(seed)
    lengths = {f"run-{i + 1}": int(n) for i, n in enumerate(np.atleast_1d(trs))}
    writer = gs.StoreWriter(out)
    writer.create()
    shape = (int(np.ceil(voxels ** (1 / 3))) + 1,) * 3
    mask = np.zeros(shape, bool)
    mask.flat[:voxels] = True
    affine = np.eye(4).tolist()
    _unit(writer, "fmri/mask", "fmri", {
        gs.MASK: (mask, mask.shape, (gs.X, gs.Y, gs.Z), {"affine": affine, "n_voxels": voxels}),
        gs.VOXELS: (np.argwhere(mask).astype(np.int32), (voxels, 3), (gs.VOXEL, gs.IJK), {})}, {})
    names = [f"sub-{s + 1:02d}" for s in range(subjects)]
    for run, n in lengths.items():
        for name in names:
            bold = rng.standard_normal((n, voxels), dtype=np.float32)
            bold = (bold - bold.mean(0)) / bold.std(0)
            prefix = gs.fmri_prefix(name, run)
            _unit(writer, prefix, "fmri", {
                f"{prefix}/bold": (bold, (16, voxels), (gs.TR, gs.VOXEL), {}),
                f"{prefix}/mean": (rng.uniform(500, 1500, voxels).astype(np.float32), (voxels,), (gs.VOXEL,), {}),
                f"{prefix}/std": (rng.uniform(10, 50, voxels).astype(np.float32), (voxels,), (gs.VOXEL,), {})},
                {"runs": {run: {"n_trs": n, "n_zero_variance": 0}}, "zscore": "run"}, run)
        video = rng.integers(0, 256, size=(n, frames, *hw, 3), dtype=np.uint8)
        flat = video.reshape(n, -1, 3).astype(np.int64)
        moments = np.stack([flat.sum(1), (flat ** 2).sum(1)], axis=1)
        v = gs.stimulus_prefix(run, "video")
        _unit(writer, f"video/{run}", "video", {
            f"{v}/frames": (video, (16, frames, *hw, 3), (gs.TR, gs.FRAME, gs.HEIGHT, gs.WIDTH, gs.CHANNEL), {}),
            f"{v}/padded": (np.zeros((n, frames), bool), (16, frames), (gs.TR, gs.FRAME), {}),
            f"{v}/moments": (moments, (16, 2, 3), (gs.TR, gs.MOMENT, gs.CHANNEL),
                             {"pixels_per_tr": frames * hw[0] * hw[1]})},
            {"n_trs": n, "frames_per_tr": frames, "n_padded_frames": 0}, run)
        codes = rng.integers(0, 1024, size=(n, codebooks, code_frames)).astype(np.int16)
        _unit(writer, f"audio/{run}", "audio", {
            f"{gs.stimulus_prefix(run, 'audio')}/codes": (codes, (64, codebooks, code_frames),
                                                          (gs.TR, gs.CODEBOOK, gs.CODE_FRAME),
                                                          {"codebook_size": 1024, "bandwidth_kbps": 3.0,
                                                           "frame_rate": 75.0, "code_frames_per_tr": code_frames})},
            {"n_trs": n, "codebook_size": 1024}, run)
        text = rng.standard_normal((n, text_dim)).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        t = gs.stimulus_prefix(run, "text")
        _unit(writer, f"text/{run}", "text", {
            f"{t}/embeddings": (text, (128, text_dim), (gs.TR, gs.EMBEDDING), {}),
            f"{t}/has_text": (np.ones(n, bool), (128,), (gs.TR,), {})}, {"n_trs": n}, run)
    rule = {"val_runs": [], "test_runs": [], "val_fraction": 0.2}
    split = plan_split(lengths, val_fraction=0.2)
    runs = {r: {"n_trs": n, "onset_s": 0.0, "n_trs_by_unit": {f"{st}/{r}": n for st in ("audio", "text", "video")},
                "subjects": {s: n for s in names}, "split": {k: list(v) for k, v in split[r].items()}}
            for r, n in lengths.items()}
    units = {k: e["fingerprint"] for k, e in sorted(writer.manifest["units"].items())}
    record = {"fingerprint": hash_obj(units), "format": gs.FORMAT, "tr_s": 1.5, "runs": runs,
              "run_order": list(lengths), "subjects": names, "split_rule": rule, "units": units}
    writer.write_align(record, {"format": gs.FORMAT, "tr_s": 1.5, "runs": runs, "run_order": list(lengths),
                                "subjects": names, "split_rule": rule, "synthetic": True})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--trs", type=int, nargs="+", default=[946], help="TRs per run (one number per run)")
    ap.add_argument("--voxels", type=int, default=69397)
    a = ap.parse_args()
    print(build(Path(a.out), a.subjects, a.trs, a.voxels))


if __name__ == "__main__":
    main()
