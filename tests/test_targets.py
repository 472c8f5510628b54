"""Target sets beside the voxels (issue #21): atlas parcels, coordinate spheres, fsaverage5.

One tiny study is built by the engine once per module: 2 subjects on a 12 mm MNI grid
(16x19x16), BOLD written here (not by giblet.synth's generator) with a *parcel-wise* planted
signal -- every voxel of a parcel reads the parcel's mix of the movie's colour latents -- plus
drift and noise, detrended by the fMRI stage. The atlas lies on another grid (6 mm, shifted)
and has a label outside the brain. Each target is checked against nilearn called directly
on the same cleaned data. The evaluation on a target set (noise ceiling, ridge baseline,
giblet-evaluate --target) uses the same store (copied where it caches a ceiling).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from giblet.config import load_config
from giblet.errors import ConfigError, InputError
from giblet.normalize import ZScorer
from giblet.reader import open_store
from pipelines import engine

N_TRS = 60
SHAPE = (16, 19, 16)
AFFINE = np.array([[12.0, 0, 0, -90], [0, 12.0, 0, -126], [0, 0, 12.0, -72], [0, 0, 0, 1]])  # MNI mm
ATLAS_AFFINE = np.array([[6.0, 0, 0, -93], [0, 6.0, 0, -129], [0, 0, 6.0, -75], [0, 0, 0, 1]])
ATLAS_SHAPE = (32, 38, 32)
PARCELS = "parcels/atlas"
SURFACE = "surface/fsaverage5"
TARGETS = [{"name": "atlas", "kind": "parcels", "labels": "atlas.nii.gz", "labels_table": "atlas.tsv"},
           {"name": "power", "kind": "spheres", "coords": "power_2011", "radius_mm": 8.0},
           {"name": "fsaverage5", "kind": "surface", "n_samples": 2}]


def world(shape, affine) -> np.ndarray:
    """``(x, y, z, 3)`` mm coordinates of a grid's voxel centres."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return nib.affines.apply_affine(affine, ijk)


def brain(shape, affine) -> np.ndarray:
    """An ellipsoid brain around the MNI brain's centre."""
    xyz = world(shape, affine)
    return (((xyz - [0, -18, 18]) / [72, 102, 80]) ** 2).sum(-1) < 1


def atlas_labels(shape, affine) -> np.ndarray:
    """Octants of the brain (labels 1..8), and label 9: a cube outside the brain."""
    xyz = world(shape, affine)
    octant = 1 + (xyz[..., 0] > 0) + 2 * (xyz[..., 1] > -18) + 4 * (xyz[..., 2] > 18)
    labels = np.where(brain(shape, affine), octant, 0)
    labels[np.all(np.abs(xyz - [85, 80, 100]) < 6, axis=-1)] = 9
    return labels.astype(np.int16)


def write_bold(path: Path, regressors: np.ndarray, seed: int) -> None:
    """Raw int16-like BOLD whose brain voxels follow their parcel's planted signal."""
    rng = np.random.default_rng(seed)
    inside = brain(SHAPE, AFFINE)
    parcel = atlas_labels(SHAPE, AFFINE)
    weights = np.random.default_rng(0).normal(size=(10, 3))  # parcel -> colour latents, shared by subjects
    signal = regressors[:N_TRS, :3] @ weights.T  # (tr, parcel)
    base = np.where(inside, 900.0 + 100 * rng.random(SHAPE), 20.0)
    t = np.linspace(0, 1, N_TRS)
    data = base[..., None] * (1 + 0.05 * signal[:, parcel].transpose(1, 2, 3, 0) * inside[..., None]
                              + 0.03 * t + 0.01 * rng.standard_normal(SHAPE + (N_TRS,)))
    img = nib.Nifti1Image(data.astype(np.float32), AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((12.0, 12.0, 12.0, 1.5))
    nib.save(img, str(path))


def make_targets_study(root: Path) -> Path:
    """The module's study: giblet.synth writes the movie (colour scenes) and the config; the BOLD,
    the mask and the atlas are written here."""
    from giblet.synth import make_study

    config = make_study(root, n_subjects=2, n_trs=N_TRS, shape=SHAPE, movie_size=(32, 18), fps=5, annotations=False,
                        audio_track=False, seed=5)
    truth = np.load(root / "truth.npz")
    raw = yaml.safe_load(config.read_text())
    for i, rel in enumerate(raw["inputs"]["fmri"].values()):
        write_bold(root / rel, truth["regressors"], seed=i)
    nib.save(nib.Nifti1Image(brain(SHAPE, AFFINE).astype(np.uint8), AFFINE), str(root / "mask.nii.gz"))
    nib.save(nib.Nifti1Image(atlas_labels(ATLAS_SHAPE, ATLAS_AFFINE), ATLAS_AFFINE), str(root / "atlas.nii.gz"))
    (root / "atlas.tsv").write_text("index\tname\n" + "".join(f"{i}\toctant-{i}\n" for i in range(1, 10)))
    raw["fmri"] = {"mask_strategy": "file", "mask_file": "mask.nii.gz", "detrend": True, "targets": TARGETS}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def scheduler():
    """An in-process Dask cluster (threads): the engine runs as on a cluster, without spawning workers."""
    from conftest import inproc_scheduler

    return inproc_scheduler()


@pytest.fixture(scope="module")
def built(tmp_path_factory, scheduler) -> tuple[Path, Path]:
    """``(config path, store path)`` of the study, built once."""
    root = tmp_path_factory.mktemp("targets")
    config = make_targets_study(root)
    report = engine.run(load_config(config), scheduler=scheduler, progress=False, log=lambda m: None)
    return config, Path(report.store)


def cleaned_volume(view, subject: str) -> nib.Nifti1Image:
    """The cleaned signal the voxel unit z-scored, ``bold * std + mean``, back on the grid (0 outside)."""
    x = view.fmri(subject) * view.fmri_stats(subject)[1] + view.fmri_stats(subject)[0]
    vol = np.zeros(view.mask.shape + (len(x),), np.float32)
    vol[view.mask] = x.T
    return nib.Nifti1Image(vol, view.affine)


def served(view, subject: str, target: str) -> np.ndarray:
    """A target's stored series back on its own scale (``denormalize``)."""
    return view.denormalize(subject, view.fmri(subject, target=target), target=target)


# -- the three sets equal nilearn called directly -------------------------------------------------------
def test_parcels_equal_nilearn_labels_masker_on_the_cleaned_data(built):
    from nilearn.maskers import NiftiLabelsMasker

    from giblet.features.fmri import clean, read_masked

    config, store = built
    view, root = open_store(store), config.parent
    raw = read_masked(root / "bold" / "sub-01.nii.gz", "sub-01", view.mask, 16)  # the voxel unit's input, re-cleaned
    cleaned = cleaned_volume(view, "sub-01")
    np.testing.assert_allclose(cleaned.get_fdata()[view.mask].T, clean(raw, True, None, 1.5), rtol=1e-4, atol=1e-2)
    masker = NiftiLabelsMasker(str(root / "atlas.nii.gz"), mask_img=str(root / "mask.nii.gz"), strategy="mean",
                               standardize=None)
    direct = masker.fit_transform(cleaned)  # the atlas on its own 6 mm grid: nilearn resamples it (nearest)
    info = view.target_info(PARCELS)
    columns = [masker.region_ids_[i] for i in range(direct.shape[1])]
    assert info["arrays"]["labels"].tolist() == columns == list(range(1, 9))
    assert info["empty"] == [9] and info["attrs"]["names"][0] == "octant-1"  # outside the brain: recorded, dropped
    np.testing.assert_allclose(served(view, "sub-01", PARCELS), direct, rtol=1e-5)
    np.testing.assert_allclose(view.fmri("sub-01", target=PARCELS), ZScorer().fit(direct).transform(direct), atol=1e-4)


def test_spheres_equal_nilearn_spheres_masker_and_the_dropped_ones_are_empty(built):
    from nilearn import datasets
    from nilearn.maskers import NiftiSpheresMasker

    config, store = built
    view, mask = open_store(store), str(config.parent / "mask.nii.gz")
    rois = datasets.fetch_coords_power_2011().rois
    info = view.target_info("parcels/power")
    kept = rois.set_index("roi").loc[info["arrays"]["labels"], ["x", "y", "z"]].to_numpy(float)
    np.testing.assert_array_equal(info["arrays"]["coords"], kept)
    cleaned = cleaned_volume(view, "sub-02")
    masker = NiftiSpheresMasker(kept, radius=8.0, mask_img=mask, allow_overlap=True, standardize=None)
    direct = masker.fit_transform(cleaned)
    np.testing.assert_allclose(served(view, "sub-02", "parcels/power"), direct, rtol=1e-5)
    assert info["empty"] and len(info["empty"]) + info["n_columns"] == len(rois)
    for label in info["empty"]:  # nilearn itself finds these spheres empty
        seed = rois.set_index("roi").loc[[label], ["x", "y", "z"]].to_numpy(float)
        with pytest.raises(ValueError, match="empty"):
            NiftiSpheresMasker(seed, radius=8.0, mask_img=mask, standardize=None).fit_transform(cleaned)


def test_surface_equals_vol_to_surf_of_both_hemispheres(built):
    from nilearn.datasets import load_fsaverage
    from nilearn.surface import vol_to_surf

    config, store = built
    view, mask = open_store(store), str(config.parent / "mask.nii.gz")
    fs, cleaned = load_fsaverage("fsaverage5"), cleaned_volume(view, "sub-01")
    direct = np.concatenate([vol_to_surf(cleaned, fs["pial"].parts[h], inner_mesh=fs["white_matter"].parts[h],
                                         kind="depth", n_samples=2, mask_img=mask) for h in ("left", "right")])
    vertex = view.target_info(SURFACE)["arrays"]["vertex"]
    assert direct.shape[0] == 20484 and np.isnan(direct[np.setdiff1d(np.arange(20484), vertex)]).all()
    np.testing.assert_allclose(served(view, "sub-01", SURFACE), direct[vertex].T, rtol=1e-4, atol=1e-3)


# -- statistics, verify, the readers ---------------------------------------------------------------------
def test_every_target_is_z_scored_over_its_served_trs_and_denormalizes_back(built):
    from giblet.verify import _check_targets, verify_store

    _, store = built
    view = open_store(store)
    assert view.targets == [PARCELS, "parcels/power", SURFACE]
    for target in view.targets:
        for subject in view.subjects:
            z = view.fmri(subject, target=target)
            assert z.shape == (view.n_trs("run-1", subject), view.n_columns(target))
            np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
            np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
            mean, std = view.fmri_stats(subject, target=target)
            np.testing.assert_allclose(view.denormalize(subject, z, target=target), z * std + mean, rtol=1e-6)
    assert verify_store(store) == []
    key = f"targets/{PARCELS}/sub-01/run-1"
    view.manifest["units"][key]["params"]["voxel_unit"] = "0" * 16  # as if the voxels were rebuilt without it
    assert [p.split(":")[0] for p in _check_targets(view)] == [key]
    xr = open_store(store).to_xarray(target=PARCELS)
    assert xr["fmri"].dims == ("subject", "tr", "parcel") and xr["target_labels"].values.tolist() == list(range(1, 9))


def test_dataset_serves_a_parcel_target_and_its_statistics(built):
    from giblet.data import GibletDataset
    from giblet.errors import ModalityMissingError

    _, store = built
    ds = GibletDataset(store, "train", target=PARCELS, modalities=["fmri"])
    view = open_store(store)
    assert ds.n_voxels == 8 and ds.sample_spec()["fmri"][0] == (8,)
    sample = ds[5]
    s, r, t = ds.locate(5)
    np.testing.assert_array_equal(sample["fmri"].numpy(), view.fmri(ds.subjects[s], target=PARCELS)[t])
    np.testing.assert_allclose(ds.denormalize(sample["fmri"][None], s, r)[0].numpy(),
                               served(view, ds.subjects[s], PARCELS)[t], rtol=1e-5)
    with pytest.raises(ModalityMissingError, match="no target set 'parcels/nope'.*fmri.targets"):
        GibletDataset(store, target="parcels/nope")


# -- units: one per set and (subject, run); the voxels never see fmri.targets ----------------------------
def test_changing_the_atlas_rebuilds_only_its_units_and_targets_never_touch_the_voxels(built, scheduler, tmp_path):
    from pipelines.engine import plan_for

    config, store = built
    root = tmp_path / "copy"
    shutil.copytree(config.parent, root)
    before = {k: e["fingerprint"] for k, e in open_store(root / store.name).manifest["units"].items()}
    labels = atlas_labels(ATLAS_SHAPE, ATLAS_AFFINE)
    labels[labels == 2] = 1  # merge two octants
    nib.save(nib.Nifti1Image(labels, ATLAS_AFFINE), str(root / "atlas.nii.gz"))
    report = engine.run(load_config(root / config.name), scheduler=scheduler, progress=False, log=lambda m: None)
    atlas_units = {f"targets/{PARCELS}", f"targets/{PARCELS}/sub-01/run-1", f"targets/{PARCELS}/sub-02/run-1"}
    assert set(report.ran) == atlas_units
    after = {k: e["fingerprint"] for k, e in open_store(root / store.name).manifest["units"].items()}
    assert {k for k in after if after[k] != before[k]} == atlas_units
    assert open_store(root / store.name).n_columns(PARCELS) == 7
    # the voxel units' fingerprints do not depend on fmri.targets at all
    _, with_targets = plan_for(load_config(config))
    _, without = plan_for(load_config(config, ["fmri.targets=[]"]))
    voxels = {u.key: u.fingerprint for u in without}
    assert voxels == {u.key: u.fingerprint for u in with_targets if u.key in voxels}
    assert all(k.startswith("targets/") for k in {u.key for u in with_targets} - set(voxels))


def test_training_on_parcels_learns_the_planted_parcel_signal_and_evaluates_per_parcel(built, tmp_path, capsys):
    from pipelines.evaluate import main as evaluate
    from pipelines.train import load_train_config, train

    _, store = built
    tiny = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml"
    cfg = load_train_config(tiny, [f"store={store}", f"out={tmp_path / 'run'}", f"data.target={PARCELS}",
                                   "data.window=4", "schedule.epochs=8", "log.every=10", "log.val_every=48",
                                   "log.ckpt_every=48"])
    summary = train(cfg)
    assert "8 columns of parcels/atlas" in capsys.readouterr().out  # the head is sized from the store
    assert summary["r_mean"] > 0.6  # the parcels follow the movie's colours; chance is ~0
    assert evaluate([str(tmp_path / "run"), "--out", str(tmp_path / "eval")]) == 0
    table = (tmp_path / "eval" / "r_sub-01.tsv").read_text().splitlines()
    assert table[0] == "label\tname\tn_voxels\tvalue" and len(table) == 9 and table[1].startswith("1\toctant-1\t")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["target"] == PARCELS and "ceiling_note" not in summary  # the ceiling on the same parcels
    assert len((tmp_path / "eval" / "ceiling_sub-01.tsv").read_text().splitlines()) == 9


# -- evaluation on a target set: the noise ceiling and the ridge baseline on its columns --------------------
def direct_ceiling(view, target: str, split: str) -> np.ndarray:
    """``(subject, column)``: each subject's z-scored series over the split's TRs against the mean of the
    other subjects' at the same TRs, Pearson r column by column in numpy (0 without variance). The study
    has one run that every subject serves whole, uncensored: no TR is left out."""
    run = view.runs[0]
    assert all(view.n_trs(run, s) == view.n_trs(run) and not view.censored(s, run).any() for s in view.subjects)
    a, b = view.split_trs(split, run)
    ys = np.stack([view.fmri(s, run, target=target)[a:b] for s in view.subjects]).astype(np.float64)
    out = []
    for i in range(len(ys)):
        x, m = ys[i] - ys[i].mean(0), np.delete(ys, i, 0).mean(0)
        m = m - m.mean(0)
        den = np.sqrt((x * x).sum(0) * (m * m).sum(0))
        out.append(np.where(den > 1e-9, (x * m).sum(0) / np.where(den > 1e-9, den, 1), 0.0))
    return np.array(out)


def test_noise_ceiling_on_target_sets_is_the_loso_correlation_cached_under_its_own_name(built, tmp_path):
    from giblet.evaluation.ceiling import ceiling_name, noise_ceiling
    from giblet.verify import verify_store

    store = tmp_path / "copy.zarr"
    shutil.copytree(built[1], store)  # the ceilings are cached in the store: not in the module's
    view = open_store(store)
    voxels = noise_ceiling(view, "all", cache=False)  # before any target set's entry exists
    for target, dim in ((PARCELS, "parcel"), (SURFACE, "vertex")):
        val = noise_ceiling(view, "val", target=target, cache=False)
        assert not val.cached and val.isc.shape == (2, view.n_columns(target)) and val.subjects == view.subjects
        np.testing.assert_allclose(val.isc, direct_ceiling(view, target, "val"), atol=1e-5)
        saved = noise_ceiling(store, "all", target=target)  # "all": no other test of the module caches it
        assert not saved.cached
        np.testing.assert_allclose(saved.isc, direct_ceiling(view, target, "all"), atol=1e-5)
        name = ceiling_name("all", target)
        entry = open_store(store).derived(name)
        assert entry["params"] == {"split": "all", "target": target, "version": 1}
        assert entry["meta"]["n_trs"] == saved.n_trs == {s: N_TRS for s in view.subjects}
        arr = open_store(store).array(f"{name}/isc")
        assert tuple(arr.metadata.dimension_names) == ("subject", dim) and arr.attrs["target"] == target
        again = noise_ceiling(store, "all", target=target)
        assert again.cached and again.n_trs == saved.n_trs
        np.testing.assert_array_equal(again.isc, saved.isc)
    assert ceiling_name("val", PARCELS) == "derived/noise_ceiling-val-parcels-atlas"
    assert (noise_ceiling(store, "all", target=PARCELS).isc > 0.5).all()  # the planted parcel signal is shared
    # the voxels: their name, params, attrs and values as before target sets had ceilings
    cached = noise_ceiling(store, "all", target="voxels")
    after = open_store(store)
    assert ceiling_name("all") == ceiling_name("all", "voxels") == "derived/noise_ceiling-all"
    assert after.derived("derived/noise_ceiling-all")["params"] == {"split": "all", "version": 1}
    assert "target" not in after.array("derived/noise_ceiling-all/isc").attrs
    assert tuple(after.array("derived/noise_ceiling-all/isc").metadata.dimension_names) == ("subject", "voxel")
    np.testing.assert_array_equal(cached.isc, voxels.isc)
    assert after.derived(ceiling_name("all", PARCELS)) and after.derived(ceiling_name("all", SURFACE))  # all kept
    assert verify_store(store) == []


def test_ridge_baseline_on_parcels_scores_per_subject_with_the_parcel_ceiling(built, tmp_path, capsys):
    from giblet.evaluation.ceiling import ceiling_name
    from giblet.evaluation.features import FeatureParams, StoreFeatures, store_features
    from giblet.evaluation.ridge import ridge_baseline
    from pipelines.evaluate import main as evaluate

    store, out = tmp_path / "copy.zarr", tmp_path / "eval"
    shutil.copytree(built[1], store)
    assert evaluate(["--baseline", "ridge", "--store", str(store), "--target", PARCELS, "--out", str(out)]) == 0
    assert "ridge baseline on parcels/atlas" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    view = open_store(store)
    direct = ridge_baseline(view, target=PARCELS).r["val"]
    isc = view.array(f"{ceiling_name('val', PARCELS)}/isc")[...]  # the CLI cached the parcels' ceiling
    assert summary["target"] == PARCELS and list(summary["subjects"]) == view.subjects == list(direct)
    for i, name in enumerate(view.subjects):
        assert direct[name].shape == (8,) and summary["subjects"][name]["n"] == 8
        assert summary["subjects"][name]["mean"] == pytest.approx(float(direct[name].mean()), abs=1e-5)
        assert summary["ceiling"]["subjects"][name]["mean"] == pytest.approx(float(isc[i].mean()), abs=1e-5)
        for kind, values in (("r", direct[name]), ("ceiling", isc[i])):
            rows = (out / f"{kind}_{name}.tsv").read_text().splitlines()
            assert rows[0] == "label\tname\tn_voxels\tvalue" and len(rows) == 9
            np.testing.assert_allclose([float(r.split("\t")[-1]) for r in rows[1:]], values, atol=1e-5)
    assert set(summary["files"]["figures"]) == {"per_subject", "r_vs_ceiling"} and summary["fraction_of_ceiling"]
    assert not list(out.glob("*.nii.gz"))  # no voxel maps for a target set
    # the planted parcel signal is found; the same features shuffled in time find nothing
    features = store_features(view, FeatureParams())
    rng = np.random.default_rng(0)
    null = StoreFeatures({r: x[rng.permutation(len(x))] for r, x in features.runs.items()}, features.bands,
                         features.delays)
    shuffled = ridge_baseline(view, target=PARCELS, features=null).r["val"]
    for name in view.subjects:
        assert direct[name].mean() > 0.5 and direct[name].mean() > shuffled[name].mean() + 0.3, name


def test_an_unknown_target_is_one_line_naming_the_stores_sets(built, capsys):
    from giblet.errors import ModalityMissingError
    from giblet.evaluation.ceiling import noise_ceiling
    from giblet.evaluation.ridge import ridge_baseline
    from pipelines.evaluate import main as evaluate

    _, store = built
    assert evaluate(["--baseline", "ridge", "--store", str(store), "--target", "parcels/nope", "--out", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("giblet-evaluate: error: ") and "--target 'parcels/nope'" in err
    assert "voxels, parcels/atlas, parcels/power, surface/fsaverage5" in err
    with pytest.raises(SystemExit) as exit_:
        evaluate([str(store), "--target", PARCELS])  # a run is scored on its own data.target
    assert exit_.value.code == 2 and "--target chooses the ridge baseline's targets" in capsys.readouterr().err
    for call in (lambda: ridge_baseline(store, target="surface/nope"),
                 lambda: noise_ceiling(store, "val", target="surface/nope", cache=False)):
        with pytest.raises(ModalityMissingError, match="no target set 'surface/nope'; it serves voxels, parcels/"):
            call()


# -- bad input: one line each -----------------------------------------------------------------------------
def test_bad_targets_fail_in_one_line_naming_the_target_and_the_fix(built, tmp_path):
    from giblet.features.targets import build_definition
    from pipelines.engine import plan_for

    config, store = built
    root = config.parent

    def plan(*overrides):
        with pytest.raises((ConfigError, InputError)) as err:
            plan_for(load_config(config, [f"fmri.targets={yaml.safe_dump(t, default_flow_style=True).strip()}"
                                          for t in overrides]))
        assert "\n" not in str(err.value)
        return str(err.value)

    prob = nib.Nifti1Image(np.random.default_rng(0).random(ATLAS_SHAPE + (3,)).astype(np.float32), ATLAS_AFFINE)
    nib.save(prob, str(tmp_path / "prob.nii.gz"))
    assert "has shape (32, 38, 32, 3); it must be 3D" in plan([{"name": "p", "labels": str(tmp_path / "prob.nii.gz")}])
    assert "did you mean 'coords'" in plan([{"name": "s", "kind": "spheres", "cords": "power_2011"}])
    (tmp_path / "seeds.csv").write_text("x,y,name\n0,-52,pcc\n")
    assert "lacks columns ['z']" in plan([{"name": "s", "kind": "spheres", "coords": str(tmp_path / "seeds.csv")}])
    assert "given twice" in plan([{"name": "a", "labels": "atlas.nii.gz"}, {"name": "a", "kind": "spheres",
                                                                          "coords": "power_2011"}])
    native = np.diag([3.0, 3.0, 3.0, 1.0])  # origin at a corner: not MNI
    img = nib.load(str(root / "bold" / "sub-01.nii.gz"))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), native, img.header), str(tmp_path / "native.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), native), str(tmp_path / "native_mask.nii.gz"))
    with pytest.raises(InputError, match=r"\(parcels/power\): the BOLD grid spans x 0\.\.45.*not in MNI space.*"
                                         r"assume_mni: true"):
        plan_for(load_config(config, [f"inputs.fmri={{sub-01: {tmp_path / 'native.nii.gz'}}}",
                                      f"fmri.mask_file={tmp_path / 'native_mask.nii.gz'}"]))
    spec = {"id": "parcels/far", "kind": "parcels", "labels": str(tmp_path / "far.nii.gz"), "labels_table": None}
    far = ATLAS_AFFINE.copy()
    far[:3, 3] += 500  # the same atlas, half a metre away
    nib.save(nib.Nifti1Image(atlas_labels(ATLAS_SHAPE, ATLAS_AFFINE), far), spec["labels"])
    with pytest.raises(InputError, match=r"target parcels/far: none of its 9 labels of far\.nii\.gz overlaps"):
        build_definition(str(tmp_path / "staging"), str(store), spec)
    half = atlas_labels(ATLAS_SHAPE, ATLAS_AFFINE).astype(np.float32) + 0.5
    nib.save(nib.Nifti1Image(half, ATLAS_AFFINE), spec["labels"])
    with pytest.raises(InputError, match="non-integer values .*probabilistic atlas"):
        build_definition(str(tmp_path / "staging"), str(store), spec)


def test_every_target_array_and_meta_key_is_documented(built):
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "store.md").read_text()
    fmri_section = doc[doc.index("## fMRI"):doc.index("## Video")]
    view = open_store(built[1])
    for name in (a for a in view._arrays if a.startswith("targets/") or a.count("/") > 4):
        parts = name.split("/")
        parts[-2] = "<name>"
        if parts[0] == "fmri":
            parts[1:3] = ["<subject>", "<run>"]
        dims = tuple(view.array(name).metadata.dimension_names)
        row = next((ln for ln in doc.splitlines() if ln.startswith(f"| `{'/'.join(parts)}`")), None)
        assert row is not None and f"({', '.join(dims)}{',' if len(dims) == 1 else ''})" in row, (name, dims, row)
    for key, entry in view.manifest["units"].items():
        meta = entry["meta"] if key.startswith("targets/") else {}
        keys = set(meta) | {k for r in (meta.get("runs") or {}).values() for k in r}
        assert not [k for k in keys if not re.search(f"`{k}`", fmri_section)], key


@pytest.mark.slow
def test_zscore_by_subject_gives_one_target_unit_per_subject_over_its_runs(built, scheduler, tmp_path):
    from giblet.verify import verify_store

    config, store = built
    root = tmp_path / "copy"
    shutil.copytree(config.parent, root)
    atlas = {**TARGETS[0], "labels": str(root / "atlas.nii.gz"), "labels_table": str(root / "atlas.tsv")}
    cfg = load_config(root / config.name, ["fmri.zscore=subject", f"fmri.targets={json.dumps([atlas])}"])
    engine.run(cfg, scheduler=scheduler, progress=False, log=lambda m: None)
    view = open_store(root / store.name)
    assert {k for k in view.manifest["units"] if k.startswith("targets/")} == {
        f"targets/{PARCELS}", f"targets/{PARCELS}/sub-01", f"targets/{PARCELS}/sub-02"}
    assert verify_store(root / store.name) == []
