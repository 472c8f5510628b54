"""Unit tier of the trainer: the model, losses, schedule, checkpoint, diagnostics and train config,
on random tensors (no store)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from giblet.data.frames import pool_frames
from giblet.errors import ConfigError
from giblet.models.autoencoder import (AutoencoderConfig, GibletAutoencoder, ModelSpec, hrf_kernel, prepare_batch,
                                       select_frames)
from giblet.normalize import ZScorer
from giblet.training import checkpoint as ckpt
from giblet.training import distributed as D
from giblet.training.diagnostics import enforce_scale_check, grad_norms, scale_check
from giblet.training.losses import LossConfig, audio_ce, check_losses, compute_losses, masked_mse
from giblet.training.schedule import (OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, check_warmup,
                                      lr_factor, param_groups, resolve_schedule)

REPO = Path(__file__).resolve().parents[1]
V, W, F_, H, WD, C, NCB, T, VOCAB, E = 40, 5, 3, 12, 16, 3, 2, 10, 16, 24


def spec(window=W - 1, video=True, audio=True, text=True, **kw) -> ModelSpec:
    return ModelSpec(n_voxels=V, window=window, lag=0, tr_s=1.5, video=(F_, H, WD, C) if video else None,
                     audio=(NCB, T, VOCAB) if audio else None, text=E if text else None,
                     video_stats=(np.full(3, 0.5, np.float32), np.full(3, 0.2, np.float32)) if video else None,
                     text_stats=(np.zeros(E, np.float32), np.ones(E, np.float32)) if text else None, **kw)


def samples(n=4, window=W - 1, seed=0, video=True, audio=True, text=True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ctx = (window + 1,) if window else ()
    out = []
    for i in range(n):
        s = {"fmri": torch.randn(V, generator=g), "subject": torch.tensor(i % 2), "run": torch.tensor(i // 2),
             "tr": torch.tensor(10 + i), "index": torch.tensor(i), "stim_valid": torch.ones(ctx, dtype=torch.bool)}
        if video:
            s["video"] = torch.randint(0, 256, ctx + (F_, H, WD, C), generator=g, dtype=torch.uint8)
        if audio:
            s["audio"] = torch.randint(0, VOCAB, ctx + (NCB, T), generator=g)
        if text:
            s["text"] = torch.randn(ctx + (E,), generator=g)
            s["has_text"] = torch.ones(ctx, dtype=torch.bool)
        out.append(s)
    return out


def small_cfg(**kw) -> AutoencoderConfig:
    base = dict(d_model=16, n_layers=1, n_heads=2, d_bottleneck=8, video_frames=2, video_pool=[3, 4],
                audio_embed=4, audio_segments=2)
    return AutoencoderConfig(**{**base, **kw})


# -- model -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mods", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_output_shapes_follow_the_data(mods):
    torch.manual_seed(0)
    model = GibletAutoencoder(small_cfg(), spec(video=mods[0], audio=mods[1], text=mods[2]))
    batch = prepare_batch(samples(video=mods[0], audio=mods[1], text=mods[2]), video_frames=2)
    out = model(batch)
    assert out["fmri"].shape == (4, V)  # the head's width is the store's n_voxels
    if mods[0]:
        assert out["recon_video"].shape == out["target_video"].shape == (4, 2 * C * 3 * 4)
    if mods[1]:
        assert out["recon_audio"].shape == (4, NCB, 2, VOCAB)  # one distribution per segment
    if mods[2]:
        assert out["recon_text"].shape == out["target_text"].shape == (4, E)


def test_fmri_is_never_an_input_and_the_head_starts_at_zero():
    torch.manual_seed(0)
    model = GibletAutoencoder(small_cfg(), spec()).eval()
    batch = prepare_batch(samples(), video_frames=2)
    a = model(batch)["fmri"]
    batch2 = {**batch, "fmri": batch["fmri"] * 100 + 7}
    assert torch.equal(a, model(batch2)["fmri"])
    assert torch.count_nonzero(a) == 0  # zero-initialized head: the first fMRI loss is mean(target^2)
    _, parts = compute_losses(model(batch), batch, LossConfig())
    assert parts["fmri"].item() == pytest.approx(float(batch["fmri"].pow(2).mean()), rel=1e-6)


def test_stimulus_before_tr0_is_ignored():
    torch.manual_seed(0)
    model = GibletAutoencoder(small_cfg(dropout=0.0), spec()).eval()
    with torch.no_grad():
        model.fmri_head.shared.weight.normal_()
    s = samples(n=2)
    for x in s:
        x["stim_valid"][:2] = False  # the two oldest TRs of the window are before TR 0
    b1 = prepare_batch(s, 2)
    b2 = dict(b1, video=b1["video"].clone(), audio=b1["audio"].clone(), text=b1["text"].clone())
    b2["video"][:, :2] = 255 - b2["video"][:, :2]
    b2["audio"][:, :2] = (b2["audio"][:, :2] + 3) % VOCAB
    b2["text"][:, :2] += 5.0
    torch.testing.assert_close(model(b1)["fmri"], model(b2)["fmri"])
    b2["text"][:, -1] += 5.0  # a real TR does matter
    assert not torch.allclose(model(b1)["fmri"], model(b2)["fmri"])


def test_temporal_filter_starts_at_the_causal_glover_hrf():
    model = GibletAutoencoder(small_cfg(), spec(window=7))
    kernel = hrf_kernel(1.5)
    w = model.temporal[0].detach().numpy()
    np.testing.assert_allclose(w[::-1], kernel[:8], rtol=1e-6)  # newest token = lag 0
    assert int(np.argmax(w[::-1])) * 1.5 in (4.5, 6.0)  # peak 4-6 s after the stimulus
    lagged = GibletAutoencoder(small_cfg(), ModelSpec(n_voxels=V, window=3, lag=2, tr_s=1.5, text=E))
    np.testing.assert_allclose(lagged.temporal[0].detach().numpy()[::-1], kernel[2:6], rtol=1e-6)


def test_model_hrf_equals_the_datasets_nilearn_kernel():
    from giblet.data import hrf_kernel as nilearn_kernel

    for tr in (0.8, 1.5, 2.0):
        np.testing.assert_allclose(hrf_kernel(tr), nilearn_kernel(tr), atol=1e-12)
    assert hrf_kernel(1.5).sum() == pytest.approx(1.0)


def test_prepare_batch_selects_frames_adds_context_and_denormalizes():
    s = samples(n=3, window=0)
    frames = torch.arange(10).view(10, 1, 1, 1).expand(10, 2, 2, 3).to(torch.uint8)
    assert select_frames(frames, 3)[:, 0, 0, 0].tolist() == [0, 4, 9] or \
        select_frames(frames, 3)[:, 0, 0, 0].tolist() == [0, 5, 9]
    b = prepare_batch(s, video_frames=2)
    assert b["video"].shape == (3, 1, 2, H, WD, C) and b["stim_valid"].shape == (3, 1)
    from giblet.models.autoencoder import targets

    t = targets(b)
    assert torch.equal(t["audio"], b["audio"][:, -1]) and t["valid"].all() and t["fmri"] is b["fmri"]
    assert "target_fmri" not in b  # z-scores: the target is the input entry itself, never a copy
    scalers = {(0, 0): ZScorer.from_stats(np.full(V, 1000.0), np.full(V, 30.0)),
               (1, 0): ZScorer.from_stats(np.full(V, 500.0), np.zeros(V)),
               (0, 1): ZScorer.from_stats(np.full(V, 200.0), np.full(V, 10.0))}

    def denorm(z, subject, run):  # GibletDataset.denormalize's signature: one scaler per (subject, run)
        return torch.stack([torch.from_numpy(scalers[int(i), int(j)].inverse_transform(r.numpy()))
                            for r, i, j in zip(z, subject, run)])

    raw = prepare_batch(s, video_frames=2, denormalize=denorm)["target_fmri"]
    torch.testing.assert_close(raw[0], s[0]["fmri"] * 30 + 1000)
    torch.testing.assert_close(raw[1], torch.full((V,), 500.0))  # zero-variance voxels map back to their mean
    torch.testing.assert_close(raw[2], s[2]["fmri"] * 10 + 200)  # the sample's own run's scaler


# -- losses --------------------------------------------------------------------------------------------
def test_loss_components_start_at_their_documented_scale():
    torch.manual_seed(0)
    model = GibletAutoencoder(small_cfg(), spec())
    batch = prepare_batch(samples(n=8), 2)
    total, parts = compute_losses(model(batch), batch, LossConfig(weights={"fmri": 1, "video": 0.5, "audio": 0.1,
                                                                           "text": 0.0}))
    assert parts["audio"].item() == pytest.approx(math.log(VOCAB), rel=0.15)  # CE over VOCAB classes
    assert 0.2 < parts["fmri"].item() < 3.0
    expected = parts["fmri"] + 0.5 * parts["video"] + 0.1 * parts["audio"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    mse = GibletAutoencoder(small_cfg(), spec(audio_loss="mse"))
    out = mse(batch)
    assert out["recon_audio"].shape == (8, NCB, T)
    _, p2 = compute_losses(out, batch, LossConfig(audio="mse"))
    assert p2["audio"].item() > 20  # codes ~ U(0, 16) regressed as floats: ~ E[code^2]


def test_masked_losses_skip_masked_rows():
    pred, target = torch.zeros(3, 4), torch.tensor([[1.0] * 4, [2.0] * 4, [100.0] * 4])
    assert masked_mse(pred, target, torch.tensor([True, True, False])).item() == pytest.approx(2.5)
    assert masked_mse(pred, target, torch.tensor([False] * 3)).item() == 0.0
    logits = torch.zeros(2, 1, 3, 5)
    logits[0, 0, :, 2] = 50.0  # row 0 predicts class 2 with certainty
    codes = torch.full((2, 1, 3), 2)
    assert audio_ce(logits, codes, torch.tensor([True, False])).item() == pytest.approx(0.0, abs=1e-6)
    assert audio_ce(logits, codes, torch.tensor([False, True])).item() == pytest.approx(math.log(5), rel=1e-5)


def test_audio_encoder_bag_is_the_mean_code_embedding_of_each_segment():
    from giblet.models.autoencoder import AudioEncoder, segment_of_frame

    torch.manual_seed(0)
    enc = AudioEncoder(n_codebooks=4, code_frames=10, vocab=16, d_embed=3, segments=4, d_out=8, dropout=0.0)
    codes = torch.randint(0, 16, (2, 5, 4, 10))
    e = enc.embed.weight[codes + enc.offset.view(-1, 1)]  # (2, 5, codebook, frame, 3): one table per codebook
    seg = segment_of_frame(10, 4)
    ref = torch.stack([e[..., seg == s, :].mean((-3, -2)) for s in range(4)], -2)
    torch.testing.assert_close(enc(codes), enc.proj(ref.reshape(2, 5, -1)))


def test_segment_cross_entropy_equals_per_frame_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 4, 7, generator=g)  # (batch, codebook, segment, vocab)
    codes = torch.randint(0, 7, (3, 2, 10), generator=g)  # 10 code frames over 4 segments
    seg = torch.arange(10) * 4 // 10
    per_frame = logits[:, :, seg]  # (batch, codebook, frame, vocab)
    expected = torch.nn.functional.cross_entropy(per_frame.reshape(-1, 7), codes.reshape(-1), reduction="none")
    expected = expected.view(3, 2, 10).mean((1, 2))
    mask = torch.tensor([True, False, True])
    got = audio_ce(logits, codes, mask)
    assert got.item() == pytest.approx(float(expected[mask].mean()), rel=1e-6)


def test_loss_config_checks():
    assert check_losses(LossConfig()) == []
    problems = check_losses(LossConfig(weights={"fmri": 1.0, "vidoe": 1.0}, fmri_target="scanner", audio="l2"),
                            modalities=("video",))
    text = " ".join(problems)
    assert "vidoe" in text and "fmri_target" in text and "loss.audio" in text and "loss.weights.video" in text


# -- schedule ----------------------------------------------------------------------------------------
def test_lr_warms_up_linearly_then_decays_by_cosine_in_steps():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    np.testing.assert_allclose(f[:10], np.arange(1, 11) / 10)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.55, abs=0.01) and f[99] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_warmup_in_epochs_is_converted_to_steps_and_the_optimizer_applies_it():
    sched = resolve_schedule(ScheduleConfig(epochs=5, warmup_epochs=1.5), batches_per_epoch=40, accum_steps=2)
    assert (sched.steps_per_epoch, sched.warmup_steps, sched.total_steps) == (20, 30, 100)
    assert "30 steps (= 1.5 epochs)" in sched.describe()
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    sch = build_scheduler(opt, sched)
    applied = []
    for _ in range(sched.total_steps):
        applied.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert applied[0] == pytest.approx(0.1 / 30) and max(applied) == pytest.approx(0.1)
    assert int(np.argmax(applied)) == 29 and check_warmup(sched) is None


def test_epoch_unit_reproduces_the_prototype_stall():
    sched = resolve_schedule(ScheduleConfig(epochs=15, warmup_steps=100, unit="epoch"), batches_per_epoch=50)
    lrs = [lr_factor(s // sched.steps_per_epoch, sched.total_steps, sched.warmup_steps, 0.1)
           for s in range(sched.total_steps)]
    assert max(lrs) == pytest.approx(0.15)  # after 15 epochs, 15 % of the target LR
    assert "15 %" in check_warmup(sched) and "unit=step" in check_warmup(sched)


def test_optimizer_falls_back_to_torch_adamw_on_cpu():
    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, name = build_optimizer(param_groups(model, 0.01), OptimConfig(name="adamw8bit"), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and name == "torch.AdamW" and caught
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.weight) in decay and id(model.bias) not in decay  # no decay on biases


# -- checkpoint, RNG -----------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "rng": [D.rng_state()],
             "loader": {"epoch": 1, "position": 32, "seed": 0, "order": {"chunks": [16, 16]}}, "total_steps": 9,
             "scheduler": {}, "run": {"data": {"batch_size": 16}}, "shape": {"n_voxels": 10}}
    ckpt.save_checkpoint(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind
    back = ckpt.load_checkpoint(tmp_path)
    assert back["step"] == 7 and back["loader"]["position"] == 32
    torch.testing.assert_close(back["model"]["weight"], model.weight.detach())
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters())
    fresh.load_state_dict(back["optimizer"])
    assert ckpt.load_checkpoint(tmp_path / "none") is None
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        ckpt.load_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="n_voxels: checkpoint 10, now 12"):
        ckpt.check_shape(back, {"n_voxels": 12})
    with pytest.raises(ConfigError, match="data.batch_size: checkpoint 16, now 8.*resume=weights_only"):
        ckpt.check_run(back, {"data": {"batch_size": 8}})


def test_check_run_lets_the_world_size_change_and_nothing_else():
    saved = {"run": {"world_size": 2, "seed": 0, "data": {"batch_size": 16}}}
    ckpt.check_run(saved, {"world_size": 3, "seed": 0, "data": {"batch_size": 16}})  # elastic resume
    with pytest.raises(ConfigError, match="seed: checkpoint 0, now 1") as err:
        ckpt.check_run(saved, {"world_size": 3, "seed": 1, "data": {"batch_size": 16}})
    assert "world_size" not in str(err.value)


class _Payload:
    """Pickles as a call that creates a file: loading it must never run that call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("case", ["tensor", "no_keys", "wrong_type", "pickle", "malicious"])
def test_a_bad_checkpoint_file_is_refused_in_one_line_naming_it(tmp_path, case):
    import pickle

    path, marker = tmp_path / "checkpoint.pt", tmp_path / "pwned"
    full = {"format": ckpt.FORMAT, "model": {}, "step": 1, "total_steps": 2, "optimizer": {}, "scheduler": {},
            "loader": {}, "rng": [], "run": {}, "shape": {}}
    if case == "tensor":
        torch.save(torch.zeros(3), path)
        needle = "not a giblet checkpoint: it holds a Tensor, not a dict of run state"
    elif case == "no_keys":
        torch.save({"weights": torch.zeros(2)}, path)
        needle = "not a giblet checkpoint: it lacks format, model, step, total_steps"
    elif case == "wrong_type":
        torch.save({**full, "step": "7", "rng": {}}, path)
        needle = "step is a str, not a int; rng is a dict, not a list"
    elif case == "pickle":  # a plain pickle, not a torch file
        path.write_bytes(pickle.dumps({"model": {}}))
        needle = "cannot be loaded as a giblet checkpoint"
    else:
        torch.save({**full, "model": _Payload(marker)}, path)
        needle = "refused: it holds Python objects other than tensors"
    with pytest.raises(ConfigError) as info:
        ckpt.load_checkpoint(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg, msg
    assert "out=" in msg
    if case == "malicious":
        assert "posix.system" in msg or "os.system" in msg, msg  # what was refused, torch's one line of it
        assert "weights_only=False" not in msg  # never advise loading an untrusted file unsafely
    assert not marker.exists()  # nothing in the file ran


def test_rng_state_round_trip():
    import random

    D.seed_everything(3, 1)
    state = D.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    D.seed_everything(9, 0)
    D.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# -- diagnostics --------------------------------------------------------------------------------------
def test_grad_norms_per_top_level_module():
    torch.manual_seed(0)
    model = GibletAutoencoder(small_cfg(), spec())
    batch = prepare_batch(samples(), 2)
    total, _ = compute_losses(model(batch), batch, LossConfig())
    total.backward()
    norms = grad_norms(model)
    assert {"enc_video", "enc_audio", "enc_text", "trunk", "bottleneck", "temporal", "fmri_head", "dec_video",
            "dec_audio", "dec_text"} <= set(norms)
    whole = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(float(whole), rel=1e-4)


def test_scale_check_names_raw_fmri_and_codes_under_mse():
    sp = spec()
    b = prepare_batch(samples(n=8), 2)
    ok = scale_check(b, sp, {"fmri_raw_mean": 1000.0, "fmri_raw_std": 30.0}, LossConfig())
    assert [r["ok"] for r in ok] == [True, True, True, True], ok
    b = dict(b, target_fmri=b["fmri"] * 30 + 1000)
    rows = scale_check(b, sp, {"fmri_raw_mean": 1000.0, "fmri_raw_std": 30.0}, LossConfig(audio="mse"))
    bad = {r["input"].split()[0]: r for r in rows if not r["ok"]}
    assert set(bad) == {"fmri", "audio"}
    assert "raw scanner units" in bad["fmri"]["note"] and "loss.audio=ce" in bad["audio"]["note"]
    with pytest.raises(ConfigError, match="fmri target.*audio codes"):
        enforce_scale_check(rows, "error")
    with pytest.warns(UserWarning, match="scale check"):
        enforce_scale_check(rows, "warn")
    enforce_scale_check(rows, "off")
    b["video"] = b["video"] // 255  # a store whose frames were saved in [0, 1] would look like this
    assert not scale_check(b, sp, {}, LossConfig())[0]["ok"]
    pooled = dict(b, video=pool_frames(prepare_batch(samples(n=8), 2)["video"], (3, 4)))  # the dataset's video_pool
    row = scale_check(pooled, sp, {"video_pool_factor": 16.0}, LossConfig())[0]
    assert row["ok"] and row["input"].startswith("video (pooled 16:1") and row["batch_std"] < 0.5, row
    twice = dict(pooled, video=pooled["video"] / 255)  # [0, 1] pixels divided by 255 again
    assert not scale_check(twice, sp, {"video_pool_factor": 16.0}, LossConfig())[0]["ok"]


def test_video_pooled_by_the_dataset_gives_the_model_the_same_input_as_uint8_frames():
    torch.manual_seed(0)
    model = GibletAutoencoder(small_cfg(), spec()).eval()
    batch = prepare_batch(samples(), video_frames=2)
    pooled = dict(batch, video=pool_frames(batch["video"], (3, 4)))
    assert pooled["video"].shape == batch["video"].shape[:3] + (3, 4, C) and pooled["video"].dtype == torch.float32
    expect = torch.nn.functional.adaptive_avg_pool2d(batch["video"][0, 1].permute(0, 3, 1, 2).float() / 255, (3, 4))
    torch.testing.assert_close(pooled["video"][0, 1], expect.permute(0, 2, 3, 1))
    a, b = model(batch), model(pooled)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(pool_frames(pooled["video"], (3, 4)), pooled["video"])  # pooling to its own size keeps it


# -- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo", "tiny", "gpu", "prototype"])
def test_every_shipped_train_config_loads(name, tmp_path):
    from pipelines.train import load_train_config

    cfg = load_train_config(REPO / "configs" / "train" / f"{name}.yaml", [f"store={tmp_path}", "out=run"])
    assert cfg.store == str(tmp_path) and cfg.out == str(Path.cwd() / "run")  # overrides: relative to the cwd
    if name == "prototype":
        assert (cfg.loss.fmri_target, cfg.loss.audio, cfg.schedule.unit) == ("raw", "mse", "epoch")
        assert set(cfg.loss.weights.values()) == {1.0}


def test_train_config_reports_every_problem_with_suggestions():
    from pipelines.train import load_train_config

    with pytest.raises(ConfigError) as info:
        load_train_config(REPO / "configs" / "train" / "tiny.yaml",
                          ["optim.lrr=1", "model.d_model=30", "schedule.unit=epochs", "data.window=-1"])
    msg = str(info.value)
    assert "did you mean 'lr'" in msg
    with pytest.raises(ConfigError) as info:
        load_train_config(REPO / "configs" / "train" / "tiny.yaml",
                          ["model.d_model=31", "schedule.unit=epochs", "data.window=-1", "log.scale_check=maybe",
                           "compile_mode=fast"])
    msg = str(info.value)
    assert "5 problem(s)" in msg and "scale_check" in msg and "not divisible" in msg and "schedule.unit" in msg and "data.window" in msg
    assert "compile_mode: 'fast'; choose one of default, reduce-overhead" in msg
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead with optim.accum_steps=2"):
        load_train_config(REPO / "configs" / "train" / "tiny.yaml",
                          ["compile_mode=reduce-overhead", "optim.accum_steps=2"])
    load_train_config(REPO / "configs" / "train" / "tiny.yaml", ["compile_mode=reduce-overhead", "compile=true"])


def test_cli_reports_one_line_errors(tmp_path, capsys):
    from pipelines.train import main

    assert main([str(REPO / "configs" / "train" / "tiny.yaml"), f"store={tmp_path / 'missing.zarr'}",
                 f"out={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("giblet-train: error:") and "missing.zarr" in err and "\n" not in err
    assert main([str(tmp_path / "nope.yaml")]) == 1
    assert "train config not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def _ddp_grads(rank: int, port: int, out: str) -> None:
    """One gloo rank: gradients of a small model under DDP, with and without the bucket-divide hook."""
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rt = D.setup("cpu", "fp32")
    grads = {}
    for divide in (True, False):
        torch.manual_seed(0)  # same weights on both ranks
        model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
        ddp = D.wrap(model, rt, D.DDPConfig(bucket_cap_mb=0.001, bucket_divide=divide))  # several buckets
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(rank))  # each rank its own data
        ddp(x).square().sum().backward()
        grads[divide] = [p.grad.clone() for p in model.parameters()]
    torch.save(grads, f"{out}/rank{rank}.pt")
    del ddp  # its reducer's last collective is done on both ranks before either closes its gloo pairs:
    dist.barrier()  # a rank that tears down first can abort the other ("terminate called ...") on a busy machine
    dist.destroy_process_group()


def test_ddp_bucket_divide_averages_gradients_like_ddp_itself(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_grads, args=(port, str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)  # the average of the two ranks' local gradients, computed here
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
    local = []
    for rank in (0, 1):
        model.zero_grad()
        model(torch.randn(5, 6, generator=torch.Generator().manual_seed(rank))).square().sum().backward()
        local.append([p.grad.clone() for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*local)):
        mean = (a + b) / 2
        for g in (g0, g1):
            torch.testing.assert_close(g[True][i], mean)  # the hook: divided once per bucket
            torch.testing.assert_close(g[False][i], mean)  # DDP's own per-parameter division
