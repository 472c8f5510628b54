"""Evaluation on a built store: the ISC noise ceiling's time and peak RSS against the time to read
all the fMRI once (same script, same process), and the ridge baseline's fit time per subject.

The fMRI is read once before the ceiling (cold or warm page cache, as the machine is) and once
after it (warm, as the ceiling found it): the ratio is against the second. Peak RSS is sampled
every 50 ms per phase (the process and any children; ``baseline_rss_gb`` is what was resident
before the phase began).

Usage (a Sherlock-shaped store: 17 subjects, runs of 946 and 1,030 TRs, ~40k voxels)::

    python benchmarks/synthetic_store.py /tmp/s17.zarr --subjects 17 --trs 946 1030 --voxels 40000
    python benchmarks/bench_evaluate.py /tmp/s17.zarr --json eval_sherlock17.json
    python benchmarks/bench_evaluate.py STORE --ridge-subjects 0 --json eval_all.json   # every subject
    python benchmarks/bench_evaluate.py STORE --no-ridge --save --json eval_ceiling.json  # + commit, cached read
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, timed  # noqa: E402

import giblet  # noqa: E402
from giblet.evaluation.ceiling import noise_ceiling  # noqa: E402
from giblet.evaluation.features import FeatureParams, store_features  # noqa: E402
from giblet.evaluation.ridge import fit_subject, subject_samples  # noqa: E402


def read_all_fmri(view) -> int:
    """Read every (subject, run) ``bold`` whole, one at a time; returns the bytes read."""
    total = 0
    for subject in view.subjects:
        for run in view.subject_runs(subject):
            total += view.fmri(subject, run).nbytes
    return total


def ceiling_figures(view, split: str, save: bool, scheduler) -> dict:
    nbytes, read_cold, read_rss, _ = timed(read_all_fmri, view)
    result, ceiling_s, ceiling_rss, before = timed(noise_ceiling, view, split, cache=save, scheduler=scheduler)
    _, read_warm, _, _ = timed(read_all_fmri, view)
    out = {"fmri_gb": nbytes / 1e9, "read_once_first_s": read_cold, "read_once_warm_s": read_warm,
           "read_peak_rss_gb": read_rss, "ceiling_s": ceiling_s, "ceiling_peak_rss_gb": ceiling_rss,
           "baseline_rss_gb": before, "ceiling_over_read": ceiling_s / read_warm,
           "ceiling_saved": save, "isc_median": float(np.nanmedian(result.isc)), "n_trs": result.n_trs}
    if save:
        again = giblet.open_store(view.path)
        cached, cached_s, _, _ = timed(noise_ceiling, again, split)
        out.update(cached_read_s=cached_s, cached=cached.cached)
    return out


def ridge_figures(view, subjects: list[str], delays) -> dict:
    params = FeatureParams(delays=tuple(delays) if delays else None)
    features, features_s, features_rss, _ = timed(store_features, view, params)
    per_subject = {}
    for subject in subjects:
        def fit():
            train = subject_samples(view, features, subject, "train")
            evals = {s: e for s in ("val", "test") if (e := subject_samples(view, features, subject, s))}
            return fit_subject(train, evals)
        (r, alphas, _, solver), seconds, rss, _ = timed(fit)
        per_subject[subject] = {"fit_s": seconds, "peak_rss_gb": rss, "solver": solver,
                                "median_r": {s: float(np.median(v)) for s, v in r.items()},
                                "median_alpha": float(np.median(alphas))}
    fits = [v["fit_s"] for v in per_subject.values()]
    return {"features_s": features_s, "features_peak_rss_gb": features_rss, "n_features": features.n_features,
            "bands": {m: s.stop - s.start for m, s in features.bands.items()}, "delays": list(features.delays),
            "subjects": per_subject, "fit_s_median": float(np.median(fits)) if fits else None,
            "fit_s_all_subjects_estimate": float(np.median(fits)) * len(view.subjects) if fits else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--scheduler", default=None, help="dask scheduler for the ceiling (default: threads)")
    ap.add_argument("--save", action="store_true", help="commit the ceiling into the store and time a cached read")
    ap.add_argument("--no-ridge", action="store_true")
    ap.add_argument("--ridge-subjects", type=int, default=3, help="subjects fitted (0: all)")
    ap.add_argument("--delays", type=int, nargs="*", help="FIR delays in TRs (default: 1 .. ceil(12 s / TR))")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)

    view = giblet.open_store(args.store)
    out = {"machine": machine(), "store": str(args.store.resolve()), "subjects": len(view.subjects),
           "runs": {r: view.n_trs(r) for r in view.runs}, "n_voxels": view.n_voxels, "split": args.split,
           "ceiling": ceiling_figures(view, args.split, args.save, args.scheduler)}
    if not args.no_ridge:
        subjects = view.subjects[:args.ridge_subjects] if args.ridge_subjects else view.subjects
        out["ridge"] = ridge_figures(view, subjects, args.delays)
    args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
