"""``giblet-train CONFIG.yaml [KEY=VALUE ...]``: the whole training loop, top to bottom.

Setup -> explicit step loop -> cleanup, nanoGPT style; the parts live in ``giblet.training``
and ``giblet.models``. One process::

    giblet-train configs/train/demo.yaml store=giblet-demo/demo.zarr

or several (NCCL on GPU, gloo on CPU; ranks come from torchrun's RANK/WORLD_SIZE)::

    torchrun --nproc_per_node 2 -m pipelines.train configs/train/gpu.yaml store=/data/sherlock.zarr

A run folder (``out``) holds ``log.jsonl`` and ``checkpoint.pt``; rerunning the same
command resumes from the checkpoint (``resume=false`` refuses to overwrite instead).
``python -m stats.diagnose RUN/log.jsonl`` turns the log into a verdict and plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from giblet.config import _build, _set_override, read_yaml, resolve
from giblet.data import GibletDataset, GibletLoader
from giblet.errors import ConfigError
from giblet.models.autoencoder import (AutoencoderConfig, GibletAutoencoder, ModelSpec, check_model,
                                       count_parameters, finish_batch, prepare_batch)
from giblet.reader import open_store
from giblet.training import checkpoint as ckpt
from giblet.training import distributed as D
from giblet.training.diagnostics import (LogConfig, Meter, RunLog, StepProfiler, check_log, enforce_scale_check,
                                         format_scale_check, scale_check)
from giblet.training.losses import COMPONENTS, LossConfig, VoxelCorrelation, check_losses, compute_losses
from giblet.training.schedule import (OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, check_schedule,
                                      check_warmup, param_groups, resolve_schedule)
from pipelines.errors import one_line_errors

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
KILL_ENV = "GIBLET_TRAIN_KILL_AT_STEP"  # tests only: SIGKILL this process right after that optimizer step


@dataclass(frozen=True)
class DataConfig:
    subjects: Optional[list[str]] = None  # default: every subject in the store
    runs: Optional[list[str]] = None  # default: every run in the store (the split decides which TRs train)
    window: int = 8  # stimulus context: window + 1 TRs ending at target - lag (causal)
    lag: int = 0
    hrf: bool = False  # the dataset's HRF convolution of text (the model has its own HRF filter)
    batch_size: int = 32  # per rank, per micro-step
    num_workers: int = 0
    mix_chunks: int = 2
    lanes: int = 4
    val_batch_size: int = 64
    audio_vocab: int = 1024  # codebook size, when audio/codes does not record it
    drop_last: Optional[bool] = None  # skip each epoch's last partial batch (a few samples, new ones every
    #   epoch); None: true with compile=true (one batch shape: no second graph at every epoch's end)
    pool_video: bool = True  # average-pool frames to model.video_pool in the loader workers, once per
    #   decoded chunk (90x160 -> 18x32: 6x fewer bytes per batch to the device); false: ship uint8 frames


@dataclass(frozen=True)
class TrainConfig:
    store: str = ""  # a store built by giblet-preprocess
    out: str = "runs/train"  # run folder: log.jsonl, checkpoint.pt
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    resume: bool = True  # continue from out/checkpoint.pt when it exists
    threads: Optional[int] = None  # torch CPU threads per process (None: torch's default; torchrun sets 1)
    compile: bool = False  # torch.compile the model (fewer kernel launches on GPU; first steps compile)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs: no launch
    #   cost per kernel) | max-autotune-no-cudagraphs
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ddp: D.DDPConfig = field(default_factory=D.DDPConfig)
    config_path: Optional[str] = None  # filled by load_train_config


def load_train_config(path: str | Path, overrides: list[str] | tuple = ()) -> TrainConfig:
    """YAML + ``key=value`` overrides -> validated ``TrainConfig`` (every problem reported at once).
    Paths in the YAML are relative to its folder; paths given as overrides, to the working directory."""
    path = Path(path)
    raw = read_yaml(path, "pass a YAML such as configs/train/demo.yaml", what="train config")
    problems: list[str] = []
    for k in ("store", "out"):
        if raw.get(k):
            raw[k] = str(resolve(path.resolve().parent, raw[k]))
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in ("store", "out") and value:
            item = f"{key}={Path(value).expanduser().resolve()}"
        _set_override(raw, item, problems)
    cfg = _build(TrainConfig, raw, "", problems)
    if not problems:
        if not cfg.store:
            problems.append("store: no store given; set store=PATH (a store built by giblet-preprocess)")
        check_model(cfg.model, problems)
        check_losses(cfg.loss, problems=problems)
        check_schedule(cfg.schedule, cfg.optim, problems)
        check_log(cfg.log, problems)
        for name in ("window", "lag"):
            if getattr(cfg.data, name) < 0:
                problems.append(f"data.{name}: must be >= 0 TRs, got {getattr(cfg.data, name)}")
        if cfg.compile_mode not in COMPILE_MODES:
            problems.append(f"compile_mode: {cfg.compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        elif cfg.compile_mode == "reduce-overhead" and cfg.optim.accum_steps > 1:
            # a CUDA graph's next replay reuses the memory of its outputs, the gradients included
            problems.append(f"compile_mode=reduce-overhead with optim.accum_steps={cfg.optim.accum_steps}: CUDA "
                            "graphs reuse each micro-step's gradient memory; accumulate with compile_mode=default")
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    return dataclasses.replace(cfg, config_path=str(path.resolve()))


def model_spec(ds: GibletDataset, cfg: TrainConfig, view=None) -> ModelSpec:
    """Everything the model's shape depends on, read from the store (never hand-edited);
    ``view``: the store already opened (``giblet.open_store``), else it is opened here."""
    view, shapes = view or open_store(ds.store_path), ds.sample_spec()
    audio = None
    if "audio" in ds.modalities:
        n_cb, n_frames = shapes["audio"][0][-2:]
        attrs = dict(view.array(view.stimulus_name("audio", ds.runs[0])).attrs)
        audio = (n_cb, n_frames, int(attrs.get("codebook_size", cfg.data.audio_vocab)))
    return ModelSpec(n_voxels=view.n_voxels, window=ds.window, lag=ds.lag, tr_s=ds.tr_s,
                     video=tuple(shapes["video"][0][-4:]) if "video" in ds.modalities else None, audio=audio,
                     text=shapes["text"][0][-1] if "text" in ds.modalities else None,
                     video_stats=view.video_stats() if "video" in ds.modalities else None,
                     text_stats=view.text_stats() if "text" in ds.modalities else None, audio_loss=cfg.loss.audio)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validate(model, val_ds: GibletDataset, collate, cfg: TrainConfig, rt: D.Runtime) -> dict:
    """Loss components and per-voxel Pearson r over the whole val split, summed across ranks."""
    model.eval()
    shard = np.array_split(np.arange(len(val_ds)), rt.world.world_size)[rt.world.rank]  # contiguous: whole chunks
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, shard.tolist()), cfg.data.val_batch_size,
                                         num_workers=cfg.data.num_workers, collate_fn=collate,
                                         generator=torch.Generator())  # leave the global RNG alone
    corr = VoxelCorrelation(val_ds.n_voxels, rt.device)
    sums = torch.zeros(len(COMPONENTS) + 1, dtype=torch.float64, device=rt.device)  # n, then components
    for batch in loader:
        batch = to_device(batch, rt.device)
        with rt.autocast():
            out = model(batch)
            _, parts = compute_losses(out, batch, cfg.loss)
        pred = out["fmri"].float()
        if cfg.loss.fmri_target == "raw":  # r is computed on z-scores either way, through the same ZScorers
            pred = torch.stack([torch.from_numpy(val_ds.scaler(int(s), int(r)).transform(p.cpu().numpy()))
                                for p, s, r in zip(pred, batch["subject"], batch["run"])]).to(rt.device)
        corr.update(pred, batch["fmri"])
        n = len(pred)
        sums[0] += n
        for i, k in enumerate(COMPONENTS, 1):
            sums[i] += n * parts[k].double() if k in parts else 0.0
    corr.all_reduce()
    D.all_reduce_sum(sums)
    r = corr.r().cpu().numpy()
    model.train()
    out = {f"loss_{k}": float(sums[i] / sums[0].clamp(min=1)) for i, k in enumerate(COMPONENTS, 1)
           if k == "fmri" or k in val_ds.modalities}
    top = np.sort(r)[-max(1, len(r) // 10):]
    return {**out, "r_mean": float(r.mean()), "r_median": float(np.median(r)), "r_top10": float(top.mean())}


def train(cfg: TrainConfig) -> dict:
    # ---- setup -------------------------------------------------------------------------------
    if cfg.threads:  # on a shared CPU, spinning OpenMP threads can make each step 10x slower
        torch.set_num_threads(cfg.threads)
    rt = D.setup(cfg.device, cfg.precision)
    main = rt.is_main
    say = print if main else (lambda *a, **k: None)
    D.seed_everything(cfg.seed, rt.world.rank)
    dcfg = cfg.data
    ds_kw = dict(subjects=dcfg.subjects, runs=dcfg.runs, window=dcfg.window, lag=dcfg.lag, hrf=dcfg.hrf)
    view = open_store(cfg.store)
    if view.has_modality("video"):  # read and hand over only the frames the model sees, pooled as it pools them
        ds_kw["frames"] = cfg.model.video_frames
        if dcfg.pool_video:
            ds_kw["video_pool"] = tuple(cfg.model.video_pool)
    train_ds, val_ds = GibletDataset(cfg.store, "train", **ds_kw), GibletDataset(cfg.store, "val", **ds_kw)
    spec = model_spec(train_ds, cfg, view)
    problems = check_losses(cfg.loss, spec.modalities)
    if problems:
        raise ConfigError(f"{cfg.config_path}: " + "; ".join(problems))
    raw = cfg.loss.fmri_target == "raw"
    finish = partial(finish_batch, denormalize=train_ds.denormalize if raw else None)
    val_collate = partial(prepare_batch, video_frames=cfg.model.video_frames,
                          denormalize=val_ds.denormalize if raw else None)
    drop_last = cfg.compile if dcfg.drop_last is None else dcfg.drop_last
    loader = GibletLoader(train_ds, batch_size=dcfg.batch_size, num_workers=dcfg.num_workers, seed=cfg.seed,
                          drop_last=drop_last, mix_chunks=dcfg.mix_chunks, lanes=dcfg.lanes, world=rt.world,
                          transform=finish, pin_memory=rt.device.type == "cuda",
                          generator=torch.Generator().manual_seed(cfg.seed))
    # ^ its own generator: a DataLoader draws a worker seed when iterated, and drawing it from the
    #   global RNG would shift dropout after a resume (which starts one more iterator than a plain run)
    accum = cfg.optim.accum_steps
    sched = resolve_schedule(cfg.schedule, loader.batches_per_epoch, accum)
    model = GibletAutoencoder(cfg.model, spec).to(rt.device)
    par = D.data_parallel(model, param_groups(model, cfg.optim.weight_decay), rt, cfg.ddp, zero=cfg.optim.zero)
    optimizer, optim_name = build_optimizer(par.param_groups, cfg.optim, rt.device)
    if cfg.optim.zero:
        optim_name = f"ZeRO-1 over {rt.world.world_size} rank(s), flat buffers: {optim_name}"
    scheduler = build_scheduler(optimizer, sched)
    fingerprint = {"store": str(Path(cfg.store).resolve()), "n_voxels": spec.n_voxels,
                   "modalities": list(spec.modalities), "window": spec.window, "lag": spec.lag,
                   "model": dataclasses.asdict(cfg.model), "world_size": rt.world.world_size,
                   "zero": cfg.optim.zero}
    step, state = 0, ckpt.load_checkpoint(cfg.out) if cfg.resume else None
    if not cfg.resume and ckpt.checkpoint_path(cfg.out).exists():
        raise ConfigError(f"{ckpt.checkpoint_path(cfg.out)} exists and resume=false; choose another out= folder")
    if state is not None:
        ckpt.check_compatible(state, fingerprint)
        model.load_state_dict(state["model"])
        par.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        step = int(state["step"])
        D.set_rng_state(state["rng"][rt.world.rank])
        del state  # the mmap'd tensors were copied into the model and optimizer
    model = eager = par.model  # DDP-wrapped (several ranks, no ZeRO) or the bare model
    if cfg.compile:  # validation runs eager: eval mode and its batch size would each compile another graph
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    graphed = cfg.compile and cfg.compile_mode == "reduce-overhead"  # CUDA graphs (on GPU only)
    log = RunLog(Path(cfg.out) / "log.jsonl" if main else None, cfg.log.tensorboard)
    n_params = count_parameters(model)
    say(f"giblet-train: {rt.world.world_size} process(es) on {rt.device}, autocast {rt.amp_dtype}, "
        f"{n_params / 1e6:.3g} M parameters, optimizer {optim_name}")
    say(f"data: {len(train_ds)} train / {len(val_ds)} val samples, {spec.n_voxels} voxels, "
        f"modalities {', '.join(spec.modalities)}, window {spec.window} lag {spec.lag}")
    say(sched.describe())
    warn = check_warmup(sched)
    if warn:
        say(f"WARNING: {warn}")
    if step:
        say(f"resumed at step {step} (epoch {loader.epoch}, {loader.position} samples in)")
        log.write("resume", step=step, epoch=loader.epoch, position=loader.position)
    else:
        log.write("config", config=dataclasses.asdict(cfg), n_params=n_params, optimizer=optim_name,
                  autocast=str(rt.amp_dtype), device=str(rt.device), world_size=rt.world.world_size,
                  env=D.env_summary(), schedule=dataclasses.asdict(sched), schedule_warning=warn,
                  n_voxels=spec.n_voxels, modalities=list(spec.modalities), peak_lr=cfg.optim.lr)

    def batches():
        while True:  # GibletLoader resumes mid-epoch and moves to the next epoch by itself
            yield from loader

    stream = batches()
    first = next(stream)
    # ---- scale check: the check that would have stopped the prototype on day one -------------
    mean, std = view.fmri_stats(train_ds.subjects[0], view.subject_runs(train_ds.subjects[0])[0])
    stats = {"fmri_raw_mean": float(mean.mean()), "fmri_raw_std": float(std.mean())}
    if "video_pool" in ds_kw:  # stored pixels per pooled pixel
        frames = view.array(view.stimulus_name("video", train_ds.runs[0]))
        stats["video_pool_factor"] = float(np.prod(frames.shape[2:4]) / np.prod(ds_kw["video_pool"]))
    rows = scale_check(first, spec, stats, cfg.loss, cfg.log.scale_tolerance)
    say(format_scale_check(rows))
    log.write("scale_check", step=step, rows=rows)
    enforce_scale_check(rows, cfg.log.scale_check)

    # ---- the step loop -------------------------------------------------------------------------
    meter, kill_at = Meter(), int(os.environ.get(KILL_ENV, 0))
    profiler = StepProfiler(Path(cfg.out), rt.world.rank, step + cfg.log.profile_start, cfg.log.profile_steps,
                            rt.device)
    t_start, val = time.perf_counter(), {}
    model.train()
    while step < sched.total_steps:
        parts_sum: dict[str, float] = {}
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = first if first is not None else next(stream)
            first = None
            meter.wait += time.perf_counter() - t0
            meter.samples += len(batch["index"])
            batch = to_device(batch, rt.device)
            if graphed:  # a new iteration: the graphs may reuse the previous step's output memory
                torch.compiler.cudagraph_mark_step_begin()
            with par.no_sync(micro < accum - 1), rt.autocast():
                out = model(batch)
                loss, parts = compute_losses(out, batch, cfg.loss)
            (loss / accum).backward()
            for k, v in [("loss", loss)] + list(parts.items()):
                parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float() / accum
        par.reduce_gradients()  # ZeRO: this rank's shard of the mean gradient (DDP did it in the backward)
        log_now = (step + 1) % cfg.log.every == 0 or step + 1 == sched.total_steps
        module_norms = par.module_grad_norms() if log_now else {}  # pre-clip, like the total
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = par.clip_grad_norm_(clip)  # the pre-clip total norm
        lr = optimizer.param_groups[0]["lr"]  # the LR this step applies
        optimizer.step()
        par.after_step()  # ZeRO: every rank gathers the updated shards
        scheduler.step()
        par.zero_grad(optimizer)
        step += 1
        profiled = profiler.after_step(step)
        if profiled:
            log.write("profile", step=step, **profiled)
            say(f"profile of steps {step - cfg.log.profile_steps + 1}..{step}: wall {profiled['wall_ms_per_step']:.1f} "
                f"ms/step, device busy {100 * profiled['device_busy_fraction']:.0f}%, NCCL "
                f"{profiled['nccl_ms_per_step']:.1f} ms/step ({profiler.path})")
        if log_now:
            keys = sorted(parts_sum)
            vals = D.all_reduce_sum(torch.stack([parts_sum[k] for k in keys])) / rt.world.world_size
            losses = {("loss" if k == "loss" else f"loss_{k}"): float(v) for k, v in zip(keys, vals)}
            rec = {"step": step, "epoch": loader.epoch, "lr": lr, **losses, "grad_norm": float(norm),
                   **{f"grad_norm_{k}": v for k, v in module_norms.items()}, **meter.summary(rt.world.world_size)}
            if rt.device.type == "cuda":
                rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(rt.device) / 1e9
            log.write("train", **rec)
            say(f"step {step}/{sched.total_steps} | loss {losses['loss']:.4g} ("
                + " ".join(f"{k[5:]} {v:.3g}" for k, v in losses.items() if k != "loss")
                + f") | lr {lr:.3g} | grad {float(norm):.3g} | wait {100 * rec['data_wait']:.0f}% | "
                  f"{rec['samples_per_s']:.0f} samples/s")
            meter.reset()
        if step % cfg.log.val_every == 0 or step == sched.total_steps:
            val = validate(eager, val_ds, val_collate, cfg, rt)
            log.write("val", step=step, **val)
            say(f"val @ {step}: r_mean {val['r_mean']:.4f} (median {val['r_median']:.4f}, top 10% "
                f"{val['r_top10']:.4f}) | fmri loss {val['loss_fmri']:.4g}")
        if step % cfg.log.ckpt_every == 0 or step == sched.total_steps:
            rngs = D.gather_objects(D.rng_state())  # every rank's, so each resumes its own dropout stream
            optim_state = par.optimizer_state(optimizer)  # ZeRO: every rank's shard, on rank 0
            if main:
                ckpt.save_checkpoint(cfg.out, {"model": D.unwrap(model).state_dict(), "step": step,
                                               "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                                               "loader": loader.state_dict(), "rng": rngs, "fingerprint": fingerprint})
            D.barrier()
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- cleanup -------------------------------------------------------------------------------
    summary = {"steps": step, "seconds": time.perf_counter() - t_start, **val}
    log.write("end", **summary)
    log.close()
    D.cleanup()
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="giblet-train", description="Train the giblet autoencoder on a store.")
    p.add_argument("config", help="train YAML, e.g. configs/train/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. store=demo.zarr optim.lr=3e-4")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    def body() -> int:
        try:
            train(load_train_config(args.config, args.overrides))
            return 0
        finally:
            D.cleanup()

    return one_line_errors("giblet-train", body, debug=args.debug,
                           interrupted="rerun the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
