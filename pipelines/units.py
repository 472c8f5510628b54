"""Units of work: what a stage plans, the engine runs and the manifest records.

A *stage* (fmri, video, audio, text; ``pipelines.stages``) turns the config into *units*:
the smallest pieces cached and committed on their own (``fmri/mask``,
``fmri/sub-01/run-1``, ``video/run-1``). A unit's fingerprint is
``hash(stage, VERSION, non-default params, input fingerprints)`` (``giblet.fingerprint``);
a unit whose fingerprint matches the manifest is skipped.

Some parameters are known only once other units are committed: an fMRI unit serves the
TRs its run's stimulus covers, which the audio stage learns by decoding. Such a unit has
a ``bind(manifest_units) -> params`` hook; the engine calls it when the unit's
dependencies are committed (at plan time when they already are), and the bound
parameters enter the fingerprint like any other.

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
    key: str  # also the manifest key, e.g. "fmri/sub-01/run-1"
    stage: str
    version: int
    params: dict  # non-default parameters in effect (recorded; enter the fingerprint)
    inputs: dict  # input name -> fingerprint (files, upstream units)
    make_tasks: Callable[["Unit", Path], list[Task]]
    arrays: list[str]  # array paths (relative to the store) this unit commits
    deps: list[str] = field(default_factory=list)  # unit keys committed before this one starts
    prepare: Optional[Callable[["Unit", Path], None]] = None
    finalize: Optional[Callable[["Unit", Path, dict], dict]] = None  # -> record kept in the manifest
    bind: Optional[Callable[[dict], dict]] = None  # manifest units -> params known once deps are committed
    label: str = ""  # human description for progress lines
    run: Optional[str] = None  # the run the unit belongs to (None: the whole study, e.g. the mask)
    n_tasks: int = 1  # how many tasks an unbound unit will have (the progress total is fixed up front)
    bound: Optional[dict] = None  # what bind returned
    max_workers: Optional[int] = None  # its tasks run on at most this many workers (each loads a big model)
    cleanup: Optional[Callable[[], None]] = None  # run on every worker once no unit of its stage is left
    device: Optional[str] = None  # a model stage's configured device (auto | cpu | cuda[:N]): cuda asks its
    #   tasks onto GPU workers (the Dask resource GPU, pipelines.placement); None: CPU work (fMRI, video)
    cells: int = 0  # single-threaded work its tasks do (fMRI: TRs x grid voxels); the in-process rule sums it
    slots: Optional[int] = None  # tasks of it that can run at once (set by the engine before its tasks are made)

    @property
    def ready(self) -> bool:
        """Whether every parameter is known (no bind hook, or it has run)."""
        return self.bind is None or self.bound is not None

    def bind_from(self, manifest_units: dict) -> None:
        if self.bind is not None:
            self.bound = self.bind(manifest_units)

    @property
    def all_params(self) -> dict:
        return {**self.params, **(self.bound or {})}

    @property
    def fingerprint(self) -> str:
        if not self.ready:
            raise RuntimeError(f"{self.key}: fingerprint asked before its dependencies are committed")
        return unit_fingerprint(self.stage, self.version, self.all_params, self.inputs)

    def tasks(self, staging: Path) -> list[Task]:
        return self.make_tasks(self, staging)

    def task_count(self) -> int:
        """Tasks the unit will run (before its staging folder exists, and before it is bound)."""
        return len(self.tasks(Path("."))) if self.ready else self.n_tasks

    def entry(self) -> dict:
        """The manifest record of this unit (before arrays and results are added)."""
        return {"stage": self.stage, "version": self.version, "fingerprint": self.fingerprint,
                "params": self.all_params, "inputs": self.inputs, "deps": self.deps, "run": self.run}


@dataclass
class PlanContext:
    cfg: StudyConfig
    store: Path
    files: FileHashCache
    manifest_units: dict = field(default_factory=dict)  # the store's committed units (for bind at plan time)

    def file_fp(self, path: Path) -> str:
        return self.files.fingerprint(path)


class Stage:
    """Base of a stage: ``plan`` returns its units (``upstream``: units planned so far, by key)."""

    name: str = ""
    version: int = 1

    def enabled(self, cfg: StudyConfig) -> bool:
        raise NotImplementedError

    def plan(self, ctx: PlanContext, upstream: dict[str, Unit]) -> list[Unit]:
        raise NotImplementedError
