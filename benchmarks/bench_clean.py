"""fMRI cleaning (detrend + Butterworth high-pass): giblet's ``clean`` against ``nilearn.signal.clean``.

Same input, same numbers (checked here too): a (946 TR, ``--voxels``) float32 block of a
Sherlock-length run with drift; ``high_pass`` 0.01 Hz at TR 1.5 s, as configs/preprocess/sherlock.yaml.

    python benchmarks/bench_clean.py --voxels 8192 --json clean.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voxels", type=int, default=8192)
    ap.add_argument("--trs", type=int, default=946)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from nilearn.signal import clean as nl_clean

    from giblet.features.fmri import clean

    rng = np.random.default_rng(0)
    t = np.arange(args.trs)[:, None]
    x = (1000 + 0.05 * t * rng.normal(size=args.voxels) + rng.normal(0, 10, size=(args.trs, args.voxels)))
    x = x.astype(np.float32)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    ref = nl_clean(x.astype(np.float64), detrend=True, high_pass=0.01, t_r=1.5, standardize=None,
                   standardize_confounds=False) + x.astype(np.float64).mean(0)
    base = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = clean(x.copy(), True, 0.01, 1.5)
    mine = time.perf_counter() - t0
    out = {"machine": machine(), "shape": [args.trs, args.voxels], "nilearn_clean_s": base, "giblet_clean_s": mine,
           "speedup": base / mine, "max_abs_diff": float(np.abs(got - ref).max()),
           "per_sherlock_subject_s": {"nilearn": base * 69397 / args.voxels, "giblet": mine * 69397 / args.voxels}}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
