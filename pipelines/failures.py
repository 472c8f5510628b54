"""What a failed build says: where it failed (the phase) and why (the cause), on one line.

A failure is classified twice. The *phase* says where it happened: starting the cluster,
connecting to a scheduler, reading an input, computing a task, writing chunks in a task,
committing on the driver, closing the cluster. The *cause* picks the advice:

- disk (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EROFS``) and permissions (``EACCES``, ``EPERM``):
  free space or fix permissions, then rerun to resume;
- slowness (``TimeoutError``, which ``asyncio.TimeoutError`` is, and Dask's ``CommClosedError``):
  the machine or the scheduler is slow or busy, rerun to resume -- never the disk, although
  both are ``OSError``;
- a Dask worker that died (``KilledWorker``): out of memory or killed, use fewer workers;
- anything else: its type name and first line, and ``--debug`` for the traceback.

A message never shows empty parentheses: an exception with no text is named by its type.
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from giblet.errors import GibletError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS}
NO_PERMISSION = {errno.EACCES, errno.EPERM}
RESUME = "completed units are kept; rerun to resume"


class BuildError(GibletError, RuntimeError):
    """A build step failed outside the config and the inputs: the disk, the cluster, a task."""


def describe(exc: BaseException) -> str:
    """``exc`` in a few words: an OSError's strerror, else ``Type: first line``, else ``Type``."""
    if isinstance(exc, OSError) and exc.strerror and not is_slow(exc):
        return exc.strerror
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def is_slow(exc: BaseException) -> bool:
    """A timeout, a dropped Dask connection, or futures cancelled with it: the machine or the
    scheduler is too busy (or the scheduler went away)."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    return isinstance(exc, (TimeoutError, CommClosedError, CancelledError))


def cause_advice(exc: BaseException, path: Optional[Path] = None) -> str:
    """The fix for ``exc``, chosen by its cause (``path``: the store, named in disk advice)."""
    from distributed import KilledWorker

    where = f" on {path}" if path else ""
    if is_slow(exc):
        return (f"the machine or the Dask scheduler is slow or busy, not a disk problem; {RESUME} "
                f"(on a loaded machine, --workers 1 helps)")
    if isinstance(exc, KilledWorker):
        return (f"a Dask worker died running it (out of memory, or killed); {RESUME} with fewer "
                f"--workers (more memory each) or after freeing memory")
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code in DISK_FULL:
        return f"free space{where} (or raise the quota or file-size limit); {RESUME}"
    if code in READ_ONLY:
        return f"the filesystem{where} is read-only; make it writable or choose another output, then rerun"
    if code in NO_PERMISSION:
        target = getattr(exc, "filename", None) or path
        return f"fix the permissions of {target}; {RESUME}" if target else f"fix permissions; {RESUME}"
    return f"{RESUME} (--debug shows the traceback)"


def failure(exc: BaseException, what: str, path: Optional[Path] = None) -> BuildError:
    """The one-line error for ``exc`` raised while doing ``what`` (e.g. ``fmri/sub-01: commit``)."""
    from distributed import KilledWorker

    detail = "KilledWorker" if isinstance(exc, KilledWorker) else describe(exc)  # its text is a paragraph
    return BuildError(f"{what} failed ({detail}); {cause_advice(exc, path)}")


def task_failure(exc: BaseException, unit: str, task: str, store: Path) -> BuildError:
    """The error for a non-giblet exception of task ``task`` of ``unit``, placed by phase: a
    chunk write (a path in the store, or a disk errno), an input read (another path), or the
    task's compute (no path); the cause says when it was the scheduler, not the task."""
    filename = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if is_slow(exc):
        what = f"{unit}: task {task}"  # the advice says it is not the disk, whatever the path
    elif filename and _inside(filename, store) or getattr(exc, "errno", None) in DISK_FULL | READ_ONLY:
        what = f"{unit}: task {task} writing to {store}"
    elif filename:
        what = f"{unit}: task {task} reading {filename}"
    else:
        what = f"{unit}: task {task}"
    return failure(exc, what, store)


@contextmanager
def phase(what: str, path: Optional[Path] = None, catch: tuple = (Exception,)) -> Iterator[None]:
    """Turn a non-giblet exception of the ``catch`` types raised inside into
    ``failure(exc, what, path)``; others (a bug's KeyError, say) pass unchanged.

    KeyboardInterrupt passes through (the CLI says how to resume); giblet's own errors pass
    unchanged, so an inner, more precise phase wins over an outer one."""
    try:
        yield
    except GibletError:
        raise
    except catch as exc:
        raise failure(exc, what, path) from exc


def _inside(filename, root: Path) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(Path(root).resolve())
    except (OSError, ValueError, TypeError):
        return False
