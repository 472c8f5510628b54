"""The audio stage's soundtrack: probe a movie's (or a separate file's) audio stream, decode
it to mono float32 at the model's rate starting at stimulus time ``onset_s``, and hand it to
the encode tasks (once per worker, or staged once per unit and memory-mapped).

PyAV (libavcodec, libswresample) does the decoding; this module decides only where time 0
is and how the samples reach the tasks. ``giblet.features.audio`` re-exports its names.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from giblet.errors import InputError
from giblet.features.media import open_stream


@dataclass(frozen=True)
class SourceInfo:
    """What the container header says about the audio source."""

    path: str
    key: str  # "movie" or "audio": the inputs entry it came from
    duration_s: Optional[float]  # seconds after stimulus time 0, from the header (an estimate; None when absent)


def _open(path: Path, key: str):
    fix = "give the soundtrack as inputs.audio=FILE" if key == "movie" else "point inputs.audio at an audio file"
    return open_stream(
        path, "audio", "audio", missing=f"{{path}} does not exist; fix inputs.{key} in the config",
        unreadable=f"{{path}} is not a readable media file ({{error}}); re-copy or re-export it, or fix inputs.{key}",
        absent=f"{{path}} has no audio track (streams: {{streams}}); {fix}")


def _anchor_s(container, key: str, astream) -> float:
    """Stimulus time 0 in stream seconds: the movie's first video frame, else the audio start."""
    ref = container.streams.video[0] if key == "movie" and container.streams.video else astream
    return float(ref.start_time * ref.time_base) if ref.start_time is not None else 0.0


def has_audio_track(path: Path) -> bool:
    """True if ``path`` exists, opens, and has an audio stream (header only)."""
    try:
        container, _ = _open(path, "movie")
    except InputError:
        return False
    container.close()
    return True


def probe_source(path: Path, key: str) -> SourceInfo:
    """Header-only checks of the audio source (exists, opens, has an audio track)."""
    container, a = _open(path, key)
    with container:
        duration = None
        if a.duration is not None:
            duration = float(a.duration * a.time_base) + float((a.start_time or 0) * a.time_base)
        if container.duration is not None:
            duration = max(duration or 0.0, container.duration / 1e6)
        if duration is not None:
            duration -= _anchor_s(container, key, a)
        return SourceInfo(str(path), key, duration)


def read_waveform(path: str, key: str, rate: int, onset_s: float) -> tuple[np.ndarray, dict]:
    """Decode, downmix and resample the source; start it at stimulus time ``onset_s``.

    Returns:
        ``(sample,) float32`` mono at ``rate`` Hz, sample 0 at stimulus time ``onset_s``;
        and a record (source rate/channels, first-sample time, samples dropped/padded).
    """
    import av

    container, a = _open(Path(path), key)
    to_float = av.AudioResampler(format="fltp")  # any sample format -> planar float, same rate
    to_mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
    duration = float(a.duration * a.time_base) if a.duration and a.time_base else None
    wave, first_t, n_in = _Samples(int(duration * rate * 1.01) + rate if duration else 60 * rate), None, 0
    with container:
        anchor = _anchor_s(container, key, a)
        try:
            for frame in container.decode(a):
                if first_t is None:
                    first_t = (frame.time if frame.time is not None else 0.0) - anchor
                for f in to_float.resample(frame):
                    wave.extend(_downmix_resample(to_mono, f, n_in))
                    n_in += f.samples
            for f in to_float.resample(None):  # flush both resamplers
                wave.extend(_downmix_resample(to_mono, f, n_in))
                n_in += f.samples
            wave.extend([f.to_ndarray().reshape(-1) for f in to_mono.resample(None)])
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise InputError(f"audio: {path} is truncated or corrupt: decoding failed after {n_in} samples "
                             f"({type(exc).__name__}: {exc}); re-copy or re-export the file") from None
    wave = wave.array()
    shift = int(round((onset_s - (first_t or 0.0)) * rate))  # >0: drop samples before onset
    wave = wave[shift:] if shift >= 0 else np.concatenate([np.zeros(-shift, np.float32), wave])
    info = {"source_rate": int(a.rate or 0), "source_channels": int(a.channels or 0), "codec": a.codec_context.name,
            "first_sample_s": first_t, "onset_shift_samples": shift, "n_samples": int(len(wave))}
    return wave, info


class _Samples:
    """A float32 buffer filled in place, grown by doubling: a decoded soundtrack costs its own
    size, not that again in thousands of per-frame arrays (kept by the allocator's heap after
    they are joined)."""

    def __init__(self, capacity: int):
        self.buf, self.n = np.empty(max(1, capacity), np.float32), 0

    def extend(self, parts: list[np.ndarray]) -> None:
        for part in parts:
            if self.n + len(part) > len(self.buf):
                grown = np.empty(max(2 * len(self.buf), self.n + len(part)), np.float32)
                grown[:self.n] = self.buf[:self.n]
                self.buf = grown
            self.buf[self.n:self.n + len(part)] = part
            self.n += len(part)

    def array(self) -> np.ndarray:
        """The samples (a copy only when the buffer is much larger than its contents)."""
        return self.buf[:self.n].copy() if self.n < 0.9 * len(self.buf) else self.buf[:self.n]


def _downmix_resample(resampler, frame, pts: int) -> list[np.ndarray]:
    """Average a planar float frame's channels to mono, then resample it (libswresample)."""
    import av
    from fractions import Fraction

    mono = frame.to_ndarray().mean(axis=0, keepdims=True, dtype=np.float32)  # (1, samples)
    out = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono), format="fltp", layout="mono")
    out.sample_rate, out.pts, out.time_base = frame.sample_rate, pts, Fraction(1, frame.sample_rate)
    return [f.to_ndarray().reshape(-1) for f in resampler.resample(out)]


@functools.lru_cache(maxsize=1)
def cached_waveform(path: str, key: str, fingerprint: str, rate: int, onset_s: float) -> tuple[np.ndarray, dict]:
    """``read_waveform`` once per worker process (the tasks of one worker share it)."""
    wave, info = read_waveform(path, key, rate, onset_s)
    wave.setflags(write=False)
    return wave, info


def staged_waveform(staging: str, path: str, key: str, rate: int, onset_s: float) -> tuple[np.ndarray, dict]:
    """``read_waveform``, once per unit: the first task writes the samples into the unit's
    staging folder, and each task memory-maps them (a new map per task, dropped with it), so
    a worker holds the samples it encodes rather than the whole track (a 50-minute one is
    0.29 GB). A resumed run reuses the file; two workers decoding at once write the same
    bytes (each renames its own)."""
    import json
    import os

    samples, meta = Path(staging) / "waveform.f32", Path(staging) / "waveform.json"
    if not meta.exists():
        wave, info = read_waveform(path, key, rate, onset_s)
        for dst, write in ((samples, wave.tofile), (meta, lambda f: Path(f).write_text(json.dumps(info)))):
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
            write(tmp)
            os.replace(tmp, dst)
        del wave
    info = json.loads(meta.read_text())
    if samples.stat().st_size == 0:  # an empty file cannot be mapped
        return np.zeros(0, np.float32), info
    return np.memmap(samples, np.float32, mode="r"), info
