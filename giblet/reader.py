"""``giblet.open_store``: a read-only view of a complete store (format 2: runs x subjects).

Only arrays listed in ``manifest.json`` are served, and only when the manifest is intact
(its digest matches) and its align record matches its units (a run killed between
committing a unit and aligning leaves the store "incomplete", never half-served). Each
run's stimulus is served trimmed to the run's ``n_trs``; each (subject, run) serves the
TRs its fMRI unit stored.

Every chunk read goes through a store that knows the manifest's checksums: a chunk the
manifest lists but the disk lacks is an error, never zeros; with
``open_store(path, verify="chunks")`` every chunk read is also checksummed.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import zarr
from zarr.storage import LocalStore

from giblet.errors import ModalityMissingError, StoreError
from giblet.features.pretrained.reading import FeatureReader
from giblet.fingerprint import hash_bytes
from giblet.location import is_remote, store_location
from giblet.manifest import (ALIGN_KEY, DERIVED_KEY, GROUP_META, MASK, TARGETS, VOXELS, VOXELS_TARGET, fmri_prefix,
                             is_target_unit, read_manifest, stimulus_prefix, target_prefix)
from giblet.normalize import ZScorer
from giblet.split import SPLITS, split_ranges

VERIFY_MODES = (None, "chunks")
STIMULUS_ARRAYS = {"video": "frames", "audio": "codes", "text": "embeddings"}


def open_store(path, verify: Optional[str] = None, *, storage_options: Optional[dict] = None,
               cache_dir: Optional[str | Path] = None) -> "StoreView":
    """Open a giblet store read-only. Raises ``StoreError`` if it is missing, incomplete or edited.

    Args:
        path: a local folder, or a URL (``s3://bucket/prefix/study.zarr``; any fsspec protocol).
        verify: ``None`` (default): a missing chunk is an error; ``"chunks"``: every chunk read
            is also checked against the manifest's checksum (slower; ``giblet-preprocess
            verify`` checks everything at once).
        storage_options: a URL's fsspec options (endpoint, credentials); default: the
            environment's (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Never stored.
        cache_dir: a URL's local chunk cache folder (default ``$GIBLET_CHUNK_CACHE``, else none):
            every chunk read is kept there and read from there next time (``giblet.objstore``).
    """
    return StoreView(path, verify=verify, storage_options=storage_options, cache_dir=cache_dir)


class ManifestStore(LocalStore):
    """A read-only ``LocalStore`` that refuses to invent data: a chunk the manifest lists but
    the disk lacks raises (zarr would serve the fill value), and with ``check`` every chunk
    read is compared with its checksum."""

    def __init__(self, root, *, read_only: bool = True, expected: Optional[dict] = None, check: bool = False):
        super().__init__(root, read_only=True)
        self.expected, self.check = expected or {}, check

    async def get(self, key, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        digest = self.expected.get(key)
        if digest is None:
            return buf
        if buf is None:
            raise StoreError(f"{self.root}: {key} is missing although the manifest lists it (deleted or moved); "
                             f"run `giblet-preprocess verify {self.root}` and rebuild the unit")
        if self.check and byte_range is None and hash_bytes(buf.to_bytes()) != digest:
            raise StoreError(f"{self.root}: {key} does not match its checksum (corrupted, or rewritten by a rebuild "
                             f"after this view was opened); reopen the store, or run `giblet-preprocess verify`")
        return buf


class StoreView(FeatureReader):
    """Read-only access to a study store (see ``docs/store.md`` for the schema)."""

    def __init__(self, path, verify: Optional[str] = None, *, storage_options: Optional[dict] = None,
                 cache_dir: Optional[str | Path] = None):
        self.path = store_location(path, storage_options)  # a Path, or a RemoteLocation (prints as its URL)
        if verify not in VERIFY_MODES:
            raise StoreError(f"open_store: verify={verify!r}; choose None or 'chunks'")
        if not (self.path.exists(GROUP_META) if is_remote(self.path) else (self.path / GROUP_META).is_file()):
            raise StoreError(f"{self.path}: not a giblet store (no zarr.json); build one with "
                             f"`giblet-preprocess run CONFIG`")
        manifest = read_manifest(self.path)
        if not manifest or ALIGN_KEY not in manifest:
            raise StoreError(f"{self.path}: store is incomplete (manifest.json has no align record); "
                             f"run `giblet-preprocess run CONFIG` to finish it")
        current = {k: e["fingerprint"] for k, e in manifest["units"].items()}
        if manifest[ALIGN_KEY].get("units") != current:
            raise StoreError(f"{self.path}: store is incomplete (units changed after the last align); "
                             f"run `giblet-preprocess run CONFIG` to finish it")
        self.manifest = manifest
        self.align: dict = manifest[ALIGN_KEY]
        self.generation = manifest.get("generation")
        self.verify = verify
        entries = list(manifest["units"].values()) + list(self._derived_fresh(manifest).values())
        expected = {f"{name}/{rel}": digest for e in entries
                    for name, rec in e["arrays"].items() for rel, digest in rec["checksums"].items()}
        self._root = zarr.open_group(self._manifest_store(entries, expected, verify == "chunks", cache_dir), mode="r",
                                     zarr_format=3)
        self.tr_s: float = float(self.align["tr_s"])
        self.runs: list[str] = list(self.align["run_order"])
        self.subjects: list[str] = list(self.align["subjects"])

    def _manifest_store(self, entries: list, expected: dict, check: bool, cache_dir):
        """The zarr store every read goes through: here, or on object storage (``giblet.objstore``)."""
        if not is_remote(self.path):
            return ManifestStore(self.path, expected=expected, check=check)
        from giblet.objstore import manifest_store

        arrays = {name: rec for e in entries for name, rec in e["arrays"].items()}
        return manifest_store(self.path, arrays, expected, check, cache_dir or os.environ.get("GIBLET_CHUNK_CACHE"))

    @property
    def storage_options(self) -> Optional[dict]:
        """The fsspec options the view was opened with (None: a local store, or the environment's)."""
        return (self.path.storage_options or None) if is_remote(self.path) else None

    @cached_property
    def attrs(self) -> dict:
        """The root group's ``giblet`` attributes (provenance: versions, config, fingerprints)."""
        return dict(self._root.attrs.get("giblet", {}))

    # -- generic -------------------------------------------------------------------------
    @staticmethod
    def _derived_fresh(manifest: dict) -> dict[str, dict]:
        """Derived results computed from this store as it is (their basis: its align record)."""
        basis = manifest[ALIGN_KEY].get("fingerprint")
        return {k: e for k, e in (manifest.get(DERIVED_KEY) or {}).items() if e.get("basis") == basis}

    def derived(self, name: str) -> Optional[dict]:
        """The manifest entry of a derived result (e.g. ``derived/noise_ceiling-val``) if it was
        computed from the store as it is now, else None (never computed, or stale)."""
        return self._derived_fresh(self.manifest).get(name)

    @cached_property
    def _arrays(self) -> dict[str, dict]:
        out = {}
        for entry in list(self.manifest["units"].values()) + list(self._derived_fresh(self.manifest).values()):
            out.update(entry.get("arrays", {}))
        return out

    def has(self, name: str) -> bool:
        """True if the store holds the array (e.g. ``"fmri/mask"``) or group (``"stimuli/run-1/video"``)."""
        return name in self._arrays or any(a.startswith(name.rstrip("/") + "/") for a in self._arrays)

    def array(self, name: str) -> zarr.Array:
        """The lazy Zarr array ``name`` (full stored length), if the manifest lists it."""
        if name not in self._arrays:
            raise ModalityMissingError(
                f"{self.path}: no array {name!r} in this store (it has: {', '.join(sorted(self._arrays)) or 'none'}); "
                f"add that input to the config and rerun")
        return self._root[name]

    def unit_meta(self, key: str) -> dict:
        return (self.manifest["units"].get(key) or {}).get("meta", {})

    # -- runs, subjects, TR counts, split ----------------------------------------------------
    def run(self, run: Optional[str] = None) -> str:
        """``run`` checked against the store's runs; ``None`` means the only run of a one-run store."""
        if run is None:
            if len(self.runs) == 1:
                return self.runs[0]
            raise ModalityMissingError(f"{self.path}: the store has {len(self.runs)} runs ({', '.join(self.runs)}); "
                                       f"name one, e.g. run={self.runs[0]!r}")
        if run not in self.runs:
            raise ModalityMissingError(f"{self.path}: no run {run!r}; runs: {', '.join(self.runs) or 'none'}")
        return run

    def subject_runs(self, subject: str) -> list[str]:
        """The runs ``subject`` has BOLD for (a subject may lack a run)."""
        self._check_subject(subject)
        return [r for r in self.runs if subject in self.align["runs"][r]["subjects"]]

    def has_run(self, subject: str, run: str) -> bool:
        return run in self.align["runs"] and subject in self.align["runs"][run]["subjects"]

    def n_trs(self, run: Optional[str] = None, subject: Optional[str] = None) -> int:
        """TRs of ``run``'s grid (its stimulus), or the TRs served for ``subject`` in it."""
        rec = self.align["runs"][self.run(run)]
        if subject is None:
            return int(rec["n_trs"])
        self._check_pair(subject, self.run(run))
        return int(rec["subjects"][subject])

    @property
    def split(self) -> dict[str, dict[str, tuple[int, int]]]:
        """``{split: {run: (start, stop)}}`` for ``train``, ``val``, ``test`` (runs without TRs in a
        split are left out): the store's record of ``giblet.split``."""
        plan = {r: v["split"] for r, v in self.align["runs"].items()}
        return {name: split_ranges(plan, name) for name in SPLITS}

    def split_trs(self, split: str, run: Optional[str] = None, subject: Optional[str] = None) -> tuple[int, int]:
        """``(start, stop)`` of ``split`` (or ``"all"``) in one run, cut to ``subject``'s served TRs."""
        run = self.run(run)
        plan = {run: self.align["runs"][run]["split"]}
        start, stop = split_ranges(plan, split).get(run, (0, 0))
        stop = min(stop, self.n_trs(run, subject)) if subject is not None else stop
        return start, max(start, stop)

    # -- fMRI ----------------------------------------------------------------------------
    def _check_subject(self, subject: str) -> None:
        if subject not in self.subjects:
            raise ModalityMissingError(f"{self.path}: no subject {subject!r}; subjects: "
                                       f"{', '.join(self.subjects) or 'none'}")

    def _check_pair(self, subject: str, run: str) -> None:
        self._check_subject(subject)
        if not self.has_run(subject, run):
            raise ModalityMissingError(f"{self.path}: subject {subject!r} has no run {run!r} (its runs: "
                                       f"{', '.join(self.subject_runs(subject)) or 'none'})")

    def _pair(self, subject: str, run) -> str:
        run = self.run(run)
        self._check_pair(subject, run)
        return fmri_prefix(subject, run)

    @property
    def mask(self) -> np.ndarray:
        """``(x, y, z) bool`` -- the mask shared by every subject and run."""
        return self.array(MASK)[...]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.array(MASK).attrs["affine"], dtype=np.float64)

    @property
    def voxels(self) -> np.ndarray:
        """``(voxel, 3) int32`` -- ijk index of each column of ``fmri(subject, run)``."""
        return self.array(VOXELS)[...]

    @property
    def n_voxels(self) -> int:
        return int(self.array(MASK).attrs["n_voxels"])

    def fmri(self, subject: str, run: Optional[str] = None, trs: Optional[slice] = None,
             target: Optional[str] = None) -> np.ndarray:
        """``(tr, voxel) float32`` z-scored BOLD of one (subject, run): the TRs it serves (rows of
        NaN at TRs ``censored(subject, run)`` marks). ``target``: a target set's id (``targets``)
        serves its ``(tr, parcel)`` or ``(tr, vertex)`` series instead (None or ``"voxels"``: the voxels)."""
        run, trs = _run_or_trs(run, trs)
        arr = self.array(f"{self._fmri_group(subject, run, target)}/bold")
        return arr[slice(None) if trs is None else trs]

    def censored(self, subject: str, run: Optional[str] = None) -> np.ndarray:
        """``(tr,) bool`` over the TRs ``fmri(subject, run)`` serves: True where ``fmri.confounds``
        censored the TR (scrubbing, non-steady-state volumes). ``bold`` is NaN there and its
        statistics leave it out; readers that score or train must skip it. All False without
        confounds (and in stores built before giblet recorded it)."""
        run = self.run(run)
        name = f"{self._pair(subject, run)}/censored"
        if name not in self._arrays:
            return np.zeros(self.n_trs(run, subject), dtype=bool)
        return self.array(name)[...]

    def fmri_stats(self, subject: str, run: Optional[str] = None,
                   target: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)``, each ``(voxel,) float32`` in raw scanner units (std 0: zero-variance),
        or ``(column,)`` of a target set (``target``)."""
        prefix = self._fmri_group(subject, run, target)
        return self.array(f"{prefix}/mean")[...], self.array(f"{prefix}/std")[...]

    def scaler(self, subject: str, run: Optional[str] = None, target: Optional[str] = None) -> ZScorer:
        """The fitted ``ZScorer`` that normalized this (subject, run) (use it to de-normalize)."""
        return ZScorer.from_stats(*self.fmri_stats(subject, run, target))

    def denormalize(self, subject: str, z, run: Optional[str] = None, target: Optional[str] = None):
        """Map z-scored values ``(..., voxel)`` (numpy or torch) back to raw scanner units
        (``(..., column)`` of a target set back to its cleaned signal)."""
        return self.scaler(subject, run, target).inverse_transform(z)

    # -- target sets (fmri.targets; docs/store.md, Targets) ----------------------------------------------
    @cached_property
    def targets(self) -> list[str]:
        """Ids of the target sets served beside the voxels, e.g. ``["parcels/schaefer",
        "surface/fsaverage5"]`` (``"voxels"`` itself is not listed)."""
        return sorted(e["meta"]["target"] for k, e in self.manifest["units"].items()
                      if is_target_unit(k) and k.count("/") == 2)

    def target(self, target: Optional[str]) -> Optional[str]:
        """``target`` checked against the store's sets; None for the voxels (None or ``"voxels"``)."""
        if target is None or target == VOXELS_TARGET:
            return None
        if target not in self.targets:
            raise ModalityMissingError(f"{self.path}: no target set {target!r}; it serves voxels"
                                       f"{''.join(', ' + t for t in self.targets)} -- add it to fmri.targets and rerun")
        return target

    def target_info(self, target: str) -> dict:
        """What a target set's columns are, to map values back to a brain: ``kind`` (parcels,
        spheres, surface), ``n_columns``, ``empty`` (labels dropped: no voxel in the mask; for
        the surface only ``n_empty``), the definition's ``arrays`` (``labels``, ``n_voxels``,
        ``atlas`` (x, y, z) or ``coords`` (parcel, 3) mm; ``vertex``) and their ``attrs``
        (``names``, ``networks``, ``radius_mm``, ``mesh``, ...)."""
        target = self.target(target)
        if target is None:
            raise ModalityMissingError(f"{self.path}: voxels are not a target set; use mask / voxels")
        meta = self.unit_meta(f"{TARGETS}/{target}")
        prefix = f"{TARGETS}/{target}/"
        names = sorted(a for a in self._arrays if a.startswith(prefix))
        arrays = {a[len(prefix):]: self.array(a)[...] for a in names}
        attrs = {k: v for a in names for k, v in self.array(a).attrs.items()}
        return {"target": target, "kind": meta.get("kind"), "n_columns": int(meta.get("n_targets", 0)),
                "empty": meta.get("empty"), "n_empty": meta.get("n_empty"), "arrays": arrays, "attrs": attrs}

    def n_columns(self, target: Optional[str] = None) -> int:
        """Columns of ``fmri(..., target=target)``: voxels, parcels or vertices."""
        target = self.target(target)
        return self.n_voxels if target is None else int(self.unit_meta(f"{TARGETS}/{target}")["n_targets"])

    def _fmri_group(self, subject: str, run, target: Optional[str]) -> str:
        prefix, target = self._pair(subject, run), self.target(target)
        return prefix if target is None else target_prefix(subject, self.run(run), target)

    # -- stimulus modalities -------------------------------------------------------------
    def stimulus_name(self, modality: str, run: Optional[str] = None, name: Optional[str] = None) -> str:
        """Store path of a run's stimulus array, e.g. ``stimuli/run-1/video/frames``."""
        return f"{stimulus_prefix(self.run(run), modality)}/{name or STIMULUS_ARRAYS[modality]}"

    def _series(self, modality: str, run, trs, name: Optional[str] = None) -> np.ndarray:
        run, trs = _run_or_trs(run, trs)
        run = self.run(run)
        n = self.n_trs(run)
        sel = slice(0, n) if trs is None else slice(*trs.indices(n))
        return self.array(self.stimulus_name(modality, run, name))[sel]

    def video(self, run: Optional[str] = None, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, frame, height, width, channel) uint8`` RGB frames of one run."""
        return self._series("video", run, trs)

    def video_padded(self, run: Optional[str] = None, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, frame) bool`` -- True where a frame slot repeats an earlier frame."""
        return self._series("video", run, trs, "padded")

    def audio_codes(self, run: Optional[str] = None, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, codebook, code_frame) int16`` EnCodec codes of one run."""
        return self._series("audio", run, trs)

    def text(self, run: Optional[str] = None, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, embedding) float32`` annotation embeddings as embedded (not z-scored)."""
        return self._series("text", run, trs)

    def has_text(self, run: Optional[str] = None, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr,) bool`` -- False where no annotation covers the TR."""
        return self._series("text", run, trs, "has_text")

    def has_modality(self, modality: str) -> bool:
        """Whether some run of the store has this stimulus modality (``video``, ``audio``, ``text``)."""
        return any(self.has(self.stimulus_name(modality, r)) for r in self.runs)

    def modality_runs(self, modality: str) -> list[str]:
        return [r for r in self.runs if self.has(self.stimulus_name(modality, r))]

    def _train_rows(self, modality: str, name: str) -> list[np.ndarray]:
        """Rows of one array over the training TRs of every run that has it (all TRs when the
        training split has none of them)."""
        train = self.split["train"]
        runs = self.modality_runs(modality)
        if not any(r in train for r in runs):
            train = {r: (0, self.n_trs(r)) for r in runs}
        return [self.array(self.stimulus_name(modality, r, name))[slice(*train[r])] for r in runs if r in train]

    @cached_property
    def _video_stats(self) -> tuple[np.ndarray, np.ndarray]:
        from giblet.features.video import pixel_stats

        rows = self._train_rows("video", "moments")
        per_tr = int(self.array(self.stimulus_name("video", self.modality_runs("video")[0], "moments"))
                     .attrs["pixels_per_tr"])
        return pixel_stats(np.concatenate(rows), per_tr)

    def video_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(mean, std)`` of [0, 1]-scaled pixels over the training TRs of every run
        (exact, from each TR's stored pixel moments; padded slots included)."""
        if not self.has_modality("video"):
            self.array(self.stimulus_name("video", self.runs[0]))  # the clear "no array" error
        return self._video_stats

    def video_float(self, run: Optional[str] = None, trs: Optional[slice] = None, zscore: bool = False) -> np.ndarray:
        """``(tr, frame, height, width, channel) float32``: pixels / 255, or z-scored per channel
        with ``video_stats()`` (``zscore=True``; a zero-std channel maps to 0)."""
        from giblet.features.video import to_float

        return to_float(self.video(run, trs), *(self.video_stats() if zscore else (None, None)))

    @cached_property
    def _text_stats(self) -> tuple[np.ndarray, np.ndarray]:
        from giblet.features.text import covered_stats

        emb = np.concatenate(self._train_rows("text", "embeddings"))
        has = np.concatenate(self._train_rows("text", "has_text"))
        return covered_stats(emb, has) if has.any() else covered_stats(emb, np.ones(len(emb), bool))

    def text_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension ``(mean, std)`` of the embeddings over the training TRs of every run that
        have text (ddof 0)."""
        if not self.has_modality("text"):
            self.array(self.stimulus_name("text", self.runs[0]))  # the clear "no array" error
        return self._text_stats

    # -- xarray --------------------------------------------------------------------------
    def to_xarray(self, run: Optional[str] = None, target: Optional[str] = None):
        """Lazy, dask-backed, named dims. One run (or ``run`` given): an ``xarray.Dataset`` with
        ``fmri`` ``(subject, tr, voxel)`` (NaN where a subject lacks the run or its TRs), its
        stats, ``fmri_censored`` ``(subject, tr)`` (``censored()``, False past a subject's
        served TRs), the mask and the run's stimulus arrays. Several runs and ``run=None``: an
        ``xarray.DataTree`` with one such Dataset per run. ``target``: ``fmri`` holds that set's
        ``(subject, tr, parcel | vertex)`` series, with its definition arrays as ``target_<name>``
        (``target_labels``, ``target_coords``, ``target_vertex``, ...) instead of the mask."""
        import xarray as xr

        target = self.target(target)
        if run is None and len(self.runs) > 1:
            return xr.DataTree.from_dict({f"/{r}": self.to_xarray(r, target) for r in self.runs})
        return self._run_dataset(self.run(run), target)

    def _run_dataset(self, run: str, target: Optional[str] = None):
        import dask.array as da
        import xarray as xr

        n = self.n_trs(run)
        subs = [s for s in self.subjects if self.has_run(s, run)]
        data_vars: dict = {}
        if subs:
            def prefix(s):
                return fmri_prefix(s, run) if target is None else target_prefix(s, run, target)

            def padded(s):
                x = da.from_zarr(self.array(f"{prefix(s)}/bold"))
                return da.pad(x, ((0, n - x.shape[0]), (0, 0)), constant_values=np.nan) if x.shape[0] < n else x

            col = tuple(self.array(f"{prefix(subs[0])}/bold").metadata.dimension_names)[1]  # voxel, parcel, vertex
            data_vars["fmri"] = (("subject", "tr", col), da.stack([padded(s) for s in subs]))
            for stat in ("mean", "std"):
                data_vars[f"fmri_{stat}"] = (("subject", col), da.stack(
                    [da.from_zarr(self.array(f"{prefix(s)}/{stat}")) for s in subs]))
            data_vars["served_trs"] = (("subject",), np.array([self.n_trs(run, s) for s in subs]))
            # True where fmri.confounds censored a served TR (bold NaN there); False past served_trs.
            data_vars["fmri_censored"] = (("subject", "tr"), np.stack(
                [np.pad(self.censored(s, run), (0, n - self.n_trs(run, s))) for s in subs]))
            if target is None:
                data_vars["mask"] = (("x", "y", "z"), self.mask)
                data_vars["voxels"] = (("voxel", "ijk"), self.voxels)
            for name in sorted(a for a in self._arrays if target and a.startswith(f"{TARGETS}/{target}/")):
                arr = self.array(name)
                data_vars[f"target_{name.rsplit('/', 1)[1]}"] = (tuple(arr.metadata.dimension_names), arr[...])
        prefix = f"{stimulus_prefix(run, '')}"
        for name in sorted(a for a in self._arrays if a.startswith(prefix)):
            arr = self.array(name)
            dims = tuple(arr.metadata.dimension_names)
            lazy = da.from_zarr(arr)
            var = name[len(prefix):].replace("/", "_")
            if name[len(prefix):].startswith("features/") and len(dims) == 2:  # widths differ between models
                dims = (dims[0], f"{var}_{dims[1]}")  # and layers: one dimension each
            data_vars[var] = (dims, lazy[:n] if dims[0] == "tr" else lazy)
        coords = {"tr": np.arange(n), "time_s": ("tr", np.arange(n) * self.tr_s)}
        if subs:
            coords["subject"] = subs
        return xr.Dataset(data_vars, coords=coords, attrs={"store": str(self.path), "run": run, "tr_s": self.tr_s,
                                                           "n_trs": n, "split": str(self.align["runs"][run]["split"]),
                                                           "target": target or VOXELS_TARGET})


def _run_or_trs(run, trs):
    """Accept today's positional ``fmri(subject, slice)`` on one-run stores (a slice where the run goes)."""
    if isinstance(run, slice) and trs is None:
        return None, run
    return run, trs
