"""Checkpoints: written by rank 0 atomically, read back without a full extra copy per rank.

One file, ``<run>/checkpoint.pt``, holds everything a run needs to continue as if never
stopped: model and optimizer state, the LR scheduler, the optimizer step, every rank's
RNG states and the data loader's ``{epoch, position, seed}``. It is written to a temporary
name in the same folder, fsynced and renamed over the old one, so a kill at any moment
leaves either the old or the new checkpoint, never half of one.

Loading uses ``torch.load(map_location="cpu", mmap=True, weights_only=True)``: tensors stay
in the page cache (shared by the ranks of a node) until copied into the model, and nothing
but tensors and plain containers is unpickled.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from giblet.errors import ConfigError

FILENAME = "checkpoint.pt"
FORMAT = 1


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FILENAME


def save_checkpoint(run_dir: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) as the run's checkpoint, atomically."""
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(run_dir: str | os.PathLike) -> Optional[dict]:
    """The run's checkpoint (``None`` if there is none), memory-mapped and ``weights_only``."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which and what to do
        raise ConfigError(f"{path}: cannot be loaded as a giblet checkpoint ({type(exc).__name__}: {exc}); "
                          f"move it away to start fresh, or point out= at another run folder") from None
    if state.get("format") != FORMAT:
        raise ConfigError(f"{path}: checkpoint format {state.get('format')!r}, this giblet reads {FORMAT}; "
                          f"start a fresh run (another out=)")
    return state


def check_compatible(state: dict, fingerprint: dict) -> None:
    """Refuse to resume a checkpoint made for another model shape or store (one line, what differs)."""
    saved = state.get("fingerprint", {})
    diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if k in saved and saved[k] != v}
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"checkpoint was made for another run ({shown}); use a fresh out= folder or "
                          f"restore the settings")
