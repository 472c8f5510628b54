"""Target sets (``fmri.targets``) on a Sherlock-sized subject-run: extra cost against the voxels.

    python benchmarks/bench_targets.py [--scale 1.0] [--root /tmp/giblet-bench/targets] [--json out.json]

One subject-run of Sherlock's shape (61x73x61, 946 TRs, ~70k in-mask voxels at ``--scale 1``;
``--scale s`` shrinks the grid and the TR count by ``s``, keeping the field of view) with a
small movie, built through the engine (mask, video, voxel unit). Then, in this process, on
that store:

- baseline: the voxel unit's task (``giblet.features.fmri.build_subject``: read, mask, clean
  with ``detrend`` + ``high_pass``, z-score, write);
- each target set's tasks: its definition (once per study) and its series for the same
  (subject, run) (``build_series``: reconstruct, put back into the volume, nilearn, z-score,
  write): 400 synthetic parcels on a 2 mm grid (resampled), Power 2011 spheres (264, 5 mm),
  fsaverage5 (depth sampling, nilearn's default 10 samples).

Figures: seconds, series / voxel-unit ratio, bytes on disk of each set's arrays against the
voxels', and the trainer's samples/s on CPU with ``data.target`` voxels vs parcels (the tiny
config, ``--steps`` optimizer steps, from the runs' own ``log.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _util import PeakRSS, machine, emit  # noqa: E402

from giblet.config import load_config  # noqa: E402
from pipelines import engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPE, N_TRS, VOXEL_MM = (61, 73, 61), 946, 3.0
MNI_2MM = np.array([[2.0, 0, 0, -90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
TARGETS = [{"name": "parcels400", "kind": "parcels", "labels": "parcels400.nii.gz"},  # in the study's folder
           {"name": "power", "kind": "spheres", "coords": "power_2011"},
           {"name": "fsaverage5", "kind": "surface"}]


def voronoi_atlas(path: Path, n: int = 400, seed: int = 0) -> None:
    """``n`` parcels: the Voronoi cells of random points in an MNI-brain ellipsoid, on a 2 mm grid."""
    from scipy.spatial import cKDTree

    shape = (91, 109, 91)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = nib.affines.apply_affine(MNI_2MM, ijk)
    inside = (((xyz - [0, -18, 18]) / [70, 100, 75]) ** 2).sum(1) < 1
    rng = np.random.default_rng(seed)
    seeds = xyz[inside][rng.choice(int(inside.sum()), n, replace=False)]
    labels = np.zeros(len(xyz), np.int16)
    labels[inside] = 1 + cKDTree(seeds).query(xyz[inside])[1]
    nib.save(nib.Nifti1Image(labels.reshape(shape), MNI_2MM), str(path))


def study(root: Path, scale: float) -> Path:
    """One subject-run with a small movie (giblet.synth), the atlas and the config with every set."""
    from giblet.synth import make_study

    config = root / "study.yaml"
    if config.exists():
        return config
    shape, n_trs = tuple(math.ceil(d * scale) for d in SHAPE), math.ceil(N_TRS * scale)
    print(f"generating a {shape} x {n_trs} TR subject-run in {root} ...", file=sys.stderr)
    make_study(root, n_subjects=1, n_trs=n_trs, shape=shape, movie_size=(32, 18), fps=5, annotations=False,
               audio_track=False)
    raw = yaml.safe_load(config.read_text())
    bold = root / raw["inputs"]["fmri"]["sub-01"]
    img = nib.load(str(bold))  # keep Sherlock's field of view at any scale: voxels grow as the grid shrinks
    affine = np.diag([VOXEL_MM / scale] * 3 + [1.0])
    affine[:3, 3] = -0.5 * (VOXEL_MM / scale) * np.array(shape)
    img.header.set_qform(affine)
    img.header.set_sform(affine)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header), str(bold))
    voronoi_atlas(root / "parcels400.nii.gz")
    raw["fmri"] = {"detrend": True, "high_pass": 0.01}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def task_times(store: Path, cfg, work: Path) -> dict:
    """The voxel unit's task and each set's tasks, timed in this process on the built store."""
    from dataclasses import asdict

    from giblet.config import target_id
    from giblet.features.fmri import build_subject
    from giblet.features.target_series import build_series
    from giblet.features.targets import build_definition

    p, bold = cfg.fmri, cfg.input_path(cfg.study_runs["run-1"].fmri["sub-01"])
    n = open_store_trs(store)
    staging = work / "voxels"
    t = time.perf_counter()
    build_subject(str(staging), str(store), "sub-01", [{"run": "run-1", "path": str(bold), "n_trs": n,
                                                        "file_trs": n}], cfg.tr_s, p.detrend, p.high_pass, "zero",
                  p.chunk_trs, p.read_block_trs)
    out = {"voxels": {"series_s": time.perf_counter() - t, "bytes": size(staging)}}
    for t_cfg in p.targets:
        spec = {**asdict(t_cfg), "id": target_id(t_cfg)}
        if spec["labels"]:
            spec["labels"] = str(cfg.input_path(spec["labels"]))
        definition = work / f"def-{t_cfg.name}"
        t = time.perf_counter()
        meta = build_definition(str(definition), str(store), spec)
        define_s = time.perf_counter() - t
        shutil.copytree(definition / "targets", store / "targets", dirs_exist_ok=True)  # as the commit would
        series = work / f"series-{t_cfg.name}"
        with PeakRSS() as rss:
            t = time.perf_counter()
            build_series(str(series), str(store), spec, "sub-01", ["run-1"], "run", "zero", p.chunk_trs,
                         t_cfg.block_trs)
            series_s = time.perf_counter() - t
        out[spec["id"]] = {"definition_s": define_s, "series_s": series_s, "columns": meta["n_targets"],
                           "n_empty": meta["n_empty"], "bytes": size(series), "series_peak_rss_gb": rss.gb}
    base = out["voxels"]
    for rec in out.values():
        rec["series_over_voxel_unit"] = rec["series_s"] / base["series_s"]
        rec["bytes_over_voxels"] = rec["bytes"] / base["bytes"]
    return out


def open_store_trs(store: Path) -> int:
    from giblet.reader import open_store

    return open_store(store).n_trs("run-1", "sub-01")


def trainer_rates(store: Path, work: Path, steps: int) -> dict:
    """Steady samples/s of the tiny config on CPU, voxels vs the parcels, from each run's log."""
    from pipelines.train import load_train_config, train

    out = {}
    for target in ("voxels", "parcels/parcels400"):
        run = work / f"train-{target.replace('/', '-')}"
        cfg = load_train_config(REPO / "configs/train/tiny.yaml", [
            f"store={store}", f"out={run}", f"data.target={target}", f"schedule.max_steps={steps}",
            "log.every=5", f"log.val_every={steps}", f"log.ckpt_every={steps}", "log.scale_check=warn"])
        train(cfg)
        rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in rows if r["kind"] == "train"][2:]  # after the first steps' warm-up
        out[target] = {"samples_per_s": float(np.median(rates)), "steps": steps}
    out["parcels_over_voxels"] = out["parcels/parcels400"]["samples_per_s"] / out["voxels"]["samples_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="grid sides and TRs as a fraction of Sherlock's")
    ap.add_argument("--root", default="/tmp/giblet-bench/targets")
    ap.add_argument("--steps", type=int, default=40, help="trainer steps per target")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.root) / f"scale{args.scale:g}"
    root.mkdir(parents=True, exist_ok=True)
    config = study(root, args.scale)
    work = Path(tempfile.mkdtemp(prefix="bench-targets-"))
    cfg = load_config(config, [f"output={work / 'store.zarr'}"])
    t = time.perf_counter()
    engine.run(cfg, workers=1, progress=False, log=lambda m: None)  # mask, video, the voxel unit
    res = {"machine": machine(), "scale": args.scale, "engine_voxels_s": time.perf_counter() - t}
    store = work / "store.zarr"
    targets = [{**t, "labels": str(root / t["labels"])} if "labels" in t else t for t in TARGETS]  # override paths:
    with_targets = load_config(config, [f"output={store}", f"fmri.targets={json.dumps(targets)}"])  # vs the cwd
    res["tasks"] = task_times(store, with_targets, work)
    t = time.perf_counter()
    engine.run(with_targets, workers=1, progress=False, log=lambda m: None)  # the same sets through the engine
    res["engine_targets_s"] = time.perf_counter() - t
    res["trainer_cpu"] = trainer_rates(store, work, args.steps)
    shutil.rmtree(work)
    emit(res, args.json)


if __name__ == "__main__":
    main()
