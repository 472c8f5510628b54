"""Noise ceiling: leave-one-subject-out inter-subject correlation (ISC) per target, from the
store with Dask, cached in the store as a derived result.

For subject ``s`` and target ``v``: the Pearson r, over the split's TRs of every run ``s``
has (each run cut to the TRs ``s`` serves, concatenated over runs), between ``s``'s z-scored
BOLD and the mean of the *other* subjects' z-scored BOLD at the same TRs. A subject that
lacks the run or the TR is left out of that mean; a TR that no other subject has is left
out altogether (a subject alone in a run contributes nothing there), and so is a TR the
store marks censored for a subject (``view.censored``: NaN rows, like a TR it lacks). r is 0 where either
side has no variance over those TRs, NaN for a subject sharing fewer than 2 TRs of the
split with anyone (no ceiling can be measured). The targets are the voxels, or (``target=``)
the columns of a target set (``fmri.targets``: parcels, spheres, fsaverage5 vertices), whose
z-scored per-run series the store holds beside the voxels' (``view.fmri(..., target=...)``,
the same served TRs, NaN at the same censored ones): the same rule, column by column.

How: one pass over the fMRI. Each Dask task holds one stored chunk's TRs (``fmri.chunk_trs``,
all voxels, or the store's voxel chunks if it has any) of every subject of one run -- never
a subject's whole matrix -- and reduces it to six float64 sums per (subject, voxel): the
count, sum x, sum m, sum x^2, sum m^2, sum x m (x: the subject, m: the others' mean); the
sums are added over chunks and runs and turned into r at the end. The inputs are z-scores,
so the raw-moment formula loses nothing in float64. The scheduler is the caller's: an
active ``distributed.Client`` if there is one, else Dask's threads (``scheduler=``
overrides).

Cache: ``derived/noise_ceiling-<split>/isc`` ``(subject, voxel) float32`` with the manifest
entry ``{"basis": align fingerprint, "params": {"split", "version"}, "meta": {"subjects",
"runs", "n_trs"}}`` (``docs/store.md``, "Derived results"), committed under the store lock.
A target set has its own entry per split: ``derived/noise_ceiling-<split>-<kind>-<name>``
(the set's id with ``/`` as ``-``, e.g. ``noise_ceiling-val-parcels-schaefer``; a flat name,
so it never nests inside the voxels' group), array ``isc`` ``(subject, parcel | vertex)``,
``params`` ``{"split", "target", "version"}``.
A store whose align record changed (rebuilt units, another split) has no fresh entry, so
the next call computes it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from giblet.errors import ConfigError, StoreError
from giblet.manifest import ALIGN_KEY, DERIVED, VOXEL, VOXELS_TARGET, fmri_prefix, target_prefix
from giblet.store import StoreLock, StoreWriter, create_array

VERSION = 1  # of the definition and the computation; a change recomputes every cached ceiling
SUBJECT = "subject"  # dimension name (on-disk contract, as in StoreView.to_xarray)
ISC = "isc"
SPLITS = ("train", "val", "test", "all")
N_SUMS = 6  # count, x, m, x^2, m^2, x m


@dataclass
class NoiseCeiling:
    """A noise ceiling per (subject, target).

    Attributes:
        isc: ``(subject, target) float32`` leave-one-subject-out ISC (NaN rows: no shared TR).
        subjects: the row order (the store's subjects).
        n_trs: subject -> TRs its r is computed over.
        cached: True when read from the store rather than computed.
    """

    isc: np.ndarray
    subjects: list[str]
    n_trs: dict[str, int]
    cached: bool = False


def ceiling_name(split: str, target: Optional[str] = None) -> str:
    """The derived result's name: ``derived/noise_ceiling-<split>`` for the voxels (``target``
    None or ``"voxels"``), ``derived/noise_ceiling-<split>-<kind>-<name>`` for target set
    ``<kind>/<name>`` (kinds and splits hold no ``-``, so the name maps back to one set)."""
    if target is None or target == VOXELS_TARGET:
        return f"{DERIVED}/noise_ceiling-{split}"
    return f"{DERIVED}/noise_ceiling-{split}-{target.replace('/', '-')}"


def _bold(subject: str, run: str, target: Optional[str]) -> str:
    prefix = fmri_prefix(subject, run) if target is None else target_prefix(subject, run, target)
    return f"{prefix}/bold"


def run_stack(view, run: str, split: str, target: Optional[str] = None):
    """Every subject's z-scored BOLD over the split's TRs of one run, lazily.

    Args:
        view: the open store.
        run: a run of the store.
        split: ``train``, ``val``, ``test`` or ``all``.
        target: a target set's id (its ``(tr, parcel | vertex)`` series); None: the voxels.

    Returns:
        A dask array ``(subject, tr, column) float32`` -- rows in ``view.subjects`` order, NaN
        where a subject lacks the run or the TR, or the TR is censored -- chunked as the store's
        ``bold`` (one chunk along subjects), or None when no subject has a TR of the split in this run.
    """
    import dask.array as da

    span = view.split_trs(split, run)
    served = {s: view.split_trs(split, run, s)[1] for s in view.subjects if view.has_run(s, run)}
    if span[1] <= span[0] or all(stop <= span[0] for stop in served.values()):
        return None
    a, b = span
    rows, voxel_chunks, n_columns = [], None, view.n_columns(target)
    for s in view.subjects:
        stop = served.get(s, a)
        part = [da.from_zarr(view.array(_bold(s, run, target)))[a:stop]] if stop > a else []
        censored = view.censored(s, run)[a:stop] if stop > a else None
        if censored is not None and censored.any():  # stored as NaN already; said here, not assumed
            part = [da.where(censored[:, None], np.float32(np.nan), part[0])]
        voxel_chunks = voxel_chunks or (part[0].chunks[1] if part else None)
        rows.append((part, stop))
    layers = []
    for part, stop in rows:
        if stop < b:
            pad = da.full((b - stop, n_columns), np.nan, dtype=np.float32, chunks=(b - stop, voxel_chunks))
            part = part + [pad]
        layers.append(da.concatenate(part) if len(part) > 1 else part[0])
    return da.stack(layers).rechunk({0: -1})


def block_sums(block: np.ndarray) -> np.ndarray:
    """The six sums of one block of TRs.

    Args:
        block: ``(subject, tr, voxel)`` float32, rows of NaN where a subject has no TR.

    Returns:
        ``(subject, 1, 6, voxel) float64``: per subject, over the block's TRs it shares with
        at least one other subject: count, sum x, sum m, sum x^2, sum m^2, sum x m.
    """
    present = ~np.isnan(block[:, :, 0])  # a row is all-NaN or none: one voxel tells
    x = np.where(present[:, :, None], block, 0).astype(np.float64)
    count, total = present.sum(0), x.sum(0)
    out = np.zeros((block.shape[0], 1, N_SUMS, block.shape[2]))
    for s in range(block.shape[0]):
        use = present[s] & (count >= 2)
        if use.any():
            xs = x[s, use]
            m = (total[use] - xs) / (count[use] - 1)[:, None]
            out[s, 0] = [np.full(xs.shape[1], use.sum()), xs.sum(0), m.sum(0), (xs * xs).sum(0), (m * m).sum(0),
                         (xs * m).sum(0)]
    return out


def isc_from_sums(sums: np.ndarray) -> np.ndarray:
    """``(subject, 6, voxel)`` sums -> ``(subject, voxel) float32`` r (0: no variance, NaN: < 2 TRs)."""
    n, sx, sm, sxx, smm, sxm = (sums[:, i] for i in range(N_SUMS))
    safe = np.maximum(n, 1)
    cov, vx, vm = sxm - sx * sm / safe, sxx - sx * sx / safe, smm - sm * sm / safe
    live = (vx > 1e-9 * safe) & (vm > 1e-9 * safe)
    r = np.where(live, cov / np.sqrt(np.where(live, vx * vm, 1)), 0.0)
    return np.where(n >= 2, r, np.nan).astype(np.float32)


def loso_isc(view, split: str = "val", scheduler: Optional[str] = None,
             target: Optional[str] = None) -> tuple[np.ndarray, dict, dict]:
    """Compute the leave-one-subject-out ISC (see the module docstring); nothing is saved.

    Args:
        view: the open store.
        split: ``train``, ``val``, ``test`` or ``all``.
        scheduler: a Dask scheduler name (default: an active distributed Client, else threads).
        target: a target set's id (checked against the store's); None: the voxels.

    Returns:
        ``(isc, n_trs, runs)``: ``(subject, column) float32`` (voxels, or the set's columns),
        subject -> TRs used, and run -> subject -> ``[start, stop)`` of the split's TRs it serves there.
    """
    import dask

    _check(view, split)
    target = view.target(target)
    stacks = [s for run in view.runs if (s := run_stack(view, run, split, target)) is not None]
    if not stacks:
        raise StoreError(f"{view.path}: no subject serves a TR of split {split!r}; choose another split")
    per_run = [st.map_blocks(block_sums, new_axis=2, dtype=np.float64,
                             chunks=(st.chunks[0], (1,) * len(st.chunks[1]), (N_SUMS,), st.chunks[2])).sum(axis=1)
               for st in stacks]
    (sums,) = dask.compute(sum(per_run[1:], per_run[0]), scheduler=scheduler)
    n_trs = {s: int(sums[i, 0, 0]) for i, s in enumerate(view.subjects)}
    return isc_from_sums(sums), n_trs, spans(view, split)


def spans(view, split: str) -> dict[str, dict[str, list[int]]]:
    """run -> subject -> ``[start, stop)`` of the split's TRs the subject serves there (runs and
    subjects without any left out)."""
    out = {}
    for run in view.runs:
        found = {s: list(view.split_trs(split, run, s)) for s in view.subjects if view.has_run(s, run)}
        found = {s: v for s, v in found.items() if v[1] > v[0]}
        if found:
            out[run] = found
    return out


def _check(view, split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"noise ceiling: split {split!r} is not one of {', '.join(SPLITS)}")
    if len(view.subjects) < 2:
        raise StoreError(f"{view.path}: a noise ceiling needs >= 2 subjects with fMRI, the store has "
                         f"{len(view.subjects)} ({', '.join(view.subjects) or 'none'}); add subjects to the config")
    if split != "all" and not view.split[split]:
        raise StoreError(f"{view.path}: split {split!r} has no TR (split rule {view.align.get('split_rule')}); "
                         f"choose another split, or set split.val_fraction / split.val_runs / split.test_runs and "
                         f"rerun `giblet-preprocess run CONFIG` (the split rebuilds nothing)")


def noise_ceiling(store, split: str = "val", *, cache: bool = True, scheduler: Optional[str] = None,
                  target: Optional[str] = None) -> NoiseCeiling:
    """The store's noise ceiling for one split (and target set), from its cache when fresh.

    Args:
        store: a store path or an open ``StoreView``.
        split: ``train``, ``val``, ``test`` or ``all``.
        cache: read a fresh cached result and save a new one (False: compute, save nothing --
            e.g. for a read-only store).
        scheduler: see :func:`loso_isc`.
        target: a target set's id (``view.targets``, e.g. ``parcels/schaefer``); None or
            ``"voxels"``: the voxels. Each (split, target) is cached under its own name
            (:func:`ceiling_name`).

    Returns:
        :class:`NoiseCeiling` (``isc`` ``(subject, voxel | column) float32``).

    Raises:
        StoreError: fewer than 2 subjects, a split without TRs, a store changed while
            computing, or a store locked by a running build. ModalityMissingError (a
            ``StoreError``): a target set the store does not serve.
    """
    from giblet.location import is_remote
    from giblet.reader import StoreView, open_store

    view = store if isinstance(store, StoreView) else open_store(store)
    cache = cache and not is_remote(view.path)  # derived results are not cached on object storage (yet)
    target = view.target(target)  # None for the voxels, whose name and params stay as they always were
    name, params = ceiling_name(split, target), {"split": split, "version": VERSION}
    if target is not None:
        params = {"split": split, "target": target, "version": VERSION}
    entry = view.derived(name) if cache else None
    if entry and entry.get("params") == params:
        meta = entry["meta"]
        return NoiseCeiling(view.array(f"{name}/{ISC}")[...], list(meta["subjects"]), dict(meta["n_trs"]), True)
    isc, n_trs, runs = loso_isc(view, split, scheduler, target)
    if cache:
        meta = {"subjects": list(view.subjects), "runs": runs, "n_trs": n_trs}
        save_ceiling(view, name, {"basis": view.align["fingerprint"], "params": params, "meta": meta}, isc,
                     _column_dim(view, target))
    return NoiseCeiling(isc, list(view.subjects), n_trs, False)


def _column_dim(view, target: Optional[str]) -> str:
    """The columns' dimension name: ``voxel``, or the set's (``parcel``, ``vertex``) as its ``bold`` names it."""
    if target is None:
        return VOXEL
    first = next(s for s in view.subjects if view.subject_runs(s))
    return tuple(view.array(_bold(first, view.subject_runs(first)[0], target)).metadata.dimension_names)[1]


def save_ceiling(view, name: str, entry: dict, isc: np.ndarray, column: str = VOXEL) -> None:
    """Commit ``isc`` ``(subject, column)`` as derived result ``name`` under the store lock,
    unless the store was rebuilt since ``view`` was opened (then a ``StoreError``: rerun).
    ``column``: the columns' dimension name (``voxel``, ``parcel``, ``vertex``)."""
    from giblet.fingerprint import hash_obj

    with StoreLock(view.path):
        writer = StoreWriter(view.path)
        if (writer.manifest.get(ALIGN_KEY) or {}).get("fingerprint") != entry["basis"]:
            raise StoreError(f"{view.path}: the store was rebuilt while {name} was computed; its result would be "
                             f"stale -- rerun the evaluation")
        staging = writer.staging_dir(name, hash_obj(entry["basis"], entry["params"]))
        array = f"{name}/{ISC}"
        attrs = {"subjects": entry["meta"]["subjects"], "split": entry["params"]["split"],
                 "definition": "leave-one-subject-out ISC (docs/evaluation.md)"}
        if "target" in entry["params"]:  # the voxels' attrs stay as they always were
            attrs["target"] = entry["params"]["target"]
        out = create_array(staging, array, isc.shape, "float32", (1, isc.shape[1]), (SUBJECT, column), attrs=attrs,
                           fill_value=float("nan"))
        out[...] = isc
        writer.commit_derived(name, entry, staging, [array])
