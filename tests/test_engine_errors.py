"""How a build fails: by phase and cause, on one line; a cluster hiccup after the last commit
is a warning; a loaded machine still builds; a progress total that never moves."""
from __future__ import annotations

import errno
import functools
import io
import os
import subprocess
import sys

import cloudpickle
import pytest

import giblet.features.fmri
from giblet.config import load_config
from giblet.errors import ConfigError, GibletError
from giblet.verify import verify_store
from pipelines import cli as giblet_cli
from pipelines import engine, failures, progress
from tests.test_cli import _one_line_error, cli

# Task functions defined here travel to the Dask workers by value: the worker processes
# need not import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Silent(Exception):
    """An exception whose text is empty (``str(exc) == ""``)."""


def _raise(exc: BaseException, **task_kwargs) -> dict:
    raise exc


def _die(**task_kwargs) -> dict:
    os._exit(1)  # the worker process dies mid-task, as under the OOM killer


@pytest.fixture(scope="module")
def scheduler():
    """One single-worker LocalCluster for the in-task failures (a dead task is not retried)."""
    import logging

    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL)
    yield cluster.scheduler_address
    cluster.close()


def _build_with_failing_subjects(fmri_study, scheduler, monkeypatch, fn) -> str:
    """Run the engine with every subject task replaced by ``fn``; returns the error line."""
    monkeypatch.setattr(giblet.features.fmri, "build_subject", fn)
    with pytest.raises(GibletError) as info:
        engine.run(load_config(fmri_study), scheduler=scheduler, progress=False, log=lambda m: None)
    return str(info.value)


# -- classification, without a cluster --------------------------------------------------------

@pytest.mark.parametrize("exc, says, never", [
    (TimeoutError(), ["(TimeoutError)", "slow or busy", "rerun to resume"], ["free space", "()"]),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), ["No space left on device", "free space"], ["slow"]),
    (OSError(errno.EACCES, os.strerror(errno.EACCES), "/data/x"), ["fix the permissions of /data/x"], ["free space"]),
    (Silent(), ["(Silent)", "--debug"], ["()", "free space"]),
    (OSError(), ["(OSError)"], ["()", "free space"]),
])
def test_failure_names_the_cause_and_never_prints_empty_parentheses(exc, says, never):
    msg = str(failures.failure(exc, "doing it"))
    assert msg.startswith("doing it failed (")
    for s in says:
        assert s in msg, msg
    for s in never:
        assert s not in msg, msg


def test_a_dropped_dask_connection_is_not_a_disk_error():
    from distributed.comm.core import CommClosedError

    msg = str(failures.task_failure(CommClosedError("in <TCP>: Stream is closed"), "fmri/sub-01", "sub-01", "/s"))
    assert "fmri/sub-01" in msg and "slow or busy" in msg and "free space" not in msg


# -- failures inside tasks, through the engine -------------------------------------------------

def test_disk_full_in_a_task_gives_the_disk_advice(fmri_study, scheduler, monkeypatch):
    store = fmri_study.parent / "study.zarr"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store / "fmri" / "x"))
    msg = _build_with_failing_subjects(fmri_study, scheduler, monkeypatch, functools.partial(_raise, full))
    assert msg.startswith("fmri/sub-0") and f"writing to {store} failed (No space left on device)" in msg, msg
    assert "free space" in msg and "rerun to resume" in msg


def test_timeout_in_a_task_is_not_blamed_on_the_disk(fmri_study, scheduler, monkeypatch):
    msg = _build_with_failing_subjects(fmri_study, scheduler, monkeypatch, functools.partial(_raise, TimeoutError()))
    assert msg.startswith("fmri/sub-0") and "(TimeoutError)" in msg and "slow or busy" in msg, msg
    assert "free space" not in msg and "write failed" not in msg and "()" not in msg


def test_exception_without_text_is_named_by_its_type(fmri_study, scheduler, monkeypatch):
    msg = _build_with_failing_subjects(fmri_study, scheduler, monkeypatch, functools.partial(_raise, Silent()))
    assert msg.startswith("fmri/sub-0") and "failed (Silent)" in msg and "()" not in msg, msg


def test_a_worker_that_dies_names_the_unit(fmri_study, scheduler, monkeypatch):
    msg = _build_with_failing_subjects(fmri_study, scheduler, monkeypatch, _die)
    assert msg.startswith("fmri/sub-0") and "(KilledWorker)" in msg and "fewer --workers" in msg, msg


# -- the cluster: start and close ----------------------------------------------------------------

def test_timeout_closing_the_cluster_after_the_last_commit_is_a_warning(fmri_study, monkeypatch, capsys):
    from distributed import LocalCluster

    real_close = LocalCluster.close

    def close_then_time_out(self, *args, **kwargs):
        real_close(self, *args, **kwargs)
        raise TimeoutError()

    monkeypatch.setattr(LocalCluster, "close", close_then_time_out)
    rc = giblet_cli.main(["run", str(fmri_study), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning: closing the Dask cluster failed (TimeoutError) after every unit was committed" in err
    assert "error:" not in err
    assert verify_store(fmri_study.parent / "study.zarr") == []


def test_cluster_start_is_retried_once(fmri_study, monkeypatch):
    import distributed

    real, calls = distributed.LocalCluster, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError()  # e.g. a worker process too slow to start on a loaded machine
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", flaky)
    lines = []
    report = engine.run(load_config(fmri_study), workers=1, progress=False, log=lines.append)
    assert len(calls) == 2 and len(report.ran) == 4
    assert any("failed (TimeoutError); retrying once" in ln for ln in lines), lines


@pytest.mark.slow
def test_build_succeeds_on_a_heavily_loaded_machine(fmri_study):
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(8)]
    try:
        r = cli("run", fmri_study, "--workers", "2", "--no-progress", timeout=600)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert r.returncode == 0, r.stderr
    assert cli("verify", fmri_study.parent / "study.zarr").returncode == 0


# -- config with nothing to build -----------------------------------------------------------------

@pytest.mark.parametrize("inputs", [None, {}, {"fmri": {}}])
def test_config_with_no_inputs_is_an_error_and_writes_nothing(tmp_path, inputs):
    import yaml

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"output": "out.zarr", **({} if inputs is None else {"inputs": inputs})}))
    with pytest.raises(ConfigError, match="no inputs to build"):
        engine.run(load_config(config), progress=False)
    r = cli("run", config)
    _one_line_error(r, str(config), "no inputs to build", "inputs.fmri")
    assert not (tmp_path / "out.zarr").exists()


def test_only_a_stage_without_inputs_is_an_error(fmri_study):
    r = cli("run", fmri_study, "--only", "video")
    _one_line_error(r, "--only video: the config has no inputs for these stages")
    assert not (fmri_study.parent / "study.zarr").exists()


# -- verify on something that is not a store ----------------------------------------------------

def test_verify_says_not_a_giblet_store_once(tmp_path, fmri_study):
    for path in (tmp_path / "missing.zarr", fmri_study, tmp_path):
        r = cli("verify", path)
        _one_line_error(r, f"{path}: not a giblet store")
        assert r.stdout == "" and r.stderr.count("not a giblet store") == 1 and "incomplete" not in r.stderr


# -- progress ------------------------------------------------------------------------------------

class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_total_is_known_up_front_with_a_heartbeat(fmri_study, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    stream = _Log()
    real = progress.Progress
    made = []

    def to_stream(*args, **kwargs):
        made.append(real(*args, **kwargs, stream=stream))
        return made[-1]

    monkeypatch.setattr(engine, "Progress", to_stream)
    engine.run(load_config(fmri_study), workers=1, log=lambda m: None)
    lines = [ln for ln in stream.getvalue().splitlines() if ln.startswith("giblet: ")]
    assert lines, stream.getvalue()
    totals = {ln.split(" task(s)")[0].split("/")[1] for ln in lines}
    units = {ln.split(" unit(s)")[0].split("/")[-1] for ln in lines}
    assert totals == {"4"} and units == {"4"}, lines  # fmri/mask + 3 subjects, 1 task each
    assert (made[0].tasks_done, made[0].units_done, made[0].in_flight) == (4, 4, 0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_keeps_its_total_and_redraws_while_idle(monkeypatch):
    import re
    import time

    monkeypatch.setattr(progress, "REDRAW_EVERY_S", 0.01)
    term = _Terminal()
    bar = progress.Progress(2, 5, stream=term)
    bar.task_done(2, resumed=True)  # finished by a killed earlier run
    bar.submitted(3)
    drawn = len(term.getvalue())
    deadline = time.monotonic() + 30
    while len(term.getvalue()) == drawn and time.monotonic() < deadline:
        time.sleep(0.01)  # nothing finishes: only the heartbeat can draw
    assert len(term.getvalue()) > drawn
    bar.log(lambda m: print(m, file=term), "fmri/mask: done in 1.0 s")
    for _ in range(3):
        bar.task_done()
    bar.unit_done()
    bar.unit_done()
    bar.close()
    out = term.getvalue()
    assert set(re.findall(r"\| *\d+/(\d+) \[", out)) == {"5"}, out
    assert "fmri/mask: done in 1.0 s\n" in out and "units 2/2, 0 in flight" in out


def test_no_progress_prints_nothing(fmri_study, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.01)
    stream = _Log()
    real = progress.Progress
    monkeypatch.setattr(engine, "Progress", lambda *args, **kwargs: real(*args, **kwargs, stream=stream))
    engine.run(load_config(fmri_study), workers=1, progress=False, log=lambda m: None)
    assert stream.getvalue() == ""


# -- a tls:// scheduler ----------------------------------------------------------------------------

def _self_signed(folder):
    """A throwaway CA and one certificate signed by it for 127.0.0.1 (scheduler, worker, client)."""
    def ssl(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, cwd=folder)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=giblet-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "req.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "cert.pem",
        "-days", "1", "-extfile", "ext.cnf")
    return [f"--tls-ca-file={folder / 'ca.pem'}", f"--tls-cert={folder / 'cert.pem'}",
            f"--tls-key={folder / 'key.pem'}"]


@pytest.fixture
def tls_scheduler(tmp_path):
    import shutil

    from distributed.security import Security
    from tests.test_distributed import free_port, wait_for_workers

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    (tmp_path / "tls").mkdir()
    tls = _self_signed(tmp_path / "tls")
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    dask = [sys.executable, "-m"]
    procs = [subprocess.Popen(dask + ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                                      "--protocol", "tls", "--no-dashboard", *tls],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen(dask + ["distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
                                      "--no-dashboard", *tls],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    security = Security(tls_ca_file=str(tmp_path / "tls/ca.pem"), tls_client_cert=str(tmp_path / "tls/cert.pem"),
                        tls_client_key=str(tmp_path / "tls/key.pem"), require_encryption=True)
    try:
        wait_for_workers(address, 1, security, timeout_s=120)
        yield address, tls
    finally:
        for p in procs[::-1]:
            p.terminate()
            p.wait(timeout=60)


def test_run_on_a_tls_scheduler(fmri_study, tls_scheduler):
    import json

    address, tls = tls_scheduler
    r = cli("run", fmri_study, "--scheduler", address, "--no-progress")  # no credentials: refused, one line
    _one_line_error(r, f"--scheduler {address}: cannot connect", "--tls-ca-file")
    r = cli("run", fmri_study, "--scheduler", address, "--no-progress", *tls)
    assert r.returncode == 0, r.stderr
    units = json.loads((fmri_study.parent / "study.zarr" / "manifest.json").read_text())["units"]
    assert all(w.startswith("tls://127.0.0.1:") for e in units.values() for w in e["ran_on"])
    assert cli("verify", fmri_study.parent / "study.zarr").returncode == 0


def test_scheduler_options_are_checked(fmri_study, tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("not used")
    for args, needle in [(["--tls-ca-file", pem, "--tls-cert", pem], "only for an existing scheduler"),
                         (["--scheduler", "tcp://127.0.0.1:1", "--tls-ca-file", pem, "--tls-cert", pem],
                          "the address is not tls://"),
                         (["--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", pem], "are both needed"),
                         (["--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", pem, "--tls-cert", tmp_path / "no.pem"],
                          "--tls-cert"),
                         (["--scheduler-file", tmp_path / "none.json"], "not found"),
                         (["--scheduler-file", fmri_study], "not a Dask scheduler file")]:
        _one_line_error(cli("run", fmri_study, *args), needle)
    assert cli("run", fmri_study, "--scheduler", "tcp://a:1", "--scheduler-file", pem).returncode == 2
