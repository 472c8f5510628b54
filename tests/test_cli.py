"""The CLI as a user runs it: subprocesses, exit codes, one-line errors, kill and resume."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import giblet

CLI = [sys.executable, "-m", "pipelines.cli"]


def cli(*args, timeout=300):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def store_arrays(store):
    s = giblet.open_store(store)
    return {name: s.array(name)[...] for name in sorted(s._arrays)}


def test_run_status_verify_stats(fmri_study, tmp_path):
    r = cli("run", fmri_study, "--report", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    store = r.stdout.strip().splitlines()[-1]
    assert store.endswith("study.zarr")
    report = json.loads((tmp_path / "report.json").read_text())  # per-stage times from the task stream
    fmri = report["stages"]["fmri"]
    assert sorted(report["ran"]) == ["fmri/mask", "fmri/sub-01/run-1", "fmri/sub-02/run-1", "fmri/sub-03/run-1"]
    assert fmri["units"] == 4 and fmri["tasks"] == 4 and len(fmri["workers"]) == 1
    assert 0 < fmri["task_s"] and 0 < fmri["wall_s"] <= report["seconds"]
    assert "fmri: 4 unit(s), 4 task(s)" in r.stderr
    r2 = cli("run", fmri_study)
    assert r2.returncode == 0 and "all 4 unit(s) up to date" in r2.stderr
    st = cli("status", fmri_study, "fmri.high_pass=0.02")
    assert st.returncode == 0
    assert "fmri/mask          done" in st.stdout
    assert "fmri/sub-01/run-1  stale (parameter high_pass: 'default' -> 0.02; parameter tr_s" in st.stdout
    v = cli("verify", store)
    assert v.returncode == 0 and v.stdout.strip().endswith(": ok")
    stats = cli("stats", store)
    assert stats.returncode == 0 and "fmri/sub-01/run-1 raw mean" in stats.stdout


def _one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "exception" in ln.lower()]
    assert "Traceback" not in r.stderr and len(errors) == 1 and errors[0] == lines[-1], r.stderr
    assert lines[-1].startswith("giblet-preprocess: error: ")
    for n in needles:
        assert n in lines[-1], lines[-1]


def _set_subject(study, subject, path):
    raw = yaml.safe_load(study.read_text())
    raw["inputs"]["fmri"][subject] = str(path)
    study.write_text(yaml.safe_dump(raw))


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))


BAD = ["missing", "not_nifti", "3d", "5d", "one_tr", "grid", "affine", "nan", "truncated", "all_zero", "complex",
       "rgb", "huge_header", "header_tr", "header_tr_ms"]


@pytest.fixture(scope="module")
def built_fmri(tmp_path_factory, fmri_study_template):
    """The fMRI-only study, built once for every bad-input case (each case works on a copy)."""
    root = tmp_path_factory.mktemp("built_fmri")
    shutil.copytree(fmri_study_template.parent, root / "s")
    config = root / "s" / fmri_study_template.name
    assert cli("run", config).returncode == 0
    return config


def _bad_bold(case, bold, bad):
    """Write the bad input of ``case`` to ``bad`` from sub-01's run; returns the message's needles."""
    img = nib.load(str(bold / "sub-01.nii.gz"))
    data, aff = np.asanyarray(img.dataobj).astype(np.float32), img.affine
    needles = {"missing": ["does not exist"], "not_nifti": ["not a readable NIfTI"],
               "3d": ["expected 4D"], "5d": ["expected 4D"], "one_tr": ["1 TR(s)"],
               "grid": ["grid (9, 12, 8) differs"], "affine": ["affine differs"], "nan": ["NaN/inf", "TR 3"],
               "truncated": ["truncated or corrupt"], "all_zero": ["constant over the served TRs"],
               "complex": ["complex", "real numbers"], "rgb": ["RGB", "real numbers"],
               "huge_header": ["header declares", "the file holds"],
               "header_tr": ["header says TR = 2 s", "tr_s = 1.5", "trust_config_tr"],
               "header_tr_ms": ["header says TR = 2 s (2000 msec)", "tr_s = 1.5"]}[case]
    if case == "not_nifti":
        bad.write_bytes(b"this is not an image")
    elif case in ("3d", "5d", "one_tr", "grid", "affine", "nan", "all_zero"):
        data = {"3d": data[..., 0], "5d": data[..., None], "one_tr": data[..., :1], "grid": data[:9]}.get(case, data)
        if case == "nan":
            data[4, 5, 3, 3] = np.nan
        _save(bad, np.zeros_like(data) if case == "all_zero" else data,
              aff * np.diag([2, 1, 1, 1]) if case == "affine" else aff)
    elif case == "truncated":
        raw = gzip.compress(gzip.decompress((bold / "sub-02.nii.gz").read_bytes()))
        bad.write_bytes(raw[: len(raw) // 2])
    elif case == "complex":
        _save(bad, data.astype(np.complex64) * (1 + 1j), aff)
    elif case == "rgb":
        rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(rgb, aff), str(bad))
    elif case == "huge_header":  # a header that declares far more TRs than the file holds
        out = nib.Nifti1Image(data, aff)
        out.header.set_xyzt_units("mm", "sec")
        out.header.set_zooms((3.0, 3.0, 3.0, 1.5))
        nib.save(out, str(bad))
        raw = bytearray(gzip.decompress(bad.read_bytes()))
        dims = np.frombuffer(bytes(raw[40:56]), dtype="<i2").copy()  # NIfTI-1 dim[0..7], int16
        dims[4] = 32767  # 32,767 TRs (a NIfTI-2 header can say 10**9: the same lie, the same check)
        raw[40:56] = dims.tobytes()
        bad.write_bytes(gzip.compress(bytes(raw)))
    elif case in ("header_tr", "header_tr_ms"):
        out = nib.Nifti1Image(data, aff)
        out.header.set_xyzt_units("mm", "sec" if case == "header_tr" else "msec")
        out.header.set_zooms((3.0, 3.0, 3.0, 2.0 if case == "header_tr" else 2000.0))
        nib.save(out, str(bad))
    return needles


@pytest.mark.parametrize("case", BAD)
def test_bad_bold_inputs_fail_in_one_line_and_keep_completed_arrays(built_fmri, tmp_path, case):
    shutil.copytree(built_fmri.parent, tmp_path / "s")
    study = tmp_path / "s" / built_fmri.name
    store = study.parent / "study.zarr"
    before = store_arrays(store)
    manifest_before = json.loads((store / "manifest.json").read_text())["units"]["fmri/sub-01/run-1"]
    bold = study.parent / "bold"
    needles = _bad_bold(case, bold, bold / "bad.nii.gz")
    _set_subject(study, "sub-09", bold / "bad.nii.gz")
    r = cli("run", study)
    _one_line_error(r, *needles, *(["sub-09"]))
    after = store_arrays(store)
    assert before.keys() <= after.keys()
    for name, arr in before.items():
        np.testing.assert_array_equal(after[name], arr)
    assert json.loads((store / "manifest.json").read_text())["units"]["fmri/sub-01/run-1"] == manifest_before


def test_usage_and_config_errors_exit_codes(tmp_path, fmri_study):
    assert cli("run", "--bogus").returncode == 2
    r = cli("run", tmp_path / "none.yaml")
    _one_line_error(r, "config file not found")
    r = cli("run", fmri_study, "fmri.detrnd=true")
    _one_line_error(r, "did you mean 'detrend'")
    r = cli("run", fmri_study, "--debug", "fmri.detrnd=true")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_kill_anywhere_then_resume_gives_identical_arrays(fmri_study_template, tmp_path):
    reference = tmp_path / "ref"
    shutil.copytree(fmri_study_template.parent, reference)
    assert cli("run", reference / "study.yaml", "--workers", "1").returncode == 0
    expected = store_arrays(reference / "study.zarr")
    killed = tmp_path / "killed"
    shutil.copytree(fmri_study_template.parent, killed)
    rng = np.random.default_rng(0)
    for delay in sorted(rng.uniform(0.5, 6.0, size=3)):
        proc = subprocess.Popen(CLI + ["run", str(killed / "study.yaml"), "--workers", "1", "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if (killed / "study.zarr" / "manifest.json").exists():
            try:  # whatever open_store serves must be complete and correct
                s = giblet.open_store(killed / "study.zarr")
                for subject in s.subjects:
                    np.testing.assert_array_equal(s.fmri(subject), expected[f"fmri/{subject}/run-1/bold"])
            except giblet.StoreError:
                pass
    r = cli("run", killed / "study.yaml", "--workers", "1")
    assert r.returncode == 0, r.stderr
    got = store_arrays(killed / "study.zarr")
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert cli("verify", killed / "study.zarr").returncode == 0


def test_second_concurrent_run_is_refused_naming_the_holder(fmri_study):
    from giblet.store import StoreLock

    store = fmri_study.parent / "study.zarr"
    store.mkdir()
    with StoreLock(store):
        r = cli("run", fmri_study)
    _one_line_error(r, "locked by another run", f"pid {os.getpid()}")
    (store / ".giblet").mkdir(exist_ok=True)
    (store / ".giblet" / "lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7}))
    assert cli("run", fmri_study).returncode == 0  # stale lock recovered


def test_verify_names_a_flipped_byte(fmri_study):
    assert cli("run", fmri_study).returncode == 0
    store = fmri_study.parent / "study.zarr"
    chunk = store / "fmri/sub-02/run-1/bold/c/1/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    r = cli("verify", store)
    assert r.returncode == 1 and "fmri/sub-02/run-1/bold: chunk c/1/0 checksum mismatch" in r.stdout


def test_run_without_a_config_is_a_usage_error():
    r = cli("run")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("usage: giblet-preprocess run") and "CONFIG is required (or use --demo)" in r.stderr


def test_override_paths_are_relative_to_the_working_directory_in_both_commands(fmri_study, tmp_path):
    shell = tmp_path / "shell"
    shell.mkdir()
    st = subprocess.run(CLI + ["status", str(fmri_study), "output=here.zarr"], capture_output=True, text=True,
                        cwd=shell, timeout=300)
    assert st.returncode == 0, st.stderr
    assert st.stdout.splitlines()[0] == f"store {shell / 'here.zarr'}"  # not next to the YAML
    tiny = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml"
    tr = subprocess.run([sys.executable, "-m", "pipelines.train", str(tiny), "store=missing.zarr", "out=run"],
                        capture_output=True, text=True, cwd=shell, timeout=300)
    assert tr.returncode == 1 and tr.stderr.startswith(f"giblet-train: error: {shell / 'missing.zarr'}: "), tr.stderr
