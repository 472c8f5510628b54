"""Text stage: scene annotations -> one embedding per TR.

Rules (the on-disk contract is in ``docs/store.md``, "Text"):

- Rows are read from xlsx/csv/tsv; header whitespace is stripped. A row's text is its
  non-empty ``columns`` cells joined with ``"; "``. Rows with no time (both cells empty)
  or no text are skipped; exact duplicates of ``(start, end, text)`` are dropped; all counted.
- Times are seconds on the stimulus clock (``time_unit=s``) or 1-based TR numbers with an
  inclusive end (``time_unit=tr``, as in Sherlock's ``Start/End Time (TRs, 1.5s)``), which
  become ``[(start - 1) * tr_s, end * tr_s)``. TR ``i`` spans
  ``[onset_s + i * tr_s, onset_s + (i + 1) * tr_s)``; a row covers every TR its
  ``[start, end)`` interval overlaps.
- ``combine=mean``: a TR's embedding is the mean of its covering rows' embeddings, weighted
  by overlap seconds. ``combine=concat``: the covering rows' texts, in time order, joined
  with a space and embedded once. TRs no row covers have ``has_text`` False and are zeros
  (``fill=zeros``) or a copy of the last covered TR (``fill=ffill``).
- Each distinct string is embedded once, longest first, in batches. There is no fallback:
  a model that does not load is an error.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from giblet import store
from giblet.errors import InputError, InputMissingError
from giblet.features.media import first_line as _first_line

VERSION = 1
JOIN_COLUMNS = "; "  # between the cells of one row
JOIN_ROWS = " "  # between rows of one TR, combine=concat
ROWS_FILE = "rows.json"  # written by prepare_rows on the driver, read by build_text
_EPS = 1e-9


@dataclass
class Rows:
    """Usable annotation rows, in file order, times in seconds on the stimulus clock."""

    start: list[float]
    end: list[float]
    text: list[str]
    sheet_row: list[int]  # 1-based row of the file (the header is row 1)
    n_trs: int = 0
    counts: dict = field(default_factory=dict)


# -- reading -------------------------------------------------------------------------------
def read_table(path: str | Path):
    """The annotation table as a DataFrame of objects, header whitespace stripped."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise InputMissingError(f"text: annotation file {path} does not exist; fix inputs.annotations in the config")
    suffix = path.suffix.lower()
    try:
        if suffix in (".xlsx", ".xlsm", ".xls"):
            import warnings

            with warnings.catch_warnings():  # openpyxl: "Unknown extension is not supported"
                warnings.simplefilter("ignore", UserWarning)
                df = pd.read_excel(path, dtype=object)
        elif suffix in (".csv", ".tsv", ".tab"):
            df = pd.read_csv(path, sep="," if suffix == ".csv" else "\t", dtype=str, keep_default_na=False)
        else:
            raise InputError(f"text: {path} has suffix {suffix!r}; annotations must be .xlsx, .xls, .csv or .tsv")
    except InputError:
        raise
    except Exception as exc:  # pandas/openpyxl raise many types for unreadable files
        raise InputError(f"text: {path} is not a readable {suffix[1:]} table ({type(exc).__name__}: "
                         f"{_first_line(exc)}); re-export the file") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _column(df, name: str, path: Path, key: str):
    name = name.strip()
    hits = [i for i, c in enumerate(df.columns) if c == name]
    if not hits:
        import difflib

        close = difflib.get_close_matches(name, list(df.columns), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InputError(f"text: {path} has no column {name!r} (text.{key}); {hint}its columns are: "
                         f"{', '.join(repr(c) for c in df.columns)}")
    if len(hits) > 1:
        raise InputError(f"text: {path} has {len(hits)} columns named {name!r} once header spaces are stripped "
                         f"(text.{key}); rename them in the file")
    return df.iloc[:, hits[0]]


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _times(col, name: str, path: Path, unit: str) -> np.ndarray:
    """``(row,) float64`` times of one column; NaN where the cell is empty."""
    out = np.full(len(col), np.nan)
    for i, value in enumerate(col.tolist()):
        if _is_empty(value):
            continue
        try:
            t = float(value)
        except (TypeError, ValueError):
            t = math.nan
        if not math.isfinite(t):
            raise InputError(f"text: {path} row {i + 2}, column {name!r}: {value!r} is not a number; times must be "
                             f"{'seconds' if unit == 's' else 'TR numbers'} (convert timecodes first)")
        low = 0.0 if unit == "s" else 1.0
        if t < low:
            raise InputError(f"text: {path} row {i + 2}, column {name!r}: {t:g} is "
                             + ("negative; times are seconds from the stimulus start" if unit == "s" else
                                "below 1; TR numbers are 1-based (set text.time_unit=s for seconds)"))
        out[i] = t
    return out


def _texts(df, columns: list[str], path: Path) -> list[str]:
    cols = [_column(df, c, path, "columns").tolist() for c in columns]
    return [JOIN_COLUMNS.join(str(v).strip() for v in cells if not _is_empty(v)) for cells in zip(*cols)]


def read_rows(path: str | Path, start_column: str, end_column: str, columns: list[str], *, time_unit: str = "s",
              tr_s: float = 1.5, allow_unsorted: bool = False, row_range: tuple[int, int] | None = None,
              tr_offset: int = 0) -> Rows:
    """Read, validate and de-duplicate annotation rows (times in seconds).

    Args:
        row_range: ``(first, last)`` 1-based data rows (the header excluded), inclusive: one
            run's rows of a sheet that holds several runs (:func:`run_segments`); None: all.
        tr_offset: with ``time_unit=tr``, subtracted from the sheet's TR numbers (a sheet whose
            TR numbers continue across runs).

    Raises:
        InputError: a missing column (the message lists those that exist), a time that is not
            a number or is negative, end < start, a row with only one time, or rows out of
            time order (unless ``allow_unsorted``): a file whose clock restarts holds several
            runs, and overlaying them on one time axis would be silently wrong.
    """
    path = Path(path)
    df = read_table(path)
    names = (start_column.strip(), end_column.strip())
    start = _times(_column(df, start_column, path, "start_column"), names[0], path, time_unit)
    end = _times(_column(df, end_column, path, "end_column"), names[1], path, time_unit)
    texts = _texts(df, columns, path)
    first, last = row_range or (1, len(df))
    if last > len(df):
        raise InputError(f"text: {path} has {len(df)} data rows; text.run_rows asks for rows {first}-{last}: fix "
                         f"text.run_rows")
    counts = {"n_rows": last - first + 1, "n_untimed": 0, "n_empty_text": 0, "n_duplicates": 0, "n_zero_length": 0}
    rows = Rows([], [], [], [], counts=counts)
    scale, shift = (1.0, 0.0) if time_unit == "s" else (tr_s, 1.0 + tr_offset)  # TR n starts at (n - 1) * tr_s
    seen: set = set()
    for i in range(first - 1, last):
        if not _keep(i, start[i], end[i], texts[i], seen, counts, path, names, time_unit):
            continue
        if time_unit == "tr" and start[i] - tr_offset < 1:
            raise InputError(f"text: {path} row {i + 2}: TR {start[i]:g} minus text.tr_offset={tr_offset} is below "
                             f"1; fix text.tr_offset or text.run_rows")
        if rows.start and (start[i] - shift) * scale < rows.start[-1] and not allow_unsorted:
            prev = rows.sheet_row[-1]
            raise InputError(
                f"text: {path} row {i + 2} starts at {start[i]:g}, before row {prev} ({start[prev - 2]:g}) in column "
                f"{names[0]!r}: rows are out of time order, as when a file's clock restarts for a second run; give "
                f"the study a `runs:` block (one sheet for all runs is split where the clock restarts), give a run "
                f"its rows (text.run_rows.<run>=FIRST-LAST), split the file per run, or set text.allow_unsorted=true if overlapping rows are intended")
        rows.start.append(float((start[i] - shift) * scale))
        rows.end.append(float((end[i] - tr_offset) * scale))
        rows.text.append(texts[i])
        rows.sheet_row.append(i + 2)
    return rows


def run_segments(path: str | Path, start_column: str, end_column: str, columns: list[str],
                 time_unit: str = "s", df=None) -> list[tuple[int, int]]:
    """The runs of a sheet that holds several: ``(first, last)`` 1-based data rows of each.

    A new run starts at a row whose start time lies before the previous row's (the clock
    restarts, as in Sherlock's seconds columns at data row 483, where run 2 opens with the
    same cartoon rows as run 1). Rows without times or text are not looked at. A stretch
    made only of exact copies of earlier stretches' rows is a duplicated block, not a run:
    it is left out (its rows belong to no run). ``df``: the table, if already read.
    """
    path = Path(path)
    df = read_table(path) if df is None else df
    start = _times(_column(df, start_column, path, "start_column"), start_column.strip(), path, time_unit)
    end = _times(_column(df, end_column, path, "end_column"), end_column.strip(), path, time_unit)
    texts = _texts(df, columns, path)
    segments: list[list[int]] = [[0, len(df) - 1]]
    keys: list[set] = [set()]
    prev = None
    for i in range(len(df)):
        if np.isnan(start[i]) or np.isnan(end[i]) or not texts[i]:
            continue
        if prev is not None and start[i] < prev:
            segments[-1][1] = i - 1
            segments.append([i, len(df) - 1])
            keys.append(set())
        keys[-1].add((start[i], end[i], texts[i]))
        prev = start[i]
    runs = [seg for j, (seg, seg_keys) in enumerate(zip(segments, keys))
            if j == 0 or not seg_keys <= set().union(*keys[:j])]
    return [(a + 1, b + 1) for a, b in runs]


def shared_sheet_rows(path: str | Path, start_column: str, end_column: str, columns: list[str], time_unit: str,
                      runs: list[str], ranges: dict | None) -> dict[str, dict]:
    """Each run's rows of a sheet shared by ``runs`` (in order): ``{run: {"rows": (first, last),
    "fingerprint": hash of those rows' cells}}`` -- so a run's text is rebuilt only when *its*
    rows change, not when rows of another run are edited or added.

    Args:
        ranges: explicit ``{run: "first-last"}`` (``text.run_rows``), else the sheet's
            :func:`run_segments` in order.
    """
    from giblet.config import row_range
    from giblet.fingerprint import hash_obj

    path = Path(path)
    df = read_table(path)
    if ranges:
        missing = [r for r in runs if r not in ranges]
        if missing:
            raise InputError(f"text: text.run_rows gives no rows for runs {missing} of the shared sheet {path}; add "
                             f"text.run_rows.<run>=FIRST-LAST for each")
        found = [row_range(ranges[r]) for r in runs]
    else:
        found = run_segments(path, start_column, end_column, columns, time_unit, df=df)
        if len(found) != len(runs):
            shown = ", ".join(f"{a}-{b}" for a, b in found)
            raise InputError(f"text: {path} splits into {len(found)} run(s) where column {start_column.strip()!r} "
                             f"goes back in time (data rows {shown}), but {len(runs)} run(s) share it "
                             f"({', '.join(runs)}); give each run its rows (text.run_rows.<run>=FIRST-LAST) or its "
                             f"own sheet (runs.<run>.annotations)")
    cols = [_column(df, c, path, k) for c, k in ((start_column, "start_column"), (end_column, "end_column"))]
    cols += [_column(df, c, path, "columns") for c in columns]
    out = {}
    for run, (a, b) in zip(runs, found):
        if b > len(df):
            raise InputError(f"text/{run}: {path} has {len(df)} data rows; text.run_rows asks for rows {a}-{b}: "
                             f"fix text.run_rows")
        cells = [[None if _is_empty(v) else str(v) for v in col.iloc[a - 1:b].tolist()] for col in cols]
        out[run] = {"rows": (a, b), "fingerprint": hash_obj("rows", cells)}
    return out


def _keep(i: int, s: float, e: float, text: str, seen: set, counts: dict, path: Path, names: tuple,
          time_unit: str) -> bool:
    """Whether data row ``i`` is used; skipped rows are counted, broken ones raise."""
    if np.isnan(s) and np.isnan(e):
        counts["n_untimed"] += 1
        return False
    if np.isnan(s) or np.isnan(e):
        has, lacks = ("start", "end") if np.isnan(e) else ("end", "start")
        raise InputError(f"text: {path} row {i + 2} has a {has} time but no {lacks} time; fill both cells or "
                         f"clear both")
    if e < s:
        raise InputError(f"text: {path} row {i + 2}: end {e:g} < start {s:g} ({names[1]!r} < {names[0]!r}); "
                         f"fix the row")
    if not text:
        counts["n_empty_text"] += 1
        return False
    if (s, e, text) in seen:
        counts["n_duplicates"] += 1
        return False
    seen.add((s, e, text))
    if e == s and time_unit == "s":
        counts["n_zero_length"] += 1  # [s, s) covers no TR
        return False
    return True


def clip_to_grid(rows: Rows, tr_s: float, onset_s: float, stimulus_end_s: float | None, path: str) -> Rows:
    """Fix the TR count and drop rows outside the grid (counted).

    With a movie, the grid is the whole TRs it spans, ``floor((duration - onset_s) / tr_s)``
    (the video stage's rule); without one, it reaches the end of the last annotation,
    ``ceil((last_end - onset_s) / tr_s)``. Rows starting at/after the grid's end
    (``n_past_end``) or ending at/before ``onset_s`` (``n_before_onset``) are ignored.
    """
    if not rows.text:
        raise InputError(f"text: {path} has no usable row ({rows.counts}); check text.columns and the time columns")
    if stimulus_end_s is not None:
        n_trs = math.floor((stimulus_end_s - onset_s) / tr_s + 1e-6)
    else:
        n_trs = math.ceil((max(rows.end) - onset_s) / tr_s - 1e-6)
    if n_trs < 1:
        end = stimulus_end_s if stimulus_end_s is not None else max(rows.end)
        raise InputError(f"text: the stimulus ends at {end:g} s, within one TR of onset_s={onset_s:g} s "
                         f"(tr_s={tr_s:g}); fix onset_s or the inputs")
    grid_end = onset_s + n_trs * tr_s
    keep = [i for i in range(len(rows.text)) if rows.start[i] < grid_end and rows.end[i] > onset_s]
    counts = dict(rows.counts, n_past_end=int(sum(s >= grid_end for s in rows.start)),
                  n_before_onset=int(sum(s < grid_end and e <= onset_s for s, e in zip(rows.start, rows.end))))
    if not keep:
        raise InputError(f"text: no row of {path} falls within the {n_trs} TRs ({n_trs * tr_s:g} s after "
                         f"onset_s={onset_s:g}) ({counts}); check onset_s, text.time_unit and the time columns")
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return Rows(pick(rows.start), pick(rows.end), pick(rows.text), pick(rows.sheet_row), n_trs, counts)


def prepare_rows(staging: str | Path, path: str, start_column: str, end_column: str, columns: list[str],
                 time_unit: str, allow_unsorted: bool, tr_s: float, onset_s: float,
                 stimulus_end_s: float | None, row_range: tuple[int, int] | None = None,
                 tr_offset: int = 0) -> Rows:
    """Driver side: read and check the file (the run's ``row_range`` of a shared sheet), fix
    the grid, save the rows for ``build_text``."""
    rows = read_rows(path, start_column, end_column, columns, time_unit=time_unit, tr_s=tr_s,
                     allow_unsorted=allow_unsorted, row_range=row_range, tr_offset=tr_offset)
    rows = clip_to_grid(rows, tr_s, onset_s, stimulus_end_s, path)
    store.write_staged_json(staging, ROWS_FILE, asdict(rows))
    return rows


def stimulus_duration(path: str | Path) -> float:
    """Seconds of the movie from its header (video stream, else container); no decoding."""
    import av

    path = Path(path)
    if not path.exists():
        raise InputMissingError(f"text: movie {path} does not exist; fix inputs.movie in the config")
    try:
        with av.open(str(path)) as container:
            video = container.streams.video[0] if container.streams.video else None
            if video is not None and video.duration and video.time_base:
                return float(video.duration * video.time_base)
            if container.duration:
                return container.duration / av.time_base
    except av.FFmpegError as exc:
        raise InputError(f"text: movie {path} is not readable ({exc}); fix inputs.movie") from None
    raise InputError(f"text: movie {path} records no duration in its header; remux it (ffmpeg -i IN -c copy OUT.mp4)")


# The encoder lives in giblet.features.sentence; re-exported as part of this stage's API.
from giblet.features.sentence import SentenceEncoder, check_model_dir, default_model_path  # noqa: E402,F401
from giblet.features.media import resolve_device  # noqa: E402,F401


# -- TR assembly ----------------------------------------------------------------------------
def coverage(start: np.ndarray, end: np.ndarray, tr_s: float, onset_s: float, n_trs: int):
    """Which TRs each row overlaps, and by how many seconds.

    Returns:
        ``(row, tr, seconds)``: three ``(pair,)`` arrays, one entry per (row, TR) overlap > 0.
    """
    a = (np.asarray(start, float) - onset_s) / tr_s  # TR units
    b = (np.asarray(end, float) - onset_s) / tr_s
    first = np.clip(np.floor(a), 0, n_trs).astype(np.int64)
    stop = np.clip(np.ceil(b), 0, n_trs).astype(np.int64)
    n = np.maximum(stop - first, 0)
    row = np.repeat(np.arange(len(a)), n)
    tr = first[row] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    seconds = (np.minimum(b[row], tr + 1) - np.maximum(a[row], tr)) * tr_s
    keep = seconds > _EPS * tr_s
    return row[keep], tr[keep], seconds[keep]


def assemble(rows: Rows, tr_s: float, onset_s: float, combine: str, encode) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-TR embeddings from rows and an ``encode(list[str]) -> (n, dim)`` function.

    Returns:
        ``(embeddings (tr, embedding) float32, has_text (tr,) bool, n_distinct)``: the
        strings embedded, each once; TRs without text are zeros.
    """
    row, tr, seconds = coverage(np.array(rows.start), np.array(rows.end), tr_s, onset_s, rows.n_trs)
    has_text = np.zeros(rows.n_trs, dtype=bool)
    has_text[tr] = True
    if combine == "concat":
        # order the (row, TR) pairs by TR, then the row's start, then file order
        order = np.lexsort((row, np.array(rows.start)[row], tr))
        per_tr: dict[int, list[str]] = {}
        for k in order:
            per_tr.setdefault(int(tr[k]), []).append(rows.text[row[k]])
        keys = np.array(list(per_tr), dtype=np.int64)
        strings = [JOIN_ROWS.join(per_tr[t]) for t in keys.tolist()]
        weights = np.ones(len(keys))
        row, tr, seconds = np.arange(len(keys)), keys, weights
    else:
        strings = rows.text
    distinct = sorted({strings[r] for r in np.unique(row)})
    index = {s: i for i, s in enumerate(distinct)}
    vectors = encode(distinct).astype(np.float64)
    acc = np.zeros((rows.n_trs, vectors.shape[1]))
    np.add.at(acc, tr, seconds[:, None] * vectors[[index[strings[r]] for r in row]])
    weight = np.bincount(tr, weights=seconds, minlength=rows.n_trs)
    acc[has_text] /= weight[has_text, None]
    return acc.astype(np.float32), has_text, len(distinct)


def fill_gaps(emb: np.ndarray, has_text: np.ndarray, fill: str) -> np.ndarray:
    """``fill=ffill``: uncovered TRs copy the last covered TR (zeros before the first one)."""
    if fill != "ffill":
        return emb
    last = np.maximum.accumulate(np.where(has_text, np.arange(len(has_text)), -1))
    out = np.where((last >= 0)[:, None], emb[np.maximum(last, 0)], 0.0)
    return out.astype(np.float32)


def covered_stats(emb: np.ndarray, has_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension ``(mean, std)`` (ddof 0) over the TRs that have text.

    The reader calls it on the training TRs of every run (``StoreView.text_stats``).
    Uncovered TRs are placeholders (zeros or copies), so they would bias the statistics.

    Args:
        emb: ``(tr, embedding)``; has_text: ``(tr,) bool``.
    """
    x = np.asarray(emb, dtype=np.float64)[np.asarray(has_text, dtype=bool)]
    if not len(x):
        return np.full(emb.shape[1], np.nan, np.float32), np.full(emb.shape[1], np.nan, np.float32)
    return x.mean(0).astype(np.float32), x.std(0).astype(np.float32)


def array_names(run: str) -> dict[str, str]:
    """Store paths of one run's text arrays: ``embeddings`` and ``has_text``."""
    prefix = store.stimulus_prefix(run, "text")
    return {k: f"{prefix}/{k}" for k in ("embeddings", "has_text")}


# -- the task -------------------------------------------------------------------------------
def build_text(staging: str, names: dict, model: str, device: str, batch_size: int, combine: str, fill: str,
               tr_s: float, onset_s: float, chunk_trs: int) -> dict:
    """Task: embed the rows saved by ``prepare_rows`` into one run's ``embeddings`` and ``has_text``.

    Returns the unit's record: TR count, row counts, coverage and model facts.
    """
    import time

    rows = Rows(**store.read_staged_json(staging, ROWS_FILE))
    t0 = time.perf_counter()
    encoder = SentenceEncoder(model, device)
    t1 = time.perf_counter()
    emb, has_text, n_distinct = assemble(rows, tr_s, onset_s, combine, lambda s: encoder.encode(s, batch_size))
    t2 = time.perf_counter()
    if not has_text.any():
        raise InputError(f"text: no annotation row covers any of the {rows.n_trs} TRs ({rows.counts}); "
                         f"check onset_s, text.time_unit and the time columns")
    emb = fill_gaps(emb, has_text, fill)
    _write(staging, names, emb, has_text, chunk_trs, {"combine": combine, "fill": fill, "dim": encoder.dim,
                                                      "normalized": encoder.normalize,
                                                      "sheet_rows": [rows.sheet_row[0], rows.sheet_row[-1]]})
    return {"n_trs": rows.n_trs, **rows.counts, "n_used_rows": len(rows.text), "n_distinct_strings": n_distinct,
            "n_uncovered_trs": int((~has_text).sum()), "embedding_dim": encoder.dim, "device": encoder.device,
            "sheet_rows": [rows.sheet_row[0], rows.sheet_row[-1]], "load_s": round(t1 - t0, 3),
            "encode_s": round(t2 - t1, 3)}


def _write(staging: Path, names: dict, emb, has_text, chunk_trs: int, attrs: dict) -> None:
    n, dim = emb.shape
    e = store.create_array(staging, names["embeddings"], (n, dim), "float32", (chunk_trs, dim),
                           (store.TR, store.EMBEDDING), attrs)
    h = store.create_array(staging, names["has_text"], (n,), "bool", (chunk_trs,), (store.TR,),
                           {"meaning": "True where an annotation row covers the TR"}, fill_value=False)
    for t0 in range(0, n, chunk_trs):  # whole chunks only
        e[t0:t0 + chunk_trs] = emb[t0:t0 + chunk_trs]
        h[t0:t0 + chunk_trs] = has_text[t0:t0 + chunk_trs]
