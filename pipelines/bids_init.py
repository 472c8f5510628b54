"""``giblet-preprocess init BIDS_ROOT``: a complete, commented config from what a BIDS dataset
holds (stdout), and a summary of it (stderr): subjects x runs, TR, movies, what is missing.

The config is a ``bids:`` block plus the defaults that suit it (fMRIPrep masks and the
``simple`` confound strategy when derivatives are given); ``giblet-preprocess run`` builds
it unchanged. Discovery is :func:`giblet.bids.discover`, the same that loading the config
runs, so the summary shows what ``run`` will build. A dataset with problems (a run without
a sidecar TR, a missing stimulus file, TRs that differ) gets the summary with every
problem listed, then the first one as the error (exit 1) and no config.
"""
from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path
from typing import Optional

from giblet.bids import BidsStudy, discover, raise_problems
from giblet.config import BidsConfig

ENCODEC = "facebook/encodec_24khz"  # the field's model (configs/preprocess/sherlock.yaml)


def _q(value) -> str:
    """A YAML scalar or flow list (JSON is YAML)."""
    return json.dumps(value)


def init(root: str, derivatives: Optional[str] = None, tasks: Optional[list[str]] = None,
         space: Optional[str] = None, out=sys.stdout, err=sys.stderr) -> int:
    """Discover ``root`` (and ``derivatives``), print the summary to ``err`` and the config to ``out``.

    Raises:
        InputError: the dataset's first problem (after the summary listed them all).
    """
    root_p = Path(root).expanduser().resolve()
    deriv_p = Path(derivatives).expanduser().resolve() if derivatives else None
    b = BidsConfig(root=str(root_p), derivatives=str(deriv_p) if deriv_p else None, task=list(tasks or []),
                   space=space)
    study = discover(b, root_p, deriv_p)
    if deriv_p is not None and space is None and study.runs:
        from giblet.bids import parse_name

        first = next(iter(next(iter(study.runs.values())).values()))
        space = parse_name(first.bold.name).ents.get("space")
    audio = _audio_model(study)
    print(summary(study, audio), file=err)
    raise_problems(study)
    print(config_text(study, b, space, audio), file=out)
    return 0


def _audio_model(study: BidsStudy) -> tuple[Optional[str], Optional[str]]:
    """``(audio.model to write, a note)``: EnCodec when a movie has a soundtrack."""
    from giblet.errors import GibletError
    from giblet.features import audio
    from giblet.features.encodec import resolve_model

    if not any(m is not None and m.is_file() and audio.has_audio_track(m) for m in study.movies.values()):
        return None, None
    try:
        resolve_model(ENCODEC, Path.cwd())
        return ENCODEC, None
    except GibletError:
        return ENCODEC, (f"audio: {ENCODEC} is not in the offline Hugging Face cache; download it (huggingface-cli "
                         f"download {ENCODEC}) or set audio.model to an EnCodec save_pretrained directory "
                         f"(audio.model=random encodes with random weights: smoke tests only)")


def summary(study: BidsStudy, audio: tuple[Optional[str], Optional[str]] = (None, None)) -> str:
    """The text init prints to stderr: runs (with movies), subjects x runs TR counts, notes, problems."""
    import nibabel as nib

    runs = list(study.runs)
    where = f"{study.root}" + (f" (derivatives {study.derivatives})" if study.derivatives else " (raw BOLD)")
    tr = f"TR {study.tr_s:g} s (RepetitionTime)" if study.tr_s else "TR unknown"
    lines = [f"BIDS dataset {where}: {len(study.subjects)} subject(s) x {len(runs)} run(s), {tr}",
             f"movies found: {sum(m is not None for m in study.movies.values())} of {len(runs)}"]
    for i, run in enumerate(runs):
        movie = study.movies.get(run)
        lines.append(f"  r{i + 1} = {run}: movie {movie if movie else '-- none --'}")
    width = max([len(s) for s in study.subjects] + [7])
    lines.append(f"  {'subject':<{width}} " + " ".join(f"{f'r{i + 1}':>6}" for i in range(len(runs)))
                 + "   (TRs per scan; -- no scan)")
    for s in study.subjects:
        cells = []
        for run in runs:
            scan = study.runs[run].get(s)
            cells.append(f"{_n_trs(nib, scan.bold) if scan else '--':>6}")
        lines.append(f"  {s:<{width}} " + " ".join(cells))
    notes = study.notes + ([audio[1]] if audio[1] else [])
    lines += [f"missing / note: {n}" for n in notes]
    lines += [f"problem: {p}" for p in study.problems]
    return "\n".join(lines)


def _n_trs(nib, path: Path) -> str:
    try:
        shape = nib.load(str(path)).shape
        return str(shape[3]) if len(shape) == 4 else "3D?"
    except Exception:  # a summary cell, not a check: run's plan reports an unreadable file
        return "bad"


def _c(text: str, comment: str = "") -> str:
    """A config line with its comment aligned."""
    return f"{text:<33} # {comment}" if comment else text


def config_text(study: BidsStudy, b: BidsConfig, space: Optional[str], audio: tuple) -> str:
    """The commented YAML config (see the module docstring)."""
    fmriprep = study.derivatives is not None
    runs = list(study.runs)
    named = ", ".join(runs[:3]) + (" ..." if len(runs) > 3 else "")
    lines = [f"# giblet preprocessing config, written by `giblet-preprocess init` on {date.today().isoformat()}",
             f"# from {study.root}: {len(study.subjects)} subject(s) x {len(runs)} run(s), TR {study.tr_s:g} s.",
             "# The bids block is read again at every load: subjects, runs (named by their entities, e.g.",
             f"# {named}), the TR (sidecar RepetitionTime) and each run's movie (events.tsv",
             "# stim_file) are discovered anew, so a subject added to the dataset is built by the next run.",
             _c("output: study.zarr", "the store, relative to this file"),
             _c(f"# tr_s: {study.tr_s:g}", "from the sidecars; set it to make a change of TR an error"),
             "bids:",
             _c(f"  root: {_q(str(study.root))}", "the raw dataset: sub-*/, stimuli/, events, sidecars"),
             _c(f"  derivatives: {_q(str(study.derivatives)) if fmriprep else 'null'}",
                "fMRIPrep output: BOLD, brain masks, confounds" if fmriprep else "null: the raw BOLD"),
             _c(f"  task: {_q(b.task)}", "task labels to read (empty: all)"),
             _c(f"  space: {_q(space) if fmriprep and space else 'null'}", "the derivatives' space"),
             _c(f"  desc: {_q(b.desc)}", "the derivative BOLD's desc entity"),
             _c("  session: []", "session labels to read (empty: all)"),
             _c("  run: []", "run labels to read (empty: all)"),
             _c("  entities: {}", 'other entities to match, e.g. {res: "2"}'),
             _c("  subjects: []", "keep only these, e.g. [sub-01, sub-02] (empty: all)"),
             _c("  exclude_subjects: []", "leave these out"),
             _c("  session_in_run: true", "false: a run is (task, run), whatever session a subject saw it in"),
             _c("  stimuli: {}", "run -> movie, for runs whose events.tsv names none"),
             "split:",
             _c("  val_fraction: 0.2", "the last 20 % of every run validates (or val_runs: [RUN])")]
    lines += _fmri_lines(fmriprep)
    lines += [_c("video: {width: 160, height: 90, frame_skip: 4}", "frames stored per TR")]
    if audio[0]:
        lines += [_c(f"audio: {{model: {audio[0]}, bandwidth: 3.0}}", "EnCodec codes of the soundtrack")]
    return "\n".join(lines)


def _fmri_lines(fmriprep: bool) -> list[str]:
    if fmriprep:
        return ["fmri:",
                _c("  mask_strategy: fmriprep", "each run's desc-brain_mask, combined by mask_rule"),
                _c("  mask_rule: intersection", "intersection | union | fraction:F"),
                _c("  confounds:", "regressed by nilearn.signal.clean before the z-score"),
                _c("    strategy: simple", "nilearn preset: simple | scrubbing | compcor | ica_aroma"),
                _c("    options: {}", "e.g. {motion: basic, fd_threshold: 0.5}"),
                _c("  detrend: true", "nilearn.signal.clean(detrend=True), with the confounds"),
                _c("  high_pass: null", "Hz; 'simple' already regresses fMRIPrep's cosine drifts")]
    return ["fmri:",
            _c("  mask_strategy: epi", "nilearn compute_epi_mask of the first subject's first run"),
            _c("  detrend: true", "nilearn.signal.clean(detrend=True)"),
            _c("  high_pass: 0.01", "Hz; confounds need fMRIPrep derivatives (init --derivatives DIR)")]
