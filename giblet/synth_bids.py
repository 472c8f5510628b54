"""fMRIPrep-shaped BIDS datasets on disk, for tests and benchmarks of :mod:`giblet.bids`.

``write_bids_dataset(root, ...)`` writes a raw BIDS tree and, beside it, the derivatives an
fMRIPrep run leaves (``derivatives/fmriprep``), named as the two specifications name them::

    root/dataset_description.json
    root/task-<t>_bold.json                       RepetitionTime (inherited by every run of the task)
    root/stimuli/<t>_run-<r>.mp4                  one movie per (task, run)
    root/sub-<s>/[ses-<x>/]func/sub-<s>_[ses-<x>_]task-<t>_run-<r>_bold.nii.gz   raw BOLD (int16)
                                             ..._events.tsv      onset, duration, trial_type, stim_file
    root/derivatives/fmriprep/sub-<s>/[ses-<x>/]func/
        sub-<s>_..._space-<space>_desc-preproc_bold.nii.gz (+ .json)  float32, RepetitionTime
        sub-<s>_..._space-<space>_desc-brain_mask.nii.gz                per-run brain mask
        sub-<s>_..._desc-confounds_timeseries.tsv (+ .json)            fMRIPrep's columns, 'n/a' first rows

The BOLD carries a brain-shaped baseline, a slow drift, noise and a component driven by the
motion and CSF/WM confounds (so regressing them changes the data); the first
``non_steady`` volumes are bright (a non-steady state, flagged in the confounds), and
``spikes`` volumes per run have a framewise displacement over 0.5 mm (scrubbed by nilearn's
``scrubbing`` strategy). ``tiny=True`` writes 2x2x2 images of a few TRs and no movies: a
tree for discovery benchmarks. Every file is drawn from its own seeded generator.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

SPACE = "MNI152NLin2009cAsym"
MOTION = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
TISSUE = ("csf", "white_matter", "global_signal")


def expand(name: str) -> list[str]:
    """fMRIPrep's four columns of one regressor: itself, its derivative, their squares."""
    return [name, f"{name}_derivative1", f"{name}_power2", f"{name}_derivative1_power2"]


def confounds_table(n: int, rng: np.random.Generator, non_steady: int = 0, spikes: Sequence[int] = (),
                    n_cosine: int = 3, n_compcor: int = 5):
    """An fMRIPrep ``desc-confounds_timeseries`` table of ``n`` volumes (a pandas DataFrame),
    ``n/a`` in the first row of derivative and displacement columns as fMRIPrep writes them."""
    import pandas as pd

    cols: dict[str, np.ndarray] = {}
    for name in MOTION + TISSUE:
        x = np.cumsum(rng.normal(0, 0.05, n)) + rng.normal(0, 0.02, n)
        d = np.r_[np.nan, np.diff(x)]
        cols.update(zip(expand(name), (x, d, x ** 2, d ** 2)))
    fd = np.abs(rng.normal(0.1, 0.03, n))
    fd[list(spikes)] = 0.9
    fd[0] = np.nan
    cols["framewise_displacement"] = fd
    cols["std_dvars"] = np.r_[np.nan, np.abs(rng.normal(1.0, 0.1, n - 1))]
    cols["dvars"] = np.r_[np.nan, np.abs(rng.normal(20, 2, n - 1))]
    t = np.arange(n)
    for k in range(n_cosine):
        cols[f"cosine{k:02d}"] = np.sqrt(2 / n) * np.cos(np.pi * (2 * t + 1) * (k + 1) / (2 * n))
    for k in range(n_compcor):
        cols[f"a_comp_cor_{k:02d}"] = rng.normal(0, 1, n)
    for k in range(non_steady):
        cols[f"non_steady_state_outlier{k:02d}"] = (t == k).astype(float)
    return pd.DataFrame(cols)


def compcor_json(n_compcor: int) -> dict:
    return {f"a_comp_cor_{k:02d}": {"Method": "aCompCor", "Mask": "combined", "Retained": True,
                                    "SingularValue": 10.0 - k, "VarianceExplained": 0.1,
                                    "CumulativeVarianceExplained": 0.1 * (k + 1)} for k in range(n_compcor)}


def _brain(shape, rng) -> tuple[np.ndarray, np.ndarray]:
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g ** 2 for g in grid) < 0.75
    return inside, np.where(inside, rng.uniform(700, 1300, shape), 20.0)


def bold_data(shape, n: int, table, rng, non_steady: int = 0) -> np.ndarray:
    """``(x, y, z, n) float32``: baseline + drift + noise + the table's motion/tissue signals."""
    inside, base = _brain(shape, rng)
    driven = np.nan_to_num(table[[*MOTION, "csf", "white_matter"]].to_numpy())  # (n, 8)
    weights = rng.normal(0, 20, tuple(shape) + (driven.shape[1],)) * inside[..., None]
    data = base[..., None] + rng.normal(0, 0.3, shape)[..., None] * np.arange(n)
    data = data + weights @ driven.T + rng.normal(0, 8, tuple(shape) + (n,)) * inside[..., None]
    data[..., :non_steady] *= 1.5
    return data.astype(np.float32)


def _nifti(path: Path, data: np.ndarray, tr_s: Optional[float], dtype=np.float32) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_data_dtype(dtype)
    if tr_s is not None:
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_zooms((3.0, 3.0, 3.0, tr_s))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def run_labels(tasks: Mapping[str, int]) -> list[tuple[str, Optional[str]]]:
    """``[(task, run label or None)]``: ``tasks`` maps a task to its run count (0: no run entity)."""
    return [(t, f"{r}" if n else None) for t, n in tasks.items() for r in (range(1, n + 1) if n else [None])]


def stem(subject: str, session: Optional[str], task: str, run: Optional[str]) -> str:
    parts = [f"sub-{subject}"] + ([f"ses-{session}"] if session else []) + [f"task-{task}"]
    return "_".join(parts + ([f"run-{run}"] if run else []))


def write_bids_dataset(root: str | Path, *, n_subjects: int = 3, tasks: Mapping[str, int] = {"movie": 2},
                       sessions: Sequence[str] = (), shape=(7, 8, 6), n_trs: int | Mapping = 30, tr_s: float = 1.5,
                       derivatives: bool = True, raw_bold: bool = True, tr_sidecar: str = "top",
                       movies: bool = True, movie_s: float = 45.0, movie_audio: bool = False, non_steady: int = 2,
                       spikes: Sequence[int] = (9,), tiny: bool = False, seed: int = 0) -> Path:
    """Write a BIDS dataset (and its fMRIPrep derivatives) under ``root``; returns ``root``.

    Args:
        tasks: task -> number of runs (0: files without a run entity).
        sessions: session labels every subject has (empty: no session level).
        n_trs: TRs of every scan, or ``{(subject "01", run name): TRs}`` with a default under ``None``.
        tr_sidecar: ``top`` (one ``task-<t>_bold.json`` at the root), ``file`` (a JSON beside
            every raw BOLD) or ``none``. Derivative BOLD always has its own JSON.
        movies: write ``stimuli/<task>_run-<r>.mp4`` (32x18, 8 fps; a stereo track with
            ``movie_audio``) and name it in each run's ``events.tsv``.
        tiny: 2x2x2 images, no movies (a discovery benchmark tree).
    """
    root = Path(root)
    shape = (2, 2, 2) if tiny else tuple(shape)
    _json(root / "dataset_description.json", {"Name": "giblet synthetic", "BIDSVersion": "1.8.0"})
    deriv = root / "derivatives" / "fmriprep"
    if derivatives:
        _json(deriv / "dataset_description.json", {"Name": "fMRIPrep", "BIDSVersion": "1.8.0", "DatasetType":
                                                   "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]})
    runs = run_labels(tasks)
    if tr_sidecar == "top":
        for task in tasks:
            _json(root / f"task-{task}_bold.json", {"RepetitionTime": tr_s, "TaskName": task})
    if movies and not tiny:
        _write_movies(root, runs, movie_s, movie_audio)
    for i in range(n_subjects):
        subject = f"{i + 1:02d}"
        for j, session in enumerate(sessions or [None]):
            for k, (task, run) in enumerate(runs):
                key = stem(subject, session, task, run)
                n = _length(n_trs, subject, key)
                rng = np.random.default_rng([seed, i, j, k])
                _write_scan(root, deriv, subject, session, key, task, run, n, shape, tr_s, rng, derivatives,
                            raw_bold, tr_sidecar, movies and not tiny, non_steady, spikes)
    return root


def _length(n_trs, subject: str, key: str) -> int:
    if isinstance(n_trs, int):
        return n_trs
    return int(n_trs.get((subject, key), n_trs.get(None, 30)))


def _write_movies(root: Path, runs, movie_s: float, audio: bool) -> None:
    from giblet.synth_stimulus import scenes, write_movie

    for k, (task, run) in enumerate(runs):
        rng = np.random.default_rng([7, k])
        write_movie(root / "stimuli" / movie_name(task, run), scenes(movie_s, rng), movie_s, size=(32, 18), fps=8,
                    rng=rng, audio=audio)


def movie_name(task: str, run: Optional[str]) -> str:
    return f"{task}{f'_run-{run}' if run else ''}.mp4"


def _write_scan(root, deriv, subject, session, key, task, run, n, shape, tr_s, rng, derivatives, raw_bold,
                tr_sidecar, movies, non_steady, spikes) -> None:
    func = Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "func"
    table = confounds_table(n, rng, non_steady, [s for s in spikes if s < n])
    data = bold_data(shape, n, table, rng, non_steady)
    if raw_bold:
        _nifti(root / func / f"{key}_bold.nii.gz", data, tr_s, np.int16)
    if tr_sidecar == "file":
        _json(root / func / f"{key}_bold.json", {"RepetitionTime": tr_s, "TaskName": task})
    if movies:
        (root / func).mkdir(parents=True, exist_ok=True)
        (root / func / f"{key}_events.tsv").write_text(
            f"onset\tduration\ttrial_type\tstim_file\n0.0\t{n * tr_s}\tmovie\t{movie_name(task, run)}\n")
    if not derivatives:
        return
    out = deriv / func / key
    _nifti(Path(f"{out}_space-{SPACE}_desc-preproc_bold.nii.gz"), data, tr_s)
    _json(Path(f"{out}_space-{SPACE}_desc-preproc_bold.json"), {"RepetitionTime": tr_s, "TaskName": task,
                                                                "SkullStripped": False})
    inside = data[..., non_steady:].mean(-1) > 100 if n > non_steady else np.ones(shape, bool)
    _nifti(Path(f"{out}_space-{SPACE}_desc-brain_mask.nii.gz"), inside.astype(np.float32), None, np.uint8)
    table.to_csv(f"{out}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
    _json(Path(f"{out}_desc-confounds_timeseries.json"), compcor_json(5))
