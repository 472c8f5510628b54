"""The store's names, paths and manifest format: what every writer and reader of a store shares.

A store is a Zarr v3 group whose ``manifest.json`` (written last) lists the complete units and
their arrays; this module holds that contract and nothing that writes arrays: the layout's
names (dimension names, ``fmri/<subject>/<run>``, ``stimuli/<run>/<modality>``, target sets),
the checks on every path read from a store, and how a manifest is read, checked, digested and
written. It is separate from :mod:`giblet.store` (the local writer: staging, commits, lock) so
that the remote writer (:mod:`giblet.objstore`), the readers (:mod:`giblet.reader`,
:mod:`giblet.verify`) and gc (:mod:`giblet.orphans`) share the format without the local
writer's machinery.

Every path giblet reads from a store (array names in the manifest, checksum entries) is
checked to be a relative name made of plain segments that resolves *inside* the store,
symlinks resolved, before anything is read, written or deleted (:func:`member`): an edited
manifest can never aim a delete at another folder. The manifest carries a digest of its own
content, so an edit made outside giblet is refused rather than served.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from giblet.errors import StoreError
from giblet.fingerprint import hash_bytes, hash_file

FORMAT = 2  # store format: 2 = runs x subjects (several runs per study); 1 = one run (giblet 0.1)
MANIFEST = "manifest.json"
META_DIR = ".giblet"
ALIGN_KEY = "align"
DERIVED_KEY = "derived"  # results computed from the store (noise ceilings): served while their basis holds
DERIVED = "derived"  # ... and the group their arrays live in
GROUP_META = "zarr.json"

# Dimension names are on-disk contract (xarray reads them).
TR, VOXEL, IJK, X, Y, Z = "tr", "voxel", "ijk", "x", "y", "z"
FRAME, HEIGHT, WIDTH, CHANNEL = "frame", "height", "width", "channel"
CODEBOOK, CODE_FRAME, EMBEDDING, MOMENT = "codebook", "code_frame", "embedding", "moment"
PARCEL, VERTEX, XYZ = "parcel", "vertex", "xyz"  # target sets (fmri.targets): columns, and coordinates in mm

# Store layout: fMRI per (subject, run), stimulus arrays per run (docs/store.md).
FMRI, STIMULI = "fmri", "stimuli"
MASK, VOXELS = "fmri/mask", "fmri/voxels"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def fmri_prefix(subject: str, run: str) -> str:
    """Group of one (subject, run): ``fmri/<subject>/<run>`` holding ``bold``, ``mean``, ``std``."""
    return f"{FMRI}/{subject}/{run}"


TARGETS = "targets"  # target definitions (targets/<target id>/...) and the target units' keys
VOXELS_TARGET = "voxels"  # the target id of the voxel columns themselves (always built)


def target_prefix(subject: str, run: str, target: str) -> str:
    """Group of one target set's series for one (subject, run): ``fmri/<subject>/<run>/<target id>``,
    e.g. ``fmri/sub-01/run-1/parcels/schaefer`` (``bold``, ``mean``, ``std``)."""
    return f"{fmri_prefix(subject, run)}/{target}"


def is_target_unit(key: str) -> bool:
    """Whether a unit key belongs to a target set (``targets/<id>`` or ``targets/<id>/<subject>[/<run>]``):
    those units serve no TRs of their own (they follow their voxel unit's)."""
    return key.startswith(f"{TARGETS}/")


def stimulus_prefix(run: str, modality: str) -> str:
    """Group of one run's stimulus modality, e.g. ``stimuli/run-1/video``."""
    return f"{STIMULI}/{run}/{modality}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- paths: never act on one giblet did not make -------------------------------------------------
def check_name(name: str, what: str = "array name") -> str:
    """``name`` if it is a relative store path of plain segments (``fmri/sub-01/run-1/bold``).

    Raises:
        StoreError: an absolute path, an empty or ``..`` segment, a hidden segment, or any
            character outside ``[A-Za-z0-9_.-]``.
    """
    parts = name.split("/") if isinstance(name, str) else [None]
    if not parts or not all(isinstance(p, str) and _SEGMENT.fullmatch(p) and p not in (".", "..") for p in parts):
        raise StoreError(f"{what} {name!r} is not a plain relative path inside the store (segments of letters, "
                         f"digits, '-', '_', '.'); the manifest was edited or corrupted: giblet touched nothing -- "
                         f"rebuild into a new output path")
    return name


def contained(store: str | os.PathLike, path: Path, what: str) -> Path:
    """``path`` if it resolves inside ``store`` (symlinks resolved), else a one-line ``StoreError``."""
    root, resolved = Path(store).resolve(), Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise StoreError(f"{path}: {what} resolves to {resolved}, outside the store {root} (a symbolic link?); "
                         f"giblet touched nothing -- remove the link or rebuild into a new output path")
    return Path(path)


def member(store: str | os.PathLike, name: str, what: str = "array name") -> Path:
    """The path of store member ``name``, checked to resolve inside ``store`` (symlinks resolved)."""
    return contained(store, Path(store) / check_name(name, what), f"{what} {name!r}")


# -- JSON -----------------------------------------------------------------------------------------
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


def manifest_digest(manifest: dict) -> str:
    """blake2b of the manifest's content (everything but ``digest`` itself), key-sorted JSON."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hash_bytes(json.dumps(body, sort_keys=True, separators=(",", ":"), default=_json_default).encode())


def read_manifest(store) -> dict | None:
    """The store's manifest (None if it has none), checked before anything uses it; ``store``:
    a local folder or a ``giblet.location.RemoteLocation``.

    Raises:
        StoreError: invalid JSON, another store format, a digest that does not match the
            content (edited outside giblet), or a path that is not a plain name inside the store.
    """
    from giblet.location import is_remote, store_location

    store = store_location(store)
    if is_remote(store):
        raw = store.read_bytes(MANIFEST)
        return None if raw is None else parse_manifest(raw, store.url_of(MANIFEST))
    path = Path(store) / MANIFEST
    if not path.exists():
        return None
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(raw: bytes, path) -> dict:
    """The manifest in ``raw`` (read from ``path``), checked as :func:`read_manifest` says."""
    fix = "delete the store folder (or choose a new output path) and rerun `giblet-preprocess run CONFIG`"
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: manifest is not valid JSON ({type(exc).__name__}: {exc}); {fix}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("units"), dict):
        raise StoreError(f"{path}: not a giblet manifest (no 'units' mapping); {fix}")
    fmt = manifest.get("format", manifest.get("schema_version"))
    if fmt != FORMAT:
        raise StoreError(f"{path}: store format {fmt!r}, this giblet reads format {FORMAT} (several runs per study); "
                         f"{fix} with this giblet")
    if manifest.get("digest") != manifest_digest(manifest):
        raise StoreError(f"{path}: manifest content does not match its digest (edited outside giblet?); giblet "
                         f"serves and touches nothing in it -- {fix}")
    _check_manifest_paths(manifest)
    return manifest


def _check_manifest_paths(manifest: dict) -> None:
    derived = manifest.get(DERIVED_KEY) or {}
    if not isinstance(derived, dict):
        raise StoreError("manifest.json: 'derived' is not a mapping; rebuild into a new output path")
    for key, entry in list(manifest["units"].items()) + list(derived.items()):
        check_name(key, "unit key")
        arrays = entry.get("arrays", {}) if isinstance(entry, dict) else None
        if not isinstance(arrays, dict):
            raise StoreError(f"manifest.json: unit {key!r} has no 'arrays' mapping; rebuild into a new output path")
        for name, rec in arrays.items():
            check_name(name)
            if isinstance(rec, dict) and "path" in rec:  # object storage: where the array's attempt put it
                check_name(rec["path"], f"location of {name}")
            for rel in (rec.get("checksums") or {}) if isinstance(rec, dict) else ():
                check_name(rel, f"chunk file of {name}")


def array_checksums(array_dir: Path) -> dict[str, str]:
    """blake2b of every file of one Zarr array directory, keyed by relative path."""
    out = {}
    for p in sorted(array_dir.rglob("*")):
        if p.is_file():
            out[p.relative_to(array_dir).as_posix()] = hash_file(p)
    return out


def group_names(arrays: Iterable[str]) -> list[str]:
    """Every group that holds one of ``arrays``, the root (``""``) included, parents first."""
    groups = {""}
    for name in arrays:
        parts = name.split("/")[:-1]
        groups.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(groups, key=lambda g: (g.count("/") + bool(g), g))


def group_meta_path(store: Path, group: str) -> Path:
    return (member(store, group, "group") if group else Path(store)) / GROUP_META
