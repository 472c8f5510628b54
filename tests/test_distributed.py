"""The same stages on an existing Dask cluster: `dask scheduler` + 2 `dask worker` on loopback."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import giblet
from tests.test_cli import cli, store_arrays


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_workers(address: str, n: int, security=None, timeout_s: float = 60) -> None:
    """Until ``n`` workers have joined the scheduler at ``address`` (a loaded machine starts them slowly)."""
    from distributed import Client

    deadline = time.time() + timeout_s
    while True:
        try:
            with Client(address, timeout="5s", security=security) as c:
                if len(c.scheduler_info()["workers"]) >= n:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{n} dask worker(s) did not join {address} within {timeout_s:.0f} s")
        time.sleep(0.5)


@pytest.fixture
def dask_cluster():
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen(dask + ["--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
             "--no-dashboard", "--name", f"w{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_for_workers(address, 2)
    yield address
    for p in procs[::-1]:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def test_run_on_external_scheduler_matches_local_cluster(fmri_study_template, tmp_path, dask_cluster):
    local, remote = tmp_path / "local", tmp_path / "remote"
    shutil.copytree(fmri_study_template.parent, local)
    shutil.copytree(fmri_study_template.parent, remote)
    assert cli("run", local / "study.yaml", "--workers", "1").returncode == 0
    r = cli("run", remote / "study.yaml", "--scheduler", dask_cluster)
    assert r.returncode == 0, r.stderr
    import json

    units = json.loads((remote / "study.zarr" / "manifest.json").read_text())["units"]
    workers = {w for e in units.values() for w in e["ran_on"]}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)  # both took part
    a, b = store_arrays(local / "study.zarr"), store_arrays(remote / "study.zarr")
    assert a.keys() == b.keys() and len(a) >= 11
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert giblet.open_store(remote / "study.zarr").subjects == ["sub-01", "sub-02", "sub-03"]


def test_unreachable_scheduler_is_a_clear_error(fmri_study):
    import os
    import subprocess

    from tests.test_cli import CLI

    env = dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="3s")  # Dask's own setting, honoured
    r = subprocess.run(CLI + ["run", str(fmri_study), "--scheduler", f"tcp://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "cannot connect" in r.stderr and "Traceback" not in r.stderr
