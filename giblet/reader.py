"""``giblet.open_store``: a read-only view of a complete store.

Only arrays listed in ``manifest.json`` are served, and only when the manifest's align
record matches its units (a run killed between committing a unit and aligning leaves the
store "incomplete", never half-served). Time series are served trimmed to the common
``n_trs``.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import zarr

from giblet.errors import ModalityMissingError, StoreError
from giblet.normalize import ZScorer
from giblet.store import ALIGN_KEY, read_manifest


def open_store(path: str | Path) -> "StoreView":
    """Open a giblet store read-only. Raises ``StoreError`` if it is missing or incomplete."""
    return StoreView(path)


class StoreView:
    """Read-only access to a study store (see ``docs/store.md`` for the schema)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
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
        self.align = manifest[ALIGN_KEY]
        self._root = zarr.open_group(str(self.path), mode="r")
        self.attrs: dict = dict(self._root.attrs.get("giblet", {}))
        self.n_trs: int = int(self.align["n_trs"])
        self.tr_s: float = float(self.attrs.get("tr_s", 0.0))
        self.split: dict = {k: tuple(v) for k, v in self.align["split"].items()}

    # -- generic -------------------------------------------------------------------------
    @cached_property
    def _arrays(self) -> dict[str, dict]:
        out = {}
        for entry in self.manifest["units"].values():
            out.update(entry.get("arrays", {}))
        return out

    def has(self, name: str) -> bool:
        """True if the store holds the array (e.g. ``"video/frames"``) or group (``"video"``)."""
        return name in self._arrays or any(a.startswith(name.rstrip("/") + "/") for a in self._arrays)

    def array(self, name: str) -> zarr.Array:
        """The lazy Zarr array ``name`` (full stored length), if the manifest lists it."""
        if name not in self._arrays:
            modality = name.split("/")[0]
            raise ModalityMissingError(
                f"{self.path}: no array {name!r} in this store (it has: {', '.join(sorted(self._arrays)) or 'none'}); "
                f"add inputs.{'movie' if modality in ('video', 'audio') else modality} to the config and rerun")
        return self._root[name]

    def _series(self, name: str, trs: Optional[slice]) -> np.ndarray:
        arr = self.array(name)
        sel = slice(0, self.n_trs) if trs is None else _clip(trs, self.n_trs)
        return arr[sel]

    def unit_meta(self, key: str) -> dict:
        return (self.manifest["units"].get(key) or {}).get("meta", {})

    # -- fMRI ----------------------------------------------------------------------------
    @property
    def subjects(self) -> list[str]:
        return sorted(k.split("/", 1)[1] for k in self.manifest["units"]
                      if k.startswith("fmri/") and k != "fmri/mask")

    def _subject(self, subject: str) -> str:
        if subject not in self.subjects:
            raise ModalityMissingError(f"{self.path}: no subject {subject!r}; subjects: {', '.join(self.subjects) or 'none'}")
        return f"fmri/{subject}"

    @property
    def mask(self) -> np.ndarray:
        """``(x, y, z) bool`` -- the mask shared by all subjects."""
        return self.array("fmri/mask")[...]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.array("fmri/mask").attrs["affine"], dtype=np.float64)

    @property
    def voxels(self) -> np.ndarray:
        """``(voxel, 3) int32`` -- ijk index of each column of ``fmri(subject)``."""
        return self.array("fmri/voxels")[...]

    @property
    def n_voxels(self) -> int:
        return int(self.array("fmri/mask").attrs["n_voxels"])

    def fmri(self, subject: str, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, voxel) float32`` z-scored BOLD of one subject, trimmed to ``n_trs``."""
        return self._series(f"{self._subject(subject)}/bold", trs)

    def fmri_stats(self, subject: str) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)``, each ``(voxel,) float32`` in raw scanner units (std 0: zero-variance)."""
        prefix = self._subject(subject)
        return self.array(f"{prefix}/mean")[...], self.array(f"{prefix}/std")[...]

    def scaler(self, subject: str) -> ZScorer:
        """The fitted ``ZScorer`` that normalized this subject (use it to de-normalize)."""
        return ZScorer.from_stats(*self.fmri_stats(subject))

    def denormalize(self, subject: str, z):
        """Map z-scored values ``(..., voxel)`` (numpy or torch) back to raw scanner units."""
        return self.scaler(subject).inverse_transform(z)

    # -- stimulus modalities -------------------------------------------------------------
    def video(self, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, frame, y, x, channel) uint8`` RGB frames."""
        return self._series("video/frames", trs)

    def video_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(mean, std)`` of [0, 1]-scaled pixels over the training TRs."""
        return self.array("video/mean")[...], self.array("video/std")[...]

    def video_float(self, trs: Optional[slice] = None, zscore: bool = False) -> np.ndarray:
        """``(tr, frame, y, x, channel) float32``: pixels / 255, or z-scored per channel
        with the saved ``video_stats()`` (``zscore=True``; a zero-std channel maps to 0)."""
        from giblet.features.video import to_float

        return to_float(self.video(trs), *(self.video_stats() if zscore else (None, None)))

    def audio_codes(self, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, codebook, code_frame) int16`` EnCodec codes."""
        return self._series("audio/codes", trs)

    def text(self, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, embedding) float32`` annotation embeddings as embedded (not z-scored)."""
        return self._series("text/embeddings", trs)

    def has_text(self, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr,) bool`` -- False where no annotation covers the TR."""
        return self._series("text/has_text", trs)

    def text_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.array("text/mean")[...], self.array("text/std")[...]

    # -- xarray --------------------------------------------------------------------------
    def to_xarray(self):
        """An ``xarray.Dataset`` of every array, lazily backed by dask, with named dims."""
        import dask.array as da
        import xarray as xr

        data_vars, n = {}, self.n_trs
        subs = self.subjects
        if subs:
            data_vars["fmri"] = (("subject", "tr", "voxel"),
                                 da.stack([da.from_zarr(self.array(f"fmri/{s}/bold"))[:n] for s in subs]))
            for stat in ("mean", "std"):
                data_vars[f"fmri_{stat}"] = (("subject", "voxel"),
                                             da.stack([da.from_zarr(self.array(f"fmri/{s}/{stat}")) for s in subs]))
            data_vars["mask"] = (("x", "y", "z"), self.mask)
            data_vars["voxels"] = (("voxel", "ijk"), self.voxels)
        for name in sorted(self._arrays):
            if name.startswith("fmri/"):
                continue
            arr = self.array(name)
            dims = tuple(arr.metadata.dimension_names)
            lazy = da.from_zarr(arr)
            if dims and dims[0] == "tr":
                lazy = lazy[:n]
            data_vars[name.replace("/", "_")] = (dims, lazy)
        coords = {"tr": np.arange(n), "time_s": ("tr", np.arange(n) * self.tr_s)}
        if subs:
            coords["subject"] = subs
        return xr.Dataset(data_vars, coords=coords, attrs={"store": str(self.path), "tr_s": self.tr_s,
                                                           "n_trs": n, "split": str(self.split)})


def _clip(s: slice, n: int) -> slice:
    start, stop, step = s.indices(n)
    return slice(start, stop, step)
