"""The align step: every run's TR grid, what each (subject, run) serves, and the split.

Each run has its own grid (ragged: runs and subjects need not share a length). A run's
stimulus units each report their own TR count (``meta["n_trs"]``); the run's ``n_trs`` is
their minimum -- its stimulus arrays are stored full length and served ``[:n_trs]``, never
resampled in time. Each fMRI unit already serves the first ``min(its TRs, the run's)``
TRs of its file (bound when the stimulus was committed). The run's grid ends where the
last subject's served TRs end (a run without stimulus: its longest served fMRI run). The split comes from ``giblet.split``, the one
place it is computed.
"""
from __future__ import annotations

import platform

from giblet.config import StudyConfig, to_dict
from giblet.errors import StoreError
from giblet.fingerprint import hash_obj
from giblet.split import effective_val_fraction, plan_split
from giblet.store import FORMAT, is_target_unit, now_iso


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


def _voters(units: list, manifest: dict, only: list | None) -> dict[str, dict]:
    """The committed units that count: planned and built as planned, or (with ``--only``)
    stored units of the stages not run."""
    planned = {u.key: u for u in units}
    out = {}
    for key, entry in manifest["units"].items():
        unit = planned.get(key)
        if unit is None and not (only and entry.get("stage") not in only):
            continue
        if unit is not None and (not unit.ready or entry.get("fingerprint") != unit.fingerprint):
            continue  # not built: it does not vote
        out[key] = entry
    return out


def align_record(cfg: StudyConfig, units: list, manifest: dict, only: list | None = None) -> dict:
    """The ``align`` manifest record and the root ``attrs.giblet`` of the store.

    Raises:
        StoreError: an fMRI unit serves more TRs than its run's stimulus now covers (the
            stimulus was rebuilt shorter with ``--only``): rebuild the fMRI stage.
    """
    voters = _voters(units, manifest, only)
    runs: dict[str, dict] = {}
    for name in cfg.study_runs:
        stim = {k: int(e["meta"]["n_trs"]) for k, e in voters.items()
                if e.get("run") == name and e.get("stage") != "fmri" and (e.get("meta") or {}).get("n_trs") is not None}
        served = {}
        for key, e in voters.items():
            voxel_unit = e.get("stage") == "fmri" and not is_target_unit(key)  # a target set follows its voxels
            per_run = (e.get("meta") or {}).get("runs", {}) if voxel_unit else {}
            if name in per_run:
                served[key.split("/")[1]] = int(per_run[name]["n_trs"])
        if not stim and not served:
            continue
        covered = min(stim.values()) if stim else max(served.values())
        over = {s: m for s, m in served.items() if m > covered}
        n = min(covered, max(served.values())) if served else covered  # TRs with stimulus and some fMRI
        if over:
            raise StoreError(f"run {name}: fMRI of {', '.join(sorted(over))} serves {max(over.values())} TRs but the "
                             f"run's stimulus now covers {covered}; rebuild the fMRI stage (`giblet-preprocess run CONFIG`"
                             f" without --only, or with --only fmri)")
        order = [s for s in cfg.subjects if s in served]
        runs[name] = {"n_trs": n, "onset_s": cfg.study_runs[name].onset_s, "n_trs_by_unit": stim,
                      "subjects": {s: served[s] for s in order}}
    s = cfg.split
    held_out = [r for r in s.val_runs + s.test_runs if r in runs]
    split = plan_split({r: v["n_trs"] for r, v in runs.items()}, s.val_runs, s.test_runs, s.val_fraction)
    for r, v in runs.items():
        v["split"] = {k: list(rng) for k, rng in split[r].items()}
    rule = {"val_runs": list(s.val_runs), "test_runs": list(s.test_runs),
            "val_fraction": effective_val_fraction(s.val_fraction, held_out)}
    subjects = [x for x in cfg.subjects if any(x in v["subjects"] for v in runs.values())]
    fingerprints = {k: e["fingerprint"] for k, e in sorted(manifest["units"].items())}
    fp = hash_obj("align", FORMAT, cfg.tr_s, runs, rule, fingerprints)
    record = {"fingerprint": fp, "format": FORMAT, "tr_s": cfg.tr_s, "runs": runs, "run_order": list(runs),
              "subjects": subjects, "split_rule": rule, "units": fingerprints}
    attrs = {
        "format": FORMAT, "tr_s": cfg.tr_s, "runs": runs, "run_order": list(runs), "subjects": subjects,
        "split_rule": rule, "trim_rule": "per run: stimulus arrays stored full length, read as [:n_trs] (min over the "
        "run's stimulus units); fMRI stores exactly the TRs it serves; never resampled in time",
        "versions": _versions(), "config": to_dict(cfg), "fingerprints": fingerprints, "aligned": now_iso(),
    }
    return {"record": record, "attrs": attrs}
