"""Text stage wiring: one ``text`` unit (annotations -> per-TR embeddings).

The driver checks the inputs while planning (annotation file and model folder exist, the
movie's duration from its header), reads and validates the rows in ``prepare`` (so a bad
spreadsheet fails before any model is loaded), and one Dask task loads the model, embeds
each distinct string once and writes the arrays.
"""
from __future__ import annotations

from pathlib import Path

from giblet.features import text
from giblet.fingerprint import non_default_params
from pipelines.registry import PlanContext, Stage, Task, Unit

ARRAYS = ["text/embeddings", "text/has_text", "text/mean", "text/std"]
# How the model runs, not what it stores (the model itself enters as its weights hash).
_RUNTIME_PARAMS = ("model", "device", "batch_size")


def model_hash(ctx: PlanContext, folder: Path) -> str:
    """``giblet.fingerprint.hash_tree(folder)``, with each file's hash cached by its stat."""
    return ctx.file_fp(folder)


class TextStage(Stage):
    name = "text"
    version = text.VERSION

    def enabled(self, cfg) -> bool:
        return bool(cfg.inputs.annotations)

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        cfg, p = ctx.cfg, ctx.cfg.text
        path = cfg.input_path(cfg.inputs.annotations)
        if not path.exists():
            raise text.InputMissingError(f"text: annotation file {path} does not exist; fix inputs.annotations")
        model = text.check_model_dir(cfg.input_path(p.model) if p.model else text.default_model_path())
        weights = model_hash(ctx, model)
        params = {k: v for k, v in non_default_params(p).items() if k not in _RUNTIME_PARAMS}
        params.update(tr_s=cfg.tr_s, onset_s=cfg.onset_s, val_fraction=cfg.split.val_fraction)
        inputs = {"annotations": ctx.file_fp(path), "model": weights}
        stimulus_end = None
        if cfg.inputs.movie:  # the grid's length; its duration, not its content, is the input
            stimulus_end = text.stimulus_duration(cfg.input_path(cfg.inputs.movie))
            inputs["movie_duration_s"] = round(stimulus_end, 6)

        def prepare(staging: Path) -> None:
            text.prepare_rows(staging, str(path), p.start_column, p.end_column, list(p.columns), p.time_unit,
                              p.allow_unsorted, cfg.tr_s, cfg.onset_s, stimulus_end)

        def tasks(staging: Path) -> list[Task]:
            return [Task("embed", text.build_text, dict(
                staging=str(staging), model=str(model), device=p.device, batch_size=p.batch_size, combine=p.combine,
                fill=p.fill, tr_s=cfg.tr_s, onset_s=cfg.onset_s, val_fraction=cfg.split.val_fraction,
                chunk_trs=p.chunk_trs))]

        def finalize(staging: Path, results: dict) -> dict:
            return {**results["embed"], "model": str(model), "model_hash": weights, "stimulus_end_s": stimulus_end,
                    "annotations": str(path)}

        return [Unit("text", self.name, self.version, params, inputs, tasks, list(ARRAYS),
                     prepare=prepare, finalize=finalize, label="text embeddings")]
