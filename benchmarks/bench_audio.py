"""Audio stage speed and memory (issue 23): the stage, its encode paths and a whole build,
each against a baseline run in the same script.

Three modes, one script, the same samples for both sides of every ratio:

* ``encode`` (default; needs only torch + transformers + numpy + scipy): seeded tones and a
  speech-like signal are synthesised; ``giblet.features.audio.encode_frames`` -- the
  ``eager`` path (transformers' ``encode``, batched windows) and the ``stream`` path
  (``giblet.features.encodec_stream``) -- is timed against the prototype-style baseline
  (one ``model.encode`` of the whole waveform with all cores) and a bare loop of
  ``model.encode`` over ``segment_s`` pieces. Reports agreement of every path with the
  whole-waveform and the eager encode, and FLOP/s achieved (convolutions counted with
  forward hooks, the LSTM and the codebook distances from their shapes) against a plain
  fp32 matmul's on the same threads. It imports only ``giblet.errors`` and
  ``giblet.features`` (``giblet/__init__``, which needs zarr, is bypassed), so it runs from
  a plain copy of the repo on a GPU machine (``--device cuda``: eager only)::

      python benchmarks/bench_audio.py --seconds 300 --json /tmp/bench_audio.json

* ``--stage`` (full giblet install): a synthetic movie with a stereo AAC track is written and
  ``giblet-preprocess run --only audio`` runs in a subprocess (in-process by default; the
  ``--workers`` you pass otherwise); the baseline decodes the same file (PyAV) and encodes
  the whole waveform with all cores, in this process. Reports the stage's wall time (the
  command's, and the stage's own from ``--report``), the ratio to the baseline (goal <= 0.5)
  and each process's peak RSS (goal: the audio task's process <= 0.6 GB)::

      python benchmarks/bench_audio.py --stage --seconds 600 --json /tmp/bench_audio_stage.json

* ``--build`` (full giblet install): a ``giblet.synth`` study (``--subjects``, ``--minutes``,
  640x360 25 fps movie, 40x48x40 BOLD) is built from nothing by the command line, alternately
  with the old settings (``--workers 2 audio.fast_path=eager audio.threads=1``: a LocalCluster
  of single-threaded workers) and the defaults; wall time, CPU seconds and peak RSS of the
  process tree, and whether the two stores agree::

      python benchmarks/bench_audio.py --build --minutes 10 --subjects 3 --json /tmp/bench_build.json

Timings alternate the sides ``--repeat`` times and keep each side's best and median. On a
shared machine wall times are noisy: compare the ratios of one run, and the CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def import_audio(light: bool):
    """``giblet.features.audio``; with ``light``, without running ``giblet/__init__`` (zarr)."""
    sys.path.insert(0, str(ROOT))
    if light and "giblet" not in sys.modules:
        pkg = types.ModuleType("giblet")
        pkg.__path__ = [str(ROOT / "giblet")]
        sys.modules["giblet"] = pkg
    from giblet.features import audio

    return audio


def synth_wave(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """``(sample,) float32``: tones that change every 0.7-3 s, plus noise and a slow envelope."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    out = np.empty(n, np.float32)
    pos = 0
    while pos < n:
        m = min(n - pos, int(rng.uniform(0.7, 3.0) * rate))
        t = np.arange(m) / rate
        f = rng.choice([110, 220, 330, 440, 660, 880])
        tone = rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * f * t) * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * t))
        out[pos:pos + m] = tone + rng.normal(0, 0.02, m)
        pos += m
    return out


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_loop(model, wave: np.ndarray, bandwidth: float, segment_s: float, batch_size: int, audio) -> np.ndarray:
    """``model.encode`` on consecutive ``segment_s`` pieces, ``batch_size`` at a time (same
    32-bit-index cap as giblet); codes copied back to the host like giblet's."""
    import torch

    cfg = model.config
    seg = int(round(segment_s * cfg.sampling_rate))
    hop = int(np.prod(cfg.upsampling_ratios))
    seg -= seg % hop
    batch = min(batch_size, max(1, audio.MAX_PAD_ELEMENTS // (seg * cfg.num_filters)))
    device = next(model.parameters()).device
    n = len(wave) - len(wave) % seg  # whole pieces only: every batch has one shape
    pieces = wave[:n].reshape(-1, 1, seg)
    out = []
    with torch.inference_mode():
        for b0 in range(0, len(pieces), batch):
            x = torch.from_numpy(np.ascontiguousarray(pieces[b0:b0 + batch])).to(device)
            codes = model.encode(x, bandwidth=bandwidth, return_dict=True).audio_codes[0]
            out.append(codes.cpu().numpy())
    return np.concatenate(out).transpose(1, 0, 2).reshape(out[0].shape[1], -1)  # (codebook, frame)


def whole(model, wave: np.ndarray, bandwidth: float) -> np.ndarray:
    """The prototype's way: one ``model.encode`` of the whole waveform (torch's threads as set)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(wave))[None, None].to(device)
        return model.encode(x, bandwidth=bandwidth, return_dict=True).audio_codes[0, 0].cpu().numpy()


# -- FLOPs ------------------------------------------------------------------------------------

def encode_flops(model, seconds: float, bandwidth: float) -> float:
    """FLOPs of encoding ``seconds`` of audio: convolutions counted by forward hooks on a 2 s
    encode (scaled), the LSTM and the codebook distances from their shapes."""
    import torch

    rate, hop = model.config.sampling_rate, int(np.prod(model.config.upsampling_ratios))
    conv = []

    def hook(m, _inputs, out):
        conv.append(2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0])

    hooks = [m.register_forward_hook(hook) for m in model.encoder.modules() if isinstance(m, torch.nn.Conv1d)]
    try:
        with torch.inference_mode():
            model.encoder(torch.zeros(1, 1, 2 * rate))
    finally:
        for h in hooks:
            h.remove()
    frames = seconds * rate / hop
    lstm = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.LSTM))
    lstm_flops = lstm.num_layers * frames * 2 * 4 * lstm.hidden_size * (lstm.input_size + lstm.hidden_size)
    n_q = max(1, int(bandwidth * 1000 // (np.log2(model.config.codebook_size) * np.ceil(rate / hop))))
    vq = frames * n_q * 2 * model.config.codebook_dim * model.config.codebook_size
    return sum(conv) * seconds / 2.0 + lstm_flops + vq


def matmul_flops_per_s(threads: int, n: int = 2048, repeat: int = 5) -> float:
    """A plain fp32 ``n x n`` matmul's FLOP/s on ``threads`` torch threads (best of ``repeat``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n)
        a @ a
        best = min(_timed(lambda: a @ a)[0] for _ in range(repeat))
    finally:
        torch.set_num_threads(before)
    return 2 * n ** 3 / best


def _timed(fn) -> tuple[float, float, object]:
    """(wall s, this process's CPU s, result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


# -- encode mode --------------------------------------------------------------------------------

def compare(model, wave, audio, args, threads: int) -> dict:
    """Best-of-``repeat`` times of the paths and baselines on ``wave`` (sides alternate)."""
    cfg = model.config
    hop = int(np.prod(cfg.upsampling_ratios))
    seg = int(round(args.segment_s * cfg.sampling_rate))
    seg -= seg % hop
    wave = wave[: len(wave) - len(wave) % seg]  # the same whole pieces for every side
    k = len(wave) // hop
    seconds = len(wave) / cfg.sampling_rate
    kw = dict(bandwidth=args.bandwidth, segment_s=args.segment_s, context_s=args.context_s,
              batch_size=args.batch_size)
    sides = {
        "whole_all_cores": lambda: whole(model, wave, args.bandwidth)[:, :k],
        "bare_loop": lambda: bare_loop(model, wave, args.bandwidth, args.segment_s, args.batch_size, audio),
        "giblet_eager": lambda: audio.encode_frames(model, wave, 0, k, path="eager", **kw),
    }
    if args.device == "cpu":
        sides["giblet_stream"] = lambda: audio.encode_frames(model, wave, 0, k, path="stream", threads=threads, **kw)
    wall = {s: [] for s in sides}
    cpu = {s: [] for s in sides}
    codes = {}
    for _ in range(args.repeat):
        for side, fn in sides.items():
            sync(args.device)
            w, c, codes[side] = _timed(fn)
            sync(args.device)
            wall[side].append(w)
            cpu[side].append(c)
    best = {s: min(v) for s, v in wall.items()}
    flops = encode_flops(model, seconds, args.bandwidth)
    out = {
        "segment_s": args.segment_s, "context_s": args.context_s, "batch_size": args.batch_size,
        "audio_s": round(seconds, 2), "threads": threads,
        "best_s": {s: round(v, 3) for s, v in best.items()},
        "median_s": {s: round(statistics.median(v), 3) for s, v in wall.items()},
        "audio_s_per_s": {s: round(seconds / v, 1) for s, v in best.items()},
        "cpu_s_best": {s: round(min(v), 2) for s, v in cpu.items()},
        "all_wall_s": {s: [round(t, 3) for t in v] for s, v in wall.items()},
        "gflop": round(flops / 1e9, 1),
        "gflop_per_s": {s: round(flops / v / 1e9, 1) for s, v in best.items()},
        "agreement_with_whole": {s: float((c == codes["whole_all_cores"]).mean()) for s, c in codes.items()},
        "agreement_with_eager": {s: float((c == codes["giblet_eager"]).mean()) for s, c in codes.items()},
        "n_codebooks": int(codes["giblet_eager"].shape[0]),
    }
    for side in sides:  # < 1: faster than the baseline (the goal for the stage: <= 0.5)
        out[f"{side}_over_whole"] = round(best[side] / best["whole_all_cores"], 3)
    if "giblet_stream" in sides:
        out["stream_over_bare_loop"] = round(best["giblet_stream"] / best["bare_loop"], 3)
        out["stream_over_eager"] = round(best["giblet_stream"] / best["giblet_eager"], 3)
    return out


def agreement_only(model, wave, audio, args) -> dict:
    """Codes of the stream path against eager and whole-waveform encodes of ``wave`` (untimed)."""
    hop = int(np.prod(model.config.upsampling_ratios))
    k = len(wave) // hop
    kw = dict(bandwidth=args.bandwidth, segment_s=args.segment_s, context_s=args.context_s,
              batch_size=args.batch_size)
    ref = whole(model, wave, args.bandwidth)[:, :k]
    eager = audio.encode_frames(model, wave, 0, k, path="eager", **kw)
    stream = audio.encode_frames(model, wave, 0, k, path="stream", **kw)
    return {"audio_s": round(len(wave) / model.config.sampling_rate, 2),
            "stream_vs_eager": float((stream == eager).mean()), "stream_vs_whole": float((stream == ref).mean()),
            "eager_vs_whole": float((eager == ref).mean())}


def saved_random_model(audio) -> str:
    """The seeded random model, saved with ``save_pretrained`` to a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench_encodec_")) / "encodec"
    audio.build_random_model().save_pretrained(folder)
    return str(folder)


def load(audio, model: str | None, device: str):
    if model:
        from transformers import EncodecModel

        return EncodecModel.from_pretrained(model, local_files_only=True).eval().to(device)
    return audio.build_random_model().to(device)


# -- stage and build modes: the command line in a subprocess ------------------------------------

def run_cli(config: Path, extra: list[str], report: Path) -> dict:
    """``giblet-preprocess run CONFIG EXTRA`` from outside: wall s, CPU s of the process tree
    (this script's waited-for descendants), peak RSS of the tree and of each process."""
    from _util import PeakRSS

    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(config), *extra, "--no-progress", "--report", str(report)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with PeakRSS(include_self=False) as rss:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=config.parent)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    stages = json.loads(report.read_text())["stages"]
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 1),
            "tree_peak_rss_gb": round(rss.gb, 3), "process_peak_rss_gb": dict(sorted(rss.per_process.items(),
                                                                                     key=lambda x: -x[1])),
            "stages": {k: {f: v[f] for f in ("wall_s", "task_s", "tasks")} | {"workers": len(v["workers"])}
                       for k, v in stages.items()},
            "in_process": "running in-process" in proc.stderr}


def old_settings() -> list[str]:
    """What a build did before issue 23: a LocalCluster of single-threaded workers, the eager encoder."""
    from pipelines.cluster import default_workers

    return ["--workers", str(default_workers()), "audio.fast_path=eager", "audio.threads=1"]


def run_stage(args, audio, model) -> dict:
    """The audio stage through the command line vs the prototype-style baseline, same file."""
    import yaml

    from giblet.synth import scenes, write_movie

    tmp = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    rng = np.random.default_rng(0)
    write_movie(tmp / "movie.mp4", scenes(args.seconds, rng), args.seconds, size=(32, 18), fps=5, rng=rng)
    block = {"model": args.model or "random", "segment_s": args.segment_s, "context_s": args.context_s,
             "batch_size": args.batch_size, "device": args.device}
    (tmp / "bench.yaml").write_text(yaml.safe_dump({"output": "bench.zarr", "inputs": {"movie": "movie.mp4"},
                                                    "audio": block}))
    sides = {"stage": ["--only", "audio", "--force"] + (["--workers", str(args.workers)] if args.workers is not None
                                                        else [])}
    if not args.no_old:
        sides["stage_old_settings"] = ["--only", "audio", "--force"] + old_settings()

    def baseline() -> dict:
        t_read, _, (wave, _) = _timed(lambda: audio.read_waveform(str(tmp / "movie.mp4"), "movie", 24000, 0.0))
        t_enc, c_enc, _ = _timed(lambda: whole(model, wave, args.bandwidth))
        return {"wall_s": round(t_read + t_enc, 2), "decode_s": round(t_read, 2), "encode_s": round(t_enc, 2),
                "encode_cpu_s": round(c_enc, 1)}

    runs = {s: [] for s in list(sides) + ["baseline"]}
    for i in range(args.repeat):
        for side, extra in sides.items():
            runs[side].append(run_cli(tmp / "bench.yaml", extra, tmp / f"report-{side}-{i}.json"))
        runs["baseline"].append(baseline())
    import giblet

    meta = giblet.open_store(tmp / "bench.zarr").unit_meta("audio/run-1")
    best = {s: min(r["wall_s"] for r in v) for s, v in runs.items()}
    stage_wall = min(r["stages"]["audio"]["wall_s"] for r in runs["stage"])
    out = {"movie_s": args.seconds, "runs": runs, "meta_last_stage": {k: meta.get(k) for k in (
        "fast_path", "threads", "fast_path_agreement", "agreement_codes", "n_tasks", "encode_s", "audio_s_per_s",
        "warnings")},
        "best_wall_s": best, "stage_own_wall_s": stage_wall,
        "stage_over_baseline": round(best["stage"] / best["baseline"], 3),  # goal <= 0.5 (command wall, all in)
        "stage_own_over_baseline": round(stage_wall / best["baseline"], 3),  # the stage's own wall (--report)
        "audio_process_peak_rss_gb": max(max(r["process_peak_rss_gb"].values()) for r in runs["stage"])}
    if "stage_old_settings" in best:
        out["stage_over_old_settings"] = round(best["stage"] / best["stage_old_settings"], 3)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_build(args) -> dict:
    """A whole build of a giblet.synth study, old settings vs defaults, from nothing each time."""
    import zarr

    from giblet.store import read_manifest
    from giblet.synth import make_study

    root = Path(args.root or tempfile.mkdtemp(prefix="bench_build_"))
    n_trs = int(round(args.minutes * 60 / 1.5))
    config = root / "study.yaml"
    if not config.exists():
        t0 = time.perf_counter()
        from giblet.features import audio

        make_study(root, n_subjects=args.subjects, n_trs=n_trs, shape=tuple(args.shape), movie_size=(640, 360),
                   fps=25, seed=0, stages={"audio": {"model": saved_random_model(audio)}}, workers=2)
        print(f"study written in {time.perf_counter() - t0:.0f} s: {config}", flush=True)
    sides = {"before": old_settings(), "after": []}
    runs = {s: [] for s in sides}
    for i in range(args.repeat):
        for side, extra in sides.items():
            out = f"{side}.zarr"
            shutil.rmtree(root / out, ignore_errors=True)
            runs[side].append(run_cli(config, extra + [f"output={out}"], root / f"report-{side}-{i}.json"))
            print(side, json.dumps({k: v for k, v in runs[side][-1].items() if k != "process_peak_rss_gb"}), flush=True)
    a, b = read_manifest(root / "before.zarr")["units"], read_manifest(root / "after.zarr")["units"]
    same, codes = [], {}
    for key, entry in a.items():
        for name, rec in entry["arrays"].items():
            if key.startswith("audio/"):
                x, y = zarr.open_array(root / "before.zarr" / name, mode="r")[:], \
                    zarr.open_array(root / "after.zarr" / name, mode="r")[:]
                codes[name] = float((x == y).mean())
            else:
                same.append(rec["checksums"] == b[key]["arrays"][name]["checksums"])
    best = {s: min(r["wall_s"] for r in v) for s, v in runs.items()}
    return {"study": {"subjects": args.subjects, "minutes": args.minutes, "trs": n_trs, "shape": args.shape,
                      "movie": "640x360 25 fps"}, "before_flags": sides["before"], "runs": runs,
            "best_wall_s": best, "after_over_before_wall": round(best["after"] / best["before"], 3),
            "after_over_before_cpu": round(min(r["cpu_s"] for r in runs["after"]) /
                                           min(r["cpu_s"] for r in runs["before"]), 3),
            "peak_rss_gb": {s: min(r["tree_peak_rss_gb"] for r in v) for s, v in runs.items()},
            "other_arrays_bit_identical": all(same), "audio_codes_equal_before_after": codes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--model", help="EnCodec save_pretrained dir (default: the seeded random model)")
    ap.add_argument("--seconds", type=float, help="audio length (default: 1800 on cuda, 120 on cpu)")
    ap.add_argument("--bandwidth", type=float, default=3.0)
    ap.add_argument("--segment-s", type=float, default=20.0, help="giblet's default: 20")
    ap.add_argument("--context-s", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, help="default: 8 (cpu), 16 (cuda)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--agree-s", type=float, default=60.0, help="seconds of each signal for the agreement check")
    ap.add_argument("--threads", type=int, help="torch threads of this process, and the stream path's (default: "
                                                "all cores)")
    ap.add_argument("--stage", action="store_true", help="the stage through the command line (full giblet)")
    ap.add_argument("--workers", type=int, help="--stage: pass --workers N (default: the in-process rule decides)")
    ap.add_argument("--no-old", action="store_true", help="--stage: skip the stage with the old settings")
    ap.add_argument("--build", action="store_true", help="a whole study build, old settings vs defaults")
    ap.add_argument("--minutes", type=float, default=10.0, help="--build: movie minutes")
    ap.add_argument("--subjects", type=int, default=3, help="--build: subjects")
    ap.add_argument("--shape", type=int, nargs=3, default=[40, 48, 40], help="--build: BOLD grid")
    ap.add_argument("--root", help="--build: where the study is (written once; default: a temp folder)")
    ap.add_argument("--json", required=True, help="write the results here")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.seconds = args.seconds or (1800.0 if cuda else 120.0)
    args.batch_size = args.batch_size or (16 if cuda else 8)

    from _util import machine

    info = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "load_avg": os.getloadavg()}
    if args.build:
        info["build"] = run_build(args)
        print(json.dumps({k: v for k, v in info["build"].items() if k != "runs"}, indent=1))
    else:
        audio = import_audio(light=not args.stage)
        import torch
        import transformers

        if args.threads:
            torch.set_num_threads(args.threads)
        threads = torch.get_num_threads()
        if args.stage and not args.model:  # a save_pretrained folder, as a real model arrives (the stream
            args.model = saved_random_model(audio)  # path then reads it without importing transformers)
        model = load(audio, args.model, args.device)
        info.update({"torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
                     "torch_threads": threads, "model": args.model or "random (seed 0)", "bandwidth": args.bandwidth,
                     "gpu": torch.cuda.get_device_name(0) if cuda else None,
                     "matmul_gflop_per_s": {"all_threads": round(matmul_flops_per_s(threads) / 1e9, 1),
                                            "one_thread": round(matmul_flops_per_s(1) / 1e9, 1)}})
        whole(model, synth_wave(2.0), args.bandwidth)  # warm-up (cuDNN autotune, allocator)
        if args.stage:
            info["stage"] = run_stage(args, audio, model)
            print(json.dumps({k: v for k, v in info["stage"].items() if k != "runs"}, indent=1))
        else:
            from giblet.synth_stimulus import speech_like

            info["encode"] = compare(model, synth_wave(args.seconds), audio, args, threads)
            print(json.dumps({k: v for k, v in info["encode"].items() if not k.startswith("all_")}, indent=1))
            if not cuda:
                info["agreement"] = {name: agreement_only(model, wave, audio, args) for name, wave in (
                    ("tones", synth_wave(args.agree_s, seed=1)), ("speech_like", speech_like(args.agree_s, seed=1)))}
                print(json.dumps(info["agreement"], indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
