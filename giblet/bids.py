"""BIDS and fMRIPrep derivatives as input: the one place file names are parsed.

A ``bids:`` config block is expanded at load time into the ``runs:`` block every stage
reads (``giblet.config``, with :func:`discover`), so the store layout, fingerprints and incremental rebuilds
are those of a hand-written config. Discovery (:func:`discover`):

- **Files**: ``<root>/sub-<s>/[ses-<x>/]func/`` is listed with ``os.scandir`` (and the same
  folders under the derivatives root); a name is split into ``key-label`` entities, a
  suffix and an extension (:func:`parse_name`). Nothing else is read to find files.
- **BOLD**: from the derivatives when given (suffix ``bold``, ``desc-<bids.desc>``, one
  ``space``), else the raw ``*_bold.nii[.gz]``; filtered by task / session / run / other
  entities and subjects.
- **Runs**: the acquisition entities of a BOLD name (all but ``sub`` and the derivative
  entities ``space``, ``res``, ``den``, ``desc``; ``ses`` unless ``bids.session_in_run`` is
  false) identify its run; the run is named by them in BIDS order, e.g.
  ``task-sherlock_run-1`` or ``ses-01_task-movie_run-2``.
- **TR**: ``RepetitionTime`` of the derivative BOLD's own JSON, else of the raw sidecars
  merged by the BIDS inheritance principle (dataset, subject, session and ``func``
  levels; a JSON applies when its entities are a subset of the run's).
- **Movie**: the ``stim_file`` of the run's ``events.tsv`` (most specific one by the same
  inheritance rule), resolved against ``<root>/stimuli/``; or ``bids.stimuli.<run>``.

pybids was measured and not used: indexing a 100-subject x 10-run fMRIPrep tree (6,000
files) took 7.1 s with metadata (2.3 s without) before any planning, against 5 s for
discovery and planning together, and it brings ten more dependencies (docs/bids.md).
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from giblet.errors import ConfigError, InputError, InputMissingError

# BIDS entity order (the specification's table); unknown entities sort after these.
ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part",
            "recording", "space", "res", "den", "label", "desc")
DERIVED = ("space", "res", "den", "desc")  # what a derivative adds to its raw source's name
NIFTI = (".nii.gz", ".nii")
_PAIR = re.compile(r"([A-Za-z]+)-([A-Za-z0-9]+)")
_NA = ("", "n/a", "N/A", "nan")


@dataclass(frozen=True)
class BidsName:
    """A parsed BIDS file name: ``sub-01_task-x_run-1_bold.nii.gz`` -> entities, ``bold``, ``.nii.gz``."""

    entities: tuple[tuple[str, str], ...]
    suffix: str
    extension: str

    @property
    def ents(self) -> dict[str, str]:
        return dict(self.entities)


def parse_name(name: str) -> Optional[BidsName]:
    """Split a BIDS file name into entities, suffix and extension (None: not a BIDS name)."""
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    pairs = [_PAIR.fullmatch(p) for p in parts[:-1]]
    if not pairs or not parts[-1].isalnum() or not all(pairs) or len({m.group(1) for m in pairs}) != len(pairs):
        return None
    return BidsName(tuple((m.group(1), m.group(2)) for m in pairs), parts[-1], dot + ext)


def _sort_key(key: str, label: str) -> tuple:
    order = ENTITIES.index(key) if key in ENTITIES else len(ENTITIES)
    return (order, key, (0, int(label), label) if label.isdigit() else (1, 0, label))


def same_label(a: str, b: str) -> bool:
    """Labels match as text, or as numbers (``run-01`` is run 1)."""
    return a == b or (a.isdigit() and b.isdigit() and int(a) == int(b))


def subject_label(name: str) -> str:
    return name[4:] if name.startswith("sub-") else name


# -- listing -------------------------------------------------------------------------------------
@dataclass
class Listing:
    """Files of one dataset's ``func`` folders and of the levels above them (for inheritance)."""

    root: Path
    files: dict[Path, list[tuple[BidsName, Path]]] = field(default_factory=dict)  # folder -> its BIDS files
    func: list[Path] = field(default_factory=list)  # the func folders, subject by subject

    def level_files(self, folder: Path) -> list[tuple[BidsName, Path]]:
        if folder not in self.files:
            self.files[folder] = _files(folder)
        return self.files[folder]


def _files(folder: Path) -> list[tuple[BidsName, Path]]:
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_file() and (n := parse_name(e.name)) is not None:
                    out.append((n, Path(e.path)))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return out


def _subdirs(folder: Path, prefix: str) -> list[Path]:
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it if e.name.startswith(prefix) and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def list_dataset(root: Path) -> Listing:
    """Every ``sub-*/[ses-*/]func`` folder of a dataset, listed once."""
    out = Listing(root)
    for sub in _subdirs(root, "sub-"):
        for level in [sub] + _subdirs(sub, "ses-"):
            func = level / "func"
            files = out.level_files(func)
            if files:
                out.func.append(func)
    return out


# -- sidecars and events -------------------------------------------------------------------------
def applicable(listing: Listing, func: Path, ents: dict, suffix: str, ext: str) -> list[Path]:
    """Files of ``suffix``/``ext`` that apply to a file with entities ``ents`` in folder ``func``
    by the BIDS inheritance principle, least specific first (dataset, subject, session, func
    level; within a level, fewer entities first)."""
    levels, here = [], func
    while True:
        levels.append(here)
        if here == listing.root or here.parent == here:
            break
        here = here.parent
    found = []
    for depth, folder in enumerate(reversed(levels)):
        for name, path in listing.level_files(folder):
            if name.suffix == suffix and name.extension == ext and all(ents.get(k) == v for k, v in name.entities):
                found.append((depth, len(name.entities), path))
    return [p for *_, p in sorted(found)]


_JSON_CACHE: dict[tuple, dict] = {}  # (path, size, mtime): a top-level sidecar is read once for 1,000 runs


def read_json(path: Path) -> dict:
    try:
        st = path.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in _JSON_CACHE:
            _JSON_CACHE[key] = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON sidecar ({type(exc).__name__}: {exc}); fix or "
                         f"remove the file") from None
    if not isinstance(_JSON_CACHE[key], dict):
        raise InputError(f"{path}: a sidecar must hold a JSON object ({{\"RepetitionTime\": 1.5, ...}}); fix the file")
    return _JSON_CACHE[key]


def repetition_time(bold: Path, raw: Listing, raw_func: Path, raw_ents: dict) -> tuple[Optional[float], list[Path]]:
    """``(RepetitionTime in s or None, the files that were read)``: the BOLD's own JSON (a
    derivative's), else its raw sidecars merged by inheritance."""
    own = bold.with_name(bold.name.split(".")[0] + ".json")
    tried = [own] if own.is_file() else []
    if tried and "RepetitionTime" in read_json(own):
        return _tr(read_json(own)["RepetitionTime"], own), tried
    merged: dict = {}
    chain = applicable(raw, raw_func, raw_ents, "bold", ".json")
    for path in chain:
        merged.update(read_json(path))
    tr = merged.get("RepetitionTime")
    return (None if tr is None else _tr(tr, chain[-1])), tried + chain


def _tr(value, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"{path}: RepetitionTime is {value!r}; it must be a positive number of seconds -- fix the "
                         f"sidecar")
    return float(value)


def stimulus_of(events: Path) -> tuple[Optional[str], Optional[float]]:
    """``(stim_file, its onset)`` named by an events.tsv (None when it names none).

    Raises:
        InputError: it names more than one stimulus file (giblet serves one movie per run).
    """
    try:
        with open(events, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{events}: not a readable events table ({type(exc).__name__}: {exc}); fix or remove "
                         f"the file") from None
    named = [((r.get("stim_file") or "").strip(), r.get("onset") or "") for r in rows]
    named = [(s, o) for s, o in named if s not in _NA]
    files = list(dict.fromkeys(s for s, _ in named))
    if len(files) > 1:
        raise InputError(f"{events}: names {len(files)} stimulus files ({', '.join(files[:3])}); giblet serves one "
                         f"movie per run -- give bids.stimuli.<run>: PATH for this run")
    if not files:
        return None, None
    try:
        onset = float(named[0][1])
    except ValueError:
        onset = None
    return files[0], onset


# -- discovery ------------------------------------------------------------------------------------
@dataclass
class Scan:
    """One subject's BOLD for one run, and what its sidecars say."""

    subject: str  # sub-XX
    run: str
    bold: Path
    tr_s: Optional[float]
    tr_files: list[Path]
    events: Optional[Path] = None
    stim_file: Optional[str] = None
    onset: Optional[float] = None


@dataclass
class BidsStudy:
    """What :func:`discover` found: runs in order, each subject's scan, movies, the TR, problems."""

    root: Path
    derivatives: Optional[Path]
    runs: dict[str, dict[str, Scan]]  # run -> subject -> scan
    subjects: list[str]
    movies: dict[str, Optional[Path]]  # run -> movie (None: none found)
    tr_s: Optional[float]
    problems: list[str]  # errors: one line each, naming the file and the fix
    notes: list[str]  # worth knowing, not errors (missing scans, runs without a movie, event onsets)


def _wanted(value: str, allowed: list[str]) -> bool:
    return not allowed or any(same_label(value, a) for a in allowed)


def _is_bold(name: BidsName, derivative: bool, b) -> bool:
    """A BOLD series of the selection: NIfTI ``bold``; derivatives: of ``bids.desc`` and
    ``bids.space`` (when set); raw: without derivative entities."""
    ents = name.ents
    if name.suffix != "bold" or name.extension not in NIFTI:
        return False
    if derivative:
        if ents.get("desc") != b.desc or (b.space is not None and ents.get("space") != b.space):
            return False
    elif any(k in ents for k in DERIVED):
        return False
    filters = {"task": b.task, "ses": b.session, "run": b.run}
    if any(filters[k] and (k not in ents or not _wanted(ents[k], filters[k])) for k in filters):
        return False
    if any(k not in ents or not same_label(ents[k], str(v)) for k, v in b.entities.items()):
        return False
    subject = ents.get("sub", "")
    return (_wanted(subject, [subject_label(s) for s in b.subjects])
            and not any(same_label(subject, subject_label(s)) for s in b.exclude_subjects))


def run_name(ents: dict, session_in_run: bool = True) -> str:
    """A run's name from its acquisition entities, in BIDS order: ``ses-01_task-movie_run-1``."""
    keys = [k for k in ents if k != "sub" and k not in DERIVED and (session_in_run or k != "ses")]
    return "_".join(f"{k}-{ents[k]}" for k in sorted(keys, key=lambda k: _sort_key(k, "")))


def _run_order(names: dict[str, dict]) -> list[str]:
    """Runs sorted by their entities in BIDS order, numeric labels as numbers."""
    return sorted(names, key=lambda n: [_sort_key(k, v) for k, v in sorted(
        names[n].items(), key=lambda kv: _sort_key(kv[0], ""))])


def _select(b, source: Listing, derivative: bool, problems: list[str]) -> list[tuple[BidsName, Path, Path]]:
    found = [(n, p, func) for func in source.func for n, p in source.files[func] if _is_bold(n, derivative, b)]
    spaces = sorted({n.ents.get("space", "") for n, _, _ in found})
    if derivative and b.space is None and len(spaces) > 1:
        problems.append(f"{source.root}: derivative BOLD comes in {len(spaces)} spaces ({', '.join(spaces)}); choose "
                        f"one with bids.space (e.g. giblet-preprocess init --space {spaces[0]})")
        return []
    return found


def _collect(b, raw: Listing, source: Listing, derivative: bool,
             problems: list[str]) -> tuple[dict[str, dict[str, Scan]], dict[str, dict]]:
    """Every selected BOLD as a :class:`Scan` (run -> subject -> scan), and each run's entities."""
    runs: dict[str, dict[str, Scan]] = {}
    entities: dict[str, dict] = {}
    for name, path, func in _select(b, source, derivative, problems):
        ents = name.ents
        run, subject = run_name(ents, b.session_in_run), f"sub-{ents['sub']}"
        other = runs.setdefault(run, {}).get(subject)
        if other is not None:
            theirs = parse_name(other.bold.name).ents
            differ = sorted(k for k in set(ents) | set(theirs) if ents.get(k) != theirs.get(k))
            problems.append(f"{subject}/{run}: two BOLD files match, {other.bold} and {path} (they differ in "
                            f"{', '.join(differ)}); narrow the selection, e.g. bids.entities.{differ[0]}: LABEL"
                            + (" or bids.session_in_run: true" if "ses" in differ else ""))
            continue
        entities[run] = {k: v for k, v in ents.items() if k != "sub" and k not in DERIVED}
        raw_ents = {k: v for k, v in ents.items() if k not in DERIVED}
        raw_func = raw.root / func.relative_to(source.root)
        scan = Scan(subject, run, path, *repetition_time(path, raw, raw_func, raw_ents))
        chain = applicable(raw, raw_func, raw_ents, "events", ".tsv")
        if chain:
            scan.events = chain[-1]
            scan.stim_file, scan.onset = stimulus_of(scan.events)
        runs[run][subject] = scan
    return runs, entities


def discover(b, root: Path, derivatives: Optional[Path] = None, stimuli: Optional[dict[str, Path]] = None,
             config_tr_s: Optional[float] = None) -> BidsStudy:
    """Find subjects, runs, TRs and movies of a BIDS dataset (see the module docstring).

    Args:
        b: the ``bids`` block (:class:`giblet.config.BidsConfig`).
        root: the raw dataset; ``derivatives``: the fMRIPrep output (BOLD taken from there).
        stimuli: run -> movie, given explicitly (``bids.stimuli``, resolved).
        config_tr_s: the config's ``tr_s`` when it gives one (checked against the sidecars).

    Returns:
        A :class:`BidsStudy`; its ``problems`` are errors (one line each), ``notes`` are not.

    Raises:
        InputMissingError: ``root`` (or ``derivatives``) is not a folder.
    """
    for what, path in (("bids.root", root), ("bids.derivatives", derivatives)):
        if path is not None and not path.is_dir():
            raise InputMissingError(f"{what}: {path} is not a folder; point {what} at the dataset (the folder holding "
                                    f"sub-*/ and dataset_description.json)")
    raw = list_dataset(root)
    problems, notes = [], []
    runs, entities = _collect(b, raw, list_dataset(derivatives) if derivatives else raw, derivatives is not None,
                              problems)
    order = _run_order(entities)
    runs = {r: dict(sorted(runs[r].items(), key=lambda kv: _sort_key("sub", subject_label(kv[0])))) for r in order}
    subjects = sorted({s for r in runs.values() for s in r}, key=lambda s: _sort_key("sub", subject_label(s)))
    if not runs and not problems:
        where = derivatives or root
        problems.append(f"{where}: no BOLD series matches the bids block (desc {b.desc!r}, space {b.space!r}, task "
                        f"{b.task or 'any'}, session {b.session or 'any'}, run {b.run or 'any'}, subjects "
                        f"{b.subjects or 'all'}); check bids.root / bids.derivatives and the filters")
    tr_s = _study_tr(runs, config_tr_s, problems)
    movies = _movies(root, runs, stimuli or {}, problems, notes)
    for run, scans in runs.items():
        lacking = [s for s in subjects if s not in scans]
        if lacking:
            notes.append(f"{run}: no BOLD for {', '.join(lacking)} (they are left out of this run)")
    return BidsStudy(root, derivatives, runs, subjects, movies, tr_s, problems, notes)


def _study_tr(runs: dict[str, dict[str, Scan]], config_tr_s: Optional[float], problems: list[str]) -> Optional[float]:
    """The one TR of the study: every scan's sidecar TR, equal across runs and to the config's."""
    seen: dict[float, Scan] = {}
    for scans in runs.values():
        for scan in scans.values():
            if scan.tr_s is None:
                tried = ", ".join(str(p) for p in scan.tr_files) or "no sidecar JSON at any level"
                task = parse_name(scan.bold.name).ents.get("task", "TASK")
                problems.append(f"{scan.bold}: no RepetitionTime in its sidecars ({tried}); add \"RepetitionTime\": "
                                f"<seconds> to the BOLD's JSON or to <bids root>/task-{task}_bold.json")
            elif not any(abs(scan.tr_s - t) <= 1e-6 for t in seen):
                seen[scan.tr_s] = scan
    if len(seen) > 1:
        (ta, a), (tb, b) = list(seen.items())[:2]
        problems.append(f"TRs differ across runs: {a.tr_files[-1]} says RepetitionTime {ta:g} s ({a.subject}/{a.run}), "
                        f"{b.tr_files[-1]} says {tb:g} s ({b.subject}/{b.run}); a study has one TR -- select runs of "
                        f"one TR (bids.task, bids.run, bids.subjects) or resample them first")
        return None
    tr = next(iter(seen), None)
    if tr is not None and config_tr_s is not None and abs(tr - config_tr_s) > 1e-3 * tr:
        scan = seen[tr]
        problems.append(f"{scan.tr_files[-1]}: RepetitionTime {tr:g} s but the config says tr_s = {config_tr_s:g} s; "
                        f"drop tr_s from the config (the sidecars give it) or correct it")
    return tr


def _movies(root: Path, runs: dict[str, dict[str, Scan]], given: dict[str, Path], problems: list[str],
            notes: list[str]) -> dict[str, Optional[Path]]:
    """Each run's movie: ``bids.stimuli.<run>``, else the one ``stim_file`` all its events name."""
    unknown = [r for r in given if r not in runs]
    if unknown:
        problems.append(f"bids.stimuli: {unknown} are not runs of the dataset (runs: {', '.join(runs) or 'none'}); "
                        f"use the run names giblet-preprocess init prints")
    out: dict[str, Optional[Path]] = {}
    for run, scans in runs.items():
        if run in given:
            out[run] = given[run]
            if not given[run].is_file():
                problems.append(f"bids.stimuli.{run}: {given[run]} does not exist; fix the path")
            continue
        named = [s for s in scans.values() if s.stim_file]
        first = named[0] if named else None
        clash = next((s for s in named if s.stim_file != first.stim_file), None)
        if clash is not None:
            problems.append(f"{run}: subjects name different stimuli: {first.events} names {first.stim_file!r}, "
                            f"{clash.events} names {clash.stim_file!r}; fix the events files or give "
                            f"bids.stimuli.{run}: PATH")
        if first is None:
            out[run] = None
            notes.append(f"{run}: no events.tsv names a stim_file (no movie: fMRI only); give bids.stimuli.{run}: PATH "
                         f"to add one")
            continue
        out[run] = root / "stimuli" / first.stim_file
        if not out[run].is_file():
            problems.append(f"{first.events}: stim_file {first.stim_file!r} is not in {root / 'stimuli'} (BIDS keeps "
                            f"stimuli there); add the file or give bids.stimuli.{run}: PATH")
        if first.onset:
            notes.append(f"{run}: {first.events} starts the movie at onset {first.onset:g} s; giblet lines the movie's "
                         f"time onset_s up with TR 0 (onset_s = {-first.onset:g} if the movie began before the scan)")
    return out


# -- errors and fMRIPrep siblings -------------------------------------------------------------------
def raise_problems(study: BidsStudy) -> None:
    if study.problems:
        more = len(study.problems) - 1
        extra = f" (and {more} more problem(s): `giblet-preprocess init {study.root}` lists them all)" if more else ""
        raise InputError(study.problems[0] + extra)


def derivative_file(bold: str | Path, desc: Optional[str], suffix: str, extension: str,
                    drop: tuple[str, ...] = ()) -> Path:
    """A sibling of an fMRIPrep BOLD: same folder and entities, ``desc``/``suffix``/``extension``
    replaced and ``drop`` entities left out, e.g. the brain mask
    ``derivative_file(bold, "brain", "mask", ".nii.gz")``.

    Raises:
        ConfigError: ``bold`` is not a BIDS file name.
    """
    bold = Path(bold)
    name = parse_name(bold.name)
    if name is None:
        raise ConfigError(f"{bold}: not a BIDS file name (sub-<label>_..._bold.nii.gz); fMRIPrep masks and confounds "
                          f"are found beside fMRIPrep BOLD files only")
    ents = {k: v for k, v in name.entities if k not in drop and k != "desc"}
    if desc is not None:
        ents["desc"] = desc
    stem = "_".join(f"{k}-{v}" for k, v in sorted(ents.items(), key=lambda kv: _sort_key(kv[0], "")))
    return bold.with_name(f"{stem}_{suffix}{extension}")
