"""Pieces the stimulus stages share: the compute device, and opening a media file's stream."""
from __future__ import annotations

from pathlib import Path

from giblet.errors import ConfigError, InputError, InputMissingError


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (library errors can span pages)."""
    return (str(exc).strip().splitlines() or [""])[0]


def resolve_device(device: str, stage: str = "audio") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a missing GPU fails clearly."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{stage}.device: {device!r} but no CUDA device is visible on this worker; "
                          f"set {stage}.device=auto or {stage}.device=cpu")
    return device


def open_stream(path: Path, kind: str, stage: str, *, missing: str, unreadable: str, absent: str):
    """Open ``path`` with PyAV and return ``(container, first stream of kind)``.

    Args:
        kind: ``"video"`` or ``"audio"``.
        missing, unreadable, absent: the message for a missing file, a file PyAV cannot
            open, and a file without a stream of ``kind`` (``{path}``, ``{error}`` and
            ``{streams}`` are filled in).
    """
    import av

    if not path.exists():
        raise InputMissingError(f"{stage}: " + missing.format(path=path))
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"{stage}: " + unreadable.format(path=path, error=f"{type(exc).__name__}: {exc}")) from None
    streams = getattr(container.streams, kind)
    if not streams:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        container.close()
        raise InputError(f"{stage}: " + absent.format(path=path, streams=kinds))
    return container, streams[0]
