"""The built-in stages, in planning order, and the plan of a config.

Stimulus stages come first: an fMRI unit depends on its run's stimulus units (they decide
how many of its TRs are served). Pretrained features come last: nothing depends on them.
"""
from __future__ import annotations

from typing import Optional

from pipelines.audio_stage import AudioStage
from pipelines.features_stage import FeaturesStage
from pipelines.fmri_stage import FmriStage
from pipelines.text_stage import TextStage
from pipelines.units import PlanContext, Stage, Unit
from pipelines.video_stage import VideoStage

STAGES: tuple[Stage, ...] = (VideoStage(), AudioStage(), TextStage(), FmriStage(), FeaturesStage())
STAGE_NAMES = tuple(s.name for s in STAGES)


def build_plan(ctx: PlanContext, only: Optional[list[str]] = None) -> list[Unit]:
    """Every unit the config asks for (of the ``only`` stages, if given), dependencies first.

    Stages outside ``only`` are not planned at all, so a problem in one stage's config or
    inputs never blocks running another (``--only video`` with no audio model set).
    Units whose ``bind`` hook can run now (their dependencies are committed and not
    planned again) are bound here, so their fingerprints are known.
    """
    units: dict[str, Unit] = {}
    for stage in STAGES:
        if stage.enabled(ctx.cfg) and (not only or stage.name in only):
            for unit in stage.plan(ctx, units):
                units[unit.key] = unit
    current: dict[str, bool] = {}  # per dependency, asked once (an fmriprep mask hashes every run's mask)

    def dep_current(key: str) -> bool:
        if key not in current:
            current[key] = key not in units or is_current(units[key], ctx.manifest_units)
        return current[key]

    for unit in units.values():  # dependencies come first (and are bound before they are asked about)
        if unit.bind is not None and all(dep_current(d) for d in unit.deps):
            unit.bind_from(ctx.manifest_units)
    return list(units.values())


def is_current(unit: Unit, manifest_units: dict) -> bool:
    """Whether the store holds ``unit`` as planned (its parameters known and its fingerprint committed)."""
    return unit.ready and (manifest_units.get(unit.key) or {}).get("fingerprint") == unit.fingerprint
