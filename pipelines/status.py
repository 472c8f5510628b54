"""``giblet-preprocess status``: each unit done, stale (and why) or missing."""
from __future__ import annotations

from giblet.config import StudyConfig
from giblet.store import ALIGN_KEY, is_target_unit, read_manifest
from pipelines.units import Unit


def why_stale(unit: Unit, entry: dict) -> str:
    """Which version, parameter or input changed between the store and the config."""
    reasons = []
    if entry.get("version") != unit.version:
        reasons.append(f"stage version {entry.get('version')} -> {unit.version}")
    old_p, new_p = entry.get("params", {}), unit.all_params
    for k in sorted(set(old_p) | set(new_p)):
        if old_p.get(k) != new_p.get(k):
            reasons.append(f"parameter {k}: {old_p.get(k, 'default')!r} -> {new_p.get(k, 'default')!r}")
    old_i, new_i = entry.get("inputs", {}), unit.inputs
    for k in sorted(set(old_i) | set(new_i)):
        if old_i.get(k) != new_i.get(k):
            reasons.append(f"input {k} changed" if k in old_i and k in new_i else f"input {k} added/removed")
    return "; ".join(reasons) or "fingerprint changed"


def status_lines(cfg: StudyConfig, units: list[Unit], only: list[str] | None = None) -> tuple[list[str], bool]:
    """Human-readable status lines and whether everything is done."""
    manifest = read_manifest(cfg.output_path) or {"units": {}}
    lines, all_done = [], True
    width = max([len(u.key) for u in units] + [5])
    for unit in units:
        entry = manifest["units"].get(unit.key)
        if not unit.ready:
            waits = ", ".join(d for d in unit.deps if d != "fmri/mask") or ", ".join(unit.deps)
            why = f"{unit.deps[-1]} is built: the set is computed from it" if is_target_unit(unit.key) \
                else f"{waits} is built: it sets the TRs served"
            state = ("missing" if entry is None else "stale?") + f" (decided once {why})"
        elif entry is None:
            state = "missing"
        elif entry.get("fingerprint") == unit.fingerprint:
            state = "done"
        else:
            state = f"stale ({why_stale(unit, entry)})"
        all_done &= state == "done"
        lines.append(f"{unit.key:<{width}}  {state}")
    planned = {u.key for u in units}
    for key in sorted(set(manifest["units"]) - planned):
        if only and manifest["units"][key].get("stage") not in only:
            continue
        lines.append(f"{key:<{width}}  extra (not in the config; removed by the next run)")
        all_done = False
    align = manifest.get(ALIGN_KEY)
    current = {k: e["fingerprint"] for k, e in manifest["units"].items()}
    if align and align.get("units") == current:
        runs = ", ".join(f"{r} {v['n_trs']} TRs ({len(v['subjects'])} subjects; "
                         + ", ".join(f"{k} {a}-{b}" for k, (a, b) in v["split"].items()) + ")"
                         for r, v in align["runs"].items())
        lines.append(f"{'align':<{width}}  done: {runs}")
    else:
        lines.append(f"{'align':<{width}}  missing")
        all_done = False
    return lines, all_done
