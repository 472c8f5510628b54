"""Cache keys, in the style of huggingface/datasets ``fingerprint.py``.

A unit's fingerprint is ``hash(stage name, stage VERSION, non-default params,
input fingerprints)``. Only *non-default* parameters enter the hash, so adding a
new parameter with a default to a stage does not invalidate existing stores.

File fingerprints hash the file's *content* (so touching or copying a file does not
trigger work, and editing it always does), and are cached by ``(size, mtime_ns,
inode)`` so that a no-op rerun over gigabytes of NIfTI costs only ``stat`` calls.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

_HASH_BLOCK = 1 << 22


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 3.0 and 3 are the same parameter value
    return obj


def hash_obj(*parts: Any) -> str:
    """Stable 16-hex-digit hash of JSON-able values (dicts are key-sorted)."""
    text = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def non_default_params(params: Any) -> dict:
    """Fields of a params dataclass whose value differs from the field default -- except fields
    declared ``metadata={"fingerprint": False}`` (``giblet.config_loader.runtime``: how the work runs,
    not what it stores), the one rule every stage follows."""
    out = {}
    for f in dataclasses.fields(params):
        if not f.metadata.get("fingerprint", True):
            continue
        value = getattr(params, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        if _canonical(value) != _canonical(default):
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value  # JSON for the manifest
    return out


def unit_fingerprint(stage: str, version: int, params: dict, inputs: dict) -> str:
    """Fingerprint of one unit of work: stage name + VERSION + params + input fingerprints."""
    return hash_obj("stage", stage, version, params, inputs)


def hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def hash_file(path: str | os.PathLike) -> str:
    """Content hash of one file (blake2b, 8 bytes)."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def hash_tree(path: str | os.PathLike, file_hash=hash_file) -> str:
    """Content hash of a directory (relative names + contents), e.g. a model directory.

    ``file_hash`` hashes one file (``FileHashCache.fingerprint`` reuses cached hashes).
    """
    root = Path(path)
    h = hashlib.blake2b(digest_size=8)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(file_hash(p).encode())
    return h.hexdigest()


class FileHashCache:
    """Content hashes of input files, re-hashed only when ``stat`` changes.

    The cache lives in a JSON file inside the store (``.giblet/file-hashes.json``);
    it is an optimisation only: deleting it costs one re-hash of every input.
    """

    def __init__(self, cache_path: str | os.PathLike | None):
        self.cache_path = Path(cache_path) if cache_path else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._dirty = False
        if self.cache_path and self.cache_path.exists():
            try:
                self._entries = json.loads(self.cache_path.read_text())
            except (OSError, ValueError):
                self._entries = {}

    def fingerprint(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        if path.is_dir():  # each file's hash cached by its stat: a no-op rerun reads no weights
            return hash_tree(path, self.fingerprint)
        st = path.stat()
        key = str(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._lock:
            hit = self._entries.get(key)
            if hit and hit["stat"] == stamp:
                return hit["hash"]
        digest = hash_file(path)
        with self._lock:
            self._entries[key] = {"stat": stamp, "hash": digest}
            self._dirty = True
        return digest

    def save(self) -> None:
        if not (self.cache_path and self._dirty):
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._entries))
        os.replace(tmp, self.cache_path)
        self._dirty = False
