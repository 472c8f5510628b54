"""Shared helpers for the benchmarks: process-tree peak RSS sampling, machine description."""
from __future__ import annotations

import os
import platform
import threading
import time

import psutil


class PeakRSS:
    """Samples the RSS of this process and all its children (e.g. Dask workers) every 50 ms."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _tree_rss(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._tree_rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    @property
    def gb(self) -> float:
        return self.peak / 1e9


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.python_implementation()} "
            f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")
