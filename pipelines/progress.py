"""Build progress on stderr: tasks and units done of totals known before the first task runs.

On a terminal it is a tqdm bar (``giblet: 40%|... | 4/10 task [00:12<00:18, units 2/5, 3 in
flight]``) that a heartbeat thread redraws every few seconds, so the elapsed time moves even
while one long task runs. Elsewhere (a log file, a CI job) tqdm's carriage returns would be
noise, so it prints one plain line every ``LOG_EVERY_S`` seconds instead. ``enabled=False``
(``--no-progress``) prints nothing.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

REDRAW_EVERY_S = 2.0  # terminal: how often the bar is redrawn while nothing finishes
LOG_EVERY_S = 30.0  # not a terminal: how often a progress line is printed


class Progress:
    """Counts tasks and units; ``log(msg)`` prints a line without breaking the bar.

    Args:
        n_units: units to build in this run.
        n_tasks: their tasks, those finished by an earlier (killed) run included.
        enabled: False prints nothing.
        stream: where to draw (stderr); a terminal gets the bar, anything else plain lines.
    """

    def __init__(self, n_units: int, n_tasks: int, enabled: bool = True, stream: TextIO | None = None):
        self.n_units, self.n_tasks = n_units, n_tasks
        self.units_done = self.tasks_done = self.in_flight = 0
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=n_tasks, desc="giblet", unit="task", file=self.stream, dynamic_ncols=True)
            self._postfix()
        if enabled:
            every = REDRAW_EVERY_S if self.bar is not None else LOG_EVERY_S
            self._thread = threading.Thread(target=self._heartbeat, args=(every,), daemon=True)
            self._thread.start()

    def submitted(self, n: int) -> None:
        with self._lock:
            self.in_flight += n
            if self.bar is not None:
                self._postfix()

    def task_done(self, n: int = 1, resumed: bool = False) -> None:
        """``n`` tasks finished (``resumed``: by an earlier run, so they were never in flight)."""
        with self._lock:
            self.tasks_done += n
            if not resumed:
                self.in_flight -= n
            if self.bar is not None:
                self.bar.update(n)
                self._postfix()

    def unit_done(self) -> None:
        with self._lock:
            self.units_done += 1
            if self.bar is not None:
                self._postfix()

    def line(self) -> str:
        return (f"giblet: {self.tasks_done}/{self.n_tasks} task(s), {self.units_done}/{self.n_units} unit(s) "
                f"done, {self.in_flight} in flight, {time.monotonic() - self.t0:.0f} s")

    def log(self, say: Callable[[str], None], msg: str) -> None:
        """Print ``msg`` through ``say`` above the bar (the bar is cleared, then redrawn)."""
        if self.bar is None:
            say(msg)
            return
        with self._lock, self.bar.external_write_mode(file=self.stream):
            say(msg)

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            with self._lock:
                self.bar.close()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"units {self.units_done}/{self.n_units}, {self.in_flight} in flight")

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self._stop.is_set():
                    return
                if self.bar is not None:
                    self.bar.refresh()  # redraws the elapsed time and rate
                else:
                    print(self.line(), file=self.stream, flush=True)
