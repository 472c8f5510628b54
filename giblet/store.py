"""The local writer: staged commits into a store folder, under a lock.

Writers never touch a completed array in place. A unit of work (one stage for one input,
e.g. ``fmri/sub-01/run-1``) writes its arrays under ``.giblet/staging/``; only when every
array is written are they moved into the group and the unit recorded in ``manifest.json``
(atomic replace). An array the manifest does not list is not complete and is never served.

The store's names, path checks and manifest format live in :mod:`giblet.manifest` (shared
with the remote writer and the readers); every path is checked there before anything is
written or deleted. Readers use :func:`giblet.open_store`, which serves only what the
manifest lists.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import zarr

from giblet.errors import StoreError
from giblet.fingerprint import hash_file
from giblet.manifest import (ALIGN_KEY, DERIVED, DERIVED_KEY, FORMAT, GROUP_META, MANIFEST, META_DIR, _json_default,
                             array_checksums, atomic_write_json, check_name, contained, group_meta_path, group_names,
                             manifest_digest, member, now_iso, read_manifest)
# Re-exported: tests, pipelines, benchmarks and users import the store's names from giblet.store.
from giblet.manifest import (CHANNEL, CODE_FRAME, CODEBOOK, EMBEDDING, FMRI, FRAME, HEIGHT, IJK, MASK,  # noqa: F401
                             MOMENT, PARCEL, STIMULI, TARGETS, TR, VERTEX, VOXEL, VOXELS, VOXELS_TARGET, WIDTH, XYZ,
                             X, Y, Z, fmri_prefix, is_target_unit, parse_manifest, stimulus_prefix, target_prefix)

KILL_ENV = "GIBLET_KILL_IN_COMMIT"  # tests only: "STEP[:UNIT]" SIGKILLs the writer at that step of a commit


def remove_member(store: str | os.PathLike, name: str) -> None:
    """Delete the array or group folder ``name`` of a store, after :func:`member`'s checks."""
    path = member(store, name)
    if path.is_symlink():
        path.unlink()  # a link inside the store, to inside the store: drop the link, never its target
    else:
        shutil.rmtree(path, ignore_errors=True)


# -- writing -----------------------------------------------------------------------------------
def staged(staging: str | os.PathLike, name: str) -> str:
    """Where staged array or file ``name`` lives: a path in a local staging folder, or a URL
    under a remote attempt prefix (``giblet.objstore``)."""
    from giblet.location import is_url

    return f"{staging}/{name}" if is_url(staging) else str(Path(staging) / name)


def create_array(staging: str | os.PathLike, name: str, shape: tuple, dtype: str, chunks: tuple,
                 dims: tuple[str, ...], attrs: dict | None = None, fill_value: Any = 0) -> zarr.Array:
    """Create one staged Zarr v3 array (``staging/name``) with named dimensions."""
    arr = zarr.create_array(
        store=staged(staging, name), shape=tuple(int(s) for s in shape), dtype=dtype,
        chunks=tuple(int(c) for c in chunks), dimension_names=dims, fill_value=fill_value,
        overwrite=True, config={"write_empty_chunks": True},
    )
    if attrs:
        arr.attrs.update(attrs)
    return arr


def open_staged(staging: str | os.PathLike, name: str) -> zarr.Array:
    return zarr.open_array(staged(staging, name), mode="r+")


def write_staged_json(staging: str | os.PathLike, name: str, obj: Any) -> None:
    """A small JSON file beside the staged arrays (e.g. the text stage's rows)."""
    from giblet.location import is_url

    if not is_url(staging):
        return atomic_write_json(Path(staging) / name, obj)
    import fsspec

    with fsspec.open(staged(staging, name), "w") as fh:  # one PUT: whole or absent
        json.dump(obj, fh, default=_json_default)


def read_staged_json(staging: str | os.PathLike, name: str) -> Any:
    import fsspec

    with fsspec.open(staged(staging, name), "r") as fh:
        return json.load(fh)


def remove_staged_chunks(staging: str | os.PathLike, name: str, first: int) -> None:
    """Delete the chunk files of staged array ``name`` from first-axis chunk ``first`` on
    (zarr-python 3.1 keeps out-of-bounds chunk files after a shrink)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(staged(staging, f"{name}/c"))
    if not fs.isdir(root):
        return
    doomed = [p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].isdigit()
              and int(p.rstrip("/").rsplit("/", 1)[-1]) >= first]
    if doomed:
        fs.rm(doomed, recursive=True)


def open_committed(store: str | os.PathLike, name: str) -> zarr.Array:
    """A committed array of a store being built (a Dask task reading the study mask), read-only:
    a local store's ``store/name``, a remote store's array at the attempt its manifest names."""
    from giblet.location import is_url, store_location

    if not is_url(store):
        return zarr.open_array(str(Path(store) / name), mode="r")
    loc = store_location(store)
    manifest = read_manifest(loc) or {"units": {}}
    recs = {a: r for e in manifest["units"].values() for a, r in e.get("arrays", {}).items()}
    if name not in recs:
        raise StoreError(f"{loc}: {name} is not committed (manifest.json does not list it); rerun")
    return zarr.open_array(loc.url_of(recs[name].get("path", name)), mode="r")


class StoreWriter:
    """Driver-side owner of a store: manifest, staging areas, commits and the lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = self.path / META_DIR
        self.manifest = read_manifest(self.path) or {"format": FORMAT, "units": {}}

    # -- layout --------------------------------------------------------------------------
    def create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"output {self.path}: exists and is not a folder; choose another output path")
        if self.path.is_dir() and any(self.path.iterdir()) and not (
                (self.path / GROUP_META).exists() or (self.path / META_DIR).exists()):
            raise StoreError(f"output {self.path}: folder exists, is not empty and is not a giblet store; "
                             f"giblet will not write into it -- choose a new output path")
        if self.meta.is_symlink() or (self.meta.exists() and not self.meta.is_dir()):
            raise StoreError(f"{self.meta}: is a symbolic link or not a folder; giblet keeps its staging and lock "
                             f"there and will not follow it -- remove it or choose a new output path")
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta.mkdir(exist_ok=True)
        zarr.open_group(str(self.path), mode="a")

    def staging_dir(self, unit_key: str, fingerprint: str) -> Path:
        """``.giblet/staging/<unit>-<fingerprint>``, checked to lie inside the store (no planted link)."""
        path = self.meta / "staging" / f"{check_name(unit_key, 'unit key').replace('/', '__')}-{fingerprint}"
        return contained(self.path, path, f"staging folder of {unit_key}")

    def unit(self, key: str) -> dict | None:
        return self.manifest["units"].get(key)

    remote = False

    def exists(self) -> bool:
        return self.path.exists()

    def lock(self) -> "StoreLock":
        return StoreLock(self.path)

    @property
    def hash_cache_path(self) -> Path:
        """Where the input files' content hashes are cached (``FileHashCache``)."""
        return self.meta / "file-hashes.json"

    def open_staging(self, key: str, fingerprint: str, prepare=None) -> tuple[Path, dict]:
        """The unit's staging folder and the results of its finished tasks, resumed when a killed
        run left them; a new folder is ``prepare(staging)``-d on the driver first."""
        staging = self.staging_dir(key, fingerprint)
        if (staging / "commit-started").exists() or not (staging / "prepared").exists():
            shutil.rmtree(staging, ignore_errors=True)  # half-committed or half-prepared: start clean
        results: dict[str, dict] = {}
        if staging.exists():
            for marker in (staging / ".tasks").glob("*.json"):
                results[marker.stem] = json.loads(marker.read_text())
            return staging, results
        # Other staging folders of this unit belong to older fingerprints: drop them.
        prefix = key.replace("/", "__") + "-"
        for old in staging.parent.glob(prefix + "*"):
            if len(old.name) == len(prefix) + 16:
                shutil.rmtree(old, ignore_errors=True)
        (staging / ".tasks").mkdir(parents=True)
        if prepare:
            prepare(staging)
        (staging / "prepared").write_text(fingerprint)
        return staging, results

    def record_task(self, staging: Path, task_id: str, result: dict) -> None:
        """A finished task's result, kept so that a killed run resumes at task granularity."""
        atomic_write_json(Path(staging) / ".tasks" / f"{task_id}.json", result)

    def save_manifest(self) -> None:
        self.manifest["format"] = FORMAT
        self.manifest.pop("schema_version", None)
        self.manifest["updated"] = now_iso()
        self.manifest["generation"] = int(self.manifest.get("generation", 0)) + 1
        self.manifest["digest"] = manifest_digest(self.manifest)
        atomic_write_json(self.path / MANIFEST, self.manifest)

    # -- commits -------------------------------------------------------------------------
    def commit(self, key: str, entry: dict, staging: Path, arrays: Iterable[str]) -> None:
        """Move staged arrays into the group and record the unit, in a crash-safe order.

        1. drop the unit's old manifest entry (from here the old arrays are "incomplete"),
        2. replace each array directory, 3. record the new entry (the unit is complete).
        """
        arrays = [check_name(a) for a in arrays]
        (staging / "commit-started").write_text(now_iso())
        entry = dict(entry)
        entry["arrays"] = {}
        for name in arrays:
            src = staging / name
            meta = json.loads((src / GROUP_META).read_text())
            entry["arrays"][name] = {
                "shape": meta["shape"], "dtype": meta["data_type"],
                "chunks": meta["chunk_grid"]["configuration"]["chunk_shape"],
                "dims": meta.get("dimension_names"), "checksums": array_checksums(src),
            }
        dests = {name: member(self.path, name) for name in arrays}  # every check before any change
        old = self.manifest["units"].pop(key, None)
        self.manifest.pop(ALIGN_KEY, None)
        self.save_manifest()
        _kill_point("dropped", key)
        for name in set((old or {}).get("arrays", {})) - set(arrays):
            remove_member(self.path, name)
        root = zarr.open_group(str(self.path), mode="a")
        for i, (name, dst) in enumerate(dests.items()):
            parent = str(Path(name).parent)
            if parent != ".":
                root.require_group(parent)
            if dst.exists() or dst.is_symlink():
                remove_member(self.path, name)
            os.replace(staging / name, dst)
            if i == 0:
                _kill_point("moved", key)
        entry["completed"] = now_iso()
        self.manifest["units"][key] = entry
        self.save_manifest()
        _kill_point("recorded", key)
        shutil.rmtree(staging, ignore_errors=True)

    def commit_derived(self, name: str, entry: dict, staging: Path, arrays: Iterable[str]) -> None:
        """Record a result derived from the store (e.g. ``derived/noise_ceiling-val``) whose
        ``entry["basis"]`` is the align fingerprint it was computed from: readers serve it only
        while the store still has that align record. Same crash-safe order as :meth:`commit`;
        the units and the align record are untouched (the caller holds the store lock)."""
        arrays = [check_name(a) for a in arrays]
        if not all(a.startswith(f"{name}/") for a in arrays) or not name.startswith(f"{DERIVED}/"):
            raise StoreError(f"derived result {name!r}: its arrays must live under it, in {DERIVED}/")
        entry = dict(entry, arrays={})
        for a in arrays:
            meta = json.loads((staging / a / GROUP_META).read_text())
            entry["arrays"][a] = {"shape": meta["shape"], "dtype": meta["data_type"],
                                  "chunks": meta["chunk_grid"]["configuration"]["chunk_shape"],
                                  "dims": meta.get("dimension_names"), "checksums": array_checksums(staging / a)}
        derived = self.manifest.setdefault(DERIVED_KEY, {})
        old = derived.pop(name, None)
        self.save_manifest()
        for a in (old or {}).get("arrays", {}):
            remove_member(self.path, a)
        for group in (DERIVED, name):  # written whole, like the align step's groups
            path = member(self.path, group, "group") / GROUP_META
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"zarr_format": 3, "node_type": "group", "attributes": {}})
        for a in arrays:
            dst = member(self.path, a)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / a, dst)
        entry["groups"] = {g: hash_file(member(self.path, g, "group") / GROUP_META) for g in (DERIVED, name)}
        entry["completed"] = now_iso()
        derived[name] = entry
        self.save_manifest()
        shutil.rmtree(staging, ignore_errors=True)

    def remove_unit(self, key: str) -> None:
        """Forget a unit (e.g. a subject dropped from the config) and delete its arrays."""
        old = self.manifest["units"].get(key) or {}
        for name in old.get("arrays", {}):
            member(self.path, name)  # every check before any change
        self.manifest["units"].pop(key, None)
        self.manifest.pop(ALIGN_KEY, None)
        self.save_manifest()
        for name in old.get("arrays", {}):
            remove_member(self.path, name)

    def write_align(self, align: dict, attrs: dict) -> None:
        """Record the study's TR grids last: every group's metadata first (written whole, so a
        missing or edited ``zarr.json`` is restored; the root's holds ``attrs``), then the
        manifest's align record with each group's checksum, so an edit of either is detected."""
        groups = {}
        for group in group_names(self._array_names()):
            path = group_meta_path(self.path, group)
            meta = {"zarr_format": 3, "node_type": "group", "attributes": {"giblet": attrs} if not group else {}}
            if not group or not path.is_file() or json.loads(path.read_text() or "null") != meta:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path, json.loads(json.dumps(meta, default=_json_default)))
            groups[group] = hash_file(path)
        self.manifest[ALIGN_KEY] = dict(align, groups=groups)
        self.save_manifest()

    def groups_intact(self) -> bool:
        """Whether every group's ``zarr.json`` still has the checksum the align record holds."""
        recorded = (self.manifest.get(ALIGN_KEY) or {}).get("groups") or {}
        for group in group_names(self._array_names()):
            path = group_meta_path(self.path, group)
            if group not in recorded or not path.is_file() or hash_file(path) != recorded[group]:
                return False
        return True

    def _array_names(self) -> list[str]:
        return [a for e in self.manifest["units"].values() for a in e.get("arrays", {})]


def _kill_point(step: str, key: str) -> None:
    """Tests only (``GIBLET_KILL_IN_COMMIT=STEP[:UNIT]``): die here, as a SIGKILL would, to prove
    that every step of a commit leaves a store that is served complete or refused, and resumes."""
    want = os.environ.get(KILL_ENV)
    if want:
        wstep, _, wkey = want.partition(":")
        if wstep == step and wkey in ("", key):
            os.kill(os.getpid(), signal.SIGKILL)


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
        if self.path.is_symlink():  # never follow a planted link: the lock is a plain file giblet made
            raise StoreError(f"{self.path}: is a symbolic link, not giblet's lock file; remove it and rerun")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": now_iso()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
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
                holder = json.loads(self.path.read_text())
                return holder if isinstance(holder, dict) else {}
            except FileNotFoundError:
                return None
            except (ValueError, UnicodeDecodeError):
                time.sleep(0.05)  # being written right now
        return {}

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot check another host's pid: assume alive
        try:
            pid = int(holder["pid"])
            if pid <= 0:
                return False  # kill(0 or negative) would signal process groups, never a lock holder
            os.kill(pid, 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError, OverflowError):
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
