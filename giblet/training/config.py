"""The train config: the schema of ``giblet-train``'s YAML, its checks, and what defines a run.

:func:`load_train_config` goes through the one config loader (``giblet.config``): paths in
the YAML resolve against its folder, paths given as ``KEY=VALUE`` overrides against the
working directory, and every value check -- model, losses, schedule, log, data, device,
precision, ``ddp.compress``, ``compile_mode`` -- runs there, before any store is opened.

:func:`run_identity` is what a checkpoint must share with the config to be resumed: the
settings that fix the sample order and the LR schedule (batch size, seed, the store's
content fingerprint, the schedule, the optimizer; the world size is recorded but may
change). :func:`shape_identity` is what its weights need to fit a model.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from giblet.config import INTERNAL, PATH, load_yaml_config
from giblet.errors import ConfigError
from giblet.fingerprint import hash_obj
from giblet.models.autoencoder import AutoencoderConfig, ModelSpec, check_model
from giblet.training.diagnostics import LogConfig, check_log
from giblet.training.distributed import DEVICES, PRECISIONS, DDPConfig, check_compress
from giblet.training.losses import LossConfig, check_losses
from giblet.training.schedule import OptimConfig, ScheduleConfig, check_schedule

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
WEIGHTS_ONLY = "weights_only"
# Model settings that change no parameter's shape: weights trained with one fit the other.
_NOT_SHAPE = ("dropout", "temporal_init")


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
    target: str = "voxels"  # what the fMRI head predicts: voxels, or a target set of the store (fmri.targets),
    #   e.g. parcels/schaefer or surface/fsaverage5; the head is sized from the store
    features: Optional[list[str]] = None  # stored pretrained-feature layers as model inputs, e.g.
    #   [features/clip/layer-6] (giblet-preprocess's `features` block; HRF and window as for text)
    pool_video: bool = True  # average-pool frames to model.video_pool in the loader workers, once per
    #   decoded chunk (90x160 -> 18x32: 6x fewer bytes per batch to the device); false: ship uint8 frames


@dataclass(frozen=True)
class TrainConfig:
    store: str = field(default="", metadata=PATH)  # a store built by giblet-preprocess
    out: str = field(default="runs/train", metadata=PATH)  # run folder: log.jsonl, checkpoint.pt
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    resume: Union[bool, str] = True  # true: continue out/checkpoint.pt exactly (refused if the run's settings
    #   changed) | false: refuse to overwrite a checkpoint | weights_only: a new schedule from its model weights
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
    ddp: DDPConfig = field(default_factory=DDPConfig)
    config_path: Optional[str] = field(default=None, metadata=INTERNAL)  # filled by load_train_config

    @property
    def drop_last(self) -> bool:
        """``data.drop_last`` in effect (its default follows ``compile``)."""
        return self.compile if self.data.drop_last is None else self.data.drop_last


def load_train_config(path: str | Path, overrides: list[str] | tuple = ()) -> TrainConfig:
    """YAML + ``key=value`` overrides -> validated ``TrainConfig`` (every problem reported at once)."""
    return load_yaml_config(path, TrainConfig, overrides, check=check_train, what="train config",
                            missing_fix="pass a YAML such as configs/train/demo.yaml")


def check_train(cfg: TrainConfig, problems: list[str]) -> None:
    """Append one message per bad value; nothing here opens the store or touches a device."""
    def check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    check(bool(cfg.store), "store: no store given; set store=PATH (a store built by giblet-preprocess)")
    check(bool(cfg.out), "out: no run folder given; set out=PATH")
    check(isinstance(cfg.resume, bool) or cfg.resume == WEIGHTS_ONLY,
          f"resume: {cfg.resume!r}; choose true (continue exactly), false (never overwrite a checkpoint) or "
          f"{WEIGHTS_ONLY} (a new schedule from the checkpoint's model weights)")
    check(cfg.device in DEVICES, f"device: must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    check(cfg.precision in PRECISIONS, f"precision: must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    check(cfg.threads is None or cfg.threads >= 1, f"threads: must be an integer >= 1 or null, got {cfg.threads}")
    try:
        check_compress(cfg.ddp.compress)
    except ConfigError as exc:
        problems.append(str(exc))
    check(cfg.ddp.bucket_cap_mb > 0, f"ddp.bucket_cap_mb: must be > 0, got {cfg.ddp.bucket_cap_mb}")
    check_model(cfg.model, problems)
    check_losses(cfg.loss, problems=problems)
    check_schedule(cfg.schedule, cfg.optim, problems)
    check_log(cfg.log, problems)
    _check_data(cfg.data, problems)
    if cfg.compile_mode not in COMPILE_MODES:
        problems.append(f"compile_mode: {cfg.compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    elif cfg.compile_mode == "reduce-overhead" and cfg.optim.accum_steps > 1:
        # a CUDA graph's next replay reuses the memory of its outputs, the gradients included
        problems.append(f"compile_mode=reduce-overhead with optim.accum_steps={cfg.optim.accum_steps}: CUDA "
                        "graphs reuse each micro-step's gradient memory; accumulate with compile_mode=default")


def _check_data(d: DataConfig, problems: list[str]) -> None:
    for name in ("window", "lag", "num_workers"):
        if getattr(d, name) < 0:
            problems.append(f"data.{name}: must be an integer >= 0, got {getattr(d, name)}")
    for name in ("batch_size", "val_batch_size", "mix_chunks", "lanes", "audio_vocab"):
        if getattr(d, name) < 1:
            problems.append(f"data.{name}: must be an integer >= 1, got {getattr(d, name)}")
    if d.subjects is not None and not d.subjects:
        problems.append("data.subjects: an empty list selects no subject; leave it null for all of the store's")
    if d.target != "voxels" and not re.fullmatch(r"(parcels|surface)/[A-Za-z0-9][A-Za-z0-9_.-]*", d.target):
        problems.append(f"data.target: {d.target!r}; give voxels or a target set id such as parcels/<name> or "
                        f"surface/fsaverage5 (giblet-preprocess builds them from fmri.targets)")
    if d.runs is not None and not d.runs:
        problems.append("data.runs: an empty list selects no run; leave it null for all of the store's")
    from giblet.features.pretrained import SPEC

    bad = [f for f in d.features or () if not SPEC.fullmatch(str(f))]
    if bad:
        problems.append(f"data.features: {bad} are not stored feature layers; write features/<extractor>/layer-<k>")


# -- what defines a run ------------------------------------------------------------------------------
def store_fingerprint(view) -> str:
    """The store's content, as the align record fingerprints it (units, TR grid, split): a
    store rebuilt with other inputs or settings gets another; a moved or copied one keeps it."""
    align = view.align
    return str(align.get("fingerprint") or hash_obj(align))


def run_identity(cfg: TrainConfig, world_size: int, store_fp: str) -> dict:
    """The settings that fix a run's sample order and LR schedule (known before any dataset is
    built): a checkpoint is resumed only under the same ones -- except ``world_size``, the
    world size the schedule was resolved for: a resume on another number of ranks keeps the
    checkpoint's (``giblet.training.checkpoint.ELASTIC_KEYS``)."""
    d = cfg.data
    optim = {k: v for k, v in dataclasses.asdict(cfg.optim).items() if k != "grad_clip"}  # read every step
    return _plain({"store": store_fp, "world_size": world_size, "seed": cfg.seed,
                   "data": {"subjects": d.subjects, "runs": d.runs, "window": d.window, "lag": d.lag, "hrf": d.hrf,
                            "batch_size": d.batch_size, "drop_last": cfg.drop_last, "mix_chunks": d.mix_chunks,
                            "lanes": d.lanes, **({"target": d.target} if d.target != "voxels" else {}),
                            **({"features": d.features} if d.features else {})},
                   "schedule": dataclasses.asdict(cfg.schedule), "optim": optim,
                   "model": dataclasses.asdict(cfg.model)})


def shape_identity(spec: ModelSpec, model: AutoencoderConfig) -> dict:
    """What the model's parameter shapes depend on: weights fit only a model with the same."""
    sizes = {k: v for k, v in dataclasses.asdict(model).items() if k not in _NOT_SHAPE}
    shape = {"n_voxels": spec.n_voxels, "window": spec.window, "lag": spec.lag, "video": spec.video,
             "audio": spec.audio, "text": spec.text, "audio_loss": spec.audio_loss, "model": sizes}
    if spec.features is not None:  # absent otherwise: checkpoints from before features still fit
        shape["features"] = list(spec.features)
    if model.readout == "subject":  # one readout per training subject, in this order
        shape["subjects"] = list(spec.subjects)
    return _plain(shape)


def _plain(obj) -> dict:
    """JSON-shaped (tuples as lists), as a checkpoint stores and returns it."""
    return json.loads(json.dumps(obj))
