"""Where a store lives: a local folder, or a prefix on object storage.

A local store is a ``pathlib.Path`` and keeps the POSIX protocol of ``giblet.store``
(staging folders renamed into place, the manifest replaced by rename). A store named by a
URL (``s3://bucket/prefix/study.zarr``; reading: any fsspec protocol, e.g. ``gs://``) is a
:class:`RemoteLocation`: the few object operations the object-store protocol
(``giblet.objstore``) needs, through an fsspec filesystem. ``file://`` URLs are local paths.

Credentials and the endpoint come from the environment the filesystem reads (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``,
instance roles) or from ``storage_options`` passed in Python; giblet never writes them into
a store, a manifest or a log (a location prints as its URL).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Optional

from giblet.errors import StoreError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CONDITIONAL_PROTOCOLS = ("s3", "s3a")  # conditional PUT (If-Match / If-None-Match): what a remote commit needs


def is_url(value: Any) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (which is a local path)."""
    m = _SCHEME.match(value) if isinstance(value, str) else None
    return bool(m) and m.group(1).lower() != "file"


def local_path(value: str | os.PathLike) -> Path:
    """A local path, ``file://`` URLs included."""
    text = os.fspath(value)
    return Path(text[len("file://"):] if text.lower().startswith("file://") else text)


def store_location(value, storage_options: Optional[dict] = None) -> "Path | RemoteLocation":
    """``value`` as a store location: a ``RemoteLocation`` for URLs, else a ``Path``."""
    if isinstance(value, RemoteLocation):
        return value
    if is_url(value):
        return RemoteLocation(value, storage_options)
    return local_path(value)


def is_remote(location: Any) -> bool:
    return isinstance(location, RemoteLocation)


class PreconditionFailed(StoreError):
    """A conditional PUT lost: the object changed since it was read (another writer)."""


class RemoteLocation:
    """A store prefix on object storage (``s3://bucket/prefix/study.zarr``) via fsspec.

    Relative keys (``manifest.json``, ``attempts/<id>/fmri/mask/zarr.json``) are joined to
    the prefix with ``/``. Instances pickle as their URL and options (DataLoader workers
    and Dask tasks open their own filesystem).
    """

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.protocol = _SCHEME.match(self.url).group(1).lower()
        self.storage_options = dict(storage_options or {})
        try:
            # listings are never cached: another process (a Dask worker, a gc) changes the prefix
            self.fs, self.root = url_to_fs(self.url, **{"use_listings_cache": False, **self.storage_options})
        except ImportError as exc:
            raise StoreError(f"{self.url}: reading {self.protocol}:// needs a filesystem package ({exc}); install "
                             f"giblet's `remote` extra (pip install 'giblet[remote]': s3fs) or the package fsspec "
                             f"names for {self.protocol}") from None
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemoteLocation({self.url!r})"  # never the options: they may hold credentials

    def __reduce__(self):
        return RemoteLocation, (self.url, self.storage_options)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def digest(self) -> str:
        """A short hash of the URL: a local cache folder name for this store."""
        return hashlib.blake2b(self.url.encode(), digest_size=8).hexdigest()

    def key(self, rel: str = "") -> str:
        """The object key of ``rel`` below the store; a name read from the manifest that would
        leave the store (absolute, ``..`` or empty segments) is refused before any
        read, write or delete -- the remote twin of ``giblet.manifest.contained``."""
        if not rel:
            return self.root
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or rel.startswith("/"):
            raise StoreError(f"{self.url}: {rel!r} is not a name inside the store (edited manifest?); "
                             f"rebuild into a new output")
        return f"{self.root}/{rel}"

    def url_of(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    # -- objects ---------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.isfile(self.key(rel))

    def read_bytes(self, rel: str) -> Optional[bytes]:
        try:
            return self.fs.cat_file(self.key(rel))
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.key(rel), data)

    def read_versioned(self, rel: str) -> tuple[Optional[bytes], Optional[str]]:
        """The object's bytes and its ETag, from one GET (None, None when absent)."""
        self._need_conditional(rel)
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.key(rel))

        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def put_if(self, rel: str, data: bytes, etag: Optional[str]) -> str:
        """PUT ``data`` only if the object still has ``etag`` (None: only if it does not exist);
        returns the new ETag. Raises ``PreconditionFailed`` when another writer got there first."""
        self._need_conditional(rel)
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.key(rel))
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            out = sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except Exception as exc:
            if _precondition_failed(exc):
                raise PreconditionFailed(f"{self.url_of(rel)}: changed by another writer") from None
            raise
        self.fs.invalidate_cache(self.key(rel))
        return out["ETag"]

    def _need_conditional(self, rel: str) -> None:
        if self.protocol not in CONDITIONAL_PROTOCOLS:
            raise StoreError(f"{self.url_of(rel)}: giblet writes stores on object storage through S3 conditional "
                             f"writes (If-Match), which {self.protocol}:// does not offer here; write to s3:// (AWS, "
                             f"MinIO, Ceph, R2: set AWS_ENDPOINT_URL) or a local folder -- reading works for any "
                             f"fsspec protocol")

    # -- prefixes ---------------------------------------------------------------------------
    def files(self, prefix: str) -> dict[str, dict]:
        """Every object under ``prefix/``, by path relative to it, with its listing details."""
        base = self.key(prefix).rstrip("/") + "/"
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(base):]: v for k, v in found.items() if k.startswith(base) and v.get("type") != "directory"}

    def children(self, prefix: str) -> list[str]:
        """Names one level below ``prefix/`` (objects and "folders")."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key(prefix), detail=False))
        except FileNotFoundError:
            return []

    def cat(self, rels: list[str]) -> dict[str, bytes]:
        """Several objects at once (concurrent GETs)."""
        if not rels:
            return {}
        got = self.fs.cat([self.key(r) for r in rels], on_error="omit")
        return {r: got[self.key(r)] for r in rels if self.key(r) in got}

    def remove(self, prefix: str) -> None:
        """Delete every object under ``prefix/`` (and ``prefix`` itself)."""
        base = self.key(prefix)
        keys = [base + "/" + rel for rel in self.files(prefix)]
        if self.fs.isfile(base):
            keys.append(base)
        if keys:
            self.fs.rm(keys)

    def zarr_store(self, prefix: str = "", read_only: bool = True):
        """A zarr ``FsspecStore`` rooted at ``prefix`` (an async filesystem of its own)."""
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url_of(prefix), storage_options=self.storage_options or None,
                                    read_only=read_only)


def _precondition_failed(exc: BaseException) -> bool:
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, FileExistsError):
            return True
        code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or "PreconditionFailed" in str(e or ""):
            return True
    return False
