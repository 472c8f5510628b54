"""Units of work and the stage registry.

A *stage* (fmri, video, audio, text) turns the config into *units*: the smallest pieces
that are cached and committed on their own (``fmri/mask``, ``fmri/sub-01``, ``video``).
A unit's fingerprint is ``hash(stage, VERSION, non-default params, input fingerprints)``
(see ``giblet.fingerprint``); a unit whose fingerprint matches the manifest is skipped.

A unit runs as: ``prepare(staging)`` on the driver (create staged arrays), its ``tasks``
on Dask workers in parallel (each writes whole chunks), ``finalize(staging, results)`` on
the driver (small arrays, the record kept in the manifest), then the engine commits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from giblet.config import StudyConfig
from giblet.fingerprint import FileHashCache, unit_fingerprint


@dataclass
class Task:
    """One Dask task: ``fn(**kwargs)`` on a worker; returns a JSON-able dict."""

    id: str
    fn: Callable[..., dict]
    kwargs: dict


@dataclass
class Unit:
    key: str  # also the manifest key, e.g. "fmri/sub-01"
    stage: str
    version: int
    params: dict  # non-default parameters in effect (recorded; enter the fingerprint)
    inputs: dict  # input name -> fingerprint (files, upstream units)
    make_tasks: Callable[[Path], list[Task]]
    arrays: list[str]  # array paths (relative to the store) this unit commits
    deps: list[str] = field(default_factory=list)  # unit keys committed before this one starts
    prepare: Optional[Callable[[Path], None]] = None
    finalize: Optional[Callable[[Path, dict], dict]] = None  # -> record kept in the manifest
    label: str = ""  # human description for progress lines

    @property
    def fingerprint(self) -> str:
        return unit_fingerprint(self.stage, self.version, self.params, self.inputs)

    def entry(self) -> dict:
        """The manifest record of this unit (before arrays and results are added)."""
        return {"stage": self.stage, "version": self.version, "fingerprint": self.fingerprint,
                "params": self.params, "inputs": self.inputs, "deps": self.deps}


@dataclass
class PlanContext:
    cfg: StudyConfig
    store: Path
    files: FileHashCache

    def file_fp(self, path: Path) -> str:
        return self.files.fingerprint(path)


class Stage:
    """Base of a stage: ``plan`` returns its units; ``verify`` checks a committed store."""

    name: str = ""
    version: int = 1

    def enabled(self, cfg: StudyConfig) -> bool:
        raise NotImplementedError

    def plan(self, ctx: PlanContext, upstream: dict[str, Unit]) -> list[Unit]:
        raise NotImplementedError


_STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    _STAGES[stage.name] = stage
    return stage


def stages() -> dict[str, Stage]:
    """Registered stages in execution order (importing pipelines.stages registers them)."""
    import pipelines.stages  # noqa: F401  (registers the built-in stages)

    return dict(_STAGES)


def build_plan(ctx: PlanContext, only: Optional[list[str]] = None) -> list[Unit]:
    """Every unit the config asks for (of the ``only`` stages, if given), dependencies first.

    Stages outside ``only`` are not planned at all, so a problem in one stage's config or
    inputs never blocks running another (``--only video`` with no audio model set).
    """
    units: dict[str, Unit] = {}
    for stage in stages().values():
        if stage.enabled(ctx.cfg) and (not only or stage.name in only):
            for unit in stage.plan(ctx, units):
                units[unit.key] = unit
    return list(units.values())
