"""BIDS input: discovery + planning of a 100-subject x 10-run fMRIPrep tree, and the cost of
confound regression for a Sherlock-sized run against the nibabel read of that run.

1. Discovery + planning: ``giblet.synth_bids.write_bids_dataset(tiny=True)`` writes 100 x 10
   derivative runs (2x2x2 x 20 TRs: raw + fMRIPrep BOLD, sidecars, masks, confounds tables;
   6,000 files); each config is loaded (the ``bids`` block expanded) and planned
   (``pipelines.engine.plan_for``, a fresh store: every input hashed) in a fresh process,
   ``--repeats`` times; imports are timed apart. Configs: ``init``'s default for derivatives
   (fMRIPrep masks + ``simple`` confounds: the plan reads every mask header and tries the
   first confounds table through nilearn) and a plain one (``epi`` mask, no confounds). With
   ``--pybids DIR`` (a ``pip install --target DIR pybids``), pybids' ``BIDSLayout`` indexes the
   same tree for comparison.
2. Confounds: a Sherlock-sized run (61x73x61 x 1,030 TRs, gzip int16 with scaling, ~73k
   in-mask voxels) and its fMRIPrep confounds table; the masked nibabel read (what the fMRI
   stage reads), nilearn's ``load_confounds_strategy`` (``simple``, ``scrubbing``) and
   ``giblet.features.confounds.regress`` (one ``nilearn.signal.clean`` with the confounds,
   sample mask, detrend and 0.01 Hz high-pass), and giblet's ``clean`` without confounds.

    python benchmarks/bench_bids.py --json benchmarks/results/bids_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine  # noqa: E402

CONFIGS = {
    "fmriprep_masks_simple_confounds": {"fmri": {"mask_strategy": "fmriprep", "confounds": {"strategy": "simple"}}},
    "epi_mask_no_confounds": {"fmri": {"mask_strategy": "epi"}},
}
PLAN = """
import json, sys, time
t0 = time.perf_counter()
from giblet.config import load_config
from pipelines.engine import plan_for
t1 = time.perf_counter()
cfg = load_config(sys.argv[1])
t2 = time.perf_counter()
ctx, units = plan_for(cfg)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_discover_s": t2 - t1, "plan_s": t3 - t2,
                  "discover_plus_plan_s": t3 - t1, "total_s": t3 - t0, "units": len(units),
                  "runs": len(cfg.runs), "subjects": len(cfg.subjects)}))
"""
PYBIDS = """
import sys, time
sys.path.append(sys.argv[2])
t0 = time.perf_counter()
from bids import BIDSLayout
t1 = time.perf_counter()
layout = BIDSLayout(sys.argv[1], validate=False, derivatives=sys.argv[1] + "/derivatives/fmriprep")
bold = layout.get(suffix="bold", desc="preproc", extension=".nii.gz", scope="derivatives")
t2 = time.perf_counter()
print({"import_s": t1 - t0, "index_and_query_s": t2 - t1, "bold_files": len(bold)})
"""


def discovery(tmp: Path, repeats: int, pybids: str | None) -> dict:
    import yaml

    from giblet.synth_bids import write_bids_dataset

    t0 = time.perf_counter()
    tree = write_bids_dataset(tmp / "tree", n_subjects=100, tasks={"movie": 10}, n_trs=40, tiny=True, non_steady=1,
                              spikes=())  # 40 TRs: more than `simple`'s 29 confounds
    out: dict = {"tree": {"subjects": 100, "runs": 10, "files": sum(1 for p in tree.rglob("*") if p.is_file()),
                          "write_s": time.perf_counter() - t0}}
    for name, extra in CONFIGS.items():
        config = tmp / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"output": str(tmp / f"{name}.zarr"), "bids": {
            "root": str(tree), "derivatives": str(tree / "derivatives" / "fmriprep")}, **extra}))
        runs = []
        for _ in range(repeats):
            r = subprocess.run([sys.executable, "-c", PLAN, str(config)], capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                raise SystemExit(f"{name}: planning failed: {r.stderr.strip().splitlines()[-1]}")
            runs.append(json.loads(r.stdout))
        out[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[name]["repeats"] = runs
    if pybids:
        r = subprocess.run([sys.executable, "-c", PYBIDS, str(tree), pybids], capture_output=True, text=True)
        out["pybids"] = r.stdout.strip() or r.stderr.strip().splitlines()[-1]
    return out


def sherlock_run(tmp: Path) -> tuple[Path, np.ndarray]:
    """A 61x73x61 x 1030 int16 .nii.gz in fMRIPrep naming, its confounds table, the in-mask voxels."""
    import nibabel as nib

    from giblet.synth import brain
    from giblet.synth_bids import compcor_json, confounds_table

    shape, n = (61, 73, 61), 1030
    rng = np.random.default_rng(0)
    inside, base = brain(shape, rng)
    table = confounds_table(n, rng, non_steady=3, spikes=[200, 201, 640])
    driven = np.nan_to_num(table[["trans_x", "rot_y", "csf"]].to_numpy(np.float32))
    weights = rng.normal(0, 5, shape + (3,)).astype(np.float32) * inside[..., None]
    data = np.empty(shape + (n,), np.float32)
    for t0 in range(0, n, 64):
        t1 = min(n, t0 + 64)
        data[..., t0:t1] = base[..., None] + weights @ driven[t0:t1].T + \
            rng.standard_normal(shape + (t1 - t0,), dtype=np.float32) * 10 * inside[..., None]
    func = tmp / "sherlock" / "sub-01" / "func"
    func.mkdir(parents=True)
    bold = func / "sub-01_task-sherlock_run-1_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((3.0, 3.0, 3.0, 1.5))
    nib.save(img, str(bold))
    table.to_csv(func / "sub-01_task-sherlock_run-1_desc-confounds_timeseries.tsv", sep="\t", index=False,
                 na_rep="n/a")
    (func / "sub-01_task-sherlock_run-1_desc-confounds_timeseries.json").write_text(json.dumps(compcor_json(5)))
    return bold, inside


def confound_cost(tmp: Path) -> dict:
    from giblet.config import ConfoundsParams
    from giblet.features import confounds
    from giblet.features.fmri import clean, read_masked

    t0 = time.perf_counter()
    bold, mask = sherlock_run(tmp)
    out: dict = {"write_s": time.perf_counter() - t0, "shape": [61, 73, 61, 1030], "voxels": int(mask.sum())}
    t0 = time.perf_counter()
    x = read_masked(bold, "sub-01", mask, 16)
    out["nibabel_read_s"] = read = time.perf_counter() - t0
    for strategy in ("simple", "scrubbing"):
        t0 = time.perf_counter()
        table, censored = confounds.load(bold, ConfoundsParams(strategy=strategy), 1030, 1030, "sub-01")
        loaded = time.perf_counter() - t0
        t0 = time.perf_counter()
        confounds.regress(x, table, censored, True, 0.01, 1.5, "sub-01")
        regress = time.perf_counter() - t0
        out[strategy] = {"confounds": int(table.shape[1]), "censored": int(censored.sum()), "load_confounds_s": loaded,
                         "regress_s": regress, "ratio_to_read": (loaded + regress) / read}
    t0 = time.perf_counter()
    clean(x.copy(), True, 0.01, 1.5)
    out["clean_without_confounds_s"] = time.perf_counter() - t0
    out["clean_without_confounds_ratio_to_read"] = out["clean_without_confounds_s"] / read
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pybids", metavar="DIR", help="a `pip install --target DIR pybids` to compare with")
    ap.add_argument("--skip-confounds", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        out["discovery"] = discovery(Path(tmp), args.repeats, args.pybids)
        print(json.dumps({k: v for k, v in out["discovery"].items()}, indent=1, default=str), flush=True)
        if not args.skip_confounds:
            out["confounds"] = confound_cost(Path(tmp))
            print(json.dumps(out["confounds"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
