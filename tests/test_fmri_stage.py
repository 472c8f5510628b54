"""fMRI stage end to end through the real engine (LocalCluster), store and reader."""
from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml

import giblet
from giblet.config import load_config
from giblet.errors import InputError, StoreError
from giblet.verify import verify_store
from pipelines import engine
from tests.conftest import REAL_BOLD


def build(config, *overrides, **kw):
    return engine.run(load_config(config, overrides), progress=False, **kw)  # in-process: a small study


def raw_masked(path, mask):
    return np.asanyarray(nib.load(str(path)).dataobj)[mask].T  # (tr, voxel), float64 scaled


def test_round_trip_denormalize_equals_raw_and_verify(fmri_study):
    report = build(fmri_study)
    assert sorted(report.ran) == ["fmri/mask", "fmri/sub-01/run-1", "fmri/sub-02/run-1", "fmri/sub-03/run-1"]
    s = giblet.open_store(report.store)
    assert s.subjects == ["sub-01", "sub-02", "sub-03"] and s.runs == ["run-1"] and s.n_trs() == 30
    mask = s.mask
    assert mask.dtype == bool and 0 < mask.sum() < mask.size
    assert (s.voxels == np.argwhere(mask)).all() and s.n_voxels == mask.sum()
    z = s.fmri("sub-02")
    assert z.shape == (30, s.n_voxels) and z.dtype == np.float32
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
    mean, std = s.fmri_stats("sub-02")
    assert mean.min() > 100  # raw scanner units, not z-scores
    raw = raw_masked(fmri_study.parent / "bold/sub-02.nii.gz", mask)
    back = s.denormalize("sub-02", z)
    assert np.max(np.abs(back - raw) / np.abs(raw)) < 1e-5
    assert verify_store(report.store) == []
    ds = s.to_xarray()
    assert ds["fmri"].dims == ("subject", "tr", "voxel") and ds["fmri"].shape == (3, 30, s.n_voxels)
    assert ds.sizes["x"] == 10


def test_real_nipy_bold_round_trip(tmp_path):
    for s in ("sub-01", "sub-02"):
        shutil.copy(REAL_BOLD, tmp_path / f"{s}.nii.gz")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output": "real.zarr", "tr_s": 2.0, "inputs": {
        "fmri": {"sub-01": "sub-01.nii.gz", "sub-02": "sub-02.nii.gz"}}, "fmri": {"mask_strategy": "background"}}))
    report = build(cfg)
    s = giblet.open_store(report.store)
    raw = raw_masked(REAL_BOLD, s.mask)
    assert raw.min() > 600 and raw.max() > 5000  # raw scanner units, as shipped
    for subject in s.subjects:
        back = s.denormalize(subject, s.fmri(subject))
        assert np.max(np.abs(back - raw) / np.abs(raw)) < 1e-5
    assert verify_store(report.store) == []

    # detrend + high-pass on: the saved mean is still the raw voxel mean (the filtered signal is
    # not zero-mean; it is re-centred), and denormalize returns nilearn's cleaned signal on that mean
    from nilearn.signal import clean as nl_clean

    s = giblet.open_store(build(cfg, "fmri.detrend=true", "fmri.high_pass=0.02").store)
    mean, std = s.fmri_stats("sub-01")
    np.testing.assert_allclose(mean, raw.mean(0), rtol=1e-6)
    cleaned = nl_clean(raw, detrend=True, high_pass=0.02, t_r=2.0, standardize=None, standardize_confounds=False)
    expect = cleaned - cleaned.mean(0) + raw.mean(0)
    np.testing.assert_allclose(s.denormalize("sub-01", s.fmri("sub-01")), expect, rtol=0, atol=1e-3 * raw.mean())
    np.testing.assert_allclose(std, expect.std(0), rtol=1e-4)
    assert verify_store(s.path) == []
    # the header says TR 2.0 s: a config that says 1.5 is refused, unless told to trust the config
    with pytest.raises(InputError, match="header says TR = 2 s.*tr_s = 1.5.*trust_config_tr"):
        build(cfg, "tr_s=1.5")
    s = giblet.open_store(build(cfg, "tr_s=1.5", "fmri.trust_config_tr=true").store)
    assert s.unit_meta("fmri/sub-01/run-1")["runs"]["run-1"]["header_tr_s"] == 2.0 and s.tr_s == 1.5


def test_epi_mask_on_tiny_real_image_fails_with_fix(tmp_path):
    shutil.copy(REAL_BOLD, tmp_path / "a.nii.gz")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"tr_s": 2.0, "inputs": {"fmri": {"sub-01": "a.nii.gz"}}}))
    with pytest.raises(InputError, match="mask_strategy=background"):
        build(cfg)


def test_cache_hits_and_minimal_recompute(fmri_study, monkeypatch):
    build(fmri_study)
    assert build(fmri_study).ran == []
    # a parameter of the subject units: subjects recompute, the mask does not
    assert sorted(build(fmri_study, "fmri.detrend=true").ran) == ["fmri/sub-01/run-1", "fmri/sub-02/run-1",
                                                                  "fmri/sub-03/run-1"]
    # one subject's file content changes: only that subject
    path = fmri_study.parent / "bold/sub-03.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) * 1.01, img.affine, img.header), str(path))
    assert build(fmri_study, "fmri.detrend=true").ran == ["fmri/sub-03/run-1"]
    # adding a subject computes only that subject (the mask comes from the reference subject)
    shutil.copy(fmri_study.parent / "bold/sub-01.nii.gz", fmri_study.parent / "bold/sub-04.nii.gz")
    raw = yaml.safe_load(fmri_study.read_text())
    raw["inputs"]["fmri"]["sub-04"] = "bold/sub-04.nii.gz"
    fmri_study.write_text(yaml.safe_dump(raw))
    assert build(fmri_study, "fmri.detrend=true").ran == ["fmri/sub-04/run-1"]
    # removing it drops its arrays; nothing else recomputes
    del raw["inputs"]["fmri"]["sub-04"]
    fmri_study.write_text(yaml.safe_dump(raw))
    report = build(fmri_study, "fmri.detrend=true")
    assert report.ran == [] and report.removed == ["fmri/sub-04/run-1"]
    assert giblet.open_store(report.store).subjects == ["sub-01", "sub-02", "sub-03"]
    # a new stage code version recomputes that stage
    from pipelines.fmri_stage import FmriStage

    monkeypatch.setattr(FmriStage, "version", FmriStage.version + 1)
    assert len(build(fmri_study, "fmri.detrend=true").ran) == 4


def test_force_and_only(fmri_study):
    build(fmri_study)
    assert len(build(fmri_study, force=True, only=["fmri"]).ran) == 4
    from giblet.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        build(fmri_study, only=["nope"])


@pytest.mark.parametrize("detrend, high_pass", [(True, 0.01), (True, None), (False, 0.02)])
def test_clean_equals_nilearn_signal_clean(detrend, high_pass):
    from nilearn.signal import clean as nl_clean

    from giblet.features.fmri import clean

    rng = np.random.default_rng(3)
    t = np.arange(300)[:, None]
    x = (1000 + 0.2 * t * rng.normal(size=70) + 5 * np.sin(t / 40.0) + rng.normal(0, 3, size=(300, 70)))
    cleaned = nl_clean(x, detrend=detrend, high_pass=high_pass, t_r=1.5 if high_pass else None,
                       standardize=None, standardize_confounds=False)
    expect = cleaned - cleaned.mean(axis=0) + x.mean(axis=0)  # nilearn's signal, on the raw voxel mean
    got = clean(x.astype(np.float32), detrend, high_pass, 1.5, block=32)  # three blocks, the last one short
    np.testing.assert_allclose(got, expect, rtol=0, atol=2e-3)  # float32 storage of ~1000-unit values
    np.testing.assert_allclose(got.mean(0, dtype=np.float64), x.mean(0), rtol=1e-6)  # the raw mean, exactly


def test_a_run_too_short_for_the_high_pass_filter_is_one_clear_line(fmri_study):
    path = fmri_study.parent / "bold/sub-02.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., :12], img.affine, img.header), str(path))
    with pytest.raises(InputError, match=r"sub-02/run-1: fmri.high_pass=0.01 Hz cannot filter its 12 served TRs"):
        build(fmri_study, "fmri.high_pass=0.01")


def test_detrend_removes_planted_drift(fmri_study):
    plain = giblet.open_store(build(fmri_study).store).fmri("sub-01")
    clean = giblet.open_store(build(fmri_study, "fmri.detrend=true").store).fmri("sub-01")
    t = np.arange(30) - 14.5
    slope = lambda z: np.abs((t[:, None] * z).sum(0) / (t**2).sum()).mean()  # noqa: E731
    assert slope(clean) < 1e-4 < slope(plain)


def test_zero_variance_voxels_counted_and_finite(fmri_study):
    path = fmri_study.parent / "bold/sub-02.nii.gz"
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[5, 6, 4, :] = 900.0  # a constant voxel in the middle of the brain
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    s = giblet.open_store(build(fmri_study).store)
    col = int(np.flatnonzero((s.voxels == [5, 6, 4]).all(1))[0])
    mean, std = s.fmri_stats("sub-02")
    assert std[col] == 0 and mean[col] == pytest.approx(900.0)
    z = s.fmri("sub-02")
    assert np.isfinite(z).all() and (z[:, col] == 0).all()
    assert s.unit_meta("fmri/sub-02/run-1")["runs"]["run-1"]["n_zero_variance"] == 1
    assert s.denormalize("sub-02", z)[:, col] == pytest.approx(900.0)
    with pytest.raises(InputError, match="zero variance over tr.*fmri.zero_variance=zero"):
        build(fmri_study, "fmri.zero_variance=error")


def test_subjects_of_different_length_are_trimmed_not_warped(fmri_study):
    path = fmri_study.parent / "bold/sub-03.nii.gz"
    img = nib.load(str(path))
    short = np.asanyarray(img.dataobj)[..., :25]
    nib.save(nib.Nifti1Image(short, img.affine), str(path))
    s = giblet.open_store(build(fmri_study).store)
    # each subject serves its own TRs (no stimulus here to cut them), z-scored over exactly those
    assert s.n_trs() == 30 and s.n_trs("run-1", "sub-03") == 25 and s.n_trs("run-1", "sub-01") == 30
    assert s.fmri("sub-01").shape[0] == 30 and s.fmri("sub-03").shape[0] == 25
    np.testing.assert_allclose(s.fmri("sub-03").mean(0), 0, atol=1e-4)
    assert s.split == {"train": {"run-1": (0, 24)}, "val": {"run-1": (24, 30)}, "test": {}}
    assert s.split_trs("val", "run-1", "sub-03") == (24, 25)


def test_incomplete_store_is_never_served(fmri_study):
    report = build(fmri_study)
    manifest = report.store / "manifest.json"
    import json

    m = json.loads(manifest.read_text())
    del m["align"]
    manifest.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="incomplete"):
        giblet.open_store(report.store)
    (report.store / "manifest.json").unlink()
    with pytest.raises(StoreError, match="incomplete"):
        giblet.open_store(report.store)
    assert verify_store(report.store)[0].endswith("rerun it")
