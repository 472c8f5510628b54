"""The same stages on an existing Dask cluster: `dask scheduler` + 2 `dask worker` on loopback."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

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


@contextmanager
def loopback_cluster(*worker_args: list[str]):
    """``dask scheduler`` and one single-threaded ``dask worker`` per entry of ``worker_args`` (its
    extra arguments; named ``w0``, ``w1``, ...) on loopback; yields the scheduler's address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen(dask + ["--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for i, extra in enumerate(worker_args):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
                 "--no-dashboard", "--name", f"w{i}", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_workers(address, len(worker_args))
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


@pytest.fixture
def dask_cluster():
    with loopback_cluster([], []) as address:
        yield address


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


@pytest.mark.slow  # ~25 s: two workers importing torch, EnCodec and the text model (tests/test_placement.py: the rule)
def test_model_stages_run_on_the_gpu_worker_and_the_rest_on_the_cpu_worker(tmp_path):
    """One invocation on a mixed cluster: w1 advertises GPU=1 (on this CPU machine), w0 nothing.
    audio.device and text.device are `auto` (the default): a worker advertises a GPU, so their
    tasks request it and all run on w1, which resolves auto to its CPU (recorded in the meta);
    fMRI and video units are kept off the GPU worker."""
    import json

    from distributed import Client

    from giblet.synth import make_study

    study = make_study(tmp_path, n_subjects=2, n_trs=6, shape=(8, 10, 6), fps=10, movie_size=(64, 36), seed=5,
                       stages={"audio": {"model": "random", "segment_s": 4.0, "chunk_trs": 4},
                               "video": {"width": 16, "height": 9, "chunk_trs": 4, "segment_trs": 4},
                               "fmri": {"mask_strategy": "background"}})
    with loopback_cluster([], ["--resources", "GPU=1"]) as address:
        with Client(address, timeout="30s") as c:
            by_name = {w["name"]: a for a, w in c.scheduler_info()["workers"].items()}
        r = cli("run", study, "--scheduler", address)
    assert r.returncode == 0, r.stderr
    units = json.loads((tmp_path / "study.zarr" / "manifest.json").read_text())["units"]
    ran_on = {key: set(e["ran_on"]) for key, e in units.items()}
    model = {k for k in ran_on if k.startswith(("audio/", "text/"))}
    assert {k.split("/")[0] for k in ran_on} == {"audio", "text", "fmri", "video"} and len(ran_on) >= 6
    assert all(ran_on[k] == {by_name["w1"]} for k in model), ran_on
    assert all(ran_on[k] == {by_name["w0"]} for k in set(ran_on) - model), ran_on
    assert {units[k]["meta"]["device"] for k in model} == {"cpu"}  # computed on the CPU: no CUDA here
