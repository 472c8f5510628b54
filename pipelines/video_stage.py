"""Video stage wiring: one ``video/<run>`` unit per run with a movie, its tasks chunk-aligned time segments."""
from __future__ import annotations

from pathlib import Path

from giblet.errors import ConfigError
from giblet.features import video
from giblet.fingerprint import non_default_params
from pipelines.units import PlanContext, Stage, Task, Unit

RULES = {
    "time": "t = (pts - stream.start_time) * time_base; the video stream's first frame is t = 0",
    "assignment": "frame at t belongs to TR floor((t - onset_s) / tr_s), exact rational arithmetic",
    "selection": "frames of each TR window numbered 0, 1, ...; keep 0, k, 2k, ... (k = frame_skip) up to frames_per_tr",
    "padding": "a TR with fewer kept frames repeats its last one; a TR no frame falls into repeats the frame "
               "on screen at its start; padded slots are True in padded",
    "coverage": "only TRs the movie fully covers; the trailing partial TR and frames before onset_s are dropped",
}


class VideoStage(Stage):
    name = "video"
    version = video.VERSION

    def enabled(self, cfg) -> bool:
        return any(r.movie for r in cfg.study_runs.values())

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        return [self._run_unit(ctx, run) for run in ctx.cfg.study_runs.values() if run.movie]

    def _run_unit(self, ctx: PlanContext, run) -> Unit:
        cfg, p = ctx.cfg, ctx.cfg.video
        if run.onset_s < 0:
            raise ConfigError(f"video/{run.name}: onset_s={run.onset_s} is negative (fMRI TR 0 before the movie "
                              f"starts), which the TR grid cannot represent; drop the leading fMRI TRs and set "
                              f"onset_s >= 0")
        path = cfg.input_path(run.movie)
        info = video.probe_movie(path)  # header only: a bad file fails before any compute
        grid = video.make_grid(info, cfg.tr_s, run.onset_s, p.frame_skip, p.frames_per_tr)
        names = video.array_names(run.name)
        params = non_default_params(p)
        params.update(tr_s=cfg.tr_s, onset_s=run.onset_s)  # the TR grid
        attrs = {"rgb": True, "interpolation": p.interpolation, "frame_skip": p.frame_skip,
                 "frames_per_tr": grid.frames_per_tr, "fps": float(info.fps), "tr_s": cfg.tr_s,
                 "onset_s": run.onset_s, "run": run.name, "source": _source(info), "colour": info.colour.attrs(),
                 "rules": RULES}

        def prepare(unit: Unit, staging: Path) -> None:
            video.create_arrays(staging, names, grid, p.width, p.height, p.chunk_trs, attrs)

        def tasks(unit: Unit, staging: Path) -> list[Task]:
            return [Task(f"{t0:06d}-{t1:06d}", video.decode_segment, dict(
                staging=str(staging), names=names, path=str(path), tr0=t0, tr1=t1, tr_s=cfg.tr_s,
                onset_s=run.onset_s, frame_skip=p.frame_skip, frames_per_tr=grid.frames_per_tr, width=p.width,
                height=p.height, interpolation=p.interpolation, chunk_trs=p.chunk_trs, fps=info.fps))
                for t0, t1 in video.segments(grid.n_trs, p.segment_trs)]

        def finalize(unit: Unit, staging: Path, results: dict) -> dict:
            return _finalize(results, info, grid, attrs)

        return Unit(f"video/{run.name}", self.name, self.version, params, {"movie": ctx.file_fp(path)}, tasks,
                    list(names.values()), prepare=prepare, finalize=finalize, label=f"video {run.name}",
                    run=run.name)


def _source(info: video.MovieInfo) -> dict:
    return {"path": info.path, "codec": info.codec, "width": info.width, "height": info.height,
            "fps": str(info.fps), "duration_s": float(info.duration)}


def _finalize(results: dict, info: video.MovieInfo, grid: video.TrGrid, attrs: dict) -> dict:
    """The unit's manifest record, from its segments' counts."""
    parts = [results[k] for k in sorted(results)]
    total = lambda key: int(sum(r[key] for r in parts))  # noqa: E731
    covered = grid.onset + grid.n_trs * grid.tr
    return {
        "n_trs": grid.n_trs, "frames_per_tr": grid.frames_per_tr, "frame_skip": grid.frame_skip,
        "fps": float(info.fps), "frames_per_tr_window": float(grid.tr * info.fps), "tr_s": attrs["tr_s"],
        "onset_s": attrs["onset_s"], "n_segments": len(parts),
        "n_frames_in_trs": total("n_frames_in_trs"), "n_padded_frames": total("n_padded"),
        "n_dropped_frames": total("n_dropped"), "n_empty_trs": total("n_empty_trs"),
        "dropped_tail_s": float(info.duration - covered), "source": _source(info),
    }
