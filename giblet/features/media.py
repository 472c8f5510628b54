"""Pieces the stimulus stages share: the compute device, torch's CPU threads, and opening a
media file's stream."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def task_threads(requested: Optional[int], concurrent: Optional[int]) -> int:
    """torch intra-op threads for one task: ``requested``, else this process's cores divided
    by the tasks of its kind that may run at once on them (``concurrent``; None: as many as
    cores, one thread each -- the Dask workers' own setting)."""
    if requested:
        return int(requested)
    cores = available_cores()
    return max(1, cores // max(1, concurrent or cores))


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block, then restored (a Dask worker
    starts with 1: its nanny sets OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op
    elsewhere). A model task's thousands of multi-MB tensors leave its threads' arenas
    fragmented: trimmed at each task's end, the next task starts from the live memory
    (the audio stage's peak RSS stays flat across tasks instead of creeping ~0.07 GB)."""
    import ctypes

    try:  # the process's own symbols (libc among them): no `ldconfig` child forked from a large process
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def trims_heap(fn):
    """``fn``, then ``trim_heap`` however it ends (a decorator for model tasks)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            trim_heap()
    return run


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
