"""Crash-anywhere harness: SIGKILL `giblet-preprocess run` at seeded random moments.

For each kill point the run is started on the same study, killed after a random delay
(spread over the whole length of an uninterrupted run), and whatever `open_store` then
serves is checked against the uninterrupted result; after all kills the run is completed
and every array must equal the reference and `verify` must pass.

    python tests/crash_harness.py --kills 30 --seed 0      # by hand; CI runs a few
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "pipelines.cli"]


def make_full_study(root: Path) -> Path:
    """Every stage: 2 subjects, 24 TRs, movie with audio, annotations, random EnCodec."""
    from giblet.synth import make_study

    return make_study(root, n_subjects=2, n_trs=24, shape=(10, 12, 8), movie_size=(96, 54), seed=3,
                      stages={"audio": {"model": "random", "segment_s": 10.0, "chunk_trs": 8},
                              "video": {"segment_trs": 16, "chunk_trs": 8}, "fmri": {"chunk_trs": 8}})


def arrays(store: Path) -> dict:
    import giblet

    s = giblet.open_store(store)
    return {name: s.array(name)[...] for name in sorted(s._arrays)}


def run_cli(config: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["run", str(config), "--workers", "2", "--no-progress"], capture_output=True,
                          text=True, **kw)


def harness(template_config: Path, work: Path, kills: int, seed: int) -> dict:
    """Returns a report; raises AssertionError on any mismatch."""
    ref_dir, crash_dir = work / "ref", work / "crash"
    shutil.copytree(template_config.parent, ref_dir)
    shutil.copytree(template_config.parent, crash_dir)
    t0 = time.perf_counter()
    r = run_cli(ref_dir / template_config.name)
    assert r.returncode == 0, r.stderr
    full_s = time.perf_counter() - t0
    expected = arrays(ref_dir / "study.zarr")
    rng = np.random.default_rng(seed)
    report = {"kills": kills, "seed": seed, "uninterrupted_s": round(full_s, 1), "points": []}
    config = crash_dir / template_config.name
    for delay in rng.uniform(0.2, full_s, size=kills):
        proc = subprocess.Popen(CLI + ["run", str(config), "--workers", "2", "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        served = _check_served(crash_dir / "study.zarr", expected)
        manifest = crash_dir / "study.zarr" / "manifest.json"
        n_units = len(json.loads(manifest.read_text())["units"]) if manifest.exists() else 0
        report["points"].append({"delay_s": round(float(delay), 2), "finished_before_kill": finished,
                                 "committed_units": n_units, "served_arrays_checked": served})
        if finished:  # start the next kill point from scratch, so that it interrupts real work
            shutil.rmtree(crash_dir / "study.zarr")
    r = run_cli(config)
    assert r.returncode == 0, r.stderr
    got = arrays(crash_dir / "study.zarr")
    assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    v = subprocess.run(CLI + ["verify", str(crash_dir / "study.zarr")], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout
    report["final"] = f"{len(expected)} arrays equal to the uninterrupted run; verify ok"
    return report


def kill_in_commit(template_config: Path, work: Path, steps=("dropped", "moved", "recorded")) -> dict:
    """SIGKILL the writer inside a unit's commit at each of its steps (the moments a random
    delay rarely lands on): what is served must be complete, and a rerun must finish the store
    equal to an uninterrupted one."""
    from giblet.store import KILL_ENV

    ref_dir = work / "ref"
    shutil.copytree(template_config.parent, ref_dir)
    assert run_cli(ref_dir / template_config.name).returncode == 0  # complete: the next runs replace its units
    expected = arrays(ref_dir / "study.zarr")
    report = {}
    for step in steps:
        crash_dir = work / f"commit-{step}"
        shutil.copytree(ref_dir, crash_dir)
        config = crash_dir / template_config.name
        raw = config.read_text()
        config.write_text(raw.replace("chunk_trs: 8", "chunk_trs: 4"))  # every fMRI unit rebuilt
        env = dict(os.environ, **{KILL_ENV: f"{step}:fmri/sub-01/run-1"})
        proc = subprocess.Popen(CLI + ["run", str(config), "--workers", "2", "--no-progress"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        code = proc.wait(timeout=600)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its Dask workers
        except ProcessLookupError:
            pass
        assert code == -signal.SIGKILL, f"{step}: the writer was not killed in the commit (exit {code})"
        served = _check_served(crash_dir / "study.zarr", expected)  # chunking changed, values did not
        config.write_text(raw)  # back to the reference's parameters: the resumed run must equal it
        r = run_cli(config)
        assert r.returncode == 0, r.stderr
        got = arrays(crash_dir / "study.zarr")
        assert got.keys() == expected.keys(), (step, sorted(got), sorted(expected))
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{step}: {name}")
        report[step] = {"served_after_kill": served}
    return report


def _check_served(store: Path, expected: dict | None) -> int:
    """Whatever open_store serves after a kill must be complete and equal to the reference."""
    import giblet

    try:
        s = giblet.open_store(store)
    except giblet.StoreError:
        return 0  # refused as incomplete: allowed
    names = sorted(s._arrays)
    for name in names:
        data = s.array(name)[...]  # every listed chunk present (a missing one raises), never zeros
        if expected is not None:
            np.testing.assert_array_equal(data, expected[name], err_msg=f"served {name}")
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="giblet-crash-"))
    config = make_full_study(work / "template")
    report = harness(config, work, args.kills, args.seed)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
