"""fMRI stage vs nibabel alone on a Sherlock-shaped subject (61x73x61, 946 TRs, gzip int16).

    python benchmarks/bench_fmri.py [--root /tmp/giblet-bench/fmri] [--json out.json]

Baseline: nibabel reading the same file in the same script (``np.asanyarray(img.dataobj)``).
Figures: the subject task's time (read + mask + z-score + Zarr write) / baseline, the whole
stage through the engine (LocalCluster start, mask unit, subject unit), and the peak RSS
of the process tree for 1 and 4 subjects (it must not grow with the number of subjects).
"""
from __future__ import annotations

import argparse
import json
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
from giblet.synth import make_study  # noqa: E402
from pipelines import engine  # noqa: E402

SHAPE, N_TRS = (61, 73, 61), 946


def study(root: Path, n: int) -> Path:
    config = root / "study.yaml"
    if not config.exists():
        print(f"generating {n} Sherlock-shaped subjects in {root} ...", file=sys.stderr)
        make_study(root, n_subjects=n, n_trs=N_TRS, shape=SHAPE, movie=False, annotations=False)
    return config


def subset_config(config: Path, n: int, out: Path) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw["inputs"]["fmri"] = {k: str(config.parent / v) for k, v in list(raw["inputs"]["fmri"].items())[:n]}
    raw["output"] = str(out)
    path = out.parent / f"subset{n}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/giblet-bench/fmri")
    ap.add_argument("--json")
    args = ap.parse_args()
    config = study(Path(args.root), 4)
    first = config.parent / "bold/sub-01.nii.gz"
    work = Path(tempfile.mkdtemp(prefix="bench-fmri-"))
    res = {"machine": machine(), "shape": SHAPE, "n_trs": N_TRS, "file_mb": first.stat().st_size / 1e6}

    t = time.perf_counter()
    data = np.asanyarray(nib.load(str(first)).dataobj)
    res["nibabel_read_s"] = time.perf_counter() - t
    res["nibabel_dtype"] = str(data.dtype)
    del data

    # The stage, once through the engine per subject count (fresh store each time).
    for n in (1, 4):
        out = work / f"s{n}.zarr"
        cfg = load_config(subset_config(config, n, out))
        with PeakRSS() as rss:
            t = time.perf_counter()
            engine.run(cfg, workers=2, progress=False, log=lambda m: None)
            res[f"engine_{n}_subjects_s"] = time.perf_counter() - t
        res[f"peak_rss_{n}_subjects_gb"] = rss.gb

    # The subject task alone, in this process, against the same read (mask from the store).
    from giblet.features.fmri import build_subject

    staging = work / "staging"
    t = time.perf_counter()
    build_subject(str(staging), str(work / "s1.zarr"), "sub-01", str(first), 1.5, False, None, "zero", 16, 64)
    res["subject_task_s"] = time.perf_counter() - t
    res["subject_task_over_read"] = res["subject_task_s"] / res["nibabel_read_s"]
    manifest = json.loads((work / "s1.zarr/manifest.json").read_text())
    res["n_voxels"] = manifest["units"]["fmri/mask"]["meta"]["n_voxels"]
    shutil.rmtree(work)
    emit(res, args.json)


if __name__ == "__main__":
    main()
