"""``giblet-train CONFIG.yaml [KEY=VALUE ...]``: the whole training loop, top to bottom.

Setup -> explicit step loop -> cleanup, nanoGPT style; the parts live in ``giblet.training``
and ``giblet.models``. One process::

    giblet-train configs/train/demo.yaml store=giblet-demo/demo.zarr

or several (NCCL on GPU, gloo on CPU; ranks come from torchrun's RANK/WORLD_SIZE)::

    torchrun --nproc_per_node 2 -m pipelines.train configs/train/gpu.yaml store=/data/sherlock.zarr

A run folder (``out``) holds ``log.jsonl`` and ``checkpoint.pt``; rerunning the same
command resumes from the checkpoint, or says the run is finished -- with the same number
of ranks or another (elastic: the samples of the epoch left by the saved ranks are split
exactly over the new ones, ``giblet.data.partition`` step 5; the LR schedule, its step
count and the per-rank batch size stay). A rerun with settings that change the sample order
or schedule is refused (``resume=weights_only`` starts a new schedule from the checkpoint's
weights; ``resume=false`` refuses to overwrite any checkpoint).
The config's schema and checks are ``giblet.training.config``.
``python -m stats.diagnose RUN/log.jsonl`` turns the log into a verdict and plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from giblet.data import GibletDataset, GibletLoader
from giblet.errors import ConfigError, ModalityMissingError
from giblet.evaluation.metrics import SubjectCorrelation
from giblet.models.autoencoder import (GibletAutoencoder, ModelSpec, count_parameters, finish_batch,
                                       prepare_batch)
from giblet.reader import open_store
from giblet.training import checkpoint as ckpt
from giblet.training import distributed as D
from giblet.training.config import (TrainConfig, load_train_config, run_identity, shape_identity,
                                    store_fingerprint)
from giblet.training.diagnostics import (Meter, RunLog, StepProfiler, enforce_scale_check, format_scale_check,
                                         scale_check)
from giblet.training.losses import COMPONENTS, check_losses, compute_losses
from giblet.training.schedule import build_optimizer, build_scheduler, check_warmup, param_groups, resolve_schedule
from pipelines.errors import one_line_errors

KILL_ENV = "GIBLET_TRAIN_KILL_AT_STEP"  # tests only: SIGKILL this process right after that optimizer step
__all__ = ["train", "main", "load_train_config", "model_spec", "dataset_kwargs", "validate"]


def model_spec(ds: GibletDataset, cfg: TrainConfig, view=None) -> ModelSpec:
    """Everything the model's shape depends on, read from the store (never hand-edited);
    ``view``: the store already opened (``giblet.open_store``), else it is opened here."""
    view, shapes = view or open_store(ds.store_path), ds.sample_spec()
    audio = None
    if "audio" in ds.modalities:
        n_cb, n_frames = shapes["audio"][0][-2:]
        attrs = dict(view.array(view.stimulus_name("audio", ds.runs[0])).attrs)
        audio = (n_cb, n_frames, int(attrs.get("codebook_size", cfg.data.audio_vocab)))
    return ModelSpec(n_voxels=ds.n_voxels, window=ds.window, lag=ds.lag, tr_s=ds.tr_s,
                     video=tuple(shapes["video"][0][-4:]) if "video" in ds.modalities else None, audio=audio,
                     text=shapes["text"][0][-1] if "text" in ds.modalities else None,
                     video_stats=view.video_stats() if "video" in ds.modalities else None,
                     text_stats=view.text_stats() if "text" in ds.modalities else None, audio_loss=cfg.loss.audio,
                     subjects=tuple(ds.subjects), **_features_spec(ds, view))


def _features_spec(ds: GibletDataset, view) -> dict:
    """The served pretrained-feature layers' widths and statistics (side by side), if any."""
    if not ds.features:
        return {}
    stats = [view.feature_stats(spec) for spec in ds.features]
    return {"features": tuple(len(mean) for mean, _ in stats),
            "features_stats": tuple(np.concatenate(part) for part in zip(*stats))}


def to_device(batch: dict, device: torch.device, subjects: Optional[torch.Tensor] = None) -> dict:
    """The batch on ``device``; ``subjects`` (``model.subject_table(ds.subjects)``) turns the
    dataset's subject indices into the model's, by name."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if subjects is not None and "subject" in batch:
        batch["subject"] = subjects[batch["subject"]]
    return batch


def dataset_kwargs(cfg: TrainConfig, view) -> dict:
    """``GibletDataset`` keyword arguments of a run (train and val alike; ``giblet-evaluate`` too)."""
    d = cfg.data
    kw = dict(subjects=d.subjects, runs=d.runs, window=d.window, lag=d.lag, hrf=d.hrf, target=d.target)
    if d.features:
        kw["features"] = list(d.features)
    if view.has_modality("video"):  # read and hand over only the frames the model sees, pooled as it pools them
        kw["frames"] = cfg.model.video_frames
        if d.pool_video:
            kw["video_pool"] = tuple(cfg.model.video_pool)
    return kw


@torch.no_grad()
def validate(model, val_ds: GibletDataset, collate, cfg: TrainConfig, rt: D.Runtime) -> dict:
    """Loss components over the val split, and the field's score: Pearson r per voxel and
    per subject over the subject's val TRs (all ranks' sums), summarized per subject and
    across subjects (``giblet.evaluation.metrics.per_subject``).

    Returns:
        ``loss_<component>``; ``r_mean`` (the headline: mean over subjects of each subject's
        mean r over voxels), ``r_median`` (median of subject medians), ``r_top10`` (mean of
        subject top-decile means); ``subjects``: ``{name: {"mean", "median", "top10", "n"}}``.
    """
    model.eval()
    table = D.unwrap(model).subject_table(val_ds.subjects, rt.device)  # the val set's subjects, by name
    shard = np.array_split(np.arange(len(val_ds)), rt.world.world_size)[rt.world.rank]  # contiguous: whole chunks
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, shard.tolist()), cfg.data.val_batch_size,
                                         num_workers=cfg.data.num_workers, collate_fn=collate,
                                         generator=torch.Generator())  # leave the global RNG alone
    corr = SubjectCorrelation(len(val_ds.subjects), val_ds.n_voxels, rt.device)
    sums = torch.zeros(len(COMPONENTS) + 1, dtype=torch.float64, device=rt.device)  # n, then components
    for batch in loader:
        subject = batch["subject"].to(rt.device)  # the val set's index, for the score
        batch = to_device(batch, rt.device, table)
        with rt.autocast():
            out = model(batch)
            _, parts = compute_losses(out, batch, cfg.loss)
        pred = out["fmri"].float()
        if cfg.loss.fmri_target == "raw":  # r is computed on z-scores either way, through the same ZScorers
            pred = torch.stack([torch.from_numpy(val_ds.scaler(int(s), int(r)).transform(p.cpu().numpy()))
                                for p, s, r in zip(pred, subject, batch["run"])]).to(rt.device)
        corr.update(pred, batch["fmri"], subject)
        n = len(pred)
        sums[0] += n
        for i, k in enumerate(COMPONENTS, 1):
            sums[i] += n * parts[k].double() if k in parts else 0.0
    corr.all_reduce()
    D.all_reduce_sum(sums)
    score = corr.summary(val_ds.subjects)
    model.train()
    out = {f"loss_{k}": float(sums[i] / sums[0].clamp(min=1)) for i, k in enumerate(COMPONENTS, 1)
           if k == "fmri" or k in val_ds.modalities}
    return {**out, "r_mean": score["mean"], "r_median": score["median"], "r_top10": score["top10"],
            "subjects": score["subjects"]}


def train(cfg: TrainConfig) -> dict:
    # ---- setup -------------------------------------------------------------------------------
    if cfg.threads:  # on a shared CPU, spinning OpenMP threads can make each step 10x slower
        torch.set_num_threads(cfg.threads)
    rt = D.setup(cfg.device, cfg.precision)
    main = rt.is_main
    say = print if main else (lambda *a, **k: None)
    run_dir, view = Path(cfg.out), open_store(cfg.store)
    if not view.subjects:
        raise ModalityMissingError(f"{view.path}: the store has no fMRI (no subject's BOLD was built), and "
                                   f"giblet-train needs fMRI targets; add runs.<run>.fmri (or inputs.fmri) to the config and "
                                   f"rerun giblet-preprocess")
    log_path = run_dir / "log.jsonl"
    run = run_identity(cfg, rt.world.world_size, store_fingerprint(view))
    ckpt_path = ckpt.checkpoint_path(run_dir)
    state = ckpt.resume_state(run_dir, cfg.resume, run)  # changed settings are refused before any dataset is built
    if state is not None and cfg.resume is True:  # elastic: the schedule stays the one the first world size resolved
        run["world_size"] = state["run"]["world_size"]
    if state is not None and cfg.resume is True and state["step"] >= state["total_steps"]:
        say(f"giblet-train: the run in {run_dir} is finished (step {state['step']} of {state['total_steps']}); "
            f"nothing to do (checkpoint {ckpt_path}, log {log_path}). To train further, choose another out= or set "
            f"resume=weights_only with a longer schedule")
        return {"steps": int(state["step"]), "finished": True}
    say(f"giblet-train: run folder {run_dir}: checkpoint {ckpt_path}, log {log_path}")
    D.seed_everything(cfg.seed, rt.world.rank)
    dcfg, ds_kw = cfg.data, dataset_kwargs(cfg, view)
    train_ds, val_ds = GibletDataset(cfg.store, "train", **ds_kw), GibletDataset(cfg.store, "val", **ds_kw)
    spec = model_spec(train_ds, cfg, view)
    problems = check_losses(cfg.loss, spec.modalities)
    if problems:
        raise ConfigError(f"{cfg.config_path}: " + "; ".join(problems))
    raw = cfg.loss.fmri_target == "raw"
    finish = partial(finish_batch, denormalize=train_ds.denormalize if raw else None)
    val_collate = partial(prepare_batch, video_frames=cfg.model.video_frames,
                          denormalize=val_ds.denormalize if raw else None)
    loader = GibletLoader(train_ds, batch_size=dcfg.batch_size, num_workers=dcfg.num_workers, seed=cfg.seed,
                          drop_last=cfg.drop_last, mix_chunks=dcfg.mix_chunks, lanes=dcfg.lanes, world=rt.world,
                          transform=finish, pin_memory=rt.device.type == "cuda",
                          generator=torch.Generator().manual_seed(cfg.seed))
    # ^ its own generator: a DataLoader draws a worker seed when iterated, and drawing it from the
    #   global RNG would shift dropout after a resume (which starts one more iterator than a plain run)
    accum = cfg.optim.accum_steps
    sched = resolve_schedule(cfg.schedule, loader.batches_per_epoch_at(run["world_size"]), accum)
    model = GibletAutoencoder(cfg.model, spec).to(rt.device)
    train_subjects = model.subject_table(train_ds.subjects, rt.device)  # the identity: the spec is the train set's
    par = D.data_parallel(model, param_groups(model, cfg.optim.weight_decay), rt, cfg.ddp, zero=cfg.optim.zero)
    optimizer, optim_name = build_optimizer(par.param_groups, cfg.optim, rt.device)
    if cfg.optim.zero:
        optim_name = f"ZeRO-1 over {rt.world.world_size} rank(s), flat buffers: {optim_name}"
    scheduler = build_scheduler(optimizer, sched)
    shape = shape_identity(spec, cfg.model)
    step, weights_from, saved_world = 0, None, rt.world.world_size
    if state is not None:
        ckpt.check_shape(state, shape, ckpt_path)
        model.load_state_dict(state["model"])
        if cfg.resume is True:
            par.load_optimizer_state(optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            loader.load_state_dict(state["loader"])  # another world size: the epoch's rest is split over this one
            step, saved_world = int(state["step"]), len(state["rng"])
            if rt.world.rank < saved_world:  # a rank the checkpoint did not have keeps its seed_everything stream
                D.set_rng_state(state["rng"][rt.world.rank])
        else:  # weights_only: fresh optimizer, schedule, loader and RNG streams
            previous = _set_aside(log_path) if main else None
            weights_from = {"checkpoint": str(ckpt_path), "step": int(state["step"]),
                            "previous_log": str(previous) if previous else None}
        del state  # the mmap'd tensors were copied into the model and optimizer
    model = eager = par.model  # DDP-wrapped (several ranks, no ZeRO) or the bare model
    if cfg.compile:  # validation runs eager: eval mode and its batch size would each compile another graph
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    graphed = cfg.compile and cfg.compile_mode == "reduce-overhead"  # CUDA graphs (on GPU only)
    log = RunLog(log_path if main else None, cfg.log.tensorboard)
    n_params = count_parameters(model)
    say(f"giblet-train: {rt.world.world_size} process(es) on {rt.device}, autocast {rt.amp_dtype}, "
        f"{n_params / 1e6:.3g} M parameters, optimizer {optim_name}")
    say(f"fMRI readout: {D.unwrap(model).fmri_head.describe()}")
    say(f"data: {len(train_ds)} train / {len(val_ds)} val samples, {spec.n_voxels} "
        f"{'voxels' if train_ds.target == 'voxels' else 'columns of ' + train_ds.target}, "
        f"modalities {', '.join(spec.modalities)}, window {spec.window} lag {spec.lag}")
    say(sched.describe())
    warn = check_warmup(sched)
    if warn:
        say(f"WARNING: {warn}")
    if step:
        say(f"resumed at step {step} (epoch {loader.epoch}, {loader.position} samples in)")
        if saved_world != rt.world.world_size:
            say(f"elastic resume: the checkpoint was written by {saved_world} rank(s), this run has "
                f"{rt.world.world_size}; the rest of epoch {loader.epoch} is split over them ({len(loader)} batch(es) "
                f"a rank), and the LR schedule keeps its {sched.total_steps} steps (now of "
                f"{rt.world.world_size} x {dcfg.batch_size} samples)")
        log.write("resume", step=step, epoch=loader.epoch, position=loader.position, world_size=rt.world.world_size,
                  saved_world_size=saved_world, legs=[list(leg) for leg in loader.legs])
    else:
        if weights_from:
            say(f"resume=weights_only: model weights from step {weights_from['step']} of {ckpt_path}, a new schedule "
                f"from step 0 (previous log: {weights_from['previous_log']})")
        log.write("config", config=dataclasses.asdict(cfg), n_params=n_params, optimizer=optim_name,
                  autocast=str(rt.amp_dtype), device=str(rt.device), world_size=rt.world.world_size,
                  env=D.env_summary(), schedule=dataclasses.asdict(sched), schedule_warning=warn,
                  n_voxels=spec.n_voxels, modalities=list(spec.modalities), peak_lr=cfg.optim.lr,
                  weights_from=weights_from)

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
    profiler = StepProfiler(run_dir, rt.world.rank, step + cfg.log.profile_start, cfg.log.profile_steps,
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
            batch = to_device(batch, rt.device, train_subjects)
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
                f"{val['r_top10']:.4f}; means over subjects) | fmri loss {val['loss_fmri']:.4g} | per subject: "
                + ", ".join(f"{k} {v['mean']:.3f}" for k, v in val["subjects"].items()))
        if step % cfg.log.ckpt_every == 0 or step == sched.total_steps:
            rngs = D.gather_objects(D.rng_state())  # every rank's, so each resumes its own dropout stream
            optim_state = par.optimizer_state(optimizer)  # ZeRO: every rank's shard, on rank 0
            if main:
                ckpt.save_checkpoint(run_dir, {"model": D.unwrap(model).state_dict(), "step": step,
                                           "total_steps": sched.total_steps, "optimizer": optim_state,
                                           "scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                                           "rng": rngs, "run": run, "shape": shape})
            D.barrier()
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- cleanup -------------------------------------------------------------------------------
    summary = {"steps": step, "seconds": time.perf_counter() - t_start, **val}
    log.write("end", **summary)
    log.close()
    D.cleanup(together=True)
    return summary


def _set_aside(log_path: Path) -> Optional[Path]:
    """Rename a previous run's log to the first free ``log.N.jsonl`` (a new schedule starts its own)."""
    if not log_path.exists():
        return None
    n = 1
    while (target := log_path.with_name(f"log.{n}.jsonl")).exists():
        n += 1
    log_path.rename(target)
    return target


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="giblet-train", description="Train the giblet autoencoder on a store.",
        epilog="Rerunning the same command resumes from OUT/checkpoint.pt, also with another number of ranks "
               "(e.g. written by `torchrun --nproc_per_node 2`, resumed by 1 process or by 3): the samples the "
               "saved ranks left of the current epoch are split exactly over the new ones (none lost or repeated "
               "beyond the usual padding / drop_last rule); the LR schedule, its steps and data.batch_size per "
               "rank stay, so a step then draws ranks x batch_size samples. Not with optim.zero=true (its "
               "optimizer shards are per rank). See docs/scaling.md.")
    p.add_argument("config", help="train YAML, e.g. configs/train/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. store=demo.zarr optim.lr=3e-4")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
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
