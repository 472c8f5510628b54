"""Video stage throughput and memory, as ratios against baselines measured in this script.

On one movie file (default: a Sherlock-length synthetic movie, 23.8 min, 640x360, 25 fps,
H.264 + AAC, generated once with ``giblet.synth.write_movie`` and cached under /tmp):

1. ``opencv_sequential``: a plain OpenCV loop, ``VideoCapture.read`` + ``cv2.resize(INTER_AREA)``
   of every frame (the baseline; goal: stage >= 0.8x of it).
2. ``opencv_grab_retrieve``: OpenCV decoding every frame but converting/resizing only every
   ``frame_skip``-th (the fairest OpenCV equivalent of what the stage stores).
3. ``stage_one_task``: ``giblet.features.video.decode_segment`` over the whole movie in this
   process (one task: decode, select, resize, write Zarr chunks, pixel histograms).
4. ``seek_per_frame``: the prototype's loop, ``cap.set(CAP_PROP_POS_FRAMES, i)`` before every
   read, on the first ``--seek-frames`` frames only (it is ~20-50x slower).
5. ``engine``: the whole stage through ``pipelines.engine.run`` (LocalCluster, N workers,
   commit, manifest, align) with the peak RSS of the process tree (driver + workers).

Frames/s always counts *source* frames covered (the movie's frames), whatever is kept.

    python benchmarks/bench_video.py --out /tmp/bench_video.json
    python benchmarks/bench_video.py --movie /path/to/sherlock.m4v --out sherlock.json

The stage has no GPU path (decoding is CPU work); ``--device`` is accepted for the common
benchmark interface and recorded only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil

CACHE = Path("/tmp/giblet-bench")  # generated movies, kept between runs
SCRATCH = CACHE / "video-scratch"  # this script's stores and staging, removed after use

sys.path.insert(0, str(Path(__file__).parent))
from _util import PeakRSS  # noqa: E402  (shared with the other benchmarks)


def sherlock_like_movie(minutes: float, width: int, height: int, fps: int) -> Path:
    """Generate (once) a synthetic movie of the requested length with frame-index codes."""
    from giblet.synth import scenes, write_movie

    path = CACHE / f"synth_{width}x{height}_{fps}fps_{minutes:g}min.mp4"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} (one-off, several minutes) ...", file=sys.stderr)
        rng = np.random.default_rng(0)
        duration = minutes * 60
        tmp = path.with_suffix(".partial.mp4")
        write_movie(tmp, scenes(duration, rng), duration, size=(width, height), fps=fps, rng=rng)
        os.replace(tmp, path)
    return path


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(repeat: int, fns: dict) -> dict:
    """Run each measurement ``repeat`` times, round-robin (so drifting load on a shared
    machine hits all alike); keep the fastest wall time and the least CPU time of each."""
    runs: dict = {name: [] for name in fns}
    peaks: dict = {name: 0 for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            with PeakRSS() as rss:
                c0 = time.process_time()  # CPU seconds of this process, all threads
                secs, out = timed(fn)
                runs[name].append({"seconds": secs, "cpu_s": time.process_time() - c0, "out": out})
            peaks[name] = max(peaks[name], rss.peak)
    best = {}
    for name, rs in runs.items():
        fastest = min(rs, key=lambda r: r["seconds"])
        best[name] = {"seconds": fastest["seconds"], "cpu_s": min(r["cpu_s"] for r in rs), "out": fastest["out"],
                      "runs_s": [r["seconds"] for r in rs], "peak_rss_mib": peaks[name] / 2**20}
    return best


def opencv_sequential(path: Path, size: tuple[int, int]) -> int:
    import cv2

    cap, n = cv2.VideoCapture(str(path)), 0
    while True:
        ok, frame = cap.read()
        if not ok:
            return n
        cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        n += 1


def opencv_grab_retrieve(path: Path, size: tuple[int, int], skip: int) -> int:
    import cv2

    cap, n = cv2.VideoCapture(str(path)), 0
    while cap.grab():
        if n % skip == 0:
            ok, frame = cap.retrieve()
            cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        n += 1
    return n


def seek_per_frame(path: Path, size: tuple[int, int], n_frames: int) -> int:
    import cv2

    cap = cv2.VideoCapture(str(path))
    for i in range(n_frames):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, frame = cap.read()
        if not ok:
            return i
        cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    return n_frames


def stage_one_task(path: Path, size: tuple[int, int], tr_s: float, skip: int, chunk_trs: int,
                   limit_trs: int | None = None) -> dict:
    """decode_segment over the whole movie in this process (prepare + one task + stats)."""
    import dataclasses

    from giblet.features import video

    info = video.probe_movie(path)
    grid = video.make_grid(info, tr_s, 0.0, skip, None)
    if limit_trs:
        grid = dataclasses.replace(grid, n_trs=min(limit_trs, grid.n_trs))
    staging = SCRATCH / "staging-one-task"
    shutil.rmtree(staging, ignore_errors=True)
    video.create_arrays(staging, grid, size[0], size[1], chunk_trs, {})
    result = video.decode_segment(str(staging), str(path), 0, grid.n_trs, grid.n_trs, tr_s, 0.0, skip,
                                  grid.frames_per_tr, size[0], size[1], "area", chunk_trs, info.fps)
    video.pixel_stats([result["hist"]])
    shutil.rmtree(staging, ignore_errors=True)
    return {"n_trs": grid.n_trs, "frames": int(math.ceil(grid.n_trs * grid.tr * info.fps)),
            "frames_per_tr": grid.frames_per_tr}


def engine_run(path: Path, workers: int, tr_s: float) -> dict:
    import yaml

    from giblet.config import load_config
    from pipelines import engine

    root = SCRATCH / f"engine-w{workers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg_path = root / "video.yaml"
    # audio.model only lets the audio stage plan (the movie has a sound track); it does not run
    cfg_path.write_text(yaml.safe_dump({"output": "store.zarr", "tr_s": tr_s, "inputs": {"movie": str(path)},
                                        "audio": {"model": "random"}}))
    cfg = load_config(cfg_path)
    run = lambda: engine.run(cfg, only=["video"], workers=workers, progress=False, log=lambda m: None)  # noqa: E731
    with PeakRSS() as rss:
        seconds, report = timed(run)
    from giblet.reader import open_store

    store = open_store(report.store)
    meta = store.unit_meta("video")
    out = {"workers": workers, "seconds": seconds, "peak_rss_tree_mib": rss.peak / 2**20, "n_trs": meta["n_trs"],
           "frames_shape": list(store.array("video/frames").shape),
           "store_video_mib": sum(p.stat().st_size for p in (root / "store.zarr" / "video").rglob("*")
                                  if p.is_file()) / 2**20,
           "source_frames": int(round(meta["source"]["duration_s"] * meta["fps"]))}
    out["cache_hit_rerun_s"], _ = timed(run)
    shutil.rmtree(root, ignore_errors=True)
    return out


def in_process(out: dict, path: Path, args) -> None:
    """The three sequential readers (interleaved, best of ``--repeat``) and the seek loop."""
    size = (160, 90)
    stage_one_task(path, size, args.tr_s, 4, 16, limit_trs=2)  # warm-up: imports, page cache
    best = interleaved(args.repeat, {
        "opencv_sequential": lambda: opencv_sequential(path, size),
        "opencv_grab_retrieve": lambda: opencv_grab_retrieve(path, size, 4),
        "stage_one_task": lambda: stage_one_task(path, size, args.tr_s, 4, 16)})
    for name, m in best.items():
        res = m.pop("out")
        res = res if isinstance(res, dict) else {"frames": res}
        out[name] = {**res, **m, "fps": res["frames"] / m["seconds"], "fps_per_cpu_s": res["frames"] / m["cpu_s"]}
        print(f"{name}: {out[name]['fps']:.0f} frames/s wall, {out[name]['fps_per_cpu_s']:.0f} per CPU-second",
              file=sys.stderr)
    secs, n = timed(lambda: seek_per_frame(path, size, args.seek_frames))
    out["seek_per_frame"] = {"frames": n, "seconds": secs, "fps": n / secs}
    print(f"seek per frame (first {n} frames): {n / secs:.0f} frames/s", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--movie", help="movie file (default: a generated Sherlock-length synthetic movie)")
    ap.add_argument("--minutes", type=float, default=23.8)
    ap.add_argument("--size", default="640x360", help="generated movie size WxH")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--tr-s", type=float, default=1.5)
    ap.add_argument("--seek-frames", type=int, default=250)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs of each in-process measurement (best kept)")
    ap.add_argument("--device", default="cpu", help="recorded only: video decoding is CPU work")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    path = Path(args.movie) if args.movie else sherlock_like_movie(args.minutes, w, h, args.fps)
    out: dict = {"movie": str(path), "movie_mib": path.stat().st_size / 2**20, "device": args.device,
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "ram_gib": round(psutil.virtual_memory().total / 2**30, 1)},
                 "date": dt.date.today().isoformat(), "target": "160x90, frame_skip 4, area",
                 "load_avg_start": os.getloadavg()}
    in_process(out, path, args)
    out["engine"] = []
    for workers in args.workers:
        e = engine_run(path, workers, args.tr_s)
        e["fps"] = e["source_frames"] / e["seconds"]
        out["engine"].append(e)
        print(f"engine, {workers} worker(s): {e['seconds']:.1f} s, {e['fps']:.0f} frames/s, "
              f"peak RSS {e['peak_rss_tree_mib']:.0f} MiB", file=sys.stderr)
    base, stage = out["opencv_sequential"], out["stage_one_task"]
    out["ratios"] = {
        "stage_one_task_vs_opencv_sequential": stage["fps"] / base["fps"],
        "stage_one_task_vs_opencv_sequential_cpu": stage["fps_per_cpu_s"] / base["fps_per_cpu_s"],
        "stage_one_task_vs_opencv_grab_retrieve": stage["fps"] / out["opencv_grab_retrieve"]["fps"],
        "stage_one_task_vs_opencv_grab_retrieve_cpu": (stage["fps_per_cpu_s"]
                                                       / out["opencv_grab_retrieve"]["fps_per_cpu_s"]),
        "stage_one_task_vs_seek_per_frame": stage["fps"] / out["seek_per_frame"]["fps"],
        **{f"engine_w{e['workers']}_vs_opencv_sequential": e["fps"] / base["fps"] for e in out["engine"]},
    }
    out["load_avg_end"] = os.getloadavg()  # other work on a shared machine skews every figure
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
