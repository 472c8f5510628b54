"""Pretrained-feature extraction throughput (seconds of movie per second) against a bare
``model(**inputs)`` loop on the same batches.

For each model (random weights, saved with ``save_pretrained`` and loaded through the stage's
own offline path): a seeded synthetic movie with a soundtrack is written
(``giblet.synth.write_movie``); giblet's task function (``extract_video`` /
``extract_audio``: PyAV decode, the processor, batching with the prefetch thread, the
forward, pooling, the parts written) runs over every TR of it; the bare loop runs
``model(**inputs, output_hidden_states=True)`` over the *same* processor outputs, built
beforehand (decoding and preprocessing are not timed on that side), host-to-device copy
included. Ratio = bare seconds / giblet seconds (goal >= 0.9 on the GPU host); each side is
the best of ``--repeat`` alternating runs, after a warm-up. The CPU side alone is timed too,
no model: ``decode_only`` (video: PyAV decoding + the RGB conversion of the kept frames;
audio: reading and resampling the soundtrack) and ``inputs_only`` (giblet's whole input
pipeline as its task runs it: decoding, preprocessing, batches on the device; audio's
soundtrack is cached per worker, so not included). ``limit_ratio`` = bare / inputs_only:
the most the ratio can be while the inputs are made at that pace. Peak memory: CUDA
``max_memory_allocated`` per side on a GPU, the process tree's peak RSS on CPU.

    python benchmarks/bench_features.py --size small                  # CPU check, small configs
    python benchmarks/bench_features.py --size large --device cuda --dtype bfloat16 --seconds 600 \\
        --json benchmarks/results/features_h200.json                   # ViT-B/16 and Whisper-small sized
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import PeakRSS, machine  # noqa: E402

TR = 1.5
SIZES = {  # ViT / CLIP-sized and Whisper-sized at "large"; a few MB each at "small"
    "small": {"vit": dict(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=128),
              "whisper": dict(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80)},
    "large": {"vit": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072),
              "whisper": dict(d_model=768, encoder_layers=12, decoder_layers=1, encoder_attention_heads=12,
                              decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                              num_mel_bins=80)},
}


def save_models(root: Path, size: str) -> dict[str, Path]:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel, WhisperConfig, WhisperFeatureExtractor, \
        WhisperModel

    torch.manual_seed(0)
    cfg = SIZES[size]
    out = {"vit": root / "vit", "whisper": root / "whisper"}
    ViTModel(ViTConfig(**cfg["vit"])).save_pretrained(out["vit"])
    edge = cfg["vit"]["image_size"]
    ViTImageProcessor(size={"height": edge, "width": edge}).save_pretrained(out["vit"])
    WhisperModel(WhisperConfig(**cfg["whisper"])).save_pretrained(out["whisper"])
    WhisperFeatureExtractor(feature_size=cfg["whisper"]["num_mel_bins"]).save_pretrained(out["whisper"])
    return out


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str, rss: PeakRSS) -> float:
    import torch

    return round((torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss.peak) / 1e9, 3)


def bare_loop(m, batches: list, device: str) -> None:
    """``model(**inputs)`` over pre-made batches: the host-to-device copy and the forward only."""
    import torch

    with torch.inference_mode():
        for inputs in batches:
            feed = {k: (v.to(device, m.dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()
                    if isinstance(v, torch.Tensor)}
            m.net(**feed, output_hidden_states=True)
    sync(device)


def video_batches(movie: str, n_trs: int, m, args) -> list:
    from fractions import Fraction

    from giblet.features.pretrained import video as V

    times = [(k + Fraction(1, 2)) * Fraction(str(TR)) / args.frames_per_tr for k in range(n_trs * args.frames_per_tr)]
    return list(V._batches(movie, times, m.processor, args.batch_size, args.device))


def audio_batches(movie: str, n_trs: int, m, args) -> list:
    from giblet.features.pretrained import audio as A

    rate = int(m.processor.sampling_rate)
    wave = A.waveform(movie, "movie", "bench", rate)
    size = A.max_batch(round((args.context_s + TR) * rate), args.batch_size, args.device)
    return list(A._batches(wave, range(n_trs), m.processor, rate, TR, 0.0, args.context_s, size, args.device))


def input_timers(modality: str, movie: str, n_trs: int, m, args) -> dict:
    """``{name: fn}``: the CPU side of giblet's task alone (see the module docstring)."""
    from giblet.features.audio import read_waveform
    from giblet.features.pretrained import audio as A
    from giblet.features.pretrained import video as V

    if modality == "video":
        _, times = V.slot_times(0, n_trs, TR, 0.0, args.frames_per_tr, 0)
        edge, spec = V.decode_edge(m.processor), V.preprocess_spec(m.processor, "bench")
        return {"decode_only": lambda: sum(1 for _ in V._rgb(movie, times, edge)),
                "inputs_only": lambda: sum(1 for _ in V._batches(movie, times, m.processor, args.batch_size,
                                                                 args.device, spec))}
    rate = int(m.processor.sampling_rate)
    wave = A.waveform(movie, "movie", "bench", rate)
    size = A.max_batch(round((args.context_s + TR) * rate), args.batch_size, args.device)
    logmel = args.device.startswith("cuda") and A.on_device_logmel(m.processor)
    return {"decode_only": lambda: len(read_waveform(movie, "movie", rate, 0.0)[0]),
            "inputs_only": lambda: sum(1 for _ in A._batches(wave, range(n_trs), m.processor, rate, TR, 0.0,
                                                             args.context_s, size, args.device, logmel))}


def compare(kind: str, path: Path, movie: str, n_trs: int, args) -> dict:
    from giblet.features.pretrained import audio as A
    from giblet.features.pretrained import model as M
    from giblet.features.pretrained import video as V

    modality = "video" if kind == "vit" else "audio"
    m = M.load(str(path), kind, modality, args.device, args.dtype, f"features.{kind}")
    config = SIZES[args.size][kind]
    last = config.get("num_hidden_layers", config.get("encoder_layers"))  # the last hidden state
    common = dict(where=f"features.{kind}", model=str(path), model_fp=kind, device=args.device, dtype=args.dtype,
                  layers=[last], pooling="mean", tr_s=TR, onset_s=0.0, batch_size=args.batch_size,
                  out_dtype="float16")
    if modality == "video":
        run = lambda tmp, tr1: V.extract_video(staging=tmp, path=movie, frames_per_tr=args.frames_per_tr,  # noqa: E731
                                               context_s=0.0, tr0=0, tr1=tr1, **common)
        batches = video_batches(movie, n_trs, m, args)
    else:
        run = lambda tmp, tr1: A.extract_audio(staging=tmp, source=movie, source_key="movie",  # noqa: E731
                                               source_fp="bench", n_trs_movie=n_trs, context_s=args.context_s,
                                               tr0=0, tr1=tr1, **common)
        batches = audio_batches(movie, n_trs, m, args)
    run(tempfile.mkdtemp(prefix="bench_features_"), 2)  # warm-up: kernels, the decoder
    bare_loop(m, batches[:1], args.device)
    timers = input_timers(modality, movie, n_trs, m, args)
    cpu_side = {k: [] for k in timers}
    for _ in range(args.repeat):
        for k, fn in timers.items():
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            cpu_side[k].append(time.perf_counter() - t0)
    times, peaks = {"bare": [], "giblet": []}, {"bare": 0.0, "giblet": 0.0}
    for _ in range(args.repeat):
        for side in ("bare", "giblet"):
            reset_peak(args.device)
            with PeakRSS() as rss:
                sync(args.device)
                t0 = time.perf_counter()
                if side == "bare":
                    bare_loop(m, batches, args.device)
                else:
                    run(tempfile.mkdtemp(prefix="bench_features_"), n_trs)
                    sync(args.device)
                times[side].append(time.perf_counter() - t0)
            peaks[side] = max(peaks[side], peak_gb(args.device, rss))
    seconds = n_trs * TR
    bare_s, ours_s = min(times["bare"]), min(times["giblet"])
    return {"model": kind, "modality": modality, "config": SIZES[args.size][kind], "movie_s": seconds,
            "n_batches": len(batches), "batch_size": args.batch_size,
            "bare_movie_s_per_s": round(seconds / bare_s, 2), "giblet_movie_s_per_s": round(seconds / ours_s, 2),
            "ratio_giblet_over_bare": round(bare_s / ours_s, 3),
            **{f"{k}_movie_s_per_s": round(seconds / min(v), 2) for k, v in cpu_side.items()},
            "limit_ratio": round(bare_s / min(cpu_side["inputs_only"]), 3),
            "all_times_s": {k: [round(t, 3) for t in v] for k, v in {**times, **cpu_side}.items()},
            "peak_gb" if args.device.startswith("cuda") else "peak_rss_gb": peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--models", nargs="+", default=["vit", "whisper"], choices=["vit", "whisper"])
    ap.add_argument("--seconds", type=float, help="movie length (default: 600 on cuda, 30 on cpu)")
    ap.add_argument("--movie-size", type=int, nargs=2, default=[640, 360], metavar=("W", "H"))
    ap.add_argument("--frames-per-tr", type=int, default=2)
    ap.add_argument("--context-s", type=float, default=1.0, help="audio context (Whisper pads every window to 30 s)")
    ap.add_argument("--batch-size", type=int, help="default: 8 (cpu), 64 (cuda)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="write the results here (default: benchmarks/results/features_<device>.json)")
    args = ap.parse_args()
    args.seconds = args.seconds or (600.0 if args.device.startswith("cuda") else 30.0)
    args.batch_size = args.batch_size or (64 if args.device.startswith("cuda") else 8)

    from giblet.synth import scenes, write_movie

    tmp = Path(tempfile.mkdtemp(prefix="bench_features_"))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    movie = tmp / "movie.mp4"
    write_movie(movie, scenes(args.seconds, rng), args.seconds, size=tuple(args.movie_size), fps=25, rng=rng)
    write_s = time.perf_counter() - t0
    paths = save_models(tmp, args.size)
    n_trs = int(args.seconds // TR) - 1
    results = [compare(k, paths[k], str(movie), n_trs, args) for k in args.models]
    out = {"machine": machine(), "device": args.device, "dtype": args.dtype, "size": args.size,
           "movie": {"seconds": args.seconds, "size": args.movie_size, "fps": 25, "write_s": round(write_s, 1)},
           "frames_per_tr": args.frames_per_tr, "context_s": args.context_s, "results": results}
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"features_{args.device.split(':')[0]}.json")
    path.write_text(json.dumps(out, indent=1))
    for r in results:
        print(f"{r['model']:8s} giblet {r['giblet_movie_s_per_s']:8.1f} movie-s/s   bare {r['bare_movie_s_per_s']:8.1f}"
              f"   ratio {r['ratio_giblet_over_bare']:.3f}   inputs-only {r['inputs_only_movie_s_per_s']:8.1f}"
              f"   decode-only {r['decode_only_movie_s_per_s']:8.1f}   limit {r['limit_ratio']:.3f}")
    print(path)


if __name__ == "__main__":
    main()
