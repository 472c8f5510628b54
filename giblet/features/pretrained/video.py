"""Video extractors: image-model features of frames sampled on the TR grid, re-decoded from the movie.

Rules (docs/store.md, "Pretrained features"):

- Grid: the video stage's (``giblet.features.video.make_grid``): TR ``i`` is
  ``[onset_s + i tr, onset_s + (i + 1) tr)`` of the movie's clock (its first frame is t = 0),
  only TRs the movie fully covers.
- Sampling: ``F = frames_per_tr`` slots per TR at ``t_m = onset_s + (m + 1/2) tr / F``
  (slot ``m`` belongs to TR ``floor(m / F)``; exact rational arithmetic); each slot takes
  the frame on screen at ``t_m`` (the last frame presented at or before it).
- Decoding: the movie is decoded again (PyAV, frame threads), not read from ``video/frames``:
  the stored frames are small (160x90 by default) and a model sees its own resolution. Frames
  shown at no slot that no other frame refers to (most B-frames) are not decoded (``shown``). Each kept
  frame becomes full-range RGB by its stream's colour flags (as the video stage does) and
  is scaled (swscale, area) so that its shorter side is the image processor's largest
  target size (never enlarged); then the image processor's own resize, crop and
  normalisation, done in torch on the model's device for the processors ``imageprep``
  knows (antialiased resize: PIL's filter within float rounding), by the processor otherwise.
- Pooling: each frame's tokens (``mean``, or ``cls``: token 0), then the mean over the
  TR's slots and the ``C = round(context_s F / tr)`` slots before them (slots before the
  movie's first frame are left out).
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from giblet.features.colour import colour_of
from giblet.features.media import resolve_device
from giblet.features.pretrained import imageprep as IP
from giblet.features.pretrained import model as M
from giblet.features.pretrained.parts import save_part
from giblet.features.video import (INTERPOLATIONS, SEEK_BACKOFF_S, _exact, _frames_from, _open, make_grid,
                                   probe_movie)

RULE = ("slot m at t = onset_s + (m + 1/2) * tr_s / frames_per_tr on the movie's clock (first frame t = 0) "
        "belongs to TR floor(m / frames_per_tr) and shows the frame on screen at t; a TR's feature is the mean over "
        "its slots and the round(context_s * frames_per_tr / tr_s) slots before them (none before t = 0) of each "
        "frame's pooled tokens")


def n_trs(path: str | Path, tr_s: float, onset_s: float) -> int:
    """The run's TR count by the video stage's rule (header only)."""
    return make_grid(probe_movie(path), tr_s, onset_s, 1, None).n_trs


def context_slots(context_s: float, tr_s: float, frames_per_tr: int) -> int:
    return int(round(context_s * frames_per_tr / tr_s))


def slot_times(tr0: int, tr1: int, tr_s: float, onset_s: float, frames_per_tr: int,
               context: int) -> tuple[np.ndarray, list[Fraction]]:
    """Slots ``m`` feeding TRs ``[tr0, tr1)`` (context included, none before t = 0) and their times."""
    tr, onset, f = _exact(tr_s), _exact(onset_s), frames_per_tr
    ms = [m for m in range(tr0 * f - context, tr1 * f) if onset + (m + Fraction(1, 2)) * tr / f >= 0]
    return np.array(ms, dtype=np.int64), [onset + (m + Fraction(1, 2)) * tr / f for m in ms]


def decode_edge(processor) -> int | None:
    """The largest target size the image processor names (``size``, ``crop_size``), or None."""
    values = []
    for attr in ("size", "crop_size"):
        v = getattr(processor, attr, None)
        if isinstance(v, int):
            values.append(v)
        elif dataclasses.is_dataclass(v) or isinstance(v, dict):
            d = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            values += [int(d[k]) for k in ("height", "width", "shortest_edge") if isinstance(d.get(k), int)]
    return max(values) if values else None


REORDER = 32  # packets demuxed past the last slot: more than any codec reorders (H.264/HEVC: <= 16)


def shown(path: str, times: list[Fraction]):
    """``wanted(pts) -> bool`` for ``_frames_from``: True for the frames on screen at ``times``
    (and for any frame outside the packets seen), from one pass over the packets' timestamps
    (demuxing only: no decoding). The rest need decoding only if other frames refer to them."""
    container, stream = _open(Path(path))
    tb, start = Fraction(stream.time_base), stream.start_time or 0
    target = times[0] - SEEK_BACKOFF_S[-1]
    if target > 0:
        container.seek(start + math.floor(target / tb), stream=stream, backward=True, any_frame=False)
    pts, past = [], 0
    try:
        for packet in container.demux(stream):
            if packet.pts is not None:
                pts.append(packet.pts)
                past += (packet.pts - start) * tb > times[-1]
                if past > REORDER:
                    break
    finally:
        container.close()
    if not pts:
        return lambda p: True
    order = sorted(set(pts))
    clock = [(p - start) * tb for p in order]
    on_screen = {order[i - 1] for i in (bisect.bisect_right(clock, t) for t in times) if i > 0}
    lo, hi = order[0], order[-1]
    return lambda p: p <= lo or p >= hi or p in on_screen


def _rgb(path: str, times: list[Fraction], edge: int | None):
    """Yield the RGB frame ``(h, w, 3) uint8`` on screen at each time (times ascending)."""
    from av.video.reformatter import Interpolation, VideoReformatter

    reformatter, colours = VideoReformatter(), {}
    algo = Interpolation[INTERPOLATIONS["area"]] | Interpolation.FULL_CHR_H_INT
    frames = _frames_from(Path(path), times[0], shown(path, times))
    t, frame = next(frames)
    upcoming = next(frames, None)
    cached = None  # (frame, rgb): a frame shown at several slots is converted once
    for when in times:
        while upcoming is not None and upcoming[0] <= when:
            t, frame = upcoming
            upcoming = next(frames, None)
        if cached is None or cached[0] is not frame:
            key = (frame.colorspace, frame.color_range, frame.format.name)
            if key not in colours:
                colours[key] = colour_of(key[0], key[1], frame.format, path).reformat_args()
            w, h = frame.width, frame.height
            scale = min(1.0, edge / min(w, h)) if edge else 1.0
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            rgb = reformatter.reformat(frame, size[0], size[1], "rgb24", interpolation=algo, threads=1,
                                       **colours[key]).to_ndarray()
            cached = (frame, rgb)
        yield cached[1]
    frames.close()


_log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def preprocess_spec(processor, where: str) -> IP.ImagePrep | None:
    """The torch preprocessing settings of ``processor``, or None (logged once per processor class)."""
    spec = IP.spec_of(processor)
    name = type(processor).__name__
    if spec is None and name not in _WARNED:
        _WARNED.add(name)
        _log.info("%s: %s is not one giblet preprocesses in torch (%s); using the processor itself", where, name,
                  ", ".join(IP.SUPPORTED))
    return spec


def _batches(path: str, times: list[Fraction], processor, batch_size: int, device: str = "cpu",
             spec: IP.ImagePrep | None = None, used: set | None = None):
    """Model inputs for consecutive slots, ``batch_size`` frames at a time: with ``spec``, one
    uint8 tensor per batch preprocessed in torch on ``device`` (``imageprep``); else the
    processor (on the model's GPU where it can: ``model.processor_kwargs``). ``used`` collects
    which path ran (``imageprep.TORCH`` / ``imageprep.PROCESSOR``)."""
    edge, kw = decode_edge(processor), M.processor_kwargs(processor, device)
    used = set() if used is None else used

    def inputs(batch: list) -> dict:
        if spec is not None and IP.fits(spec, *batch[0].shape[:2]):
            used.add(IP.TORCH)
            return IP.prepare(batch, spec, device)
        used.add(IP.PROCESSOR)
        return processor(images=batch, return_tensors="pt", **kw)

    batch = []
    for rgb in _rgb(path, times, edge):
        batch.append(rgb)
        if len(batch) == batch_size:
            yield inputs(batch)
            batch = []
    if batch:
        yield inputs(batch)


def tr_means(per_slot: np.ndarray, slots: np.ndarray, tr0: int, tr1: int, frames_per_tr: int,
             context: int) -> np.ndarray:
    """``(tr1 - tr0, dim)``: each TR's mean over its slots and its ``context`` slots before them."""
    out = np.zeros((tr1 - tr0, per_slot.shape[1]), np.float32)
    for i in range(tr0, tr1):
        pick = (slots >= i * frames_per_tr - context) & (slots < (i + 1) * frames_per_tr)
        out[i - tr0] = per_slot[pick].mean(0)
    return out


def extract_video(staging: str, where: str, path: str, model: str, model_fp: str, device: str, dtype: str,
                  layers: list[int], pooling: str, frames_per_tr: int, context_s: float, tr_s: float, onset_s: float,
                  tr0: int, tr1: int, batch_size: int, out_dtype: str) -> dict:
    """Task: features of TRs ``[tr0, tr1)`` of one movie, saved as parts for the unit's finalize.

    Returns the task's record: frames embedded, device, timings.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device, where)
    m = M.load(model, model_fp, "video", dev, dtype, where)
    context = context_slots(context_s, tr_s, frames_per_tr)
    slots, times = slot_times(tr0, tr1, tr_s, onset_s, frames_per_tr, context)
    t1 = time.perf_counter()
    run, used = M.pooled_layers(m, layers, pooling, where), set()
    batches = _batches(path, times, m.processor, batch_size, dev, preprocess_spec(m.processor, where), used)
    per_slot = [run(inputs) for inputs in M.prefetch(batches)]
    per_layer = {f"layer-{k}": tr_means(np.concatenate([b[j] for b in per_slot]), slots, tr0, tr1, frames_per_tr,
                                        context) for j, k in enumerate(layers)}
    save_part(staging, tr0, per_layer, out_dtype)
    return {"tr0": tr0, "tr1": tr1, "n_inputs": len(slots), "device": dev, "preprocess": ",".join(sorted(used)),
            "load_s": round(t1 - t0, 3), "extract_s": round(time.perf_counter() - t1, 3),
            "stimulus_s": round((tr1 - tr0) * tr_s, 3)}
