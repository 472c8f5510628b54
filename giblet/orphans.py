"""Leftovers of runs that never committed: found, reported and removed (``giblet-preprocess gc``).

- A store on object storage (``giblet.objstore``): every attempt prefix
  (``attempts/<unit>-<fingerprint>-<id>/``) that the manifest does not name -- a killed run's
  attempt (a rerun would have resumed it), a run that lost the commit race, an attempt
  replaced by a commit that died before deleting it. Only attempts whose newest object is
  older than ``min_age_s`` are orphans: a running build's attempts are unnamed too until
  they commit, so removing young ones could delete work in flight (the commit then refuses,
  or a reader of what it committed gets a "missing" error: never wrong data).
- A local store: its staging folders (``.giblet/staging/*``), when no run holds the lock.

Removing an orphan only costs recomputing it if a later run would have resumed it.
"""
from __future__ import annotations

import datetime as _dt
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from giblet.errors import StoreError
from giblet.location import is_remote, store_location
from giblet.manifest import META_DIR, contained, read_manifest
from giblet.store import StoreLock

DEFAULT_MIN_AGE_S = 24 * 3600.0


@dataclass
class Orphan:
    name: str  # the attempt prefix or staging folder, relative to the store
    files: int
    bytes: int
    age_s: float  # since its newest file was written


def find_orphans(store, min_age_s: float = DEFAULT_MIN_AGE_S, storage_options: Optional[dict] = None,
                 now: Optional[float] = None) -> list[Orphan]:
    """The orphans of ``store`` (a folder or a URL), oldest first."""
    loc = store_location(store, storage_options)
    now = time.time() if now is None else now
    found = _remote(loc, now) if is_remote(loc) else _local(loc, now)
    return sorted((o for o in found if o.age_s >= min_age_s), key=lambda o: -o.age_s)


def remove_orphans(store, orphans: list[Orphan], storage_options: Optional[dict] = None) -> None:
    """Delete ``orphans`` (from :func:`find_orphans`), checked again against the manifest."""
    loc = store_location(store, storage_options)
    if is_remote(loc):
        from giblet.objstore import ATTEMPT_FILE, referenced_attempts

        named = referenced_attempts(read_manifest(loc) or {})
        for o in orphans:
            if o.name.split("/", 1)[1] in named:
                continue  # committed since it was listed
            loc.remove(f"{o.name}/{ATTEMPT_FILE}")  # first: a commit of it in flight then refuses
            loc.remove(o.name)
        return
    with StoreLock(loc):
        for o in orphans:
            shutil.rmtree(contained(loc, loc / o.name, "staging folder"), ignore_errors=True)


def _remote(loc, now: float) -> list[Orphan]:
    from giblet.objstore import ATTEMPTS, referenced_attempts

    manifest = read_manifest(loc) or {}
    named = referenced_attempts(manifest)
    out = []
    for name in loc.children(ATTEMPTS):
        if name in named:
            continue
        files = loc.files(f"{ATTEMPTS}/{name}")
        newest = max((_mtime(info) for info in files.values()), default=now)
        out.append(Orphan(f"{ATTEMPTS}/{name}", len(files), sum(int(i.get("size") or 0) for i in files.values()),
                          now - newest))
    return out


def _local(path, now: float) -> list[Orphan]:
    if read_manifest(path) is None and not (path / META_DIR).is_dir():
        raise StoreError(f"{path}: not a giblet store (no manifest.json, no {META_DIR}/); nothing to clean")
    with StoreLock(path):  # a running build's staging folders are in use: its lock error says whose
        pass
    staging = path / META_DIR / "staging"
    out = []
    for folder in sorted(staging.iterdir()) if staging.is_dir() else ():
        files = [p for p in folder.rglob("*") if p.is_file()]
        newest = max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime)
        out.append(Orphan(folder.relative_to(path).as_posix(), len(files), sum(p.stat().st_size for p in files),
                          now - newest))
    return out


def _mtime(info: dict) -> float:
    value = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, str):
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value) if value is not None else time.time()
