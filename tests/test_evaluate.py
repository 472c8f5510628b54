"""``giblet-evaluate`` (pipelines/evaluate.py, giblet/evaluation/maps.py) as a user runs it.

One planted study (``tests/individual_study.py``, written without giblet.synth: 3 subjects
whose voxel weights share 70 %, so the other subjects predict each one and the noise ceiling
is positive), one tiny training run, one evaluation of it through the CLI -- shared by the
module. Figures are checked against direct numpy computations, never against the code
under test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch

import giblet
from conftest import inproc_scheduler
from tests import individual_study

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"
CLI = [sys.executable, "-m", "pipelines.evaluate"]
FLOOR = 0.1  # docs/evaluation.md: the per-voxel fraction's ceiling floor


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


def one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("giblet-evaluate: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate_study")
    config, truth = individual_study.make(root, n_subjects=3, n_trs=120, shape=(6, 6, 5), noise=0.3, shared=0.7,
                                          movie_size=(32, 18), seed=7)
    return individual_study.build(config, truth, scheduler=inproc_scheduler())


@pytest.fixture(scope="module")
def run(store, tmp_path_factory) -> Path:
    """A tiny training run that validates once, at its last step (its checkpoint's step)."""
    from pipelines.train import load_train_config, train

    out = tmp_path_factory.mktemp("evaluate_run") / "run"
    train(load_train_config(TINY, [f"store={store}", f"out={out}", "schedule.epochs=2", "log.val_every=1000",
                                   "log.ckpt_every=1000"]))
    return out


@pytest.fixture(scope="module")
def evaluated(run) -> tuple[subprocess.CompletedProcess, dict]:
    r = cli(run)
    assert r.returncode == 0, r.stderr
    return r, json.loads((run / "evaluation-val" / "summary.json").read_text())


def direct_r(run: Path, store: Path) -> dict[str, np.ndarray]:
    """Each subject's r per voxel over its val TRs, computed here: the checkpoint's weights in a
    model built by hand, every val sample in one batch, ``np.corrcoef`` per voxel."""
    from functools import partial

    from giblet.data import GibletDataset
    from giblet.models.autoencoder import GibletAutoencoder, prepare_batch
    from giblet.training import checkpoint as ckpt
    from pipelines.train import load_train_config, model_spec

    cfg = load_train_config(TINY, [f"store={store}", f"out={run}"])
    ds = GibletDataset(store, "val", window=cfg.data.window)
    model = GibletAutoencoder(cfg.model, model_spec(ds, cfg)).eval()
    model.load_state_dict(ckpt.load_checkpoint(run)["model"])
    batch = partial(prepare_batch, video_frames=cfg.model.video_frames)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pred = model(batch)["fmri"].numpy()  # the dataset's subject indices are the model's (same store order)
    out = {}
    for i, name in enumerate(ds.subjects):
        rows = batch["subject"].numpy() == i
        p, t = pred[rows], batch["fmri"].numpy()[rows]
        out[name] = np.array([np.corrcoef(p[:, v], t[:, v])[0, 1] for v in range(p.shape[1])])
    return out


def top10(r: np.ndarray) -> float:
    return float(np.sort(r)[::-1][:max(1, len(r) // 10)].mean())


def test_the_run_scores_as_the_trainer_validated(run, store, evaluated):
    r, summary = evaluated
    val = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if '"kind": "val"' in ln][-1]
    assert summary["mean"] == pytest.approx(val["r_mean"], abs=1e-5)
    for name, s in val["subjects"].items():
        assert summary["subjects"][name]["mean"] == pytest.approx(s["mean"], abs=1e-5)
    view = giblet.open_store(store)
    assert summary["n_trs"] == {s: int(np.diff(view.split_trs("val", "run-1", s))[0]) for s in view.subjects}
    assert summary["evaluated"]["step"] == val["step"] and summary["split"] == "val"
    assert summary["store"] == str(view.path)
    lines = r.stdout.splitlines()
    for name in view.subjects:  # the table: a row per subject with its TRs and mean r
        row = next(ln for ln in lines if ln.startswith(name))
        assert row.split()[1:3] == [str(summary["n_trs"][name]), f"{summary['subjects'][name]['mean']:.3f}"]
    assert lines[-1].endswith(str((run / "evaluation-val" / "summary.json").resolve()))


def test_summary_figures_equal_a_direct_numpy_computation(run, store, evaluated):
    _, summary = evaluated
    rs = direct_r(run, store)
    view = giblet.open_store(store)
    isc = view.array("derived/noise_ceiling-val/isc")[...]  # the ceiling the CLI cached in the store
    assert isc.shape == (3, view.n_voxels) and np.isfinite(isc).all() and (isc > 0).mean() > 0.5
    fractions, medians = [], []
    for i, name in enumerate(view.subjects):
        r, c, got = rs[name], isc[i].astype(np.float64), summary["subjects"][name]
        assert got["mean"] == pytest.approx(r.mean(), abs=1e-5)
        assert got["median"] == pytest.approx(np.median(r), abs=1e-5)
        assert got["top10"] == pytest.approx(top10(r), abs=1e-5)
        assert got["n"] == view.n_voxels
        pos, above = c > 0, c > FLOOR
        fractions.append(r[pos].mean() / c[pos].mean())
        medians.append(np.median(r[above] / c[above]))
        ceil = summary["ceiling"]["subjects"][name]
        assert ceil["fraction"] == pytest.approx(fractions[-1], abs=1e-4)
        assert ceil["voxel_fraction_median"] == pytest.approx(medians[-1], abs=1e-4)
        assert ceil["mean"] == pytest.approx(c.mean(), abs=1e-6)
        assert (ceil["n_positive"], ceil["n_above_floor"]) == (int(pos.sum()), int(above.sum()))
    assert summary["mean"] == pytest.approx(np.mean([rs[s].mean() for s in rs]), abs=1e-5)
    assert summary["median"] == pytest.approx(np.median([np.median(rs[s]) for s in rs]), abs=1e-5)
    assert summary["top10"] == pytest.approx(np.mean([top10(rs[s]) for s in rs]), abs=1e-5)
    assert summary["fraction_of_ceiling"] == pytest.approx(np.mean(fractions), abs=1e-4)
    assert summary["ceiling"]["voxel_fraction_median"] == pytest.approx(np.mean(medians), abs=1e-4)
    assert summary["ceiling"]["floor"] == FLOOR


def test_nifti_maps_round_trip_onto_the_store_mask(run, store, evaluated):
    _, summary = evaluated
    rs = direct_r(run, store)
    view = giblet.open_store(store)
    mask, ijk = view.mask, tuple(view.voxels.T)
    isc = view.array("derived/noise_ceiling-val/isc")[...]
    for i, name in enumerate(view.subjects):
        for kind, values in (("r", rs[name]), ("ceiling", isc[i])):
            path = run / "evaluation-val" / f"{kind}_{name}.nii.gz"
            assert summary["files"][f"{kind}_maps"][name] == str(path.resolve())
            img = nib.load(path)
            data = np.asarray(img.dataobj)
            assert img.get_data_dtype() == np.float32 and data.shape == mask.shape
            np.testing.assert_array_equal(img.affine, view.affine)
            np.testing.assert_allclose(data[ijk], values, atol=1e-5)  # column j lands on voxel voxels[j]
            assert not data[~mask].any()


# Least fraction of coloured (saturated) pixels: the voxels and colour bar of the glass brains,
# the violins, the scatter's points. Axes, text, the black dots and gray lines are not coloured.
COLOURED = {"glass_brain": 0.001, "per_subject": 0.01, "r_vs_ceiling": 0.003}


def figure_is_drawn(path: Path, coloured: float) -> None:
    img = mpimg.imread(path)[..., :3]
    assert img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    pixels = (img.reshape(-1, 3) * 255).round().astype(np.uint8)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    # a figure holding only a title leaves < 1 % off the background colour
    assert 1 - counts.max() / counts.sum() > 0.03 and len(colours) > 50, (path, len(colours))
    saturated = (img.max(-1) - img.min(-1)) > 0.12
    assert saturated.mean() > coloured, (path, saturated.mean())


def test_figures_exist_and_are_drawn(run, evaluated):
    _, summary = evaluated
    figures = summary["files"]["figures"]
    assert set(figures) == set(COLOURED)
    for name, path in figures.items():
        assert Path(path).parent == (run / "evaluation-val").resolve()
        figure_is_drawn(Path(path), COLOURED[name])


def test_the_ridge_baseline_without_ceiling_in_the_default_folder(store, tmp_path):
    from giblet.evaluation.ridge import ridge_baseline

    r = cli("--baseline", "ridge", "--store", store, "--no-ceiling", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "giblet-evaluation-ridge-val"
    summary = json.loads((out / "summary.json").read_text())
    direct = ridge_baseline(store).r["val"]
    assert summary["evaluated"]["kind"] == "ridge baseline" and list(summary["subjects"]) == list(direct)
    for name, rv in direct.items():
        assert summary["subjects"][name]["mean"] == pytest.approx(float(np.mean(rv.astype(np.float64))), abs=1e-6)
        data = np.asarray(nib.load(out / f"r_{name}.nii.gz").dataobj)
        np.testing.assert_allclose(data[tuple(giblet.open_store(store).voxels.T)], rv, atol=1e-6)
    assert summary["mean"] > 0.5  # the planted response is linear in the mean colour
    assert "ceiling" not in summary and summary["fraction_of_ceiling"] is None
    assert summary["ceiling_note"] == "noise ceiling skipped (--no-ceiling)" and "--no-ceiling" in r.stdout
    assert not list(out.glob("ceiling_*")) and set(summary["files"]["figures"]) == {"glass_brain", "per_subject"}


def test_a_store_of_one_subject_skips_the_ceiling_with_a_note():
    from pipelines.evaluate import store_ceiling

    ceilings, note = store_ceiling(SimpleNamespace(subjects=["sub-01"]), "val", {"sub-01": np.zeros(3)})
    assert ceilings is None and "1 subject(s)" in note and "needs >= 2" in note and "\n" not in note


def test_diagnose_links_to_the_evaluation(run, evaluated, tmp_path, capsys):
    from stats.diagnose import main

    _, summary = evaluated
    assert main([str(run), "--no-plots"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = next(ln for ln in out if ln.startswith("evaluation (val"))
    assert f"mean r {summary['mean']:.4f}" in line and f"{100 * summary['fraction_of_ceiling']:.1f}% of the" in line
    assert line.endswith(str(run / "evaluation-val" / "summary.json"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "log.jsonl", bare / "log.jsonl")
    assert main([str(bare / "log.jsonl"), "--no-plots"]) == 0  # the log itself works as before
    assert f"`giblet-evaluate {bare}`" in capsys.readouterr().out.splitlines()[-1]


def test_errors_are_one_line(run, store, tmp_path):
    one_line_error(cli(tmp_path), f"{tmp_path}: no checkpoint.pt", "not a giblet-train run folder")
    one_line_error(cli("--baseline", "ridge", "--store", tmp_path / "nowhere.zarr"), "nowhere.zarr: no such store")
    one_line_error(cli(run, "--split", "test"), "split 'test' has no TR", "--split")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoint.pt").write_bytes(b"not a torch file")
    one_line_error(cli(broken), f"{broken / 'checkpoint.pt'}: cannot be loaded as a giblet checkpoint")


@pytest.mark.parametrize("args", [[], ["RUN", "--baseline", "ridge", "--store", "S"], ["--baseline", "ridge"],
                                  ["RUN", "--split", "train"]])
def test_usage_errors_exit_2(args):
    r = cli(*args)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith("giblet-evaluate: error: "), r.stderr


def test_ceiling_fraction_by_hand():
    from giblet.evaluation.metrics import ceiling_fraction

    r = np.array([0.2, 0.4, 0.3, 0.9, 0.5])
    c = np.array([0.5, 0.05, -0.2, np.nan, 0.8])  # voxel 3 has no ceiling; voxel 2 a negative one
    got = ceiling_fraction(r, c)
    assert got["fraction"] == pytest.approx((0.2 + 0.4 + 0.5) / 3 / ((0.5 + 0.05 + 0.8) / 3))
    assert got["voxel_fraction_median"] == pytest.approx(np.median([0.2 / 0.5, 0.5 / 0.8]))  # c > 0.1 only
    assert (got["n_positive"], got["n_above_floor"]) == (3, 2)
    assert got["mean"] == pytest.approx(np.mean([0.5, 0.05, -0.2, 0.8]))
    none = ceiling_fraction(r, np.full(5, -0.1))
    assert np.isnan(none["fraction"]) and np.isnan(none["voxel_fraction_median"]) and none["n_positive"] == 0
