"""Recipe tier of the trainer: real stores built by the engine, real runs of ``pipelines.train``.

- the small convergence proof: the tiny config learns the planted stimulus -> fMRI map, the
  prototype's choices on the same store stay flat, and ``giblet-diagnose`` names each cause;
- a real ``torch.distributed.run --nproc_per_node=2`` (gloo) run whose val r is the r of the
  whole val split (equal to a single-process validation of its checkpoint);
- a run SIGKILLed mid-epoch and resumed gives the same per-step losses as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from giblet.config import load_config
from giblet.synth import make_study
from pipelines import engine

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"
PROTOTYPE = REPO / "configs" / "train" / "prototype.yaml"
N_TRS = 100


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> tuple[Path, Path]:
    """``(store, truth.npz)``: 3 subjects x 100 TRs with every registered stimulus stage."""
    from pipelines.stages import STAGE_NAMES

    registered = set(STAGE_NAMES)
    root = tmp_path_factory.mktemp("train_study")
    blocks = {"video": {"width": 32, "height": 18, "frame_skip": 3}}
    if "audio" in registered:
        blocks["audio"] = {"model": "random"}
    config = make_study(root, n_subjects=3, n_trs=N_TRS, shape=(10, 12, 8), fps=10, movie_size=(96, 54),
                        movie={"video", "audio"} & registered != set(), annotations="text" in registered,
                        seed=3, stages=blocks)
    store = engine.run(load_config(config), progress=False).store  # in-process: a small study
    return Path(store), root / "truth.npz"


def records(log: Path, kind: str) -> dict[int, dict]:
    """The last record of each step (a resumed run appends)."""
    out = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out[rec["step"]] = rec
    return out


def run_train(config: Path, store: Path, out: Path, *overrides: str, env: dict | None = None,
              launcher: tuple = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "-m", "pipelines.train", str(config), f"store={store}", f"out={out}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# -- the small convergence proof ----------------------------------------------------------------------
def test_tiny_config_learns_the_planted_map_and_logs_every_diagnostic(study, tmp_path):
    from pipelines.train import load_train_config, train
    from stats.diagnose import achievable_r, diagnose, plot, read_log

    store, truth = study
    cfg = load_train_config(TINY, [f"store={store}", f"out={tmp_path / 'run'}", "schedule.epochs=12",
                                   "log.every=5", "log.val_every=30", "log.ckpt_every=1000",
                                   "log.profile_steps=3", "log.profile_start=4"])
    summary = train(cfg)
    best = achievable_r(truth, store)
    log = read_log(tmp_path / "run" / "log.jsonl")
    report = diagnose(log, best)
    assert report.findings == [], report.text()
    assert summary["r_mean"] > 0.5 * best, report.text()  # a small model, 80 train TRs, a few seconds
    first, last = log["train"][0], log["train"][-1]
    assert last["loss_fmri"] < 0.7 * first["loss_fmri"]
    modules = {k for k in last if k.startswith("grad_norm_")}
    assert {"grad_norm_fmri_head", "grad_norm_trunk", "grad_norm_temporal", "grad_norm_enc_video"} <= modules
    assert 0.0 <= last["data_wait"] < 1.0 and last["samples_per_s"] > 0
    prof = log["profile"]  # torch.profiler over steps 5..7: where a step's time goes
    assert prof["step"] == 7 and prof["wall_ms_per_step"] > 0 and prof["device_busy_ms_per_step"] == 0  # CPU
    assert prof["top_cpu"][0][0].startswith(("aten::", "autograd::")) and 0 < prof["top_cpu"][0][1] < prof["wall_ms_per_step"]
    assert not any(k.startswith(("Optimizer.step#", "ProfilerStep")) for k, _ in prof["top_cpu"])  # ops, not ranges
    assert "by self CPU time" in (tmp_path / "run" / "profile_rank0.txt").read_text()
    applied = [r["lr"] for r in log["train"]]
    sched = log["config"]["schedule"]
    assert applied[0] == pytest.approx(cfg.optim.lr * 5 / sched["warmup_steps"])  # step 5 of the warm-up
    assert max(applied) <= cfg.optim.lr * (1 + 1e-9) and applied[-1] < 0.2 * cfg.optim.lr  # cosine decay
    assert {r["input"].split()[0] for r in log["scale_check"]["rows"]} >= {"video", "fmri"}
    assert all(r["ok"] for r in log["scale_check"]["rows"])
    pngs = plot(log, tmp_path / "plots", best)
    assert [p.name for p in pngs] == ["lr.png", "losses.png", "grad_norms.png", "val_r.png"]
    assert all(p.stat().st_size > 5000 for p in pngs)


def test_prototype_choices_stay_flat_and_each_cause_is_named(study, tmp_path):
    from pipelines.train import load_train_config, train
    from stats.diagnose import diagnose, read_log

    store, _ = study
    cfg = load_train_config(PROTOTYPE, [f"store={store}", f"out={tmp_path / 'run'}", "schedule.epochs=12",
                                        "log.every=5", "log.val_every=30", "log.ckpt_every=1000", "device=cpu",
                                        "log.tensorboard=false"])
    with pytest.warns(UserWarning, match="scale check"):
        summary = train(cfg)
    assert abs(summary["r_mean"]) < 0.1
    report = diagnose(read_log(tmp_path / "run" / "log.jsonl"))
    text = report.text()
    assert report.verdict == "FLAT", text
    assert "raw scanner units" in text  # 1. fMRI targets not z-scored
    assert "counted in epochs" in text  # 2. warm-up in epochs
    assert "with equal weights 1.0" in text  # 4. all weights 1.0
    if "audio" in read_log(tmp_path / "run" / "log.jsonl")["config"]["modalities"]:
        assert "integer codes regressed under MSE" in text  # 3. codes under MSE
    out = subprocess.run([sys.executable, "-m", "stats.diagnose", str(tmp_path / "run" / "log.jsonl"), "--no-plots"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("verdict: FLAT")


def test_default_scale_check_refuses_raw_fmri(study, tmp_path):
    from giblet.errors import ConfigError
    from pipelines.train import load_train_config, train

    store, _ = study
    cfg = load_train_config(TINY, [f"store={store}", f"out={tmp_path}", "loss.fmri_target=raw"])
    with pytest.raises(ConfigError, match="scale check before step 1 failed: fmri target.*raw scanner units"):
        train(cfg)


# -- distributed ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_reduce_val_over_the_whole_split(study, tmp_path):
    from giblet.data import GibletDataset
    from giblet.models.autoencoder import GibletAutoencoder
    from giblet.training import checkpoint as ckpt
    from giblet.training.distributed import setup
    from pipelines.train import load_train_config, model_spec, validate

    store, _ = study
    out = tmp_path / "ddp"
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}")
    res = run_train(TINY, store, out, "schedule.max_steps=6", "log.val_every=6", "log.ckpt_every=6",
                    "optim.accum_steps=2", launcher=launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es) on cpu" in res.stdout
    header = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 2 and header["env"]["WORLD_SIZE"] == "2"
    train_recs = records(out / "log.jsonl", "train")
    assert sorted(train_recs) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in train_recs.values())
    logged = records(out / "log.jsonl", "val")[6]
    # The same checkpoint validated by one process: the 2-rank figure is the whole split's, not a rank's.
    cfg = load_train_config(TINY, [f"store={store}", f"out={out}"])
    ds = GibletDataset(store, "val", window=cfg.data.window)
    model = GibletAutoencoder(cfg.model, model_spec(ds, cfg))
    model.load_state_dict(ckpt.load_checkpoint(out)["model"])
    from functools import partial

    from giblet.models.autoencoder import prepare_batch

    single = validate(model, ds, partial(prepare_batch, video_frames=cfg.model.video_frames), cfg,
                      setup("cpu", "fp32"))
    assert single["r_mean"] == pytest.approx(logged["r_mean"], abs=1e-5)
    assert single["loss_fmri"] == pytest.approx(logged["loss_fmri"], rel=1e-5)


# -- kill and resume -----------------------------------------------------------------------------------
def test_run_killed_mid_epoch_resumes_with_identical_losses(study, tmp_path):
    store, _ = study
    common = ("schedule.max_steps=18", "log.every=1", "log.val_every=100", "log.ckpt_every=4", "data.num_workers=1",
              "model.dropout=0.2")
    a = run_train(TINY, store, tmp_path / "a", *common)
    assert a.returncode == 0, a.stderr[-3000:]
    killed = run_train(TINY, store, tmp_path / "b", *common, env={"GIBLET_TRAIN_KILL_AT_STEP": "10"})
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True, mmap=True)
    assert state["step"] == 8 and 0 < state["loader"]["position"]  # the last checkpoint is mid-epoch
    resumed = run_train(TINY, store, tmp_path / "b", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 8" in resumed.stdout
    la, lb = records(tmp_path / "a" / "log.jsonl", "train"), records(tmp_path / "b" / "log.jsonl", "train")
    assert sorted(la) == sorted(lb) == list(range(1, 19))
    for step in la:
        for key in ("loss", "loss_fmri", "lr", "grad_norm"):
            assert la[step][key] == lb[step][key], (step, key)


@pytest.mark.slow  # 2 torchrun jobs; tests/test_zero.py checks the sharded step against AdamW in every run
def test_zero_sharded_optimizer_gives_the_same_losses_and_resumes(study, tmp_path):
    """optim.zero=true over 2 gloo ranks (flat buffers, reduce-scatter, each rank updates half,
    all-gather): the losses and gradient norms equal the DDP run's, also across a SIGKILL and a
    resume from the checkpoint (whose optimizer state rank 0 gathered from both shards)."""
    store, _ = study
    common = ("schedule.max_steps=10", "log.every=1", "log.val_every=100", "log.ckpt_every=4", "data.num_workers=0")

    def launcher():
        return ("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}")

    plain = run_train(TINY, store, tmp_path / "plain", *common, launcher=launcher())
    assert plain.returncode == 0, plain.stderr[-3000:]
    killed = run_train(TINY, store, tmp_path / "zero", *common, "optim.zero=true", launcher=launcher(),
                       env={"GIBLET_TRAIN_KILL_AT_STEP": "6"})
    assert killed.returncode != 0
    state = torch.load(tmp_path / "zero" / "checkpoint.pt", weights_only=True, mmap=True)
    assert state["step"] == 4 and len(state["optimizer"]["zero_shards"]) == 2  # both ranks' shards
    resumed = run_train(TINY, store, tmp_path / "zero", *common, "optim.zero=true", launcher=launcher())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stdout and "ZeRO-1 over 2 rank(s), flat buffers: torch.AdamW" in resumed.stdout
    la, lb = records(tmp_path / "plain" / "log.jsonl", "train"), records(tmp_path / "zero" / "log.jsonl", "train")
    assert sorted(la) == sorted(lb) == list(range(1, 11))
    for step in la:
        for key in ("loss", "loss_fmri", "grad_norm"):
            assert la[step][key] == pytest.approx(lb[step][key], rel=1e-6, abs=1e-9), (step, key)


@pytest.mark.slow  # torch.compile under 2 ranks: minutes of compiling on a loaded CPU
def test_compile_under_two_ranks_trains_the_same_function(study, tmp_path):
    """compile=true (torch.compile of the DDP-wrapped model, gloo): without dropout (whose
    random stream differs under compile) the losses follow the eager run's; the last partial
    batch of each epoch is dropped by default, so crossing an epoch compiles nothing again."""
    store, _ = study
    common = ("schedule.max_steps=9", "log.every=1", "log.val_every=100", "log.ckpt_every=100", "model.dropout=0.0")
    runs, stderr = {}, {}
    # eager with drop_last asked for; compiled with its default (drop_last follows compile)
    for name, extra in (("eager", ("data.drop_last=true",)), ("compiled", ("compile=true",))):
        launcher = ("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={_free_port()}")
        res = run_train(TINY, store, tmp_path / name, *common, *extra, launcher=launcher,
                        env={"TORCH_LOGS": "recompiles"})
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name], stderr[name] = records(tmp_path / name / "log.jsonl", "train"), res.stderr
    assert sorted(runs["eager"]) == sorted(runs["compiled"]) == list(range(1, 10))
    assert runs["compiled"][9]["epoch"] >= 1  # an epoch boundary was crossed ...
    assert "Recompiling" not in stderr["compiled"]  # ... with one batch shape
    for step, rec in runs["eager"].items():
        assert runs["compiled"][step]["loss"] == pytest.approx(rec["loss"], rel=1e-4), step
    assert runs["eager"][9]["loss"] != runs["eager"][1]["loss"]  # it trained


# -- what defines a run: refused changes, finished reruns, weights_only --------------------------------
FINISHED = ("schedule.max_steps=2", "log.val_every=2", "log.ckpt_every=2")


@pytest.fixture(scope="module")
def finished_run(study, tmp_path_factory) -> Path:
    """A tiny run trained to its end: 2 optimizer steps of batch 16, one checkpoint."""
    from pipelines.train import load_train_config, train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(load_train_config(TINY, [f"store={study[0]}", f"out={out}", *FINISHED]))
    return out


@pytest.fixture
def no_dataset(monkeypatch):
    """Any dataset built from here on fails the test: the answer must come before that work."""
    import pipelines.train

    def refuse(*args, **kwargs):
        raise AssertionError("a dataset was built")

    monkeypatch.setattr(pipelines.train, "GibletDataset", refuse)


def test_rerun_of_a_finished_run_says_so_and_trains_nothing(study, finished_run, no_dataset, capsys):
    from pipelines.train import main

    log = (finished_run / "log.jsonl").read_bytes()
    assert main([str(TINY), f"store={study[0]}", f"out={finished_run}", *FINISHED]) == 0
    out = capsys.readouterr().out
    assert f"giblet-train: the run in {finished_run} is finished (step 2 of 2); nothing to do" in out
    assert f"checkpoint {finished_run / 'checkpoint.pt'}, log {finished_run / 'log.jsonl'}" in out
    assert (finished_run / "log.jsonl").read_bytes() == log  # no step ran, nothing was logged


def test_resume_with_changed_order_or_schedule_is_refused_with_the_fix(study, finished_run, no_dataset, capsys):
    from pipelines.train import main

    common = [str(TINY), f"store={study[0]}", f"out={finished_run}", *FINISHED]
    for change, diff in (("data.batch_size=8", "data.batch_size: checkpoint 16, now 8"),
                         ("schedule.max_steps=4", "schedule.max_steps: checkpoint 2, now 4"),
                         ("optim.lr=1.0e-2", "optim.lr: checkpoint 0.003, now 0.01")):
        assert main(common + [change]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"giblet-train: error: {finished_run / 'checkpoint.pt'}: "), err
        assert diff in err and "choose another out= for a new run" in err and "resume=weights_only" in err, err


def test_weights_only_starts_a_new_schedule_from_the_old_weights(study, finished_run, tmp_path, capsys):
    import shutil

    from pipelines.train import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    old = torch.load(run / "checkpoint.pt", weights_only=True)
    common = [str(TINY), f"store={study[0]}", f"out={run}", "resume=weights_only", "data.batch_size=8",
              "schedule.max_steps=1", "log.val_every=1", "log.ckpt_every=1"]
    assert main(common + ["model.d_model=16"]) == 1  # weights fit only a model of their shape
    assert "its weights fit another model (model.d_model: checkpoint 32, now 16)" in capsys.readouterr().err
    assert main(common + ["optim.lr=1.0e-12"]) == 0  # one step that cannot move the weights
    out = capsys.readouterr().out
    assert f"giblet-train: run folder {run}: checkpoint {run / 'checkpoint.pt'}, log {run / 'log.jsonl'}" in out
    assert f"resume=weights_only: model weights from step 2 of {run / 'checkpoint.pt'}" in out
    new = torch.load(run / "checkpoint.pt", weights_only=True)
    assert new["step"] == new["total_steps"] == 1 and new["run"]["data"]["batch_size"] == 8
    for name, value in old["model"].items():  # the old weights ...
        torch.testing.assert_close(new["model"][name], value, rtol=0, atol=1e-9)
    assert [float(s["step"]) for s in old["optimizer"]["state"].values()][0] == 2
    assert {float(s["step"]) for s in new["optimizer"]["state"].values()} == {1.0}  # ... a fresh optimizer
    assert sorted(records(run / "log.jsonl", "train")) == [1]
    config = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()][0]
    assert config["kind"] == "config" and config["weights_from"]["step"] == 2
    assert sorted(records(run / "log.1.jsonl", "train")) == [1, 2]  # the previous run's log, set aside


@pytest.fixture(scope="module")
def stimulus_store(study, tmp_path_factory) -> Path:
    """The study's store with its fMRI units removed, as a config without ``inputs.fmri`` leaves it."""
    import shutil

    import zarr

    from giblet import store as gstore
    from giblet.config import parse_config
    from pipelines.align import align_record

    path = tmp_path_factory.mktemp("no_fmri") / "stimulus.zarr"
    shutil.copytree(study[0], path)
    writer = gstore.StoreWriter(path)
    for key in [k for k in writer.manifest["units"] if k.startswith("fmri/")]:
        writer.remove_unit(key)
    # The engine's own align step over what is left (every stored unit counts, as for the stages
    # an `--only` run leaves alone), with the config the store was built from.
    cfg = parse_config(zarr.open_group(str(path), mode="r").attrs["giblet"]["config"])
    align = align_record(cfg, [], writer.manifest, only=["no stage"])
    writer.write_align(align["record"], align["attrs"])
    return path


def test_a_store_without_fmri_fails_in_one_line_naming_it(stimulus_store, tmp_path, capsys):
    from giblet.data import GibletDataset
    from giblet.errors import ModalityMissingError
    from pipelines.train import main

    import giblet

    fix = "add runs.<run>.fmri (or inputs.fmri) to the config and rerun"
    with pytest.raises(ModalityMissingError, match="the store has no fMRI \\(no subject's BOLD was built") as info:
        GibletDataset(stimulus_store)
    assert str(info.value).startswith(f"{stimulus_store}: ") and "\n" not in str(info.value)
    assert fix in str(info.value)
    # Stimulus only (format 2): the samples are the split's (run, TR) pairs, without a subject (-1).
    view = giblet.open_store(stimulus_store)
    a, b = view.split["train"]["run-1"]
    ds = GibletDataset(stimulus_store, modalities=["video"])
    assert view.subjects == ds.subjects == [] and ds.pairs == [(-1, 0, a, b)] and len(ds) == b - a > 0
    x = ds[len(ds) - 1]
    assert (int(x["subject"]), int(x["run"]), int(x["tr"])) == (-1, 0, b - 1) and "fmri" not in x
    assert main([str(TINY), f"store={stimulus_store}", f"out={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"giblet-train: error: {stimulus_store}: the store has no fMRI "
                                              f"(no subject's BOLD was built"), err
    assert fix in err
