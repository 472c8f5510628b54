"""Checkpoints: written by rank 0 atomically, read back without a full extra copy per rank.

One file, ``<run>/checkpoint.pt``, holds everything a run needs to continue as if never
stopped: model and optimizer state, the LR scheduler, the optimizer step, every rank's
RNG states and the data loader's ``{epoch, position, seed, legs}``. It is written to a temporary
name in the same folder, fsynced and renamed over the old one, so a kill at any moment
leaves either the old or the new checkpoint, never half of one.

It also records what defines the run (``run``: the settings that fix the sample order and
the LR schedule, ``giblet.training.config.run_identity``), what its weights fit (``shape``)
and the schedule's ``total_steps``, so a rerun can refuse changed settings, or say the run
is finished, before any dataset or model is built. The number of ranks may change
(elastic resume): the loader's state says which samples of the epoch all ranks consumed
(a pure function of ``position``, ``legs`` and the recorded order), and the new ranks split
exactly the rest.

Loading uses ``torch.load(map_location="cpu", mmap=True, weights_only=True)``: tensors stay
in the page cache (shared by the ranks of a node) until copied into the model, and nothing
but tensors and plain containers is unpickled -- a file holding anything else is refused,
never executed.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Union

import torch

from giblet.errors import ConfigError

FILENAME = "checkpoint.pt"
FORMAT = 2  # 2: adds run, shape, total_steps
FIELDS = {"model": dict, "step": int, "total_steps": int, "optimizer": dict, "scheduler": dict, "loader": dict,
          "rng": list, "run": dict, "shape": dict}
_MOVE = "move it away to start fresh, or point out= at another run folder"


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
    """The run's checkpoint (``None`` if there is none), memory-mapped and ``weights_only``.

    Raises:
        ConfigError: one line naming the file and what is wrong with it (not a torch file,
            Python objects other than tensors, another format, missing or mistyped entries).
    """
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: torch explains over many lines
        raise ConfigError(f"{path}: refused: it holds Python objects other than tensors and plain containers, which "
                          f"giblet never unpickles (they could run code) ({_unpickling_reason(exc)}); if you did not "
                          f"write this file, delete it; else {_MOVE}") from None
    except Exception as exc:  # a foreign or damaged file: say which and what to do
        raise ConfigError(f"{path}: cannot be loaded as a giblet checkpoint ({type(exc).__name__}: "
                          f"{_first_line(exc)}); {_MOVE}") from None
    if isinstance(state, dict) and "format" in state and state["format"] != FORMAT:
        raise ConfigError(f"{path}: checkpoint format {state['format']!r}, this giblet reads {FORMAT}; "
                          f"start a fresh run (another out=)")
    problem = _shape_problem(state)
    if problem:
        raise ConfigError(f"{path}: not a giblet checkpoint: {problem}; {_MOVE}")
    return state


def _shape_problem(state) -> Optional[str]:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict of run state"
    missing = [k for k in ("format", *FIELDS) if k not in state]
    if missing:
        have = ", ".join(sorted(map(str, state))[:8]) or "nothing"
        return f"it lacks {', '.join(missing)} (it has: {have})"
    wrong = [f"{k} is a {type(state[k]).__name__}, not a {t.__name__}" for k, t in FIELDS.items()
             if not isinstance(state[k], t) or (t is int and isinstance(state[k], bool))]
    return "; ".join(wrong) or None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's weights_only refusal that names what was refused (its wording
    changes between releases; the surrounding advice to load with ``weights_only=False`` is
    exactly what must not be done with a file of unknown origin)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "WeightsUnpickler" in ln or "Unsupported" in ln]
    reason = (named or lines[-1:] or ["no detail"])[0]
    reason = reason.split("WeightsUnpickler error:")[-1].strip()
    return reason.split(". ")[0].rstrip(".")[:200]


# -- resuming ----------------------------------------------------------------------------------------
def resume_state(run_dir: str | os.PathLike, mode: Union[bool, str], run: dict) -> Optional[dict]:
    """The checkpoint a run starts from, per ``resume`` (``mode``); ``None``: from scratch.

    ``True``: the checkpoint in ``run_dir`` if any, only when its ``run`` identity equals
    ``run``; ``False``: none, and an existing checkpoint is refused rather than overwritten;
    ``"weights_only"``: the checkpoint, which must exist (its run settings may differ).
    """
    path = checkpoint_path(run_dir)
    if mode is False:
        if path.exists():
            raise ConfigError(f"{path} exists and resume=false; choose another out= folder, or set resume=true to "
                              f"continue that run")
        return None
    state = load_checkpoint(run_dir)
    if mode is True:
        if state is not None:
            check_run(state, run, path)
        return state
    if state is None:
        raise ConfigError(f"resume={mode}: {path} does not exist, so there are no weights to start from; point "
                          f"out= at the run whose weights you want, or set resume=true to train from scratch")
    return state


# May differ on resume (elastic): the loader splits what is left of the epoch over the new ranks
# (giblet.data.partition, step 5) and the LR schedule stays the one this world size resolved.
ELASTIC_KEYS = ("world_size",)


def check_run(state: dict, run: dict, path: str | os.PathLike = FILENAME) -> None:
    """Refuse to resume a run whose sample order or schedule settings changed (one line: what differs, the fix).

    The world size may change (``ELASTIC_KEYS``)."""
    def fixed(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in ELASTIC_KEYS}

    diff = _diff(fixed(state["run"]), fixed(run))
    if diff:
        raise ConfigError(f"{path}: this run was started with other settings, which fix its sample order and LR "
                          f"schedule ({diff}); resuming would silently change them. Rerun with the checkpoint's "
                          f"settings, choose another out= for a new run, or set resume=weights_only to start a new "
                          f"schedule from its weights")


def check_shape(state: dict, shape: dict, path: str | os.PathLike = FILENAME) -> None:
    """Refuse weights made for a model of another shape (one line: what differs, the fix)."""
    diff = _diff(state["shape"], shape)
    if diff:
        why = ""
        if state["shape"].get("subjects", []) != shape.get("subjects", []):  # the per-subject readouts' order
            why = " (one readout per training subject, in order: select the checkpoint's with data.subjects)"
        raise ConfigError(f"{path}: its weights fit another model ({diff}){why}; restore those settings or that "
                          f"store, or train from scratch with another out=")


def _diff(saved: dict, now: dict, prefix: str = "") -> str:
    """``"key: checkpoint A, now B; ..."`` over nested dicts (empty when equal)."""
    out = []
    for k in list(saved) + [k for k in now if k not in saved]:
        a, b = saved.get(k, "absent"), now.get(k, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{k}.")
            out += [inner] if inner else []
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r}, now {b!r}")
    return "; ".join(out)
