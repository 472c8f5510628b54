"""A schema-exact store of any size, written through giblet's own commit path (zarr + numpy only).

For machines without the preprocessing stack (e.g. a GPU host with only torch): the arrays
have the documented names, dtypes, dims, chunking and scales (z-scored fMRI with raw-unit
mean/std, uint8 frames, int16 codes in [0, 1024), unit-norm text embeddings), so the
dataset and trainer see a store like a real one. The values are random, not a study.

    python benchmarks/synthetic_store.py OUT.zarr --subjects 2 --trs 946 --voxels 69397
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from giblet import store as gs
from giblet.fingerprint import hash_obj


def _unit(writer, key, stage, arrays: dict, meta: dict) -> None:
    staging = writer.staging_dir(key, hash_obj(key))
    for name, (data, chunks, dims, attrs) in arrays.items():
        arr = gs.create_array(staging, name, data.shape, str(data.dtype), chunks, dims, attrs)
        step = chunks[0]
        for t0 in range(0, data.shape[0], step):  # whole chunks only
            arr[t0:t0 + step] = data[t0:t0 + step]
    entry = {"stage": stage, "version": 0, "fingerprint": hash_obj(key, "synthetic"), "params": {},
             "inputs": {}, "deps": [], "meta": meta}
    writer.commit(key, entry, staging, list(arrays))


def build(out: Path, subjects: int, trs: int, voxels: int, frames: int = 10, hw=(90, 160),
          codebooks: int = 4, code_frames: int = 112, text_dim: int = 384, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    writer = gs.StoreWriter(out)
    writer.create()
    shape = (int(np.ceil(voxels ** (1 / 3))) + 1,) * 3
    mask = np.zeros(shape, bool)
    mask.flat[:voxels] = True
    affine = np.eye(4).tolist()
    _unit(writer, "fmri/mask", "fmri", {
        "fmri/mask": (mask, mask.shape, (gs.X, gs.Y, gs.Z), {"affine": affine, "n_voxels": voxels}),
        "fmri/voxels": (np.argwhere(mask).astype(np.int32), (voxels, 3), (gs.VOXEL, gs.IJK), {})}, {})
    for s in range(subjects):
        bold = rng.standard_normal((trs, voxels), dtype=np.float32)
        bold = (bold - bold.mean(0)) / bold.std(0)
        _unit(writer, f"fmri/sub-{s + 1:02d}", "fmri", {
            f"fmri/sub-{s + 1:02d}/bold": (bold, (16, voxels), (gs.TR, gs.VOXEL), {}),
            f"fmri/sub-{s + 1:02d}/mean": (rng.uniform(500, 1500, voxels).astype(np.float32), (voxels,), (gs.VOXEL,), {}),
            f"fmri/sub-{s + 1:02d}/std": (rng.uniform(10, 50, voxels).astype(np.float32), (voxels,), (gs.VOXEL,), {})},
            {"n_trs": trs, "n_zero_variance": 0})
    video = rng.integers(0, 256, size=(trs, frames, *hw, 3), dtype=np.uint8)
    _unit(writer, "video", "video", {
        "video/frames": (video, (16, frames, *hw, 3), (gs.TR, gs.FRAME, gs.HEIGHT, gs.WIDTH, gs.CHANNEL), {}),
        "video/padded": (np.zeros((trs, frames), bool), (16, frames), (gs.TR, gs.FRAME), {}),
        "video/mean": (np.full(3, 0.5, np.float32), (3,), (gs.CHANNEL,), {}),
        "video/std": (np.full(3, 0.2887, np.float32), (3,), (gs.CHANNEL,), {})}, {"n_trs": trs})
    codes = rng.integers(0, 1024, size=(trs, codebooks, code_frames)).astype(np.int16)
    _unit(writer, "audio", "audio", {
        "audio/codes": (codes, (64, codebooks, code_frames), (gs.TR, gs.CODEBOOK, gs.CODE_FRAME),
                        {"codebook_size": 1024})}, {"n_trs": trs, "codebook_size": 1024})
    text = rng.standard_normal((trs, text_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    _unit(writer, "text", "text", {
        "text/embeddings": (text, (128, text_dim), (gs.TR, gs.EMBEDDING), {}),
        "text/has_text": (np.ones(trs, bool), (128,), (gs.TR,), {}),
        "text/mean": (text.mean(0), (text_dim,), (gs.EMBEDDING,), {}),
        "text/std": (text.std(0), (text_dim,), (gs.EMBEDDING,), {})}, {"n_trs": trs})
    n_val = int(round(0.2 * trs))
    split = {"train": [0, trs - n_val], "val": [trs - n_val, trs]}
    units = {k: e["fingerprint"] for k, e in writer.manifest["units"].items()}
    record = {"fingerprint": hash_obj(units), "n_trs": trs, "n_trs_by_unit": {}, "split": split, "units": units}
    writer.write_align(record, {"schema_version": gs.SCHEMA_VERSION, "tr_s": 1.5, "onset_s": 0.0, "n_trs": trs,
                                "split": split, "synthetic": True})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--trs", type=int, default=946)
    ap.add_argument("--voxels", type=int, default=69397)
    a = ap.parse_args()
    print(build(Path(a.out), a.subjects, a.trs, a.voxels))


if __name__ == "__main__":
    main()
