"""Text stage wiring: one ``text/<run>`` unit per run with annotations (rows -> per-TR embeddings).

The driver checks the inputs while planning (annotation file and model folder exist, the
movie's duration from its header), reads and validates the run's rows in ``prepare`` (so a
bad spreadsheet fails before any model is loaded; one sheet shared by several runs is split
there), and one Dask task loads the model, embeds each distinct string once and writes the
arrays.
"""
from __future__ import annotations

from pathlib import Path

from giblet.features import text
from giblet.fingerprint import non_default_params
from pipelines.units import PlanContext, Stage, Task, Unit


class TextStage(Stage):
    name = "text"
    version = text.VERSION

    def enabled(self, cfg) -> bool:
        return any(r.annotations for r in cfg.study_runs.values())

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        runs = [r for r in ctx.cfg.study_runs.values() if r.annotations]
        if not runs:
            return []
        p = ctx.cfg.text
        model = text.check_model_dir(ctx.cfg.input_path(p.model) if p.model else text.default_model_path())
        weights = ctx.file_fp(model)  # each file's hash cached by its stat
        sharing = [r.name for r in runs if r.shared_sheet]
        shared = {}
        if sharing:  # one sheet for several runs: each run's rows, and a fingerprint of just those rows
            path = ctx.cfg.input_path(ctx.cfg.annotations)
            if not path.exists():
                raise text.InputMissingError(f"text: annotation file {path} does not exist; fix annotations")
            shared = text.shared_sheet_rows(path, p.start_column, p.end_column, list(p.columns), p.time_unit,
                                            sharing, p.run_rows or None)
        return [self._run_unit(ctx, run, model, weights, shared.get(run.name)) for run in runs]

    def _run_unit(self, ctx: PlanContext, run, model: Path, weights: str, shared: dict | None) -> Unit:
        cfg, p = ctx.cfg, ctx.cfg.text
        path = cfg.input_path(run.annotations)
        if not path.exists():
            where = "annotations" if run.shared_sheet else f"runs.{run.name}.annotations (or inputs.annotations)"
            raise text.InputMissingError(f"text/{run.name}: annotation file {path} does not exist; fix {where}")
        params = {k: v for k, v in non_default_params(p).items() if k not in ("run_rows", "tr_offset")}
        params.update(tr_s=cfg.tr_s, onset_s=run.onset_s)
        tr_offset = int(p.tr_offset.get(run.name, 0))
        if p.time_unit == "tr" and tr_offset:
            params["tr_offset"] = tr_offset
        row_range = tuple(shared["rows"]) if shared else None
        # a shared sheet: the run's own rows are its input (editing another run's rows rebuilds nothing here)
        inputs = {"annotations": shared["fingerprint"] if shared else ctx.file_fp(path), "model": weights}
        stimulus_end = None
        if run.movie:  # the grid's length; its duration, not its content, is the input
            stimulus_end = text.stimulus_duration(cfg.input_path(run.movie))
            inputs["movie_duration_s"] = round(stimulus_end, 6)
        names = text.array_names(run.name)

        def prepare(unit: Unit, staging: Path) -> None:
            text.prepare_rows(staging, str(path), p.start_column, p.end_column, list(p.columns), p.time_unit,
                              p.allow_unsorted, cfg.tr_s, run.onset_s, stimulus_end, row_range, tr_offset)

        def tasks(unit: Unit, staging: Path) -> list[Task]:
            return [Task("embed", text.build_text, dict(
                staging=str(staging), names=names, model=str(model), device=p.device, batch_size=p.batch_size,
                combine=p.combine, fill=p.fill, tr_s=cfg.tr_s, onset_s=run.onset_s, chunk_trs=p.chunk_trs))]

        def finalize(unit: Unit, staging: Path, results: dict) -> dict:
            return {**results["embed"], "model": str(model), "model_hash": weights, "stimulus_end_s": stimulus_end,
                    "annotations": str(path), "shared_sheet_rows": list(row_range) if row_range else None}

        return Unit(f"text/{run.name}", self.name, self.version, params, inputs, tasks, list(names.values()),
                    prepare=prepare, finalize=finalize, label=f"text {run.name}", run=run.name, device=p.device)
