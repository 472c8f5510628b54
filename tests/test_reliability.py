"""Faults injected for real: a full disk (tmpfs), a write error (RLIMIT_FSIZE), parallel runs."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import uuid

import numpy as np
import pytest
import yaml

from tests.test_cli import CLI, cli, store_arrays


def _absolute_inputs(config, output):
    raw = yaml.safe_load(config.read_text())
    raw["inputs"]["fmri"] = {k: str(config.parent / v) for k, v in raw["inputs"]["fmri"].items()}
    raw["output"] = str(output)
    return raw


def _add_subject(config, raw, src="sub-01"):
    shutil.copy(config.parent / f"bold/{src}.nii.gz", config.parent / "bold/sub-04.nii.gz")
    raw["inputs"]["fmri"]["sub-04"] = str(config.parent / "bold/sub-04.nii.gz")
    config.write_text(yaml.safe_dump(raw))


def _assert_untouched(store, before, manifest_before):
    after = store_arrays(store)
    for name, arr in before.items():
        np.testing.assert_array_equal(after[name], arr)
    units = json.loads((store / "manifest.json").read_text())["units"]
    for key, entry in manifest_before.items():
        assert units[key] == entry


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here ({r.stderr.decode().strip()}); the RLIMIT test covers write errors")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_mid_stage_fails_cleanly_and_resumes(fmri_study, tmpfs):
    store = tmpfs / "study.zarr"
    raw = _absolute_inputs(fmri_study, store)
    fmri_study.write_text(yaml.safe_dump(raw))
    assert cli("run", fmri_study, "--workers", "1").returncode == 0
    before = store_arrays(store)
    manifest_before = json.loads((store / "manifest.json").read_text())["units"]
    _add_subject(fmri_study, raw)
    ballast = tmpfs / "ballast"
    with open(ballast, "wb") as fh:  # fill the disk, leaving almost nothing
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    r = cli("run", fmri_study, "--workers", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "No space left on device" in last and "rerun to resume" in last, last
    _assert_untouched(store, before, manifest_before)
    ballast.unlink()
    r = cli("run", fmri_study, "--workers", "1")
    assert r.returncode == 0 and "1 unit(s) to build, 4 up to date" in r.stderr, r.stderr
    assert cli("verify", store).returncode == 0


def test_write_error_fails_cleanly_and_resumes(fmri_study):
    store = fmri_study.parent / "study.zarr"
    assert cli("run", fmri_study, "--workers", "1").returncode == 0
    before = store_arrays(store)
    manifest_before = json.loads((store / "manifest.json").read_text())["units"]
    _add_subject(fmri_study, yaml.safe_load(fmri_study.read_text()))

    def limit_file_size():  # every file over 2 KiB fails to write (EFBIG), in workers too
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    r = subprocess.run(CLI + ["run", str(fmri_study), "--workers", "1"], capture_output=True, text=True,
                       preexec_fn=limit_file_size, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in r.stderr.strip().splitlines()[-1]
    _assert_untouched(store, before, manifest_before)
    r = cli("run", fmri_study, "--workers", "1")
    assert r.returncode == 0 and "1 unit(s) to build" in r.stderr, r.stderr
    assert cli("verify", store).returncode == 0


def test_two_runs_on_different_stores_in_parallel(fmri_study_template, tmp_path):
    configs = []
    for name in ("a", "b"):
        shutil.copytree(fmri_study_template.parent, tmp_path / name)
        configs.append(tmp_path / name / "study.yaml")
    procs = [subprocess.Popen(CLI + ["run", str(c), "--workers", "1", "--no-progress"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in configs]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = (store_arrays(c.parent / "study.zarr") for c in configs)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_output_folder_that_is_not_a_store_is_refused(fmri_study):
    (fmri_study.parent / "study.zarr").mkdir()
    keep = fmri_study.parent / "study.zarr" / f"thesis-{uuid.uuid4().hex}.tex"
    keep.write_text("precious")
    r = cli("run", fmri_study)
    assert r.returncode == 1 and "is not a giblet store" in r.stderr
    assert keep.read_text() == "precious" and os.listdir(keep.parent) == [keep.name]
    r = cli("run", fmri_study, "output=../../elsewhere.zarr")  # an override: relative to the working directory
    assert r.returncode == 1 and "output: '../../elsewhere.zarr' escapes the working directory via '..'" in r.stderr
