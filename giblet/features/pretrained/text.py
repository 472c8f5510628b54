"""Text extractors: language-model features of each TR's words, with preceding words as context.

Rules (docs/store.md, "Pretrained features"):

- Rows: the text stage's reading of the annotation sheet (``giblet.features.text.read_rows``:
  the same ``text.*`` columns, time unit, the run's rows of a shared sheet); its grid
  (``clip_to_grid``: the movie's whole TRs, else to the last annotation).
- Words: a row's text split on whitespace; its ``n`` words are spread evenly over the row,
  word ``j`` at ``start + j (end - start) / n`` (a transcript with one word per row keeps
  each word's own time). Words are ordered by time (then sheet order); a word at ``t``
  belongs to TR ``floor((t - onset_s) / tr_s)``. Words before ``onset_s`` are context only;
  words past the grid are dropped.
- Input of TR ``i``: its own words, after the ``context_words`` words before them, joined
  with spaces, tokenized by the model's (fast) tokenizer, cut from the left to the model's
  length (the TR's own words are kept).
- Pooling over the TR's own tokens (offset mapping; special tokens excluded): ``mean``,
  ``last``, or ``cls`` (token 0). TRs without words of their own are zeros and False in
  ``has_words``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from giblet.errors import InputError
from giblet.features import text as sheet
from giblet.features.media import resolve_device
from giblet.features.pretrained import model as M
from giblet.features.pretrained.parts import save_part

WORDS_FILE = "words.json"  # written by prepare_words on the driver, read by extract_text
RULE = ("a row's n words are spread evenly over [start, end): word j at start + j * (end - start) / n; a word at t "
        "belongs to TR floor((t - onset_s) / tr_s); TR i is fed its own words after the context_words words before "
        "them and pooled over its own tokens; TRs without words are zeros (has_words False)")


def words_of(rows: sheet.Rows) -> tuple[list[str], np.ndarray]:
    """Every word of ``rows`` in time order (then sheet order) and its time ``(word,) float64``."""
    items = []
    for r, (start, end, text) in enumerate(zip(rows.start, rows.end, rows.text)):
        words = text.split()
        items += [(start + j * (end - start) / len(words), r, j, w) for j, w in enumerate(words)]
    items.sort(key=lambda x: x[:3])
    return [w for *_, w in items], np.array([t for t, *_ in items], dtype=np.float64)


def prepare_words(staging: str | Path, path: str, start_column: str, end_column: str, columns: list[str],
                  time_unit: str, allow_unsorted: bool, tr_s: float, onset_s: float, stimulus_end_s: float | None,
                  row_range: tuple[int, int] | None, tr_offset: int) -> dict:
    """Driver: read the run's rows, fix the grid, save the words and their TRs for the task."""
    rows = sheet.read_rows(path, start_column, end_column, columns, time_unit=time_unit, tr_s=tr_s,
                           allow_unsorted=allow_unsorted, row_range=row_range, tr_offset=tr_offset)
    n_trs = sheet.clip_to_grid(rows, tr_s, onset_s, stimulus_end_s, path).n_trs  # the text stage's grid
    words, times = words_of(rows)
    trs = np.floor((times - onset_s) / tr_s + 1e-9).astype(np.int64)
    keep = trs < n_trs
    if not ((trs >= 0) & keep).any():
        raise InputError(f"text: no word of {path} falls within the {n_trs} TRs after onset_s={onset_s:g} s; check "
                         f"onset_s, text.time_unit and the time columns")
    record = {"words": [w for w, k in zip(words, keep) if k], "tr": trs[keep].tolist(), "n_trs": n_trs,
              "n_rows": len(rows.text), "sheet_rows": [rows.sheet_row[0], rows.sheet_row[-1]] if rows.text else []}
    from giblet.manifest import atomic_write_json

    atomic_write_json(Path(staging) / WORDS_FILE, record)
    return record


def tr_inputs(words: list[str], trs: np.ndarray, n_trs: int, context_words: int) -> list[tuple[int, str, int]]:
    """``(tr, text, own_start)`` of every TR with words: the text fed and the character
    where its own words start."""
    out = []
    for i in np.unique(trs[(trs >= 0) & (trs < n_trs)]).tolist():
        own = np.flatnonzero(trs == i)
        lo, hi = int(own[0]), int(own[-1]) + 1
        context = " ".join(words[max(0, lo - context_words):lo])
        prefix = context + " " if context else ""
        out.append((i, prefix + " ".join(words[lo:hi]), len(prefix)))
    return out


def max_tokens(m: M.Loaded) -> int | None:
    """The longest input the model takes: the tokenizer's or the position table's bound."""
    bounds = [int(getattr(m.processor, "model_max_length", 0) or 0),
              int(getattr(m.net.config, "max_position_embeddings", 0) or 0)]
    bounds = [b for b in bounds if 0 < b < 10**6]  # tokenizers without a bound say ~1e30
    return min(bounds) if bounds else None


def encode(m: M.Loaded, items: list[tuple[int, str, int]]) -> dict:
    """Tokenize a batch (cut from the left) with the tokens each TR pools (``model.KEEP``)."""
    tok = m.processor
    tok.truncation_side = "left"  # keep the TR's own words; drop the oldest context
    if tok.pad_token is None:  # causal LMs (GPT-2, LLaMA) ship none; padding is masked and never pooled
        tok.pad_token = tok.eos_token or tok.unk_token
    limit = max_tokens(m)
    enc = tok([t for _, t, _ in items], padding=True, truncation=limit is not None, max_length=limit,
              return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping").numpy()
    starts = np.array([s for *_, s in items])[:, None]
    enc[M.KEEP] = (offsets[..., 1] > offsets[..., 0]) & (offsets[..., 0] >= starts)
    return dict(enc)


def extract_text(staging: str, where: str, model: str, model_fp: str, device: str, dtype: str, layers: list[int],
                 pooling: str, context_words: int, batch_size: int, out_dtype: str) -> dict:
    """Task: features of every TR of the run from the words ``prepare_words`` saved."""
    t0 = time.perf_counter()
    rec = json.loads((Path(staging) / WORDS_FILE).read_text())
    n = int(rec["n_trs"])
    dev = resolve_device(device, where)
    m = M.load(model, model_fp, "text", dev, dtype, where)
    t1 = time.perf_counter()
    items = tr_inputs(rec["words"], np.asarray(rec["tr"], dtype=np.int64), n, context_words)
    run = M.pooled_layers(m, layers, pooling, where, keep=lambda x, _: x[M.KEEP])
    batches = (encode(m, items[a:a + batch_size]) for a in range(0, len(items), max(1, batch_size)))
    pooled = [run(b) for b in M.prefetch(batches)]
    has = np.zeros(n, bool)
    rows = np.array([i for i, *_ in items], dtype=np.int64)
    has[rows] = True
    out = {"has_words": has}
    for j, k in enumerate(layers):
        dense = np.zeros((n, pooled[0][j].shape[1] if pooled else 0), np.float32)
        if pooled:
            dense[rows] = np.concatenate([b[j] for b in pooled])
        out[f"layer-{k}"] = dense
    save_part(staging, 0, out, out_dtype)
    return {"n_trs": n, "n_words": len(rec["words"]), "n_trs_with_words": int(has.sum()), "n_inputs": len(items),
            "device": dev, "load_s": round(t1 - t0, 3), "extract_s": round(time.perf_counter() - t1, 3),
            "stimulus_s": None}
