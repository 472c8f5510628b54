"""The Dask engine: plan units, skip cached ones, run the rest on a cluster, commit, align.

Units run as soon as their dependencies are committed (an fMRI unit after the mask and its
run's stimulus units, which decide how many of its TRs are served; ``pipelines.units``). Each finished task leaves a marker in its unit's
staging folder, so a killed run resumes at task granularity; each finished unit is
committed (arrays moved in, manifest updated) on the driver, one at a time.

A failure is reported by where it happened (``pipelines.failures``: cluster start, a task's
input read, compute or chunk write, the commit, the scheduler) and why (disk, permissions,
a slow machine, a dead worker); a failure to close the cluster after the last commit is a
warning, not an error.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from giblet import inputs
from giblet.config import StudyConfig
from giblet.errors import ConfigError, GibletError, StoreError
from giblet.fingerprint import FileHashCache
from giblet.objstore import open_writer
from giblet.store import ALIGN_KEY
from pipelines.align import align_record
from pipelines.cluster import Cluster
from pipelines.failures import describe, phase, task_failure
from pipelines.placement import Placement
from pipelines.progress import Progress
from pipelines.stages import STAGE_NAMES, build_plan, is_current
from pipelines.units import PlanContext, Unit


@dataclass
class RunReport:
    store: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stages: dict[str, dict] = field(default_factory=dict)  # per stage: units, tasks, wall_s, task_s, workers

    def as_dict(self) -> dict:
        return {"store": str(self.store), "ran": self.ran, "skipped": self.skipped, "removed": self.removed,
                "seconds": self.seconds, "stages": self.stages}

    def stage_lines(self) -> list[str]:
        return [f"  {name}: {st['units']} unit(s), {st['tasks']} task(s), {st['wall_s']:.1f} s wall "
                f"(first task to last commit), {st['task_s']:.1f} s of task time on {len(st['workers'])} worker(s)"
                for name, st in self.stages.items()]


def plan_for(cfg: StudyConfig, only: Optional[list[str]] = None) -> tuple[PlanContext, list[Unit]]:
    if only:
        bad = [s for s in only if s not in STAGE_NAMES]
        if bad:
            raise ConfigError(f"--only {' '.join(bad)}: unknown stage; choose from {', '.join(STAGE_NAMES)}")
    store = cfg.output_path
    writer = open_writer(store)  # reads the manifest: an edited one is refused before any work
    files = FileHashCache(writer.hash_cache_path if writer.exists() else None)
    ctx = PlanContext(cfg=cfg, store=store, files=files, manifest_units=writer.manifest["units"])
    return ctx, build_plan(ctx, only)


def run(cfg: StudyConfig, *, only: Optional[list[str]] = None, force: bool = False,
        scheduler: Optional[str] = None, workers: Optional[int] = None,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr), progress: bool = True,
        security=None) -> RunReport:
    """Build or update the store described by ``cfg``; returns what ran and what was skipped.

    ``scheduler``: an existing Dask scheduler (``tcp://`` or ``tls://``; ``security``: its
    ``distributed.Security``), else a LocalCluster of ``workers`` processes is started;
    ``workers=0``: in-process; None: in-process when the build is small
    (``pipelines.cluster``, the in-process rule)."""
    t_start = time.perf_counter()
    try:
        ctx, units = plan_for(cfg, only)
        _require_units(cfg, units, only)
        report = RunReport(store=ctx.store)
        # Driver-side writes outside a unit (store creation, lock, manifest, align): a disk
        # error names the store; a timeout is never blamed on the disk (pipelines.failures).
        with phase(f"{ctx.store}: writing the store", ctx.store, catch=(OSError,)):
            cluster = Cluster(scheduler, workers, security, log,
                              gpus=any(u.device not in (None, "cpu") for u in units))
            _run_locked(cfg, ctx, units, report, only, force, cluster, log, progress)
    finally:
        inputs.cleanup()  # local copies of inputs given by URL
    report.seconds = time.perf_counter() - t_start
    return report


def _require_units(cfg: StudyConfig, units: list[Unit], only: Optional[list[str]]) -> None:
    """Refuse a plan with nothing in it, before the output folder is created (a config with no
    input at all is already refused when loaded)."""
    if units:
        return
    where = cfg.config_path or "config"
    keys = ", ".join(f"runs.<run>.{f.name}" for f in fields(cfg.inputs))
    if only:
        raise ConfigError(f"{where}: --only {' '.join(only)}: the config has no inputs for these stages "
                          f"({keys}); add them, or drop --only")
    raise ConfigError(f"{where}: no inputs to build ({keys} are all empty); add at least one, e.g. "
                      f"`inputs: {{fmri: {{sub-01: bold/sub-01.nii.gz}}}}`")


def _run_locked(cfg, ctx, units, report, only, force, cluster, log, progress) -> None:
    writer = open_writer(ctx.store)  # a local folder, or object storage (giblet.objstore): same steps
    writer.create()
    with writer.lock():
        ctx.files.cache_path = writer.hash_cache_path
        ctx.files.save()
        # A unit whose parameters wait on its dependencies (bind) is decided when they are committed.
        todo = [u for u in units if force or not u.ready or not is_current(u, writer.manifest["units"])]
        report.skipped = [u.key for u in units if u not in todo]
        planned_keys = {u.key for u in units}
        stale_keys = [k for k, e in writer.manifest["units"].items()
                      if k not in planned_keys and (not only or e.get("stage") in only)]
        for key in stale_keys:
            writer.remove_unit(key)
            log(f"{key}: removed (no longer in the config)")
        report.removed = stale_keys
        if todo:
            log(f"{len(todo)} unit(s) to build, {len(report.skipped)} up to date")
            report.stages, current = _execute(todo, writer, cluster, log, progress, force)
            report.ran = [u.key for u in todo if u.key not in current]
            report.skipped += current
        align = align_record(cfg, units, writer.manifest, only)
        if (writer.manifest.get(ALIGN_KEY, {}).get("fingerprint") != align["record"]["fingerprint"]
                or not writer.groups_intact()):  # a group's zarr.json missing or edited: write them again
            writer.write_align(align["record"], align["attrs"])
        if not todo:
            log(f"all {len(report.skipped)} unit(s) up to date" + (" (stages: " + ", ".join(only) + ")" if only else ""))


def _execute(todo: list[Unit], writer, cluster: Cluster, log, progress,
             force: bool = False) -> tuple[dict[str, dict], list[str]]:
    """Run the units' tasks on the cluster, committing each unit when its tasks are done.

    Returns per-stage timings (from the scheduler's task stream: worker-side compute times)
    and the units found up to date once their dependencies were committed (bind).

    The cluster is closed before returning. A failure to close it once every unit is
    committed is a warning: the store is complete, and a rerun would find nothing to do."""
    # Every task is counted before the first one starts, so the progress total never moves.
    bar = Progress(len(todo), sum(u.task_count() for u in todo), enabled=progress)
    cluster.choose(sum(u.cells for u in todo))
    try:
        client = cluster.start()
        try:
            stages, current = _run_units(todo, writer, client, bar, log, force, cluster.describe())
        finally:
            bar.close()
    except BaseException:
        cluster.close()  # the first failure is the one to report
        raise
    if inputs.FETCHED:
        try:
            client.run(inputs.cleanup)  # the workers' copies of inputs given by URL
        except Exception as exc:  # scratch hygiene only
            log(f"warning: removing the workers' copies of remote inputs failed ({describe(exc)})")
    problem = cluster.close()
    if problem is not None:
        log(f"warning: closing the Dask cluster failed ({describe(problem)}) after every unit was committed; "
            f"the store is complete, nothing to redo")
    return stages, current


POOL_CHECK_S = 20.0  # how often a pinned stage (audio.workers; CPU work on a mixed cluster) checks its workers


def _run_units(todo: list[Unit], writer, client, bar: Progress, log,
               force: bool, where: str = "the Dask cluster") -> tuple[dict[str, dict], list[str]]:
    from distributed import as_completed, get_task_stream

    # GPU units request the GPU resource, CPU units stay off GPU workers (pipelines.placement);
    # a unit that needs a GPU worker on a cluster without one fails here, before any submission.
    workers = client.scheduler_info()["workers"]
    placement = Placement(workers)
    placement.check(todo, workers, where)

    pending = {u.key: u for u in todo}
    current: list[str] = []  # found up to date once bound
    waiting_on = {u.key: [d for d in u.deps if d in pending] for u in todo}
    started: dict[str, dict] = {}  # unit key -> {"staging", "left": set(task ids), "results", "t0", "t1"}
    futures = as_completed()
    owner = {}  # dask key -> (unit key, task id)
    pools: dict[str, list[str]] = {}  # stage -> the workers its pinned units run on (pipelines.placement)
    pool_unit: dict[str, Unit] = {}  # stage -> a unit of it (what its pool is chosen for)
    submitted, superseded = {}, set()  # future -> its task; keys of futures cancelled by repool()
    try:
        def start_ready() -> None:
            while ready := [k for k, deps in waiting_on.items() if not deps and k not in started]:
                start(ready[0])

        def start(key: str) -> None:
            unit = pending[key]
            if unit.bind is not None:  # its dependencies are committed now: its last parameters are known
                unit.bind_from(writer.manifest["units"])
                if not force and is_current(unit, writer.manifest["units"]):
                    current.append(key)
                    started[key] = {"t0": time.time(), "skipped": True}
                    bar.task_done(unit.task_count(), resumed=True)
                    bar.unit_done()
                    bar.log(log, f"{key}: up to date")
                    release(key)
                    return
            unit.slots = task_slots(client.scheduler_info()["workers"], unit.max_workers)
            with phase(f"{key}: preparing its staging folder in {writer.path}", writer.path):
                staging, results, tasks = _open_staging(writer, unit)
            todo_tasks = [t for t in tasks if t.id not in results]
            started[key] = {"staging": staging, "results": results, "left": {t.id for t in todo_tasks},
                            "t0": time.time()}  # wall clock: comparable with the workers' task stream
            bar.task_done(len(tasks) - len(todo_tasks), resumed=True)
            for task in todo_tasks:
                submit(key, task)
            bar.submitted(len(todo_tasks))
            if not todo_tasks:
                finish(key)

        def submit(key: str, task) -> None:
            unit = pending[key]
            opts = placement.resources(unit)
            if placement.restricted(unit):
                # strict pin (Dask steals loosely restricted tasks); repool() if the workers leave
                if unit.stage not in pools:
                    pools[unit.stage] = placement.pool(unit, client.scheduler_info()["workers"])
                    pool_unit[unit.stage] = unit
                if pools[unit.stage]:
                    opts["workers"] = pools[unit.stage]
            fetched = {p: url for p, url in inputs.FETCHED.items() if p in repr(task.kwargs)}  # inputs given by URL
            fn = partial(inputs.call_with_inputs, task.fn, fetched) if fetched else task.fn
            fut = client.submit(fn, **task.kwargs, pure=False, key=f"{key}:{task.id}-{os.urandom(4).hex()}", **opts)
            owner[fut.key] = (key, task.id)
            submitted[fut] = task
            futures.add(fut)

        def repool() -> None:
            """A stage whose workers all left (a restarted worker has a new address): its
            waiting tasks go to workers still here (of the kind it may run on)."""
            alive = client.scheduler_info()["workers"]
            for stage, pool in list(pools.items()):
                new = placement.pool(pool_unit[stage], alive)
                if set(pool) & set(alive) or not new:
                    continue
                stuck = [f for f in submitted if not f.done() and pending[owner[f.key][0]].stage == stage]
                pools[stage] = new
                bar.log(log, f"{stage}: its workers left; {len(stuck)} task(s) move to {', '.join(new)}")
                for f in stuck:
                    superseded.add(f.key)
                    f.cancel()
                    submit(owner[f.key][0], submitted.pop(f))

        def next_done() -> list:
            """The next finished futures; while none finish, check every POOL_CHECK_S that
            pinned stages still have their workers."""
            import distributed

            while pools and (live := [f for f in futures.futures if f.key not in superseded]):
                try:
                    distributed.wait(live, timeout=POOL_CHECK_S, return_when="FIRST_COMPLETED")
                    break
                except (TimeoutError, distributed.TimeoutError):
                    repool()
            return futures.next_batch(block=True)

        def finish(key: str) -> None:
            unit, state = pending[key], started[key]
            with phase(f"{key}: finalizing in {state['staging']}", writer.path):
                meta = unit.finalize(unit, state["staging"], state["results"]) if unit.finalize \
                    else _merge(state["results"])
            entry = unit.entry()
            entry["meta"] = meta
            entry["ran_on"] = sorted(state.get("ran_on", ()))  # worker addresses (provenance)
            with phase(f"{key}: committing to {writer.path}", writer.path):
                writer.commit(key, entry, state["staging"], unit.arrays)
            state["t1"] = time.time()
            bar.unit_done()
            bar.log(log, f"{key}: done in {state['t1'] - state['t0']:.1f} s")
            for note in meta.get("warnings", ()) if isinstance(meta, dict) else ():  # e.g. a fallback, kept in meta
                bar.log(log, f"{key}: warning: {note}")
            if unit.cleanup and not any(k != key and pending[k].stage == unit.stage for k in waiting_on):
                clean_workers(unit)
            release(key)

        def clean_workers(unit: Unit) -> None:
            """The stage's last unit is committed: its workers drop what they cached for it."""
            try:
                client.run(unit.cleanup)
            except Exception as exc:  # memory hygiene only: the store is complete either way
                bar.log(log, f"warning: {unit.stage}: releasing the workers' caches failed ({describe(exc)})")

        def release(key: str) -> None:
            del waiting_on[key]
            for deps in waiting_on.values():
                if key in deps:
                    deps.remove(key)

        def finished(fut) -> None:
            """A task is done: record its result; commit its unit when it was the last."""
            key, task_id = owner[fut.key]
            submitted.pop(fut, None)
            try:
                result = fut.result()  # re-raises the task's own exception
            except GibletError:
                raise  # already one line naming the input, the value and the fix
            except Exception as exc:
                raise task_failure(exc, key, task_id, writer.path) from exc
            state = started[key]
            state.setdefault("ran_on", set()).update(*client.who_has([fut]).values())
            with phase(f"{key}: recording task {task_id} in {state['staging']}", writer.path):
                writer.record_task(state["staging"], task_id, result)
            state["results"][task_id] = result
            state["left"].discard(task_id)
            bar.task_done()
            if not state["left"]:
                finish(key)
                start_ready()

        # Outermost phase: the scheduler itself (a dropped connection while submitting or
        # waiting); the task and commit phases inside are more precise and win.
        with phase("the Dask scheduler connection", writer.path, catch=(OSError,)), \
                get_task_stream(client) as stream:
            start_ready()
            while not futures.is_empty():
                for fut in next_done():
                    if fut.key in superseded:
                        continue
                    finished(fut)
        if waiting_on:
            raise StoreError(f"units never became ready: {', '.join(waiting_on)} (a dependency cycle?)")
        ran = {k: v for k, v in started.items() if not v.get("skipped")}
        return _stage_times(todo, ran, stream.data, owner), current
    finally:
        for fut in list(futures.futures):
            fut.cancel()


def task_slots(workers: dict, max_workers: Optional[int]) -> int:
    """Tasks of a unit that can run at once: its workers' threads (``max_workers`` of them at
    most, the ones with the most threads). ``workers``: the scheduler's ``scheduler_info()``."""
    threads = sorted((int(w.get("nthreads", 1)) for w in workers.values()), reverse=True)
    return max(1, sum(threads[:max_workers] if max_workers else threads))


def _stage_times(units: list[Unit], started: dict[str, dict], task_stream: list[dict],
                 owner: dict[str, tuple[str, str]]) -> dict[str, dict]:
    """Per stage: units, tasks, wall seconds from its first unit's start to its last commit,
    and the summed worker-side compute time of its tasks (``owner``: dask key -> unit key, task)."""
    stage_of = {u.key: u.stage for u in units}
    out: dict[str, dict] = {}
    for key, state in started.items():
        t0, t1 = state["t0"], state.get("t1", state["t0"])
        st = out.setdefault(stage_of[key], {"units": 0, "tasks": 0, "start": t0, "end": t1, "task_s": 0.0,
                                            "workers": set()})
        st["units"] += 1
        st["start"], st["end"] = min(st["start"], t0), max(st["end"], t1)
    for rec in task_stream:
        unit_key = owner.get(rec.get("key"), (None,))[0]
        if unit_key in stage_of:
            st = out[stage_of[unit_key]]
            st["tasks"] += 1
            st["task_s"] += sum(s["stop"] - s["start"] for s in rec.get("startstops", ()) if s.get("action") == "compute")
            st["workers"].add(rec.get("worker"))
    return {name: {"units": st["units"], "tasks": st["tasks"], "wall_s": round(st["end"] - st["start"], 3),
                   "task_s": round(st["task_s"], 3), "workers": sorted(map(str, st["workers"]))}
            for name, st in out.items()}


def _open_staging(writer, unit: Unit):
    """The unit's staging area (a local folder, or a remote attempt prefix), resumed when a
    killed run left finished tasks in it."""
    prepare = (lambda staging: unit.prepare(unit, staging)) if unit.prepare else None
    staging, results = writer.open_staging(unit.key, unit.fingerprint, prepare)
    return staging, results, unit.tasks(staging)


def _merge(results: dict) -> dict:
    if len(results) == 1:
        return next(iter(results.values()))
    return {"tasks": results}
