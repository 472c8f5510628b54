"""Target-set units of the fMRI stage (``fmri.targets``): a definition unit per set, then one
series unit per voxel unit.

- ``targets/<id>`` (e.g. ``targets/parcels/schaefer``): the set on the study's mask and grid
  (``giblet.features.targets``); keyed by the mask unit's fingerprint, the target's settings
  and its files' content (the labels image and table, a coordinate CSV; for nilearn's
  bundled tables and meshes, nilearn's version).
- ``targets/<id>/<subject>/<run>`` (``targets/<id>/<subject>`` with ``fmri.zscore=subject``):
  the set's series (``giblet.features.target_series``), computed from what the voxel unit of
  the same (subject, run) committed; its key binds that unit's fingerprint once it is
  committed, so rebuilding the voxels rebuilds the set, and changing an atlas rebuilds only
  that set's units (the voxel units never see ``fmri.targets``).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from giblet.config import target_id
from giblet.features import target_series as series
from giblet.features import targets
from giblet.fingerprint import non_default_params
from giblet.store import TARGETS
from pipelines.units import PlanContext, Task, Unit

FILE_FIELDS = ("labels", "labels_table", "coords")  # keyed by content, not by the path written
SERIES_PARAMS = ("zero_variance", "zscore", "chunk_trs")  # fmri.* settings a series unit follows


def plan_targets(ctx: PlanContext, groups: dict[str, list[tuple[str, str]]], voxel_units: dict[str, Unit],
                 mask: Unit, mask_fp: str, ref_img, bold_paths: list[Path]) -> list[Unit]:
    """The units of every ``fmri.targets`` entry (``groups``: voxel unit key -> its (subject, run)
    pairs; checks that need only headers run here, before any compute)."""
    units = []
    for i, t in enumerate(ctx.cfg.fmri.targets):
        tid = target_id(t)
        where = f"fmri.targets[{i}] ({tid})"
        spec = {**asdict(t), "id": tid}
        for key in FILE_FIELDS:
            if spec[key] and not (key == "coords" and spec[key] in targets.COORD_TABLES):
                spec[key] = str(ctx.cfg.input_path(spec[key]))
        _check(spec, where, ref_img, bold_paths)
        definition = _definition_unit(ctx, t, spec, mask, mask_fp)
        units.append(definition)
        for key, members in groups.items():
            units.append(_series_unit(ctx, spec, definition, voxel_units[key], members))
    return units


def _check(spec: dict, where: str, ref_img, bold_paths: list[Path]) -> None:
    if spec["kind"] == "parcels":
        targets.check_labels_header(Path(spec["labels"]), where)
        if spec["labels_table"]:
            targets.read_table(Path(spec["labels_table"]), where, ("index", "name"))
        return
    if spec["kind"] == "spheres" and spec["coords"] not in targets.COORD_TABLES:
        targets.coordinate_table(spec["coords"], Path(spec["coords"]), where)
    if not spec["assume_mni"]:
        targets.check_mni(ref_img, bold_paths, where)


def _definition_unit(ctx: PlanContext, t, spec: dict, mask: Unit, mask_fp: str) -> Unit:
    import nilearn

    params = {k: v for k, v in non_default_params(t).items() if k not in FILE_FIELDS}
    inputs = {"mask": mask_fp}
    for key in FILE_FIELDS:
        if spec[key] and spec[key] in targets.COORD_TABLES:
            params["coords"] = spec[key]
            inputs["coords"] = f"nilearn {nilearn.__version__}"  # the bundled table
        elif spec[key]:
            inputs[key] = ctx.file_fp(Path(spec[key]))
    if spec["kind"] == "surface":
        inputs["mesh"] = f"nilearn {nilearn.__version__}"  # the bundled meshes and vol_to_surf
    key = f"{TARGETS}/{spec['id']}"

    def tasks(unit: Unit, staging: Path) -> list[Task]:
        return [Task("definition", targets.build_definition,
                     dict(staging=str(staging), store_path=str(ctx.store), spec=spec))]

    return Unit(key, "fmri", targets.VERSION, params, inputs, tasks,
                targets.definition_arrays(spec["kind"], spec["id"]), deps=[mask.key], label=f"target {spec['id']}")


def _series_unit(ctx: PlanContext, spec: dict, definition: Unit, voxels: Unit, members: list) -> Unit:
    p = ctx.cfg.fmri
    subject, runs = members[0][0], [r for _, r in members]
    key = f"{TARGETS}/{spec['id']}/{voxels.key.split('/', 1)[1]}"  # targets/<id>/<subject>[/<run>]
    params = {k: v for k, v in non_default_params(p).items() if k in SERIES_PARAMS}

    def bind(manifest_units: dict) -> dict:
        """The committed voxel unit this series is computed from."""
        return {"voxel_unit": manifest_units[voxels.key]["fingerprint"]}

    def tasks(unit: Unit, staging: Path) -> list[Task]:
        return [Task(subject, series.build_series, dict(
            staging=str(staging), store_path=str(ctx.store), spec=spec, subject=subject, runs=runs, zscore=p.zscore,
            zero_variance=p.zero_variance, chunk_trs=p.chunk_trs, block_trs=spec["block_trs"]))]

    arrays = [a for r in runs for a in targets.series_names(subject, r, spec["id"]).values()]
    return Unit(key, "fmri", targets.VERSION, params, {"definition": definition.fingerprint}, tasks, arrays,
                deps=[definition.key, voxels.key], bind=bind, label=f"target {spec['id']} {key.split('/', 3)[3]}",
                run=voxels.run)

