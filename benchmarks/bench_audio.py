"""Audio stage throughput (seconds of audio per second) against a bare ``model.encode`` loop.

Two modes, one script, same samples for both sides of every ratio:

* ``encode`` (default; needs only torch + transformers + numpy): a seeded waveform is
  synthesised in numpy; ``giblet.features.audio.encode_frames`` (windows + context +
  batching) is timed against a bare loop of ``model.encode`` over the same audio cut into
  ``segment_s`` pieces, batched the same way (no context, no bookkeeping). Also reports the
  fraction of code frames equal to one whole-waveform encode (``--agree-s`` seconds). It
  imports only ``giblet.errors`` and ``giblet.features.audio`` (``giblet/__init__``, which
  needs zarr, is bypassed), so it runs from a plain copy of the repo on a GPU machine::

      python benchmarks/bench_audio.py --device cuda --sweep --json /tmp/bench_audio_gpu.json

* ``--stage`` (full giblet install): a synthetic movie with a stereo AAC track is written,
  and the whole stage (PyAV decode + resample, Dask tasks, Zarr writes) runs through the
  engine; the bare loop runs on the stage's own decoded waveform::

      python benchmarks/bench_audio.py --stage --seconds 240 --json /tmp/bench_audio_stage.json

Timings alternate bare / giblet ``--repeat`` times and keep each side's best.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


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
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(wave))[None, None].to(device)
        return model.encode(x, bandwidth=bandwidth, return_dict=True).audio_codes[0, 0].cpu().numpy()


def compare(model, wave, audio, device, bandwidth, segment_s, context_s, batch_size, repeat, agree_s) -> dict:
    """Best-of-``repeat`` throughput of giblet's encode and the bare loop on ``wave``."""
    cfg = model.config
    hop = int(np.prod(cfg.upsampling_ratios))
    seg = int(round(segment_s * cfg.sampling_rate))
    seg -= seg % hop
    wave = wave[: len(wave) - len(wave) % seg]  # the same whole pieces for both sides
    k = len(wave) // hop
    seconds = len(wave) / cfg.sampling_rate
    times = {"bare": [], "giblet": []}
    cpu = {"bare": [], "giblet": []}  # process CPU seconds: steadier than wall time on a shared CPU
    for _ in range(repeat):
        sync(device); t0, c0 = time.perf_counter(), time.process_time()
        bare = bare_loop(model, wave, bandwidth, segment_s, batch_size, audio)
        sync(device); times["bare"].append(time.perf_counter() - t0); cpu["bare"].append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        ours = audio.encode_frames(model, wave, 0, k, bandwidth=bandwidth, segment_s=segment_s,
                                   context_s=context_s, batch_size=batch_size)
        sync(device); times["giblet"].append(time.perf_counter() - t0); cpu["giblet"].append(time.process_time() - c0)
    n_agree = min(k, int(agree_s * cfg.sampling_rate) // hop)
    ref = whole(model, wave[: n_agree * hop], bandwidth)[:, :n_agree]
    bare_s, ours_s = min(times["bare"]), min(times["giblet"])
    return {
        "segment_s": segment_s, "context_s": context_s, "batch_size": batch_size,
        "effective_batch": min(batch_size, max(1, audio.MAX_PAD_ELEMENTS // ((seg + int(context_s * cfg.sampling_rate))
                                                                            * cfg.num_filters))),
        "audio_s": round(seconds, 2), "bare_s": round(bare_s, 4), "giblet_s": round(ours_s, 4),
        "bare_audio_s_per_s": round(seconds / bare_s, 1), "giblet_audio_s_per_s": round(seconds / ours_s, 1),
        "ratio_giblet_over_bare": round(bare_s / ours_s, 3),  # best of each side
        "ratio_paired_median": round(float(np.median(np.divide(times["bare"], times["giblet"]))), 3),
        "all_times_s": {k_: [round(t, 4) for t in v] for k_, v in times.items()},
        "cpu_ratio_giblet_over_bare": round(min(cpu["bare"]) / min(cpu["giblet"]), 3),
        "all_cpu_s": {k_: [round(t, 2) for t in v] for k_, v in cpu.items()},
        "agreement_s": round(n_agree * hop / cfg.sampling_rate, 2),
        "giblet_equal_to_whole": float((ours[:, :n_agree] == ref).mean()),
        "bare_equal_to_whole": float((bare[:, :n_agree] == ref).mean()),
        "n_codebooks": int(ours.shape[0]),
    }


def load(audio, model: str | None, device: str):
    if model:
        from transformers import EncodecModel

        return EncodecModel.from_pretrained(model, local_files_only=True).eval().to(device)
    return audio.build_random_model().to(device)


def run_stage(args, audio, model) -> dict:
    """The whole stage through the engine vs the bare loop on its own decoded samples."""
    import yaml

    from giblet.config import load_config
    from giblet.synth import scenes, write_movie
    from pipelines import engine

    tmp = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    write_movie(tmp / "movie.mp4", scenes(args.seconds, rng), args.seconds, size=(32, 18), fps=5, rng=rng)
    write_s = time.perf_counter() - t0
    block = {"model": args.model or "random", "segment_s": args.segment_s, "context_s": args.context_s,
             "batch_size": args.batch_size, "device": args.device}
    cfg = tmp / "bench.yaml"
    cfg.write_text(yaml.safe_dump({"output": "bench.zarr", "inputs": {"movie": "movie.mp4"}, "audio": block}))
    wave, _ = audio.read_waveform(str(tmp / "movie.mp4"), "movie", 24000, 0.0)
    stage = []
    for i in range(args.repeat):
        t0 = time.perf_counter()
        report = engine.run(load_config(cfg), only=["audio"], force=True, workers=args.workers, progress=False,
                            log=lambda m: None)
        stage.append(time.perf_counter() - t0)
    import giblet

    meta = giblet.open_store(report.store).unit_meta("audio")
    encoded_s = meta["n_trs"] * 1.5
    fn = compare(model, wave, audio, args.device, args.bandwidth, args.segment_s, args.context_s,
                 args.batch_size, args.repeat, args.agree_s)
    best = min(stage)
    return {"movie_s": args.seconds, "movie_write_s": round(write_s, 2), "workers": args.workers,
            "stage_wall_s": [round(t, 2) for t in stage], "stage_tasks": meta["n_tasks"],
            "stage_task_encode_s_sum": meta["encode_s"], "stage_audio_s": encoded_s,
            "stage_audio_s_per_s": round(encoded_s / best, 2),
            "stage_over_bare": round((encoded_s / best) / fn["bare_audio_s_per_s"], 3), "function": fn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--model", help="EnCodec save_pretrained dir (default: the seeded random model)")
    ap.add_argument("--seconds", type=float, help="audio length (default: 1800 on cuda, 120 on cpu)")
    ap.add_argument("--bandwidth", type=float, default=3.0)
    ap.add_argument("--segment-s", type=float, default=60.0)
    ap.add_argument("--context-s", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, help="default: 8 (cpu), 16 (cuda)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--agree-s", type=float, help="seconds for the whole-waveform agreement check; it must span "
                                                  "window boundaries (default: 300 on cuda, 2.5 segments on cpu)")
    ap.add_argument("--sweep", action="store_true", help="also try other segment/batch sizes")
    ap.add_argument("--stage", action="store_true", help="run the whole stage through the engine (full giblet)")
    ap.add_argument("--workers", type=int, default=2, help="--stage: Dask workers")
    ap.add_argument("--threads", type=int, help="torch threads of this process (cpu)")
    ap.add_argument("--json", required=True, help="write the results here")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.seconds = args.seconds or (1800.0 if cuda else 120.0)
    args.batch_size = args.batch_size or (16 if cuda else 8)
    args.agree_s = args.agree_s or (300.0 if cuda else min(args.seconds, 2.5 * args.segment_s))

    audio = import_audio(light=not args.stage)
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(audio, args.model, args.device)
    info = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpu_count": __import__("os").cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
            "torch_threads": torch.get_num_threads(), "model": args.model or "random (seed 0)",
            "bandwidth": args.bandwidth, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "gpu": torch.cuda.get_device_name(0) if cuda else None}
    whole(model, synth_wave(2.0), args.bandwidth)  # warm-up (cuDNN autotune, allocator)
    if args.stage:
        info["stage"] = run_stage(args, audio, model)
        print(json.dumps(info["stage"], indent=1))
    else:
        wave = synth_wave(args.seconds)
        configs = [(args.segment_s, args.batch_size)]
        if args.sweep:
            configs += [(60.0, 8), (60.0, 32), (30.0, 32), (20.0, 64), (10.0, 128)]
        info["runs"] = []
        for segment_s, batch in dict.fromkeys(configs):
            r = compare(model, wave, audio, args.device, args.bandwidth, segment_s, args.context_s, batch,
                        args.repeat, args.agree_s)
            info["runs"].append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("all_")}))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
