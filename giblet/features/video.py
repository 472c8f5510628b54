"""Video stage: decode the movie once, sequentially, into uint8 frames on the TR grid.

Timing rule (exact, in rational arithmetic): a frame whose presentation time is ``t``
seconds -- ``(pts - stream.start_time) * time_base``, so the video stream's first frame is
``t = 0`` -- belongs to TR ``floor((t - onset_s) / tr_s)``. ``tr_s`` and ``onset_s`` are read
as decimals (``Fraction(str(x))``), so a TR boundary that falls exactly on a frame time
(e.g. 1.5 s at 25 fps) is never misassigned by float round-off. Within each TR window the
frames are numbered 0, 1, 2, ... and every ``frame_skip``-th one (0, k, 2k, ...) is kept, up
to ``frames_per_tr``. Rules for the irregular cases (all counted in the unit's meta and in
``video/padded``):

- a TR with fewer kept frames than ``frames_per_tr`` repeats its last kept frame;
- a TR that no frame falls into (variable frame rate, very low fps) repeats the frame on
  screen at its start, i.e. the last frame decoded before it (all its slots are padded);
- kept frames beyond ``frames_per_tr`` (only if it is set below the natural count) are dropped;
- only TRs fully covered by the movie exist: the trailing partial TR is dropped, and so
  are frames before ``onset_s``.

Decoding is sequential (PyAV / libavcodec, frame threads on); each Dask task owns a time
segment of whole chunks, seeks once to a keyframe at or before its first TR and decodes
forward. Only kept frames are converted and resized (swscale, one pass from YUV to
RGB at the target size, e.g. ``AREA``), and frames are buffered one chunk at a time, so a
task holds one chunk of output whatever the movie length.

Colour (:mod:`giblet.features.colour`): each frame's YUV becomes full-range RGB by the matrix
and range its stream flags (unflagged: BT.601, limited range). Chroma is interpolated to every
output pixel (``SWS_FULL_CHR_H_INT``, ~0.03 ms more per kept 640x360 frame): without it
swscale's packed-RGB output gives each pair of output pixels one chroma sample, which smears
colour edges (errors up to ~250 grey levels in red and blue) and, on limited-range movies,
comes out 1-2 grey levels dark.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from giblet import store
from giblet.errors import InputError
from giblet.features.colour import Colour, colour_of
from giblet.features.media import open_stream

VERSION = 2  # 2: colour matrix/range from the stream's flags, full chroma interpolation
# config name -> swscale algorithm (av.video.reformatter.Interpolation)
INTERPOLATIONS = {"area": "AREA", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "POINT",
                  "lanczos": "LANCZOS"}
SEEK_BACKOFF_S = (0, 2, 8, 32)  # seek this much earlier if the first keyframe lands after the target
_SQUARES = np.arange(256, dtype=np.int32) ** 2


def array_names(run: str) -> dict[str, str]:
    """Store paths of one run's video arrays: ``frames``, ``padded`` and ``moments``."""
    prefix = store.stimulus_prefix(run, "video")
    return {k: f"{prefix}/{k}" for k in ("frames", "padded", "moments")}


def _exact(x: float) -> Fraction:
    """A config float as the decimal the user wrote (1.5 -> 3/2, 0.1 -> 1/10)."""
    return Fraction(str(x))


@dataclass(frozen=True)
class MovieInfo:
    """What the container header says about the movie's video stream."""

    path: str
    codec: str
    width: int
    height: int
    fps: Fraction  # average frame rate
    time_base: Fraction
    start_pts: int  # presentation time of the stream's first frame (t = 0)
    duration: Fraction  # seconds from t = 0 to the end of the last frame
    colour: Colour  # what the header's colour flags call for (each frame is converted by its own)


def _open(path: Path):
    return open_stream(
        path, "video", "video", missing="movie {path} does not exist; fix inputs.movie in the config",
        unreadable="{path} is not a readable movie ({error}); the file is corrupt or truncated: re-copy or re-export it",
        absent="{path} has no video stream (streams: {streams}); point inputs.movie at the movie")


def probe_movie(path: str | Path) -> MovieInfo:
    """Read the movie header (no decoding). Raises a one-line ``InputError`` if unusable."""
    path = Path(path)
    container, stream = _open(path)
    with container:
        tb = stream.time_base
        start = stream.start_time if stream.start_time is not None else 0
        if stream.duration is not None:
            duration = Fraction(stream.duration) * tb
        elif container.duration is not None:  # microseconds, e.g. Matroska
            duration = Fraction(container.duration, 1_000_000) - start * tb
        else:
            raise InputError(f"video: {path} does not record its duration; remux it "
                             f"(`ffmpeg -i {path.name} -c copy fixed.mp4`) and point inputs.movie at the result")
        fps = stream.average_rate or stream.guessed_rate
        if not fps or tb is None:
            raise InputError(f"video: {path} does not record a frame rate or time base; remux it "
                             f"(`ffmpeg -i {path.name} -c copy fixed.mp4`)")
        cc = stream.codec_context
        colour = colour_of(cc.colorspace, cc.color_range, cc.format, str(path))
        return MovieInfo(str(path), cc.name, cc.width, cc.height, Fraction(fps), Fraction(tb), int(start), duration,
                         colour)


@dataclass(frozen=True)
class TrGrid:
    """The TR windows the movie is cut into: TR k is ``[onset + k tr, onset + (k + 1) tr)``."""

    tr: Fraction
    onset: Fraction
    n_trs: int
    frame_skip: int
    frames_per_tr: int

    def tr_of(self, t: Fraction) -> int:
        return math.floor((t - self.onset) / self.tr)

    def start_of(self, k: int) -> Fraction:
        return self.onset + k * self.tr


def make_grid(info: MovieInfo, tr_s: float, onset_s: float, frame_skip: int,
              frames_per_tr: int | None) -> TrGrid:
    """The TR grid of a movie: only TRs the movie fully covers (the partial last TR is dropped)."""
    tr, onset = _exact(tr_s), _exact(onset_s)
    n_trs = math.floor((info.duration - onset) / tr) if info.duration > onset else 0
    if n_trs < 1:
        raise InputError(f"video: {info.path} lasts {float(info.duration):.3f} s, which covers no whole TR of "
                         f"{tr_s} s after onset_s={onset_s}; use a longer movie or lower onset_s")
    natural = math.ceil(tr * info.fps / frame_skip)
    return TrGrid(tr, onset, n_trs, frame_skip, frames_per_tr or natural)


def segments(n_trs: int, segment_trs: int) -> list[tuple[int, int]]:
    """``[tr0, tr1)`` ranges of at most ``segment_trs`` TRs (a multiple of the chunk size)."""
    return [(t0, min(n_trs, t0 + segment_trs)) for t0 in range(0, n_trs, segment_trs)]


def create_arrays(staging: Path, names: dict, grid: TrGrid, width: int, height: int, chunk_trs: int,
                  attrs: dict) -> None:
    """Create the staged ``frames``, ``padded`` and ``moments`` arrays of one run (driver side)."""
    f = grid.frames_per_tr
    store.create_array(staging, names["frames"], (grid.n_trs, f, height, width, 3), "uint8",
                       (chunk_trs, f, height, width, 3),
                       (store.TR, store.FRAME, store.HEIGHT, store.WIDTH, store.CHANNEL), attrs)
    store.create_array(staging, names["padded"], (grid.n_trs, f), "bool", (chunk_trs, f), (store.TR, store.FRAME),
                       {"meaning": "True where the slot repeats an earlier frame (see frames attrs)"},
                       fill_value=False)
    store.create_array(staging, names["moments"], (grid.n_trs, 2, 3), "int64", (chunk_trs, 2, 3),
                       (store.TR, store.MOMENT, store.CHANNEL),
                       {"meaning": "per TR and channel: [sum of pixel values, sum of their squares] (0-255) over "
                                   "every stored slot, padded ones included",
                        "pixels_per_tr": int(f * width * height)})


class _SegmentWriter:
    """Collects the kept frames of TRs ``[tr0, tr1)`` and writes them a whole chunk at a time."""

    def __init__(self, staging: Path, names: dict, tr0: int, tr1: int, chunk_trs: int, frames_per_tr: int,
                 convert):
        self.frames = store.open_staged(staging, names["frames"])
        self.padded = store.open_staged(staging, names["padded"])
        self.moments = store.open_staged(staging, names["moments"])
        self.tr0, self.tr1, self.chunk, self.convert = tr0, tr1, chunk_trs, convert
        h, w = self.frames.shape[2:4]
        self.buf = np.zeros((chunk_trs, frames_per_tr, h, w, 3), dtype=np.uint8)
        self.pad = np.zeros((chunk_trs, frames_per_tr), dtype=bool)
        self.count = np.zeros(chunk_trs, dtype=np.int64)  # kept frames per TR of the current chunk
        self.n_padded = self.n_dropped = self.n_empty_trs = 0
        self.chunk0 = tr0

    def add(self, k: int, frame) -> None:
        """Keep ``frame`` as the next slot of TR ``k`` (dropped if the TR is full)."""
        i = k - self.chunk0
        if self.count[i] >= self.buf.shape[1]:
            self.n_dropped += 1
            return
        self.buf[i, self.count[i]] = self.convert(frame)
        self.count[i] += 1

    def close(self, k: int, on_screen) -> None:
        """TR ``k`` will get no more frames: pad it, and write the chunk once it is complete."""
        i, n = k - self.chunk0, int(self.count[k - self.chunk0])
        if n == 0:  # no frame starts in this TR: the frame on screen fills every slot
            self.buf[i] = self.convert(on_screen) if on_screen is not None else 0
            self.n_empty_trs += 1
        elif n < self.buf.shape[1]:
            self.buf[i, n:] = self.buf[i, n - 1]
        self.pad[i] = np.arange(self.buf.shape[1]) >= n  # n == 0: every slot is padded
        self.n_padded += int(self.pad[i].sum())
        if k + 1 == min(self.chunk0 + self.chunk, self.tr1):
            self._flush(k + 1)

    def _flush(self, end: int) -> None:
        m = end - self.chunk0
        self.frames[self.chunk0:end] = self.buf[:m]
        self.padded[self.chunk0:end] = self.pad[:m]
        self.moments[self.chunk0:end] = pixel_moments(self.buf[:m])
        self.chunk0 = end
        self.count[:] = 0
        self.pad[:] = False


def pixel_moments(frames: np.ndarray) -> np.ndarray:
    """Exact per-TR, per-channel ``[sum, sum of squares]`` of pixel values (0-255).

    Args:
        frames: ``(tr, ..., channel) uint8``.

    Returns:
        ``(tr, 2, channel) int64`` -- integers, so statistics over any set of TRs (the
        training TRs of every run, chosen after the stage ran) are exact sums of rows.
    """
    flat = frames.reshape(len(frames), -1, frames.shape[-1])
    return np.stack([flat.sum(1, dtype=np.int64), _SQUARES[flat].sum(1, dtype=np.int64)], axis=1)


def _frames_from(path: Path, t_start: Fraction, wanted=None):
    """Yield ``(t, frame)`` in presentation order from the last keyframe at or before ``t_start``.

    One seek; if the demuxer lands on a keyframe that is presented after ``t_start`` (seeking
    goes by decode time), seek again further back, so no frame of the segment is ever missed.
    ``wanted(pts) -> bool``: a packet it rejects is decoded only if other frames refer to it
    (libavcodec's ``skip_frame = NONREF``): a caller that needs a few frames skips the rest.
    """
    for back in SEEK_BACKOFF_S + (None,):
        container, stream = _open(path)
        stream.thread_type = "AUTO"
        tb, start = Fraction(stream.time_base), stream.start_time or 0
        target = None if back is None else t_start - back
        if target is not None and target > 0:
            container.seek(start + math.floor(target / tb), stream=stream, backward=True, any_frame=False)
        decoded = _decode(container, stream, path, wanted)
        first = next(decoded, None)
        if first is None or first.pts is None:
            container.close()
            if target is None or target <= 0:
                raise InputError(f"video: {path} holds no decodable video frame with a timestamp; re-export it")
            continue
        t_first = (first.pts - start) * tb
        if t_first <= t_start or target is None or target <= 0:
            try:
                yield t_first, first
                for frame in decoded:
                    if frame.pts is not None:
                        yield (frame.pts - start) * tb, frame
            finally:
                container.close()
            return
        container.close()


def _packets_decoded(container, stream, wanted):
    ctx = stream.codec_context
    for packet in container.demux(stream):  # the last packet (empty) flushes the decoder
        ctx.skip_frame = "DEFAULT" if packet.pts is None or wanted(packet.pts) else "NONREF"
        yield from packet.decode()


def _decode(container, stream, path: Path, wanted=None):
    import av

    last = None
    try:
        for last in (container.decode(stream) if wanted is None else _packets_decoded(container, stream, wanted)):
            yield last
    except av.error.FFmpegError as exc:
        at = (f"after t = {float((last.pts - (stream.start_time or 0)) * stream.time_base):.2f} s"
              if last is not None and last.pts is not None else "at the first frame")
        raise InputError(f"video: {path} is corrupt: decoding failed {at} ({type(exc).__name__}: {exc}); "
                         f"re-copy or re-export the file") from None


def decode_segment(staging: str, names: dict, path: str, tr0: int, tr1: int, tr_s: float, onset_s: float,
                   frame_skip: int, frames_per_tr: int, width: int, height: int, interpolation: str,
                   chunk_trs: int, fps: Fraction | float) -> dict:
    """Task: decode TRs ``[tr0, tr1)`` into the staged ``video/frames`` ``(tr, frame, y, x, 3) uint8``.

    ``names``: the run's array paths (:func:`array_names`). Also writes each TR's pixel
    moments. Returns counts (kept, padded, dropped frames).
    """
    from av.video.reformatter import Interpolation, VideoReformatter

    grid = TrGrid(_exact(tr_s), _exact(onset_s), tr1, frame_skip, frames_per_tr)
    reformatter = VideoReformatter()  # one swscale context for every frame (per-frame contexts are slow)
    # full chroma interpolation: see the module docstring
    algo = Interpolation[INTERPOLATIONS[interpolation]] | Interpolation.FULL_CHR_H_INT
    colours: dict = {}  # (colorspace, color_range, pix_fmt) -> reformat arguments; one entry per stream

    def convert(frame) -> np.ndarray:
        key = (frame.colorspace, frame.color_range, frame.format.name)
        if key not in colours:
            colours[key] = colour_of(key[0], key[1], frame.format, path).reformat_args()
        return reformatter.reformat(frame, width, height, "rgb24", interpolation=algo, threads=1,
                                    **colours[key]).to_ndarray()

    out = _SegmentWriter(staging, names, tr0, tr1, chunk_trs, frames_per_tr, convert)
    cur, seen, on_screen, last_t, n_decoded = tr0, 0, None, None, 0
    for t, frame in _frames_from(Path(path), grid.start_of(tr0)):
        k = grid.tr_of(t)
        if k >= tr1:
            break
        if k >= tr0 and k >= cur:
            for j in range(cur, k):
                out.close(j, on_screen)
            if k > cur:
                cur, seen = k, 0
            if seen % frame_skip == 0:
                out.add(k, frame)
            seen += 1
            n_decoded += 1
        on_screen, last_t = frame, t
    else:  # the stream ended before tr1: fine only if it lasted (almost) to the end of tr1 - 1
        _check_not_truncated(path, last_t, grid.start_of(tr1), Fraction(fps))
    for j in range(cur, tr1):
        out.close(j, on_screen)
    return {"tr0": tr0, "tr1": tr1, "n_frames_in_trs": n_decoded, "n_padded": out.n_padded,
            "n_dropped": out.n_dropped, "n_empty_trs": out.n_empty_trs}


def _check_not_truncated(path: str, last_t: Fraction | None, needed: Fraction, fps: Fraction) -> None:
    end = (last_t + 1 / fps) if last_t is not None else Fraction(0)
    if needed - end > Fraction(3, 2) / fps:  # more than a frame missing: the header promised more
        raise InputError(f"video: {path} ends at {float(end):.2f} s while its header promises at least "
                         f"{float(needed):.2f} s; the file is truncated or corrupt: re-copy or re-export it")


def pixel_stats(moments: np.ndarray, pixels_per_tr: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std (ddof 0) of [0, 1]-scaled pixels from TR moments.

    Args:
        moments: ``(tr, 2, channel)`` rows of ``moments`` arrays (any TRs, any runs).
        pixels_per_tr: pixels per channel in one TR (``moments`` attrs).

    Returns:
        ``(mean, std)`` each ``(channel,) float32`` (NaN when no TR is given).
    """
    n = len(moments) * int(pixels_per_tr)
    if n == 0:
        return np.full(3, np.nan, np.float32), np.full(3, np.nan, np.float32)
    total = [[int(v) for v in row] for row in np.asarray(moments, dtype=np.int64).sum(0)]  # Python ints: exact
    mean = np.array([s / (255.0 * n) for s in total[0]])
    var = np.array([(n * q - s * s) / (255.0 * 255.0 * n * n) for s, q in zip(total[0], total[1])])
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 0.0)).astype(np.float32)


def to_float(frames: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> np.ndarray:
    """uint8 frames ``(..., channel)`` -> float32 in [0, 1], or z-scored per channel.

    With ``mean``/``std`` (``(channel,)``, e.g. ``StoreView.video_stats()``) returns
    ``(x / 255 - mean) / std``; a channel whose std is 0 maps to 0 (no division by zero).
    """
    x = np.asarray(frames, dtype=np.float32) / np.float32(255.0)
    if mean is None:
        return x
    std = np.asarray(std, dtype=np.float32)
    safe = np.where(std > 0, std, np.float32(1.0))
    return np.where(std > 0, (x - np.asarray(mean, dtype=np.float32)) / safe, np.float32(0.0)).astype(np.float32)
