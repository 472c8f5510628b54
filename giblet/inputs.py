"""Input files named by URL (``s3://bucket/bold/sub-01.nii.gz``): fetched to local scratch.

nibabel, PyAV and pandas read local files, so a config input given as a URL is copied to
``$GIBLET_SCRATCH`` (default: the system temp folder's ``giblet-inputs/``) under a name made
from the URL -- the same path on every machine -- and read from there. The driver fetches
every input when it plans (it hashes their content and reads their headers); a Dask task
whose inputs are missing on its worker fetches them first (:func:`call_with_inputs`). A copy
whose source changed (size or ETag) is fetched again. :func:`cleanup` deletes this process's
copies; the engine calls it on the driver and on every worker at the end of a run.

Only single files: a folder (a model, a BIDS dataset) must be local.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from giblet.errors import InputError

FETCHED: dict[str, str] = {}  # this process's local copies: path -> URL


def scratch_root() -> Path:
    return Path(os.environ.get("GIBLET_SCRATCH") or Path(tempfile.gettempdir()) / "giblet-inputs")


def local_copy(url: str) -> Path:
    """Where ``url``'s copy lives: ``<scratch>/<hash of the URL>/<file name>``."""
    digest = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
    return scratch_root() / digest / url.rstrip("/").rsplit("/", 1)[-1]


def fetch(url: str) -> Path:
    """A local copy of the file at ``url`` (fetched unless an up-to-date copy is there)."""
    from fsspec.core import url_to_fs

    dest = local_copy(url)
    try:
        fs, path = url_to_fs(url)
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"{url}: no such file (check the URL, and the credentials in the environment)") from None
    except ImportError as exc:
        raise InputError(f"{url}: no filesystem for this URL ({exc}); install giblet[remote] (s3fs) or the "
                         f"package fsspec names") from None
    if info.get("type") == "directory":
        raise InputError(f"{url}: a folder; inputs given by URL must be single files -- copy the folder locally "
                         f"and give its path")
    stamp = {"size": info.get("size"), "etag": info.get("ETag") or info.get("etag") or info.get("LastModified")}
    stamp = json.loads(json.dumps(stamp, default=str))
    sidecar = dest.with_name(dest.name + ".source.json")
    if not (dest.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == stamp):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        fs.get_file(path, str(tmp))
        os.replace(tmp, dest)  # several workers of one machine may fetch at once: whole files only
        sidecar.write_text(json.dumps(stamp))
    FETCHED[str(dest)] = url
    return dest


def call_with_inputs(fn: Callable[..., Any], inputs: dict[str, str], **kwargs) -> Any:
    """A Dask task: fetch the inputs (local path -> URL) this worker lacks, then ``fn(**kwargs)``."""
    for path, url in inputs.items():
        if not Path(path).is_file() or path not in FETCHED:
            fetch(url)
    return fn(**kwargs)


def cleanup() -> None:
    """Delete this process's local copies."""
    for path in list(FETCHED):
        shutil.rmtree(Path(path).parent, ignore_errors=True)
        FETCHED.pop(path, None)
