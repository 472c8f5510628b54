"""Stores on object storage (S3 and compatible): the commit protocol without renames.

Object storage has no rename and no lock file, so a remote store (``giblet.location``)
keeps every unit's arrays where its build attempt wrote them, and makes the manifest the one
thing that changes::

    s3://bucket/study.zarr/
      zarr.json, <group>/zarr.json            group metadata, written whole by the align step
      manifest.json                           the commit point: one conditional PUT per change
      attempts/<unit>-<fingerprint>-<id>/     one build attempt of one unit
        attempt.json                          written once the attempt is prepared
        tasks/<task>.json                     finished tasks (a killed run resumes from them)
        fmri/sub-01/run-1/bold/...            its arrays: zarr.json and chunks

- A unit's tasks write into a fresh attempt prefix; nothing there is served.
- Commit: the driver reads every file of the attempt's arrays back, checksums it (and checks
  that no chunk is missing), and PUTs the manifest with the unit's entry -- each array's
  ``path`` is its attempt prefix -- **conditionally** (``If-Match`` on the ETag of the manifest
  this run read or last wrote; ``If-None-Match: *`` for a store's first manifest). That PUT
  is the only commit point: readers resolve every name through the manifest, so a half-
  written attempt is never visible, and an attempt the manifest does not name is an orphan.
- Concurrency: two runs on one store both read the manifest's ETag; the first PUT wins and
  the other's fails (HTTP 412): that run stops with a one-line error and its attempts become
  orphans. There is no lock object, so a killed run never leaves the store locked.
- A killed run resumes: an unnamed attempt of the same unit and fingerprint, prepared by a
  run on this host whose process is gone, is reused (its finished tasks kept); an attempt
  the manifest names, or that a live run (or another host's) may be writing, never is.
- Replaced attempts are deleted once the manifest no longer names them; leftovers of killed
  or losing runs are listed and removed by ``giblet-preprocess gc`` (``giblet.orphans``).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Optional

from zarr.storage import WrapperStore

from giblet.errors import StoreError
from giblet.fingerprint import hash_bytes
from giblet.location import PreconditionFailed, RemoteLocation, is_url, local_path, store_location
from giblet.manifest import (ALIGN_KEY, FORMAT, GROUP_META, MANIFEST, _json_default, check_name, group_names,
                             manifest_digest, now_iso, parse_manifest, read_manifest)
from giblet.store import StoreLock, StoreWriter, _kill_point

ATTEMPTS = "attempts"
ATTEMPT_FILE = "attempt.json"
ID_HEX = 12  # random hex digits naming an attempt
READ_BATCH = 32  # files read back at once while checksumming an attempt (bounds the driver's memory)


def attempt_of(path: str) -> Optional[str]:
    """The attempt an array path (``attempts/<id>/...``) lives in, or None."""
    parts = path.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == ATTEMPTS else None


def referenced_attempts(manifest: dict) -> set[str]:
    """Every attempt the manifest names (units and derived results)."""
    entries = list(manifest.get("units", {}).values()) + list((manifest.get("derived") or {}).values())
    return {a for e in entries for rec in e.get("arrays", {}).values() if (a := attempt_of(rec.get("path", "")))}


def _json_bytes(obj: Any) -> bytes:
    """The bytes ``giblet.manifest.atomic_write_json`` writes (so checksums agree with local stores)."""
    return json.dumps(obj, indent=1, sort_keys=True, default=_json_default).encode()


def _hash_cache_path(loc: RemoteLocation) -> Path:
    """Input files' content hashes are facts of the machine that stat-ed them: kept locally."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "giblet" / "file-hashes" / f"{loc.digest}.json"


class RemoteStoreWriter:
    """The driver's writer of a store on object storage; the methods of ``giblet.store.StoreWriter``.

    Writing needs S3 conditional writes (``giblet.location.CONDITIONAL_PROTOCOLS``). Dask
    workers write their chunks with credentials from their own environment.
    """

    remote = True

    def __init__(self, url: str | RemoteLocation, storage_options: Optional[dict] = None):
        self.loc = store_location(url, storage_options)
        self.path = self.loc  # prints as the URL, like StoreWriter.path
        raw, self.etag = self.loc.read_versioned(MANIFEST)
        self.manifest = parse_manifest(raw, self.loc.url_of(MANIFEST)) if raw is not None \
            else {"format": FORMAT, "units": {}}

    # -- layout --------------------------------------------------------------------------
    def exists(self) -> bool:
        return True  # the input-hash cache is local whatever the store

    @property
    def hash_cache_path(self) -> Path:
        return _hash_cache_path(self.loc)

    def lock(self):
        return contextlib.nullcontext()  # exclusion is the manifest's conditional PUT (module docstring)

    def create(self) -> None:
        if self.loc.exists(GROUP_META):
            return
        if self.etag is None and self.loc.children(""):
            raise StoreError(f"output {self.loc}: the prefix holds objects but no giblet store (no zarr.json, no "
                             f"manifest.json); giblet will not write into it -- choose a new output prefix")
        with contextlib.suppress(PreconditionFailed):  # another run created it first: the same bytes
            self.loc.put_if(GROUP_META, _json_bytes({"zarr_format": 3, "node_type": "group", "attributes": {}}),
                            None)

    def unit(self, key: str) -> dict | None:
        return self.manifest["units"].get(key)

    def save_manifest(self) -> None:
        """The commit point: PUT the manifest only if nobody replaced it since this run read it."""
        self.manifest["format"] = FORMAT
        self.manifest["updated"] = now_iso()
        self.manifest["generation"] = int(self.manifest.get("generation", 0)) + 1
        self.manifest["digest"] = manifest_digest(self.manifest)
        try:
            self.etag = self.loc.put_if(MANIFEST, _json_bytes(self.manifest), self.etag)
        except PreconditionFailed:
            raise StoreError(self._lost()) from None

    def _lost(self) -> str:
        return (f"{self.loc}: another run committed to this store after this run read its manifest (two runs on "
                f"one store: the first to commit wins); this run stopped without committing -- rerun it once the "
                f"other has finished (it resumes), and `giblet-preprocess gc {self.loc}` lists what it left")

    # -- attempts ------------------------------------------------------------------------
    def _rel(self, staging: str) -> str:
        return staging[len(self.loc.url) + 1:]

    def open_staging(self, key: str, fingerprint: str, prepare=None) -> tuple[str, dict]:
        """An attempt prefix for the unit (URL) and the results of its finished tasks: an
        unnamed, prepared attempt of the same fingerprint is resumed, else a new one is prepared."""
        base = f"{check_name(key, 'unit key').replace('/', '__')}-{fingerprint}-"
        named = referenced_attempts(self.manifest) | referenced_attempts(read_manifest(self.loc) or {})
        for name in self.loc.children(ATTEMPTS):
            if (name.startswith(base) and len(name) == len(base) + ID_HEX and name not in named
                    and self._abandoned(name)):
                tasks = f"{ATTEMPTS}/{name}/tasks"
                found = self.loc.cat([f"{tasks}/{rel}" for rel in self.loc.files(tasks) if rel.endswith(".json")])
                results = {rel.rsplit("/", 1)[-1][:-5]: json.loads(raw) for rel, raw in found.items()}
                return self.loc.url_of(f"{ATTEMPTS}/{name}"), results
        name = base + uuid.uuid4().hex[:ID_HEX]
        staging = self.loc.url_of(f"{ATTEMPTS}/{name}")
        if prepare:
            prepare(staging)
        self.loc.write_bytes(f"{ATTEMPTS}/{name}/{ATTEMPT_FILE}", _json_bytes(
            {"unit": key, "fingerprint": fingerprint, "started": now_iso(), "host": socket.gethostname(),
             "pid": os.getpid()}))
        return staging, {}

    def _abandoned(self, name: str) -> bool:
        """Whether attempt ``name`` was prepared by a run that is gone (this host, its pid dead):
        only such an attempt is resumed -- never one a live run (or another host's) may be writing."""
        raw = self.loc.read_bytes(f"{ATTEMPTS}/{name}/{ATTEMPT_FILE}")
        try:
            holder = json.loads(raw) if raw is not None else None
        except ValueError:
            return False
        return isinstance(holder, dict) and holder.get("host") == socket.gethostname() and \
            not StoreLock._alive(holder)

    def record_task(self, staging: str, task_id: str, result: dict) -> None:
        self.loc.write_bytes(f"{self._rel(staging)}/tasks/{task_id}.json", _json_bytes(result))

    def _array_record(self, prefix: str, name: str) -> dict:
        """Shape, dtype, chunks, dims and the checksum of every file of the array at ``prefix``,
        read back from the store (chunks equal to the fill value may be absent, as locally)."""
        files = sorted(self.loc.files(prefix))
        checksums: dict[str, str] = {}
        for i in range(0, len(files), READ_BATCH):
            got = self.loc.cat([f"{prefix}/{rel}" for rel in files[i:i + READ_BATCH]])
            checksums.update({rel[len(prefix) + 1:]: hash_bytes(raw) for rel, raw in got.items()})
        if GROUP_META not in checksums:
            raise StoreError(f"{self.loc.url_of(prefix)}: {name} has no zarr.json (the attempt was deleted while "
                             f"this run wrote it?); rerun")
        meta = json.loads(self.loc.read_bytes(f"{prefix}/{GROUP_META}"))
        return {"shape": meta["shape"], "dtype": meta["data_type"],
                "chunks": meta["chunk_grid"]["configuration"]["chunk_shape"], "dims": meta.get("dimension_names"),
                "checksums": checksums, "path": prefix}

    def commit(self, key: str, entry: dict, staging: str, arrays) -> None:
        """Record the unit, its arrays where its attempt wrote them: one conditional PUT."""
        prefix = self._rel(staging)
        entry = dict(entry, arrays={a: self._array_record(f"{prefix}/{check_name(a)}", a) for a in arrays})
        if not self.loc.exists(f"{prefix}/{ATTEMPT_FILE}"):  # gc deletes it first: the listing may lack files
            raise StoreError(f"{staging}: the attempt was deleted while this run wrote it (`giblet-preprocess gc` "
                             f"with --min-age 0 during a run?); nothing was committed -- rerun")
        _kill_point("checksummed", key)
        old = self.manifest["units"].get(key)
        entry["completed"] = now_iso()
        self.manifest["units"][key] = entry
        self.manifest.pop(ALIGN_KEY, None)
        self.save_manifest()
        _kill_point("recorded", key)
        self.loc.remove(f"{prefix}/tasks")
        self.loc.remove(f"{prefix}/{ATTEMPT_FILE}")
        self._drop_unnamed(old)

    def _drop_unnamed(self, old: Optional[dict]) -> None:
        """Delete the attempts a replaced or removed entry used, once the manifest names them no more."""
        named = referenced_attempts(self.manifest)
        for attempt in referenced_attempts({"units": {"old": old}} if old else {}) - named:
            self.loc.remove(f"{ATTEMPTS}/{attempt}")

    def commit_derived(self, name: str, entry: dict, staging, arrays) -> None:
        raise StoreError(f"{self.loc}: derived results are not cached in stores on object storage yet; compute them "
                         f"with cache=False")

    def remove_unit(self, key: str) -> None:
        old = self.manifest["units"].pop(key, None)
        self.manifest.pop(ALIGN_KEY, None)
        self.save_manifest()
        self._drop_unnamed(old)

    # -- the align step -------------------------------------------------------------------
    def _array_names(self) -> list[str]:
        return [a for e in self.manifest["units"].values() for a in e.get("arrays", {})]

    def write_align(self, align: dict, attrs: dict) -> None:
        """Every group's metadata first (whole objects), then the manifest with their checksums.
        The manifest's ETag is checked before the groups are written, so a run that already
        lost never rewrites the study attributes (a run that loses between the two leaves group
        metadata that ``verify`` reports and the next run writes again)."""
        if self.loc.read_versioned(MANIFEST)[1] != self.etag:
            raise StoreError(self._lost())
        groups = {}
        names = group_names(self._array_names())
        current = self.loc.cat([f"{g}/{GROUP_META}" if g else GROUP_META for g in names])
        for group in names:
            rel = f"{group}/{GROUP_META}" if group else GROUP_META
            meta = json.loads(json.dumps({"zarr_format": 3, "node_type": "group",
                                          "attributes": {"giblet": attrs} if not group else {}}, default=_json_default))
            raw = current.get(rel)
            if not group or raw is None or json.loads(raw or b"null") != meta:
                raw = _json_bytes(meta)
                self.loc.write_bytes(rel, raw)
            groups[group] = hash_bytes(raw)
        self.manifest[ALIGN_KEY] = dict(align, groups=groups)
        self.save_manifest()

    def groups_intact(self) -> bool:
        recorded = (self.manifest.get(ALIGN_KEY) or {}).get("groups") or {}
        names = group_names(self._array_names())
        current = self.loc.cat([f"{g}/{GROUP_META}" if g else GROUP_META for g in names])
        return all(g in recorded and hash_bytes(current.get(f"{g}/{GROUP_META}" if g else GROUP_META, b"\0")) ==
                   recorded[g] for g in names)


def open_writer(output, storage_options: Optional[dict] = None):
    """The writer of the store at ``output``: ``giblet.store.StoreWriter`` for a local folder,
    :class:`RemoteStoreWriter` for a URL (the same methods, another commit protocol)."""
    if is_url(output):
        return RemoteStoreWriter(output, storage_options)
    return StoreWriter(local_path(output))


# -- reading ----------------------------------------------------------------------------------
class RemoteManifestStore(WrapperStore):
    """A read-only zarr store over a remote store's root that resolves array names through the
    manifest (``fmri/mask/c/0/0/0`` -> ``attempts/<id>/fmri/mask/c/0/0/0``) and, like
    ``giblet.reader.ManifestStore``, refuses to invent data: a listed chunk that is missing
    raises, and with ``check`` every chunk read is checksummed.

    ``cache_dir``: keep every chunk read in this local folder (``<cache_dir>/<store hash>/
    <attempt path>``) and read it from there next time. Attempt prefixes are never rewritten
    once named by the manifest, so a cached file is valid for as long as the store names it;
    it is still checked against the manifest's checksum before it is served.
    """

    def __init__(self, store, *, paths: dict[str, str], expected: dict[str, str], check: bool = False,
                 label: str = "", cache_dir: Optional[Path] = None):
        super().__init__(store)
        self.paths, self.expected, self.check, self.label = paths, expected, check, label
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def _with_store(self, store):
        return type(self)(store, paths=self.paths, expected=self.expected, check=self.check, label=self.label,
                          cache_dir=self.cache_dir)

    def _physical(self, key: str) -> str:
        parts = key.split("/")
        for i in range(len(parts) - 1, 0, -1):
            path = self.paths.get("/".join(parts[:i]))
            if path is not None:
                return "/".join([path] + parts[i:])
        return key

    async def exists(self, key: str) -> bool:
        return await self._store.exists(self._physical(key))

    async def get(self, key, prototype=None, byte_range=None):
        digest, physical = self.expected.get(key), self._physical(key)
        cached = self.cache_dir / physical if self.cache_dir and digest and byte_range is None else None
        if cached is not None and cached.is_file():
            raw = await asyncio.to_thread(cached.read_bytes)
            if hash_bytes(raw) == digest:
                return prototype.buffer.from_bytes(raw)
        buf = await self._store.get(physical, prototype, byte_range)
        if digest is None:
            return buf
        if buf is None:
            raise StoreError(f"{self.label}: {key} ({physical}) is missing although the manifest lists it (deleted?); "
                             f"run `giblet-preprocess verify {self.label}` and rebuild the unit")
        if (self.check or cached is not None) and byte_range is None and hash_bytes(buf.to_bytes()) != digest:
            raise StoreError(f"{self.label}: {key} does not match its checksum (corrupted, or the store was rebuilt "
                             f"after this view was opened); reopen the store, or run `giblet-preprocess verify`")
        if cached is not None:
            await asyncio.to_thread(_write_cached, cached, buf.to_bytes())
        return buf


def _write_cached(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)  # several DataLoader workers may fill one cache: whole files only


def manifest_store(loc: RemoteLocation, arrays: dict[str, dict], expected: dict[str, str], check: bool,
                   cache_dir: Optional[str | os.PathLike] = None) -> RemoteManifestStore:
    """The zarr store ``giblet.open_store`` reads a remote store through (``arrays``: the
    manifest's array records by name)."""
    paths = {name: rec.get("path", name) for name, rec in arrays.items()}
    cache = Path(cache_dir) / loc.digest if cache_dir else None
    return RemoteManifestStore(loc.zarr_store(), paths=paths, expected=expected, check=check, label=loc.url,
                               cache_dir=cache)


# -- verify --------------------------------------------------------------------------------
def check_array(loc: RemoteLocation, name: str, rec: dict) -> list[str]:
    """``giblet.verify``'s file checks of one array, on object storage."""
    prefix = rec.get("path", name)
    files = set(loc.files(prefix))
    if GROUP_META not in files:
        return [f"{name}: listed in manifest.json but missing in the store ({loc.url_of(prefix)})"]
    meta = json.loads(loc.read_bytes(f"{prefix}/{GROUP_META}"))
    problems = []
    if meta.get("shape") != rec["shape"]:
        problems.append(f"{name}: shape {meta.get('shape')} != manifest {rec['shape']}")
    if meta.get("data_type") != rec["dtype"]:
        problems.append(f"{name}: dtype {meta.get('data_type')} != manifest {rec['dtype']}")
    problems += [f"{name}: file {rel} is missing" for rel in sorted(set(rec["checksums"]) - files)]
    problems += [f"{name}: unexpected file {rel} (not written by giblet)" for rel in sorted(files - set(rec["checksums"]))]
    listed = sorted(set(rec["checksums"]) & files)
    for i in range(0, len(listed), READ_BATCH):
        got = loc.cat([f"{prefix}/{rel}" for rel in listed[i:i + READ_BATCH]])
        for rel, raw in sorted(got.items()):
            rel = rel[len(prefix) + 1:]
            if hash_bytes(raw) != rec["checksums"][rel]:
                what = "metadata (zarr.json)" if rel == GROUP_META else f"chunk {rel}"
                problems.append(f"{name}: {what} checksum mismatch (changed in the store); rerun "
                                f"`giblet-preprocess run CONFIG --force --only {name.split('/')[0]}`")
    return problems


def group_digest(loc: RemoteLocation, group: str) -> Optional[str]:
    raw = loc.read_bytes(f"{group}/{GROUP_META}" if group else GROUP_META)
    return None if raw is None else hash_bytes(raw)
