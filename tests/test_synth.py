"""giblet.synth: files independent of the worker count, the real spreadsheet copied in, the CLI."""
from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import yaml

from conftest import REAL_XLSX
from giblet.config import load_config
from giblet.synth import SHERLOCK_STAGES, make_study


def test_subjects_written_by_two_processes_equal_one_process(tmp_path):
    kw = dict(n_subjects=3, n_trs=24, shape=(9, 10, 8), movie=False, annotations=False, seed=4)
    one, two = make_study(tmp_path / "one", workers=1, **kw), make_study(tmp_path / "two", workers=2, **kw)
    subjects = yaml.safe_load(one.read_text())["inputs"]["fmri"]
    assert list(subjects) == ["sub-01", "sub-02", "sub-03"]
    data = {}
    for name, rel in subjects.items():
        a = nib.load(str(one.parent / rel))
        b = nib.load(str(two.parent / rel))
        assert a.get_data_dtype() == np.int16 and a.shape == (9, 10, 8, 24)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        data[name] = np.asanyarray(a.dataobj)
    assert not np.array_equal(data["sub-01"], data["sub-02"])  # each subject its own noise
    np.testing.assert_array_equal(np.load(one.parent / "truth.npz")["weights"], np.load(two.parent / "truth.npz")["weights"])


def test_real_annotation_file_is_copied_and_read_by_its_tr_columns(tmp_path):
    config = make_study(tmp_path, n_subjects=1, n_trs=20, shape=(9, 10, 8), movie=False, seed=0,
                        annotations_file=REAL_XLSX, stages={"text": SHERLOCK_STAGES["text"]})
    copied = tmp_path / "annotations.xlsx"
    assert copied.read_bytes() == REAL_XLSX.read_bytes()
    cfg = load_config(config)
    assert str(cfg.inputs.annotations).endswith("annotations.xlsx")
    assert cfg.text.time_unit == "tr" and cfg.text.start_column == "Start Time (TRs, 1.5s)"


def test_cli_writes_a_demo_study_and_prints_its_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "giblet.synth", str(tmp_path / "s"), "--subjects", "2", "--workers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    config = r.stdout.strip().splitlines()[-1]
    assert config.endswith("study.yaml")
    inputs = yaml.safe_load(open(config))["inputs"]
    assert list(inputs["fmri"]) == ["sub-01", "sub-02"] and inputs["movie"] == "movie.mp4"
