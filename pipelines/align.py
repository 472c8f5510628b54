"""The align step: one TR grid for every modality, trimmed (never time-warped).

Every unit that produces a time series reports its own TR count (``meta["n_trs"]``);
the common ``n_trs`` is their minimum. Stored arrays keep their full length and readers
(``open_store``, ``GibletDataset``) serve ``[:n_trs]``, so adding a shorter subject changes
only this record, not other subjects' arrays. The train/val split is the first
``1 - val_fraction`` of the grid / the rest (contiguous, so val TRs never sit between
train TRs whose HRF tails overlap them).
"""
from __future__ import annotations

import platform

from giblet.config import StudyConfig, to_dict
from giblet.fingerprint import hash_obj
from giblet.store import SCHEMA_VERSION, now_iso


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("giblet", "numpy", "zarr", "dask", "nibabel", "nilearn", "torch", "transformers", "av",
                "opencv-python-headless"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def align_record(cfg: StudyConfig, units: list, manifest: dict, only: list | None = None) -> dict:
    """The ``align`` manifest record and the root ``attrs.giblet`` of the store.

    Units planned in this run vote with their TR count when built; with ``--only``, the
    stored units of the stages not run keep their vote from the manifest.
    """
    planned = {u.key: u for u in units}
    lengths = {}
    for key, entry in manifest["units"].items():
        unit = planned.get(key)
        if unit is None and not (only and entry.get("stage") not in only):
            continue
        if unit is not None and entry.get("fingerprint") != unit.fingerprint:
            continue  # not built: it does not vote
        n = (entry.get("meta") or {}).get("n_trs")
        if n is not None:
            lengths[key] = int(n)
    n_trs = min(lengths.values()) if lengths else 0
    n_val = int(round(cfg.split.val_fraction * n_trs))
    split = {"train": [0, n_trs - n_val], "val": [n_trs - n_val, n_trs]}
    fingerprints = {k: e["fingerprint"] for k, e in sorted(manifest["units"].items())}
    fp = hash_obj("align", SCHEMA_VERSION, cfg.tr_s, cfg.onset_s, split, lengths, fingerprints)
    record = {"fingerprint": fp, "n_trs": n_trs, "n_trs_by_unit": lengths, "split": split,
              "units": fingerprints}
    attrs = {
        "schema_version": SCHEMA_VERSION, "tr_s": cfg.tr_s, "onset_s": cfg.onset_s, "n_trs": n_trs,
        "n_trs_by_unit": lengths, "split": split, "trim_rule": "min over units; arrays stored full length, "
        "read as [:n_trs]; never resampled in time", "subjects": sorted(
            k.split("/", 1)[1] for k in manifest["units"] if k.startswith("fmri/") and k != "fmri/mask"),
        "versions": _versions(), "config": to_dict(cfg), "fingerprints": fingerprints, "aligned": now_iso(),
    }
    return {"record": record, "attrs": attrs}

