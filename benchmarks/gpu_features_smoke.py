"""The pretrained-feature stage on a GPU host, end to end (issue 24; not a speed figure).

Builds the tiny study of tests/test_pretrained.py twice through the engine on a LocalCluster of
worker processes: once with every extractor on ``cuda`` (the cluster advertises its GPUs, so the
tasks ask for the GPU resource: pipelines.placement) and once on ``cpu``; checks that each stored
layer agrees (cosine per TR > 0.999 at float32) and that the meta records the device used.

    python3 benchmarks/gpu_features_smoke.py --json benchmarks/results/features_gpu_smoke.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import machine  # noqa: E402


def build(root: Path, models: dict, device: str):
    import giblet
    from giblet.config import load_config
    from giblet.synth import make_study
    from pipelines import engine
    from tests.test_pretrained import extractors

    ex = {k: {**v, "device": device} for k, v in extractors(models).items()}
    config = make_study(root, n_subjects=1, n_trs=8, shape=(8, 10, 6), seed=4, fps=10, movie_size=(48, 32),
                        stages={"fmri": {"mask_strategy": "background"}, "features": ex})
    report = engine.run(load_config(config), only=["video", "fmri", "features"], workers=1, progress=False)
    return giblet.open_store(report.store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "features_gpu_smoke.json"))
    args = ap.parse_args()
    from tests.test_pretrained import tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = tiny_models(tmp / "models")
        gpu, cpu = build(tmp / "gpu", models, "cuda"), build(tmp / "cpu", models, "cpu")
        out = {"machine": machine(), "layers": {}}
        for name in gpu.feature_names():
            a, b = gpu.feature(name).astype(np.float64), cpu.feature(name).astype(np.float64)
            keep = (np.linalg.norm(a, axis=1) > 0) & (np.linalg.norm(b, axis=1) > 0)
            cos = (a * b).sum(1)[keep] / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))[keep]
            out["layers"][name] = {"min_cosine": float(cos.min()), "trs": int(keep.sum())}
        out["devices"] = {k: gpu.unit_meta(f"features/{k}/run-1")["device"] for k in ("vit", "w2v", "bert")}
        out["ok"] = all(v["min_cosine"] > 0.999 for v in out["layers"].values()) and all(
            d.startswith("cuda") for d in out["devices"].values())
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
