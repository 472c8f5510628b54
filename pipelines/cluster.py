"""The Dask cluster a build runs on: a LocalCluster on loopback, an existing scheduler, or --
for a small build -- Dask's scheduler and one worker thread inside this process.

In-process rule (``Cluster.choose``): without ``--scheduler`` and ``--workers``, a build runs
in-process when more worker processes would save less than they cost to start. Only the
single-threaded tasks gain from them (fMRI: ``Unit.cells``, TRs x grid voxels, at
``CELLS_PER_S``); audio, text and video already use every core in one process (torch
threads, libavcodec frame threads). So: in-process when ``cells / CELLS_PER_S x (1 - 1 /
workers) <= CLUSTER_START_S``, or when the machine has one core. ``--workers 0`` (or
``--in-process``) forces it, ``--workers N`` forces a LocalCluster. In-process, the units,
tasks, markers and commits are the same; the worker thread runs BLAS single-threaded, as
Dask's nanny makes its worker processes do (``OMP/MKL/OPENBLAS_NUM_THREADS=1``), so the
store is bit-identical to a cluster build's.

Timeouts are sized for a slow, loaded machine (a 2-core VM at load 10+ takes tens of
seconds to start a worker process), the LocalCluster start is retried once (nothing has
been submitted yet, so a retry is safe), and ``close()`` never raises: the engine decides
whether a failed close matters (it does not once every unit is committed).

GPUs: a LocalCluster for a build with a model stage advertises this machine's CUDA devices
as the Dask resource ``GPU`` on each worker; an existing cluster's GPU workers advertise it
themselves (``dask worker ... --resources GPU=1``). ``pipelines.placement`` uses it.

Security: a LocalCluster listens on 127.0.0.1 without authentication (see docs/cli.md,
*Dask security*). An existing scheduler can be ``tls://``: its credentials come from the
``--tls-*`` options or from Dask's own configuration (``distributed.comm.tls.*``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from giblet.errors import ConfigError
from pipelines.failures import BuildError, describe, failure
from pipelines.placement import GPU, local_gpu_count

# Floors, in seconds, for Dask's own timeouts while giblet's cluster lives; a larger value
# set by the user (dask config or DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT) is kept.
LOADED_TIMEOUTS_S = {"distributed.comm.timeouts.connect": 120, "distributed.comm.timeouts.tcp": 120}
CLOSE_TIMEOUT_S = 120
# The in-process rule. Start-up: a LocalCluster plus its workers importing giblet, torch and
# nilearn, 3-6 s on a 2-core VM. Rate: one core's fMRI task throughput, TRs x grid voxels
# (a Sherlock-shaped subject: 61x73x61 x 946 in ~9-10 s of task time, docs/performance.md).
CLUSTER_START_S = 5.0
CELLS_PER_S = 25e6


def scheduler_address(scheduler: Optional[str], scheduler_file: Optional[str]) -> Optional[str]:
    """The address given by ``--scheduler`` or read from ``--scheduler-file`` (the JSON that
    ``dask scheduler --scheduler-file FILE`` writes)."""
    if not scheduler_file:
        return scheduler
    path = Path(scheduler_file)
    try:
        return json.loads(path.read_text())["address"]
    except FileNotFoundError:
        raise ConfigError(f"--scheduler-file {path}: not found; start `dask scheduler --scheduler-file "
                          f"{path}` first (on a shared filesystem)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--scheduler-file {path}: not a Dask scheduler file ({describe(exc)}); expected "
                          f"the JSON with an \"address\" that `dask scheduler --scheduler-file` writes") from None


def tls_security(address: Optional[str], ca_file: Optional[str], cert: Optional[str], key: Optional[str]):
    """A ``distributed.Security`` for a ``tls://`` scheduler from the ``--tls-*`` options, or None
    (Dask then reads ``distributed.comm.tls.*`` from its config, the environment included)."""
    given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    if not any(given.values()):
        return None
    if not address:
        raise ConfigError("--tls-ca-file/--tls-cert/--tls-key: only for an existing scheduler; add "
                          "--scheduler tls://HOST:PORT or --scheduler-file FILE")
    if not address.startswith("tls://"):
        raise ConfigError(f"--scheduler {address}: TLS options were given but the address is not tls://; "
                          f"use the scheduler's tls:// address")
    if not (ca_file and cert):
        raise ConfigError("--tls-ca-file and --tls-cert are both needed (Dask's TLS is mutual: the CA "
                          "checks the scheduler, the certificate identifies this client); --tls-key is "
                          "optional when the key is appended to the certificate")
    for option, value in given.items():
        if value and not Path(value).is_file():
            raise ConfigError(f"{option} {value}: file not found; pass a PEM file")
    from distributed.security import Security

    return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


def default_workers() -> int:
    """LocalCluster worker processes when ``--workers`` is not given: ``min(4, cores)``."""
    return max(1, min(4, os.cpu_count() or 1))


def _trim_freed_memory() -> None:
    """What ``MALLOC_TRIM_THRESHOLD_=65536`` does in Dask's worker processes, for this one: glibc
    gives freed memory back instead of keeping large tensors' pages (the audio task's peak
    was ~0.1 GB lower with it). Best effort: other C libraries have no ``mallopt``."""
    import ctypes

    try:  # the process's own symbols, libc's among them (as giblet.features.media.trim_heap)
        ctypes.CDLL(None).mallopt(-1, 65536)  # M_TRIM_THRESHOLD (also stops the dynamic mmap threshold)
    except (OSError, AttributeError):
        pass


class Cluster:
    """A Dask client and, without ``scheduler``, the LocalCluster it owns.

    Args:
        scheduler: an existing scheduler's address (``tcp://`` or ``tls://``), or None.
        workers: LocalCluster worker processes; 0: in-process; None: ``choose`` decides
            (in-process for a small build, else ``min(4, cores)`` processes).
        security: a ``distributed.Security`` for a ``tls://`` scheduler (``tls_security``).
        log: where retry notes and the in-process decision go (stderr lines).
        gpus: whether the build has model units; a LocalCluster then counts this machine's CUDA
            devices and each worker advertises them as the Dask resource ``GPU`` (pipelines.placement).
    """

    def __init__(self, scheduler: Optional[str] = None, workers: Optional[int] = None, security=None,
                 log: Callable[[str], None] = lambda m: None, gpus: bool = False):
        if workers is not None and workers < 0:
            raise ConfigError(f"--workers {workers}: must be >= 1 worker processes, or 0 to run in-process")
        self.scheduler, self.security, self.log, self.gpus = scheduler, security, log, gpus
        self.in_process = workers == 0 and not scheduler
        self.workers = workers or default_workers()
        self.auto = workers is None and not scheduler
        self.client = self.local = None
        self._config = self._limits = None
        self.n_gpus = 0  # CUDA devices a LocalCluster's workers advertise

    def choose(self, cells: int) -> None:
        """The in-process rule (module docstring) for a build of ``cells`` single-threaded work."""
        if not self.auto:
            return
        gain_s = cells / CELLS_PER_S * (1 - 1 / self.workers)
        self.in_process = gain_s <= CLUSTER_START_S
        if self.in_process:
            self.log(f"running in-process: {self.workers} worker processes would save ~{gain_s:.1f} s of fMRI work, "
                     f"less than the ~{CLUSTER_START_S:g} s they take to start (--workers N for a LocalCluster)")

    def start(self):
        """Connect (or start a LocalCluster and connect); returns the ``distributed.Client``."""
        import dask
        import distributed  # noqa: F401  (loads the distributed.* defaults into dask.config)
        from dask.utils import parse_timedelta

        logging.getLogger("distributed").setLevel(logging.ERROR)
        user_connect_s = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
        raised = {k: f"{floor}s" for k, floor in LOADED_TIMEOUTS_S.items()
                  if parse_timedelta(dask.config.get(k), "s") < floor}
        self._config = dask.config.set(raised)  # LocalCluster workers inherit it when spawned
        try:
            if self.scheduler:
                # an existing scheduler: a wrong address fails after Dask's connect timeout (30 s unless
                # set), not the loaded-machine floor
                self.client = self._connect(user_connect_s)
            elif self.in_process:
                self.client = self._start_in_process()
            else:
                self.client = self._start_local()
        except BaseException:
            self.close()
            raise
        return self.client

    def _connect(self, timeout_s: float):
        from distributed import Client

        try:
            return Client(self.scheduler, timeout=f"{timeout_s}s", security=self.security)
        except Exception as exc:
            tls = ("; for tls://, pass --tls-ca-file and --tls-cert (or set Dask's distributed.comm.tls.* "
                   "config) signed by the scheduler's CA" if self.scheduler.startswith("tls://") else "")
            raise BuildError(f"--scheduler {self.scheduler}: cannot connect ({describe(exc)}); start `dask "
                             f"scheduler` and `dask worker {self.scheduler}`, or drop --scheduler to use a "
                             f"LocalCluster{tls}") from exc

    def describe(self) -> str:
        """The cluster in words, for messages."""
        if self.scheduler:
            return f"the cluster at {self.scheduler}"
        return f"the LocalCluster ({self.n_gpus or 'no'} CUDA device(s) on this machine)"

    def _start_local(self):
        import dask
        from distributed import Client, LocalCluster

        # Counted only for builds with a model stage: importing torch costs a second or two.
        self.n_gpus = local_gpu_count() if self.gpus else 0
        resources = {GPU: self.n_gpus} if self.n_gpus else None
        what = f"starting a LocalCluster of {self.workers} worker(s)"
        for attempt in (1, 2):
            try:
                # Task errors reach the user once, as giblet's one-line message: keep worker logs
                # quiet. dashboard_address=None does not disable the HTTP server
                # (dask/distributed#8136): bind it to a free loopback port so parallel runs never
                # collide on 8787.
                self.local = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                          host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                          silence_logs=logging.CRITICAL, resources=resources)
                return Client(self.local, timeout=dask.config.get("distributed.comm.timeouts.connect"))
            except Exception as exc:
                self._close_parts()
                if attempt == 2:
                    raise failure(exc, what) from exc
                self.log(f"{what} failed ({describe(exc)}); retrying once")

    def _start_in_process(self):
        """Dask's scheduler and one single-threaded worker in this process (no ports but the
        dashboard's, bound to loopback as for a LocalCluster); BLAS single-threaded while it lives."""
        import dask
        from distributed import Client, LocalCluster
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(1, user_api="blas")
        _trim_freed_memory()
        self.n_gpus = local_gpu_count() if self.gpus else 0  # the in-process worker advertises them too
        try:
            self.local = LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                      dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL,
                                      resources={GPU: self.n_gpus} if self.n_gpus else None)
            return Client(self.local, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        except Exception as exc:
            raise failure(exc, "starting Dask in-process") from exc

    def close(self) -> Optional[BaseException]:
        """Close the client, then the LocalCluster; returns the first error instead of raising."""
        problem = self._close_parts()
        if self._config is not None:
            self._config.__exit__(None, None, None)
            self._config = None
        if self._limits is not None:
            self._limits.restore_original_limits()
            self._limits = None
        return problem

    def _close_parts(self) -> Optional[BaseException]:
        problem = None
        for part in (self.client, self.local):
            if part is not None:
                try:
                    part.close(timeout=CLOSE_TIMEOUT_S)
                except Exception as exc:  # a timeout under load, a scheduler already gone
                    problem = problem or exc
        self.client = self.local = None
        return problem
