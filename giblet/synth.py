"""Generated studies with a planted, known stimulus -> fMRI dependence.

``make_study(root, ...)`` writes a study under ``root`` and its YAML config. One run
(``n_trs`` an int) keeps the one-run shorthand config (``onset_s`` + ``inputs:``) and
layout: ``bold/sub-XX.nii.gz``, ``movie.mp4``, ``annotations.xlsx``. Several runs
(``n_trs`` a sequence of per-run TR counts) write the ``runs:`` config, runs named
``run-1``, ``run-2``, ...: ``bold/sub-XX_run-Y.nii.gz``, ``stimuli/run-Y.mp4`` and one
``annotations.xlsx`` for all runs (Sherlock's layout) or ``annotations/run-Y.xlsx``.
Both write ``truth.npz`` (numpy only, no pickle). BOLD is int16 with scanner-like
scaling, in raw units: a brain-shaped baseline of ~600-1400 plus drift, noise and the
planted response; movies are H.264 + stereo AAC 44.1 kHz (PyAV).

The planted response (stimulus in :mod:`giblet.synth_stimulus`): each run's scene latents
``z(t)`` are convolved with the Glover HRF of :mod:`giblet.hrf` (causal, peak ~5 s after
the stimulus) and standardized over the run's nominal TRs, giving the regressors
``x(t)``; voxel ``v`` of subject ``s`` reads ``amplitude * weights[s, v] . x(t)``, with
``weights[s] = sqrt(shared) * W_shared + sqrt(1 - shared) * W_s`` (each ``N(0, 1/N_LATENT)``):
subjects share a component, and ``shared`` sets how much (issue #19).

As unkind as reality, by default when there are several runs (one run keeps the kind
shape: every subject complete, the same weights, noise and intensity): subjects differ in
weights, baseline intensity and noise level; some (subject, run) pairs have no scan; scans
run a few TRs past their movie's end (to be trimmed) or stop a few TRs early; runs differ
in length and scenes but open with the same ~12 s (Sherlock's cartoon); the one annotation
sheet restarts its seconds at each run and continues its TR numbers. See :func:`make_study`.

``truth.npz`` keys (``S`` subjects, ``R`` runs, ``K = N_LATENT``):

- ``subjects (S,)``, ``runs (R,)`` names; ``tr_s``; ``n_trs (R,)``: the runs' nominal
  TR counts (the sheet's TR numbering); ``stimulus_trs (R,)``: whole TRs each movie covers;
  ``scan_trs (S, R)``: each scan's TR count (0: missing); ``missing (S, R)`` bool.
- ``latents_<run> (T, K)``: scene features per TR (0 after the movie's end; ``T`` covers
  the movie and the run's longest scan); ``latents_hrf_<run> (T, K)``: their HRF
  convolution; ``regressors_<run> (T, K)``: the planted ``x(t)``;
  ``scene_start_<run>``, ``scene_end_<run>``, ``scene_label_<run>``. One-run studies also
  keep the unsuffixed ``latents``, ``latents_hrf``, ``scene_*`` keys.
- ``weights (S, x, y, z, K)``, ``weights_shared (x, y, z, K)`` float32; ``shared``;
  ``amplitude``; ``noise (S,)`` (noise std, fraction of baseline); ``intensity (S,)``.
- ``inside (x, y, z)`` bool; ``expected_r (S, x, y, z)``: per subject and voxel, the
  correlation between the planted response and the drift-free BOLD over the subject's TRs
  within its movies (scans trimmed at the movie's end), in expectation over the noise:
  ``sd / sqrt(sd**2 + noise[s]**2)``, ``sd**2 = amplitude**2 * w' C w`` with ``C`` the
  covariance of ``x`` over those TRs; 0 outside the brain.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml

from giblet.errors import ConfigError
from giblet.hrf import hrf_convolve
from giblet.synth_bold import brain, expected_r, make_bold, write_bold, write_scan  # noqa: F401  (public)
from giblet.synth_stimulus import (INDEX_BITS, LABELS, N_LATENT, SHERLOCK_COLUMNS,  # noqa: F401  (public names)
                                   decode_frame_index, frame_code_blocks, latents, scenes, write_annotations,
                                   write_movie, write_run_annotations)

# make_study's realism options left at None: the kind one-run shape, or reality's untidiness.
ONE_RUN_DEFAULTS = {"shared": 1.0, "subject_spread": 0.0, "scan_jitter": 0, "opening_s": 0.0, "missing_fraction": 0.0}
MULTI_RUN_DEFAULTS = {"shared": 0.5, "subject_spread": 0.15, "scan_jitter": 3, "opening_s": 12.0,
                      "missing_fraction": 0.1}


def _rng(seed: int, *key: int) -> np.random.Generator:
    """One generator per purpose (a run's scenes, a subject, a scan, ...), so no file depends
    on the worker count or the number of subjects. The first run draws as one-run studies
    always have (``seed``: scenes, brain, weights, sheet; ``[seed, s + 1]``: subject s's
    scan; ``[seed, 0]``: the movie), so their files only change where the model did."""
    return np.random.default_rng([seed, *key] if key else seed)


# _rng keys of the newer draws: tags no subject number reaches (numpy's SeedSequence reads
# [a, b] and [a, b, 0] alike, so every tag keeps one key length and avoids trailing zeros).
_SCENES, _OPENING, _LAYOUT, _SUBJECT = 1_000_001, 1_000_002, 1_000_003, 1_000_004


def _run_jobs(jobs: list, workers: int, progress: bool) -> None:
    """Run ``(function, args)`` jobs in this process or in ``workers`` forked processes."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="synth files", unit="file", disable=not progress)
    if workers <= 1:
        for fn, args in jobs:
            fn(*args)
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for future in as_completed([pool.submit(fn, *args) for fn, args in jobs]):
                future.result()
                bar.update()
    bar.close()


def _key(seed: int, first: int, run: int) -> list[int]:
    """A movie's (``first`` 0) or subject's scan seed: run 1 keeps the one-run key."""
    return [seed, first] if run == 0 else [seed, first, run]


# -- the study's plan: runs, subjects, scans ----------------------------------------------------------
def _options(counts: list[int], several: bool, **given) -> dict:
    """The realism options, None ones from the one-run or the multi-run defaults."""
    if not counts or min(counts) < 1:
        raise ConfigError(f"make_study: n_trs={counts}: give a TR count >= 1, or one per run")
    defaults = MULTI_RUN_DEFAULTS if several else ONE_RUN_DEFAULTS
    opt = {key: defaults[key] if value is None else value for key, value in given.items()}
    if not 0.0 <= opt["shared"] <= 1.0:
        raise ConfigError(f"make_study: shared={opt['shared']!r} is outside [0, 1]; 1 gives every subject the "
                          f"same weights, 0 independent ones")
    return opt


def _plan_runs(n_trs: Sequence[int], tr_s: float, extra_s: float, opening_s: float, seed: int,
               rng: np.random.Generator) -> list[dict]:
    """Per run: its name, scenes (the shared opening first; run 1's from ``rng``), duration
    and TR counts."""
    opening = scenes(opening_s, _rng(seed, _OPENING)) if opening_s > 0 else []
    runs = []
    for r, n in enumerate(n_trs):
        duration = n * tr_s + extra_s
        scene_list = scenes(duration, rng if r == 0 else _rng(seed, _SCENES, r), opening=opening)
        gap_start = scene_list[len(scene_list) // 2]["start"]
        runs.append({"name": f"run-{r + 1}", "n_trs": int(n), "duration_s": duration, "scenes": scene_list,
                     "n_cover": int(duration // tr_s), "gap": (gap_start, gap_start + 1)})
    return runs


def _pick_missing(subjects: list[str], runs: list[str], fraction: float, rng: np.random.Generator) -> set:
    """About ``fraction`` of the (subject, run) pairs, never a first run nor sub-01's: every
    subject keeps a run and every run keeps a subject."""
    pairs = [(s, r) for s in subjects[1:] for r in runs[1:]]
    n = min(len(pairs), max(1, round(fraction * len(subjects) * len(runs)))) if pairs and fraction > 0 else 0
    return {pairs[i] for i in rng.permutation(len(pairs))[:n]}


def _check_missing(missing: set, subjects: list[str], runs: list[str]) -> None:
    for s, r in sorted(missing):
        if s not in subjects or r not in runs:
            raise ConfigError(f"make_study: missing pair ({s!r}, {r!r}) names no subject of {subjects[0]}.."
                              f"{subjects[-1]} or no run of {runs}; use names like ('sub-02', 'run-2')")
    for r in runs:
        if all((s, r) in missing for s in subjects):
            raise ConfigError(f"make_study: every subject is missing {r}; a run needs at least one scan, "
                              f"so leave one of its pairs out of `missing`")


def _scan_lengths(runs: list[dict], subjects: list[str], missing: set, jitter: int, overrides: Mapping,
                  rng: np.random.Generator) -> np.ndarray:
    """``(S, R) int`` scan TR counts (0: missing). With ``jitter``, the present pairs take
    turns (in a seeded order) to run 1..jitter TRs past their movie's last whole TR, to stop
    1..jitter TRs short of the run's nominal count, or to match it (twice as often)."""
    out = np.zeros((len(subjects), len(runs)), dtype=np.int64)
    present = [(i, j) for j, run in enumerate(runs) for i, s in enumerate(subjects) if (s, run["name"]) not in missing]
    kinds = ("long", "short", "exact", "exact") if jitter > 0 else ("exact",)
    for turn, p in enumerate(rng.permutation(len(present))):
        i, j = present[p]
        k = int(rng.integers(1, jitter + 1)) if jitter > 0 else 0
        lengths = {"long": runs[j]["n_cover"] + k, "short": max(1, runs[j]["n_trs"] - k), "exact": runs[j]["n_trs"]}
        out[i, j] = lengths[kinds[turn % len(kinds)]]
    for (s, r), n in overrides.items():
        names = [run["name"] for run in runs]
        if s not in subjects or r not in names or (s, r) in missing or int(n) < 1:
            raise ConfigError(f"make_study: scan_trs[({s!r}, {r!r})] = {n!r}: name a present (subject, run) pair "
                              f"and a TR count >= 1")
        out[subjects.index(s), names.index(r)] = int(n)
    return out


def _regressors(run: dict, n: int, tr_s: float) -> None:
    """Add the run's latents, their HRF convolution and the planted regressors (``n`` TRs)."""
    z = latents(run["scenes"], n, tr_s, end_s=run["duration_s"])
    z_hrf = hrf_convolve(z, tr_s).astype(np.float64)
    seen = z_hrf[: run["n_trs"]]  # standardized over the nominal TRs, the same for every subject
    run.update(latents=z, latents_hrf=z_hrf, regressors=(z_hrf - seen.mean(0)) / (seen.std(0) + 1e-9))


def make_study(root: str | Path, *, n_subjects: int = 3, n_trs: int | Sequence[int] = 60, shape: tuple = (20, 24, 16),
               tr_s: float = 1.5, seed: int = 0, movie: bool = True, audio_track: bool = True,
               annotations: bool = True, movie_size: tuple = (192, 108), fps: int = 25, extra_s: float = 3.0,
               amplitude: float = 0.03, noise: float = 0.01, config_path: str | Path | None = None,
               output: str = "study.zarr", stages: dict | None = None, annotations_file: str | Path | None = None,
               workers: int = 1, progress: bool = False, shared: float | None = None,
               subject_spread: float | None = None, missing: Sequence[tuple[str, str]] | None = None,
               scan_jitter: int | None = None, scan_trs: Mapping[tuple[str, str], int] | None = None,
               opening_s: float | None = None, per_run_annotations: bool = False, drift: float = 0.02,
               split: dict | None = None) -> Path:
    """Write a synthetic study under ``root`` and return the path of its YAML config.

    The realism options default to None: the kind one-run shape when ``n_trs`` is an int,
    ``MULTI_RUN_DEFAULTS`` when it is a sequence. Everything is drawn from ``seed``.

    Args:
        n_trs: an int: one run of that many TRs, today's shorthand config and layout; a
            sequence: several runs (``run-1``, ...) of those nominal TR counts, the ``runs:``
            config. Each movie lasts ``n_trs * tr_s + extra_s`` seconds, so alignment must
            trim it (never warp it).
        shape: ``(x, y, z)`` voxel grid of the BOLD images.
        amplitude, noise: planted response and noise as fractions of the baseline.
        config_path: where to write the YAML (default ``root/study.yaml``).
        stages: extra stage blocks for the config, e.g. ``{"audio": {"model": "random"}}``.
        annotations_file: a real annotation spreadsheet to copy in (as the one sheet) instead
            of generating one (e.g. the Sherlock file; its text then does not drive the
            planted response).
        workers: processes writing scans and movies at once (files do not depend on it).
        progress: a tqdm bar over the files written.
        shared: in [0, 1], the weights' shared share of variance (1: every subject the same
            weights; default 1 one run, 0.5 several).
        subject_spread: subjects' baseline intensity and noise level are scaled by
            ``U(1 - spread, 1 + spread)`` each (default 0 one run, 0.15 several).
        missing: ``(subject, run)`` pairs with no scan, e.g. ``[("sub-03", "run-2")]``; left
            out of the config. Default: none for one run; for several, ~10 % of the pairs,
            never a first run nor ``sub-01``'s.
        scan_jitter: scans run up to this many TRs past their movie's last whole TR or stop
            up to this many short of the nominal count (default 0 one run, 3 several).
        scan_trs: exact TR counts for some ``(subject, run)`` pairs, over the jitter.
        opening_s: the same opening scenes (~this many seconds) start every run (default 0
            one run, 12 several).
        per_run_annotations: several runs: one sheet per run (``annotations/run-Y.xlsx``)
            instead of one sheet for all runs.
        drift: largest linear drift of a voxel over a scan (fraction of its baseline).
        split: a ``split`` block for the config, e.g. ``{"val_runs": ["run-2"]}``.
    """
    several = not isinstance(n_trs, (int, np.integer))
    counts = [int(n) for n in n_trs] if several else [int(n_trs)]
    opt = _options(counts, several, shared=shared, subject_spread=subject_spread, scan_jitter=scan_jitter,
                   opening_s=opening_s, missing_fraction=None)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    subjects = [f"sub-{s + 1:02d}" for s in range(n_subjects)]
    rng = _rng(seed)
    runs = _plan_runs(counts, tr_s, extra_s, opt["opening_s"], seed, rng)
    names = [run["name"] for run in runs]
    layout_rng = _rng(seed, _LAYOUT)
    if missing is None:
        missing = _pick_missing(subjects, names, opt["missing_fraction"], layout_rng)
    missing = {tuple(p) for p in missing}
    _check_missing(missing, subjects, names)
    scans = _scan_lengths(runs, subjects, missing, int(opt["scan_jitter"]), scan_trs or {}, layout_rng)
    for j, run in enumerate(runs):
        _regressors(run, max(int(np.ceil(run["duration_s"] / tr_s)), int(scans[:, j].max())), tr_s)
    inside, base = brain(shape, rng)
    w_shared = rng.normal(0, 1, size=tuple(shape) + (N_LATENT,)) / np.sqrt(N_LATENT)
    people = [_subject(w_shared, opt["shared"], opt["subject_spread"], noise, _rng(seed, _SUBJECT, s + 1))
              for s in range(n_subjects)]

    files = _file_names(root, subjects, names, several, per_run_annotations)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -1.5 * np.array(shape)
    jobs = [(write_movie, (files["movie"][run["name"]], run["scenes"], run["duration_s"], movie_size, fps, 44100,
                           np.random.default_rng(_key(seed, 0, j)), audio_track))
            for j, run in enumerate(runs) if movie]
    jobs += [(write_scan, (files["bold"][s, run["name"]], tuple(shape), int(scans[i, j]), tr_s, run["regressors"],
                            people[i]["weights"], inside, base * people[i]["intensity"], _key(seed, i + 1, j),
                            amplitude, people[i]["noise"], drift, affine))
             for j, run in enumerate(runs) for i, s in enumerate(subjects) if scans[i, j] > 0]
    _run_jobs(jobs, workers, progress)
    sheets = _write_sheets(files, runs, tr_s, several, annotations, annotations_file, rng)
    _write_truth(root / "truth.npz", subjects, runs, scans, people, w_shared, opt["shared"], inside, amplitude, tr_s,
                 several)
    config_path = Path(config_path) if config_path else root / "study.yaml"
    config = _config(output, tr_s, runs, subjects, scans, files, sheets, movie, several, config_path.parent.resolve())
    if split is not None:
        config["split"] = dict(split)
    config.update(stages or {})
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def _subject(w_shared: np.ndarray, shared: float, spread: float, noise: float, rng: np.random.Generator) -> dict:
    """One subject's weights (shared + individual part), baseline intensity and noise level."""
    intensity = float(rng.uniform(1 - spread, 1 + spread))
    level = float(noise * rng.uniform(1 - spread, 1 + spread))
    own = rng.normal(0, 1, size=w_shared.shape) / np.sqrt(N_LATENT)
    weights = (np.sqrt(shared) * w_shared + np.sqrt(1 - shared) * own).astype(np.float32)
    return {"weights": weights, "intensity": intensity, "noise": level}


def _file_names(root: Path, subjects: list[str], runs: list[str], several: bool, per_run_annotations: bool) -> dict:
    if not several:
        return {"bold": {(s, runs[0]): root / "bold" / f"{s}.nii.gz" for s in subjects},
                "movie": {runs[0]: root / "movie.mp4"}, "sheet": root / "annotations.xlsx", "sheets": {}}
    return {"bold": {(s, r): root / "bold" / f"{s}_{r}.nii.gz" for s in subjects for r in runs},
            "movie": {r: root / "stimuli" / f"{r}.mp4" for r in runs}, "sheet": root / "annotations.xlsx",
            "sheets": {r: root / "annotations" / f"{r}.xlsx" for r in runs} if per_run_annotations else {}}


def _write_sheets(files: dict, runs: list[dict], tr_s: float, several: bool, annotations: bool,
                  annotations_file, rng: np.random.Generator) -> str:
    """Write the annotation sheet(s); returns "one", "per_run" or "" (none)."""
    if annotations_file is not None:
        shutil.copyfile(annotations_file, files["sheet"])
        return "one"
    if not annotations:
        return ""
    if not several:
        run = runs[0]
        write_annotations(files["sheet"], run["scenes"], run["duration_s"], tr_s, rng, gap=run["gap"],
                          n_trs=run["n_trs"])
        return "one"
    if files["sheets"]:
        for run in runs:
            write_annotations(files["sheets"][run["name"]], run["scenes"], run["duration_s"], tr_s, rng,
                              gap=run["gap"], n_trs=run["n_trs"])
        return "per_run"
    write_run_annotations(files["sheet"], runs, tr_s, rng)
    return "one"


def _write_truth(path: Path, subjects: list[str], runs: list[dict], scans: np.ndarray, people: list[dict],
                 w_shared: np.ndarray, shared: float, inside: np.ndarray, amplitude: float, tr_s: float,
                 several: bool) -> None:
    """``truth.npz`` (keys in the module docstring)."""
    kept = np.minimum(scans, [run["n_cover"] for run in runs])  # what alignment keeps of each scan
    expected = np.zeros((len(subjects),) + inside.shape, dtype=np.float32)
    for i, person in enumerate(people):
        x = [run["regressors"][: kept[i, j]] for j, run in enumerate(runs) if kept[i, j] > 0]
        if x:
            expected[i] = expected_r(person["weights"], inside, np.concatenate(x), amplitude, person["noise"])
    arrays = {"subjects": np.array(subjects), "runs": np.array([run["name"] for run in runs]), "tr_s": tr_s,
              "n_trs": np.array([run["n_trs"] for run in runs]),
              "stimulus_trs": np.array([run["n_cover"] for run in runs]),
              "scan_trs": scans, "missing": scans == 0, "weights": np.stack([p["weights"] for p in people]),
              "weights_shared": w_shared.astype(np.float32), "shared": shared, "amplitude": amplitude,
              "noise": np.array([p["noise"] for p in people]), "intensity": np.array([p["intensity"] for p in people]),
              "inside": inside, "expected_r": expected}
    for run in runs:
        per_run = {"latents": run["latents"], "latents_hrf": run["latents_hrf"], "regressors": run["regressors"],
                   "scene_start": np.array([c["start"] for c in run["scenes"]]),
                   "scene_end": np.array([c["end"] for c in run["scenes"]]),
                   "scene_label": np.array([c["label"] for c in run["scenes"]])}
        arrays.update({f"{k}_{run['name']}": v for k, v in per_run.items()})
        if not several:
            arrays.update(per_run)
    np.savez(path, **arrays)


def _config(output: str, tr_s: float, runs: list[dict], subjects: list[str], scans: np.ndarray, files: dict,
            sheets: str, movie: bool, several: bool, cfg_dir: Path) -> dict:
    """The YAML config: the one-run shorthand (``onset_s`` + ``inputs``) or ``runs:``; paths
    relative to ``cfg_dir`` where they lie under it."""
    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(cfg_dir))
        except ValueError:
            return str(p.resolve())

    def fmri(j: int) -> dict:
        return {s: rel(files["bold"][s, runs[j]["name"]]) for i, s in enumerate(subjects) if scans[i, j] > 0}

    if not several:
        inputs: dict = {"fmri": fmri(0)}
        if movie:
            inputs["movie"] = rel(files["movie"][runs[0]["name"]])
        if sheets:
            inputs["annotations"] = rel(files["sheet"])
        return {"output": output, "tr_s": tr_s, "onset_s": 0.0, "inputs": inputs}
    config: dict = {"output": output, "tr_s": tr_s}
    if sheets == "one":
        config["annotations"] = rel(files["sheet"])
    config["runs"] = {}
    for j, run in enumerate(runs):
        entry: dict = {"movie": rel(files["movie"][run["name"]])} if movie else {}
        entry["onset_s"] = 0.0
        if sheets == "per_run":
            entry["annotations"] = rel(files["sheets"][run["name"]])
        entry["fmri"] = fmri(j)
        config["runs"][run["name"]] = entry
    return config


# -- presets: each printed config builds as printed ----------------------------------------------------
# The demo (`giblet-preprocess run --demo`, `python -m giblet.synth --preset demo`): two runs of
# unequal length, the last subject without run 2, small movies, the random-weight audio model.
DEMO = {"n_trs": (80, 64), "shape": (20, 24, 16), "movie_size": (160, 90), "fps": 10}
# The demo's soundtracks are two minutes long (~0.6 GB a worker with the model): every worker may
# encode (audio.workers: null), so `run --demo` takes half the time on 2 cores.
DEMO_STAGES = {"audio": {"model": "random", "workers": None}}

# Chen et al. 2017: 17 subjects, 3 mm MNI grid 61x73x61, two runs of 946 and 1,030 TRs of 1.5 s,
# each a ~24-minute 640x360 25 fps movie (Sherlock episode 1) with stereo 44.1 kHz audio.
SHERLOCK = {"n_trs": (946, 1030), "shape": (61, 73, 61), "tr_s": 1.5, "movie_size": (640, 360), "fps": 25,
            "extra_s": 9.0}
SHERLOCK_STAGES = {
    "fmri": {"mask_strategy": "epi", "detrend": True, "high_pass": 0.01},
    "video": {"width": 160, "height": 90, "frame_skip": 4},
    # No EnCodec weights can be downloaded here: a random model of the 24 kHz architecture, recorded
    # as such in the store (same compute as the real weights). Point model: at a saved copy to use them.
    "audio": {"model": "random", "bandwidth": 3.0, "device": "auto"},
    # One run: the Sherlock sheet's TR columns (1-based, inclusive), as configs/preprocess/sherlock.yaml
    # reads them (its seconds restart at run 2's first row).
    "text": {"columns": ["Scene Details - A Level"], "start_column": "Start Time (TRs, 1.5s)",
             "end_column": "End Time (TRs, 1.5s)", "time_unit": "tr"},
}
# Several runs: the seconds columns, which restart at 0 at each run's first row (where the pipeline
# splits the one sheet into runs).
SECONDS_TEXT = {"columns": ["Scene Details - A Level"], "start_column": "Start Time (s)",
                "end_column": "End Time (s)", "time_unit": "s"}


def _preset_trs(trs: tuple, runs: int | None, preset: str) -> int | tuple:
    runs = len(trs) if runs is None else runs
    if not 1 <= runs <= len(trs):
        raise ConfigError(f"{preset} preset: runs={runs}; it has runs 1..{len(trs)} ({trs} TRs); pick one of those")
    return trs[0] if runs == 1 else trs[:runs]


def demo_study(root: str | Path, *, n_subjects: int = 3, runs: int | None = None, config_path: str | Path | None = None,
               output: str = "demo.zarr", annotations_file: str | Path | None = None, workers: int = 1, seed: int = 0,
               progress: bool = False) -> Path:
    """The demo study, defined once (``DEMO``): 2 runs of 80 and 64 TRs (``runs=1``: the
    first only, the one-run shorthand), the last subject without run 2, run 2 held out for
    validation, 160x90 10 fps movies, ``audio.model: random``; a few seconds to write."""
    n_trs = _preset_trs(DEMO["n_trs"], runs, "demo")
    several = not isinstance(n_trs, int)
    stages = dict(DEMO_STAGES)
    if annotations_file is not None:  # a real sheet holding several runs: read its clock per run
        stages["text"] = dict(SECONDS_TEXT) if several else dict(SHERLOCK_STAGES["text"])
    extra = {"missing": [(f"sub-{n_subjects:02d}", "run-2")] if n_subjects > 1 else [],
             "split": {"val_runs": ["run-2"]}} if several else {}
    return make_study(root, n_subjects=n_subjects, seed=seed, config_path=config_path, output=output, stages=stages,
                      annotations_file=annotations_file, workers=workers, progress=progress,
                      **{**DEMO, "n_trs": n_trs}, **extra)


def sherlock_study(root: str | Path, *, n_subjects: int = 17, runs: int | None = None,
                   annotations_file: str | Path | None = None, workers: int = 2, seed: int = 0,
                   progress: bool = True, output: str = "sherlock.zarr") -> Path:
    """A study of Sherlock's real shape (``SHERLOCK``: two runs; ``runs=1``: the first only,
    the one-run shorthand) with the planted response of :func:`make_study` and its
    multi-run realism; ``annotations_file``: the real spreadsheet (else one in its layout).
    About 0.5 GB of gzip NIfTI per scan and ~1 min of one core each to write."""
    n_trs = _preset_trs(SHERLOCK["n_trs"], runs, "sherlock")
    stages = dict(SHERLOCK_STAGES) if isinstance(n_trs, int) else {**SHERLOCK_STAGES, "text": dict(SECONDS_TEXT)}
    return make_study(root, n_subjects=n_subjects, seed=seed, stages=stages, output=output,
                      annotations_file=annotations_file, workers=workers, progress=progress,
                      **{**SHERLOCK, "n_trs": n_trs})


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m giblet.synth",
                                 description="Write a synthetic study; print its config.")
    ap.add_argument("root", help="folder to write the study into")
    ap.add_argument("--preset", choices=["sherlock", "demo"], default="demo",
                    help="sherlock: 61x73x61, runs of 946 + 1,030 TRs, 640x360 movies; demo: the --demo study")
    ap.add_argument("--subjects", type=int, default=None, help="subjects (default: 17 sherlock, 3 demo)")
    ap.add_argument("--runs", type=int, default=None,
                    help="the preset's first N runs (default: all, 2; 1: the one-run shape)")
    ap.add_argument("--annotations", default=None, help="a real annotation spreadsheet to copy in")
    ap.add_argument("--workers", type=int, default=2, help="processes writing files at once")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.preset == "sherlock":
            config = sherlock_study(args.root, n_subjects=args.subjects or 17, runs=args.runs,
                                    annotations_file=args.annotations, workers=args.workers, seed=args.seed)
        else:
            config = demo_study(args.root, n_subjects=args.subjects or 3, runs=args.runs,
                                annotations_file=args.annotations, workers=args.workers, seed=args.seed, progress=True)
    except ConfigError as e:
        ap.error(str(e))
    print(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
