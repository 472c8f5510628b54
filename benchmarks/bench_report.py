"""``giblet-preprocess report``: time and peak RSS against the time to read one subject's fMRI
(every run of the first subject, whole, as ``view.fmri`` serves it), same script, same process.

The read runs first (cold or warm page cache, as the machine is) and again after the report
(warm); the ratio is against the second. Peak RSS is sampled every 50 ms per phase (the
process and any children; ``baseline_rss_gb`` is what was resident before the phase began).
The report is timed twice: the first call also imports matplotlib and nilearn.

Usage (a Sherlock-shaped store: 17 subjects, runs of 946 and 1,030 TRs, 69,397 voxels)::

    python benchmarks/synthetic_store.py /tmp/s17.zarr --subjects 17 --trs 946 1030 --voxels 69397
    python benchmarks/bench_report.py /tmp/s17.zarr --json benchmarks/results/report_sherlock17.json
    python benchmarks/bench_report.py /tmp/small.zarr --carpets 0 --json /tmp/report_small.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, timed  # noqa: E402

import giblet  # noqa: E402
from giblet.report import build_report  # noqa: E402


def read_subject(view, subject: str) -> int:
    """Every run of ``subject``'s z-scored BOLD, whole, one run at a time; returns the bytes read."""
    return sum(view.fmri(subject, run).nbytes for run in view.subject_runs(subject))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--carpets", type=int, default=3, help="carpet plots (each reads one run's bold)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)

    view = giblet.open_store(args.store)
    subject = view.subjects[0]
    nbytes, read_first, read_rss, _ = timed(read_subject, view, subject)
    with tempfile.TemporaryDirectory() as tmp:
        reports = []
        for i in range(2):
            out, seconds, rss, before = timed(build_report, args.store, Path(tmp) / f"r{i}.html",
                                              carpets=args.carpets, search=False)
            html = out.read_text()
            reports.append({"report_s": seconds, "peak_rss_gb": rss, "baseline_rss_gb": before,
                            "html_mb": len(html.encode()) / 1e6, "images": html.count("data:image/png")})
    _, read_warm, _, _ = timed(read_subject, view, subject)
    result = {"machine": machine(), "store": str(args.store.resolve()), "subjects": len(view.subjects),
              "runs": {r: view.n_trs(r) for r in view.runs}, "n_voxels": view.n_voxels, "carpets": args.carpets,
              "read_one_subject": {"subject": subject, "fmri_gb": nbytes / 1e9, "first_s": read_first,
                                   "warm_s": read_warm, "peak_rss_gb": read_rss},
              "report_first_call": reports[0], "report": reports[1],
              "report_over_read": reports[1]["report_s"] / read_warm}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
