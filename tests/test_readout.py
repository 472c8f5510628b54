"""Per-subject readouts (giblet.models.readout): the model, the trainer and checkpoints.

The store-level tests run on ``tests/individual_study.py`` (a generator independent of
giblet.synth) with *opposite* planted weights: subject 2's voxels respond with minus subject
1's weights, so a head shared by both can only predict ~0 there.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch

from giblet.models.autoencoder import AutoencoderConfig, GibletAutoencoder, ModelSpec, prepare_batch
from giblet.models.readout import SubjectReadout, readout_parameters, subject_table
from conftest import inproc_scheduler
from tests import individual_study

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"
NAMES = ("sub-01", "sub-02", "sub-03")


# -- the readout on its own ---------------------------------------------------------------------------
def randomized(readout: SubjectReadout, seed=0) -> SubjectReadout:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in readout.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return readout


@pytest.mark.parametrize("rank", [3, 16])  # a low-rank correction; a full head per subject (rank >= d)
def test_the_shared_head_is_exactly_the_average_subject_and_what_unseen_subjects_get(rank):
    readout = randomized(SubjectReadout(8, 11, 3, rank))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    per = [readout(x, torch.full((5,), s)) for s in range(3)]
    shared = readout.shared(x)
    torch.testing.assert_close(torch.stack(per).mean(0), shared, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(readout(x, torch.full((5,), -1)), shared)  # unseen (-1): the average subject
    torch.testing.assert_close(readout(x, None), shared)
    assert not torch.allclose(per[0], per[1], atol=1e-3)  # the subjects do differ
    mixed = readout(x, torch.tensor([0, 1, 2, -1, 1]))  # any mix of subjects in one batch
    for i, s in enumerate([0, 1, 2, -1, 1]):
        torch.testing.assert_close(mixed[i], (per[s] if s >= 0 else shared)[i], rtol=1e-5, atol=1e-5)
    n = sum(p.numel() for p in readout.parameters())
    assert n == sum(readout_parameters(8, 11, 3, rank).values())
    assert (readout.down is None) == (rank >= 8)


def test_subject_table_maps_names_and_leaves_unknown_subjects_unseen():
    table = subject_table(NAMES, ["sub-03", "sub-09", "sub-01"])
    assert table.tolist() == [2, -1, 0, -1]  # the last entry maps a dataset's -1 (no subject) to -1
    assert table[torch.tensor([0, 2, -1, 1])].tolist() == [2, 0, -1, -1]


def _model(readout="subject", subjects=NAMES) -> GibletAutoencoder:
    cfg = AutoencoderConfig(d_model=16, n_layers=1, n_heads=2, d_bottleneck=8, video_frames=1, video_pool=[2, 2],
                            readout=readout, readout_rank=4)
    torch.manual_seed(0)
    return GibletAutoencoder(cfg, ModelSpec(n_voxels=6, window=2, text=5, subjects=subjects)).eval()


def test_model_readout_follows_the_batch_subject_and_can_be_switched_off():
    model = _model()
    randomized(model.fmri_head)
    g = torch.Generator().manual_seed(2)
    batch = {"text": torch.randn(4, 3, 5, generator=g), "stim_valid": torch.ones(4, 3, dtype=torch.bool),
             "has_text": torch.ones(4, 3, dtype=torch.bool)}
    with torch.no_grad():
        out = {s: model({**batch, "subject": torch.full((4,), s)})["fmri"] for s in (-1, 0, 1, 2)}
        torch.testing.assert_close(model(batch)["fmri"], out[-1])  # no subject key: the shared prediction
    torch.testing.assert_close((out[0] + out[1] + out[2]) / 3, out[-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[2], atol=1e-3)
    shared = _model("shared")
    assert shared.fmri_head.n_subjects == 0 and not hasattr(shared.fmri_head, "up")
    n_sub = sum(p.numel() for n, p in model.named_parameters() if n.startswith("fmri_head.") and "shared" not in n)
    assert n_sub == readout_parameters(8, 6, 3, 4)["subjects"] == 3 * 4 * (6 + 8)


# -- the trainer on a study where subjects' weights are opposite ----------------------------------------
@pytest.fixture(scope="module")
def opposite_study(tmp_path_factory) -> tuple[Path, dict]:
    """3 subjects x 120 TRs, ~70 voxels, low noise; sub-02's weights are minus sub-01's."""
    root = tmp_path_factory.mktemp("opposite")
    config, truth = individual_study.make(root, n_subjects=3, n_trs=120, shape=(6, 6, 5), noise=0.3, opposite=True,
                                          movie_size=(32, 18), seed=5)
    return individual_study.build(config, truth, scheduler=inproc_scheduler()), truth


def _train(store, out, *overrides) -> dict:
    from pipelines.train import load_train_config, train

    return train(load_train_config(TINY, [f"store={store}", f"out={out}", "schedule.epochs=10", "log.val_every=1000",
                                          "log.ckpt_every=1000", *overrides]))


@pytest.fixture(scope="module")
def trained(opposite_study, tmp_path_factory) -> dict:
    """The tiny config trained with each readout (a few seconds each)."""
    store, _ = opposite_study
    root = tmp_path_factory.mktemp("runs")
    return {kind: (_train(store, root / kind, f"model.readout={kind}"), root / kind) for kind in ("subject", "shared")}


def test_per_subject_readouts_learn_maps_a_shared_head_cannot(opposite_study, trained):
    _, truth = opposite_study
    subject, _ = trained["subject"]
    assert set(subject["subjects"]) == set(NAMES)
    for name in NAMES:  # every subject, the two opposite ones included
        assert subject["subjects"][name]["mean"] > 0.6, subject["subjects"]
    assert subject["r_mean"] > 0.7 * truth["achievable"]
    # A shared head predicts the average brain: ~0 where sub-01 and sub-02 disagree in sign.
    shared, _ = trained["shared"]
    assert shared["subjects"]["sub-01"]["mean"] + shared["subjects"]["sub-02"]["mean"] < 0.3, shared["subjects"]
    assert shared["r_mean"] < subject["r_mean"] - 0.3


def test_the_studys_truth_is_what_a_linear_model_nearly_reaches(opposite_study):
    """The generator's achievable r (voxels in store order) bounds the ridge baseline from above."""
    store, truth = opposite_study
    ridge = individual_study.ridge_baseline(store)
    assert list(ridge["subjects"]) == list(NAMES)
    assert 0.8 * truth["achievable"] < ridge["mean"] < truth["achievable"] + 0.03, (ridge["mean"], truth["achievable"])


def _load(run: Path, store: Path, subjects=NAMES) -> tuple:
    from giblet.data import GibletDataset
    from giblet.training import checkpoint as ckpt
    from pipelines.train import load_train_config, model_spec

    cfg = load_train_config(TINY, [f"store={store}", f"out={run}"])
    ds = GibletDataset(store, "val", window=cfg.data.window, subjects=list(subjects))
    model = GibletAutoencoder(cfg.model, model_spec(ds, cfg))
    model.load_state_dict(ckpt.load_checkpoint(run)["model"])
    return cfg, model


def _validate(model, cfg, store, subjects=None) -> dict:
    from giblet.data import GibletDataset
    from giblet.training.distributed import setup
    from pipelines.train import validate

    ds = GibletDataset(store, "val", window=cfg.data.window, subjects=subjects)
    return validate(model, ds, partial(prepare_batch, video_frames=cfg.model.video_frames), cfg, setup("cpu", "fp32"))


def test_val_subjects_are_mapped_by_name_a_subset_and_another_order(opposite_study, trained):
    store, _ = opposite_study
    summary, run = trained["subject"]
    cfg, model = _load(run, store)
    full = _validate(model, cfg, store)
    assert full["r_mean"] == pytest.approx(summary["r_mean"], abs=1e-6)
    # A val set of sub-02 only: its index 0 must reach the model's sub-02 readout (index 1), not sub-01's
    # (whose weights are opposite: r would be negative).
    only = _validate(model, cfg, store, ["sub-02"])
    assert list(only["subjects"]) == ["sub-02"]
    assert only["r_mean"] == pytest.approx(full["subjects"]["sub-02"]["mean"], abs=1e-6)
    # The same weights in a model whose subjects are listed in another order: the same figures.
    order = (2, 0, 1)
    spec = dataclasses.replace(model.spec, subjects=tuple(NAMES[k] for k in order))
    permuted = GibletAutoencoder(cfg.model, spec)
    state = model.state_dict()
    rank, up = model.fmri_head.rank, state["fmri_head.up"]
    state["fmri_head.up"] = torch.cat([up[k * rank:(k + 1) * rank] for k in order])
    if "fmri_head.down" in state:
        state["fmri_head.down"] = state["fmri_head.down"][list(order)]
    permuted.load_state_dict(state)
    again = _validate(permuted, cfg, store)
    for name in NAMES:
        assert again["subjects"][name]["mean"] == pytest.approx(full["subjects"][name]["mean"], abs=1e-6)


def test_a_subject_unseen_in_training_gets_the_shared_prediction(opposite_study, tmp_path):
    from giblet.data import GibletDataset
    from giblet.evaluation.metrics import pearson_r

    store, _ = opposite_study
    run = tmp_path / "two"
    summary = _train(store, run, "data.subjects=[sub-01,sub-03]", "schedule.epochs=2")
    assert set(summary["subjects"]) == {"sub-01", "sub-03"}
    cfg, model = _load(run, store, ["sub-01", "sub-03"])
    assert model.spec.subjects == ("sub-01", "sub-03")
    scored = _validate(model, cfg, store)  # the val set has sub-02, whom the model never saw
    model.eval()  # validate() leaves the model in train mode
    assert set(scored["subjects"]) == set(NAMES)
    ds = GibletDataset(store, "val", window=cfg.data.window, subjects=["sub-02"])
    batch = prepare_batch([ds[i] for i in range(len(ds))], cfg.model.video_frames)
    with torch.no_grad():
        shared = model({**batch, "subject": torch.full((len(ds),), -1)})["fmri"]
        average = sum(model({**batch, "subject": torch.full((len(ds),), k)})["fmri"] for k in (0, 1)) / 2
    torch.testing.assert_close(shared, average, rtol=1e-4, atol=1e-5)
    r = pearson_r(shared.numpy(), batch["fmri"].numpy()).mean()
    assert scored["subjects"]["sub-02"]["mean"] == pytest.approx(r, abs=1e-5)


def test_resuming_weights_with_other_subjects_is_a_one_line_error(opposite_study, trained, tmp_path, capsys):
    import shutil

    from pipelines.train import main

    store, _ = opposite_study
    run = tmp_path / "run"
    shutil.copytree(trained["subject"][1], run)
    common = [str(TINY), f"store={store}", f"out={run}", "resume=weights_only",
              "schedule.max_steps=1"]
    assert main(common + ["data.subjects=[sub-01,sub-02]"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"giblet-train: error: {run / 'checkpoint.pt'}: its weights fit "
                                              f"another model"), err
    assert "subjects: checkpoint ['sub-01', 'sub-02', 'sub-03'], now ['sub-01', 'sub-02']" in err
    assert "select the checkpoint's with data.subjects" in err
    assert main(common + ["model.readout=shared"]) == 1  # the shared head alone has other weights too
    assert "model.readout: checkpoint 'subject', now 'shared'" in capsys.readouterr().err
    assert main(common + ["log.val_every=1", "log.ckpt_every=1"]) == 0  # the same subjects: accepted
