"""Shared helpers for the benchmarks: process-tree peak RSS sampling, machine description."""
from __future__ import annotations

import os
import platform
import threading
import time

import psutil


class PeakRSS:
    """Samples the RSS of this process and all its children (e.g. Dask workers) every 50 ms;
    ``breakdown`` is each process's RSS (GB) at the moment of the peak, largest first;
    ``per_process`` each process's own peak RSS (GB) over the whole run."""

    def __init__(self, interval: float = 0.05, include_self: bool = True):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.include_self = include_self  # False: only the children (e.g. a command this script runs)
        self.breakdown: list[tuple[str, float]] = []
        self.per_process: dict[str, float] = {}

    def _tree(self) -> list[tuple[str, int]]:
        me = psutil.Process()
        out = []
        for p in ([me] if self.include_self else []) + me.children(recursive=True):
            try:
                out.append((_role(p, me), p.memory_info().rss))
            except psutil.Error:
                pass
        return out

    def _sample(self) -> None:
        tree = self._tree()
        for role, rss in tree:
            self.per_process[role] = max(self.per_process.get(role, 0.0), round(rss / 1e9, 3))
        total = sum(rss for _, rss in tree)
        if total > self.peak:
            self.peak = total
            self.breakdown = sorted(((role, round(rss / 1e9, 3)) for role, rss in tree), key=lambda x: -x[1])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._sample()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    @property
    def gb(self) -> float:
        return self.peak / 1e9


def _role(p: psutil.Process, me: psutil.Process) -> str:
    """A short name for a process of the tree: this script, the CLI, a Dask worker, ..."""
    if p.pid == me.pid:
        return "benchmark"
    cmd = " ".join(p.cmdline())
    for key, role in (("spawn_main", "worker (spawned)"), ("pipelines.cli", "giblet-preprocess"),
                      ("dask_worker", "dask worker"), ("dask_scheduler", "dask scheduler"),
                      ("resource_tracker", "resource tracker")):
        if key in cmd:
            return f"{role} {p.pid}"
    return f"{p.name()} {p.pid}"


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.python_implementation()} "
            f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def timed(fn, *args, **kwargs) -> tuple[object, float, float, float]:
    """``(result, seconds, peak RSS GB, RSS GB before)`` of one call."""
    with PeakRSS() as rss:
        before = rss.peak / 1e9
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return out, seconds, rss.gb, before


def emit(res: dict, path) -> None:
    """Print a benchmark's results as JSON, and write them to ``path`` when given."""
    import json
    from pathlib import Path

    text = json.dumps(res, indent=1)
    print(text)
    if path:
        Path(path).write_text(text)
