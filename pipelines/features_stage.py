"""Pretrained-feature stage wiring: one ``features/<name>/<run>`` unit per (extractor, run).

Each extractor of the config's ``features`` block reads one modality of every run that has
it (video: the movie; audio: ``runs.<run>.audio`` or the movie's soundtrack; text: the
run's annotations). The model is found once, while planning (a folder or an offline-cached
repo id; its files' hash is the unit's ``model`` input); it is loaded on the workers. Video
and audio units are split into tasks of ``segment_trs`` TRs (whole chunks; a killed run
resumes per task), text units are one task. The arrays are written by ``finalize`` from the
tasks' parts (``giblet.features.pretrained.parts``).

Feature units never decide a run's TR grid (their meta has ``stored_trs``, not ``n_trs``):
they follow their modality's stage rules, so adding or changing an extractor never changes
what the fMRI units serve -- and the fMRI stage never waits for a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from giblet.errors import ConfigError
from giblet.features import audio as audio_stage
from giblet.features import text as text_stage
from giblet.features import pretrained as P
from giblet.features.pretrained import audio as A
from giblet.features.pretrained import model as M
from giblet.features.pretrained import text as T
from giblet.features.pretrained import video as V
from giblet.features.pretrained.parts import write_arrays
from giblet.fingerprint import non_default_params
from pipelines.units import PlanContext, Stage, Task, Unit

SHEET_KEYS = ("columns", "start_column", "end_column", "time_unit", "allow_unsorted")  # text.* that make the words
NEEDS = {"video": "a movie (runs.<run>.movie)", "audio": "sound (runs.<run>.audio or a movie with an audio track)",
         "text": "annotations (runs.<run>.annotations or the study's annotations)"}


def _source(cfg, run, modality: str):
    """``(input key, path)`` the extractor reads in ``run``, or None when the run lacks it."""
    if modality == "video":
        return ("movie", cfg.input_path(run.movie)) if run.movie else None
    if modality == "audio":
        if run.audio:
            return "audio", cfg.input_path(run.audio)
        movie = cfg.input_path(run.movie) if run.movie else None
        return ("movie", movie) if movie and audio_stage.has_audio_track(movie) else None
    return ("annotations", cfg.input_path(run.annotations)) if run.annotations else None


class FeaturesStage(Stage):
    name = "features"
    version = P.VERSION

    def enabled(self, cfg) -> bool:
        return bool(cfg.features)

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        units = []
        for name, p in ctx.cfg.features.items():
            runs = [(r, src) for r in ctx.cfg.study_runs.values() if (src := _source(ctx.cfg, r, p.modality))]
            if not runs:
                raise ConfigError(f"features.{name}: a {p.modality} extractor, but no run has {NEEDS[p.modality]}; "
                                  f"add that input or drop the extractor")
            ref = M.resolve_model(f"features.{name}.model", p.model, ctx.cfg.root, ctx.file_fp)
            shared = self._shared_rows(ctx, [r for r, _ in runs]) if p.modality == "text" else {}
            units += [self._unit(ctx, name, p, run, src, ref, shared.get(run.name)) for run, src in runs]
        return units

    @staticmethod
    def _shared_rows(ctx: PlanContext, runs: list) -> dict:
        """Each run's rows of a sheet several runs share (as the text stage splits it)."""
        sharing = [r.name for r in runs if r.shared_sheet]
        if not sharing:
            return {}
        t = ctx.cfg.text
        return text_stage.shared_sheet_rows(ctx.cfg.input_path(ctx.cfg.annotations), t.start_column, t.end_column,
                                            list(t.columns), t.time_unit, sharing, t.run_rows or None)

    def _unit(self, ctx: PlanContext, name: str, p, run, src, ref: M.ModelRef, shared: dict | None) -> Unit:
        cfg, (key, path) = ctx.cfg, src
        where, pooling = f"features.{name}", P.pooling_of(p)
        names = P.array_names(name, run.name, list(p.layers), p.modality)
        params = {**non_default_params(p), "pooling": pooling, "tr_s": cfg.tr_s, "onset_s": run.onset_s, "source": key}
        inputs = {key: shared["fingerprint"] if shared else ctx.file_fp(path), "model": ref.fingerprint}
        attrs = {"extractor": name, "modality": p.modality, "model": ref.path, "model_given": ref.given,
                 "model_hash": ref.fingerprint, "pooling": pooling, "dtype": p.dtype, "tr_s": cfg.tr_s,
                 "onset_s": run.onset_s, "run": run.name}
        plan = {"video": _video, "audio": _audio, "text": _text}[p.modality](cfg, p, run, key, path, params,
                                                                             inputs, attrs, shared)
        common = dict(where=where, model=ref.path, model_fp=ref.fingerprint, device=p.device, dtype=p.dtype,
                      layers=list(p.layers), pooling=pooling, out_dtype=p.out_dtype, batch_size=p.batch_size)

        def tasks(unit: Unit, staging: Path) -> list[Task]:
            return [Task(f"trs-{t0:06d}", plan.fn, dict(staging=str(staging), **common, **plan.kwargs,
                                                        **({} if p.modality == "text" else {"tr0": t0, "tr1": t1})))
                    for t0, t1 in plan.spans]

        def finalize(unit: Unit, staging: Path, results: dict) -> dict:
            return _finalize(staging, results, names, plan.n_trs, p, attrs, where)

        unit = Unit(f"features/{name}/{run.name}", self.name, self.version, params, inputs, tasks,
                    list(names.values()), prepare=plan.prepare, finalize=finalize, run=run.name,
                    max_workers=p.workers, cleanup=_release, device=p.device,
                    label=f"features {name} {run.name} ({p.modality}, {len(plan.spans)} task(s))")
        return unit  # device: cuda/auto ask the engine for a GPU worker (pipelines.placement)


@dataclass
class _Plan:
    n_trs: Optional[int]  # None: known once decoded (a separate audio file) or read (text without a movie)
    spans: list  # [tr0, tr1) of each task
    fn: Callable[..., dict]
    kwargs: dict
    prepare: Optional[Callable] = None


def _video(cfg, p, run, key, path, params, inputs, attrs, shared) -> _Plan:
    n_trs = V.n_trs(path, cfg.tr_s, run.onset_s)
    attrs.update(context_s=p.context_s, frames_per_tr=p.frames_per_tr, rule=V.RULE)
    return _Plan(n_trs, P.task_spans(n_trs, p.segment_trs), V.extract_video,
                 dict(path=str(path), frames_per_tr=p.frames_per_tr, context_s=p.context_s, tr_s=cfg.tr_s,
                      onset_s=run.onset_s))


def _audio(cfg, p, run, key, path, params, inputs, attrs, shared) -> _Plan:
    n_trs = V.n_trs(path, cfg.tr_s, run.onset_s) if key == "movie" else None  # a soundtrack follows its movie
    upper = n_trs
    if upper is None:  # a separate audio file: allot from its header; the tasks count the samples
        upper = audio_stage.upper_bound_trs(audio_stage.probe_source(path, key).duration_s, cfg.tr_s, run.onset_s)
    attrs.update(context_s=p.context_s, rule=A.RULE)
    return _Plan(n_trs, P.task_spans(upper, p.segment_trs) if upper is not None else [(0, 10**9)], A.extract_audio,
                 dict(source=str(path), source_key=key, source_fp=inputs[key], n_trs_movie=n_trs,
                      context_s=p.context_s, tr_s=cfg.tr_s, onset_s=run.onset_s))


def _text(cfg, p, run, key, path, params, inputs, attrs, shared) -> _Plan:
    t = cfg.text
    params.update({k: v for k, v in non_default_params(t).items() if k in SHEET_KEYS})
    tr_offset = int(t.tr_offset.get(run.name, 0)) if t.time_unit == "tr" else 0
    params.update({"tr_offset": tr_offset} if tr_offset else {})
    end = text_stage.stimulus_duration(cfg.input_path(run.movie)) if run.movie else None
    inputs.update({"movie_duration_s": round(end, 6)} if end is not None else {})
    attrs.update(context_words=p.context_words, rule=T.RULE)
    rows = tuple(shared["rows"]) if shared else None

    def prepare(unit: Unit, staging: Path) -> None:
        T.prepare_words(staging, str(path), t.start_column, t.end_column, list(t.columns), t.time_unit,
                        t.allow_unsorted, cfg.tr_s, run.onset_s, end, rows, tr_offset)

    return _Plan(None, [(0, 0)], T.extract_text, dict(context_words=p.context_words), prepare)


def _finalize(staging: Path, results: dict, names: dict, n_trs, p, attrs: dict, where: str) -> dict:
    """Write the arrays from the tasks' parts; the unit's manifest record."""
    parts = [results[k] for k in sorted(results)]
    counts = {r["n_trs"] for r in parts if r.get("n_trs") is not None}
    n = n_trs if n_trs is not None else counts.pop()
    per_array = {local: {**attrs, "layer": int(local.split("-")[1]), "meaning": f"hidden_states[{local[6:]}], "
                         f"pooled per TR"} for local in names if local.startswith("layer-")}
    if P.MASK in names:
        per_array[P.MASK] = {"meaning": "True where the TR has words of its own (else its features are zeros)"}
    shapes = write_arrays(staging, names, n, p.chunk_trs, per_array, where)
    extract_s = sum(r["extract_s"] for r in parts)
    stimulus_s = n * attrs["tr_s"]
    meta = {"stored_trs": n, "modality": p.modality, "model": attrs["model"], "model_hash": attrs["model_hash"],
            "layers": list(p.layers), "dims": {k: s[1] for k, s in shapes.items() if k.startswith("layer-")},
            "pooling": attrs["pooling"], "rule": attrs["rule"],
            "device": ",".join(sorted({r["device"] for r in parts})), "n_tasks": len(parts),
            "n_inputs": sum(r["n_inputs"] for r in parts), "extract_s": round(extract_s, 2),
            "stimulus_s_per_s": round(stimulus_s / extract_s, 2) if extract_s else None}
    if p.modality in ("video", "audio"):  # torch (on the model's device) or the HF processor
        meta["preprocess"] = ",".join(sorted({x for r in parts for x in r.get("preprocess", "").split(",") if x}))
    if p.modality == "text":
        meta.update({k: parts[0][k] for k in ("n_words", "n_trs_with_words")})
    if p.modality == "audio":
        meta.update({k: parts[0][k] for k in ("n_samples", "sampling_rate")})
    return meta


def _release() -> None:
    """Every worker drops its cached model and soundtrack once no feature unit is left."""
    A.release()
    M.release()
