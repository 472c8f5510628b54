"""The on-disk contract: a Zarr v3 group per study, a manifest written last, staged commits.

Writers never touch a completed array in place. A unit of work (one stage for one input,
e.g. ``fmri/sub-01``) writes its arrays under ``.giblet/staging/``; only when every array is
written are they moved into the group and the unit recorded in ``manifest.json`` (atomic
replace). An array the manifest does not list is not complete and is never served.

Readers use :func:`giblet.open_store`, which serves only what the manifest lists.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from giblet.errors import StoreError
from giblet.fingerprint import hash_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
META_DIR = ".giblet"
ALIGN_KEY = "align"

# Dimension names are on-disk contract (xarray reads them).
TR, VOXEL, IJK, X, Y, Z = "tr", "voxel", "ijk", "x", "y", "z"
FRAME, HEIGHT, WIDTH, CHANNEL = "frame", "height", "width", "channel"
CODEBOOK, CODE_FRAME, EMBEDDING = "codebook", "code_frame", "embedding"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` so that a reader sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_manifest(store: Path) -> dict | None:
    path = Path(store) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise StoreError(f"{path}: manifest is not valid JSON ({exc}); "
                         f"rerun `giblet-preprocess run --force` to rebuild the store") from exc


def array_checksums(array_dir: Path) -> dict[str, str]:
    """blake2b of every file of one Zarr array directory, keyed by relative path."""
    out = {}
    for p in sorted(array_dir.rglob("*")):
        if p.is_file():
            out[p.relative_to(array_dir).as_posix()] = hash_file(p)
    return out


def create_array(staging: Path, name: str, shape: tuple, dtype: str, chunks: tuple,
                 dims: tuple[str, ...], attrs: dict | None = None, fill_value: Any = 0) -> zarr.Array:
    """Create one staged Zarr v3 array (``staging/name``) with named dimensions."""
    arr = zarr.create_array(
        store=str(Path(staging) / name), shape=tuple(int(s) for s in shape), dtype=dtype,
        chunks=tuple(int(c) for c in chunks), dimension_names=dims, fill_value=fill_value,
        overwrite=True, config={"write_empty_chunks": True},
    )
    if attrs:
        arr.attrs.update(attrs)
    return arr


def open_staged(staging: Path, name: str) -> zarr.Array:
    return zarr.open_array(str(Path(staging) / name), mode="r+")


class StoreWriter:
    """Driver-side owner of a store: manifest, staging areas, commits and the lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = self.path / META_DIR
        self.manifest = read_manifest(self.path) or {"schema_version": SCHEMA_VERSION, "units": {}}
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: store schema version {self.manifest.get('schema_version')} "
                             f"is not {SCHEMA_VERSION}; rebuild it with `giblet-preprocess run --force` "
                             f"or a matching giblet version")

    # -- layout --------------------------------------------------------------------------
    def create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"output {self.path}: exists and is not a folder; choose another output path")
        if self.path.is_dir() and any(self.path.iterdir()) and not (
                (self.path / "zarr.json").exists() or (self.path / META_DIR).exists()):
            raise StoreError(f"output {self.path}: folder exists, is not empty and is not a giblet store; "
                             f"giblet will not write into it -- choose a new output path")
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta.mkdir(exist_ok=True)
        zarr.open_group(str(self.path), mode="a")

    def staging_dir(self, unit_key: str, fingerprint: str) -> Path:
        return self.meta / "staging" / f"{unit_key.replace('/', '__')}-{fingerprint}"

    def unit(self, key: str) -> dict | None:
        return self.manifest["units"].get(key)

    def save_manifest(self) -> None:
        self.manifest["updated"] = now_iso()
        atomic_write_json(self.path / MANIFEST, self.manifest)

    # -- commits -------------------------------------------------------------------------
    def commit(self, key: str, entry: dict, staging: Path, arrays: Iterable[str]) -> None:
        """Move staged arrays into the group and record the unit, in a crash-safe order.

        1. drop the unit's old manifest entry (from here the old arrays are "incomplete"),
        2. replace each array directory, 3. record the new entry (the unit is complete).
        """
        arrays = list(arrays)
        (staging / "commit-started").write_text(now_iso())
        entry = dict(entry)
        entry["arrays"] = {}
        for name in arrays:
            src = staging / name
            meta = json.loads((src / "zarr.json").read_text())
            entry["arrays"][name] = {
                "shape": meta["shape"], "dtype": meta["data_type"],
                "chunks": meta["chunk_grid"]["configuration"]["chunk_shape"],
                "dims": meta.get("dimension_names"), "checksums": array_checksums(src),
            }
        old = self.manifest["units"].pop(key, None)
        self.manifest.pop(ALIGN_KEY, None)
        self.save_manifest()
        for name in set((old or {}).get("arrays", {})) - set(arrays):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in arrays:
            dst = self.path / name
            parent = str(Path(name).parent)
            if parent != ".":
                zarr.open_group(str(self.path), mode="a").require_group(parent)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(staging / name, dst)
        entry["completed"] = now_iso()
        self.manifest["units"][key] = entry
        self.save_manifest()
        shutil.rmtree(staging, ignore_errors=True)

    def remove_unit(self, key: str) -> None:
        """Forget a unit (e.g. a subject dropped from the config) and delete its arrays."""
        old = self.manifest["units"].pop(key, None)
        self.manifest.pop(ALIGN_KEY, None)
        self.save_manifest()
        for name in (old or {}).get("arrays", {}):
            shutil.rmtree(self.path / name, ignore_errors=True)

    def write_align(self, align: dict, attrs: dict) -> None:
        """Record the common TR grid last: root attrs first, then the manifest entry."""
        group = zarr.open_group(str(self.path), mode="a")
        group.attrs["giblet"] = json.loads(json.dumps(attrs, default=_json_default))
        self.manifest[ALIGN_KEY] = align
        self.save_manifest()


class StoreLock:
    """An exclusive lock on one store (``.giblet/lock``), naming its holder.

    A lock left by a killed process on this host (its pid is gone) is taken over; a lock
    held by a live process makes the second run fail with the holder's host, pid and time.
    """

    def __init__(self, store: Path):
        self.path = Path(store) / META_DIR / "lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": now_iso()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder and self._alive(holder):
                    raise StoreError(
                        f"{self.path.parent.parent}: store is locked by another run "
                        f"(host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}); "
                        f"wait for it to finish, or delete {self.path} if that process is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise StoreError(f"{self.path}: could not take the store lock; retry")

    def _holder(self) -> dict | None:
        for _ in range(5):
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except ValueError:
                time.sleep(0.05)  # being written right now
        return {}

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot check another host's pid: assume alive
        try:
            os.kill(int(holder["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError):
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
