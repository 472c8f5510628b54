"""Video stage wiring: one ``video`` unit whose tasks are chunk-aligned time segments."""
from __future__ import annotations

from pathlib import Path

from giblet.errors import ConfigError
from giblet.features import video
from giblet.fingerprint import non_default_params
from pipelines.registry import PlanContext, Stage, Task, Unit

RULES = {
    "time": "t = (pts - stream.start_time) * time_base; the video stream's first frame is t = 0",
    "assignment": "frame at t belongs to TR floor((t - onset_s) / tr_s), exact rational arithmetic",
    "selection": "frames of each TR window numbered 0, 1, ...; keep 0, k, 2k, ... (k = frame_skip) up to frames_per_tr",
    "padding": "a TR with fewer kept frames repeats its last one; a TR no frame falls into repeats the frame "
               "on screen at its start; padded slots are True in video/padded",
    "coverage": "only TRs the movie fully covers; the trailing partial TR and frames before onset_s are dropped",
}


class VideoStage(Stage):
    name = "video"
    version = video.VERSION

    def enabled(self, cfg) -> bool:
        return cfg.inputs.movie is not None

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        cfg, p = ctx.cfg, ctx.cfg.video
        if cfg.onset_s < 0:
            raise ConfigError(f"video: onset_s={cfg.onset_s} is negative (fMRI TR 0 before the movie starts), "
                              f"which the TR grid cannot represent; drop the leading fMRI TRs and set onset_s >= 0")
        path = cfg.input_path(cfg.inputs.movie)
        info = video.probe_movie(path)  # header only: a bad file fails before any compute
        grid = video.make_grid(info, cfg.tr_s, cfg.onset_s, p.frame_skip, p.frames_per_tr)
        n_train = video.n_train_trs(grid.n_trs, cfg.split.val_fraction)
        params = non_default_params(p)
        params.pop("segment_trs", None)  # how the work is split, not what is stored
        # These change the output: the TR grid, and which TRs the pixel statistics cover.
        params.update(tr_s=cfg.tr_s, onset_s=cfg.onset_s, train_trs=n_train)
        attrs = {"rgb": True, "interpolation": p.interpolation, "frame_skip": p.frame_skip,
                 "frames_per_tr": grid.frames_per_tr, "fps": float(info.fps), "tr_s": cfg.tr_s,
                 "onset_s": cfg.onset_s, "source": _source(info), "colour": info.colour.attrs(), "rules": RULES}

        def prepare(staging: Path) -> None:
            video.create_arrays(staging, grid, p.width, p.height, p.chunk_trs, attrs)

        def tasks(staging: Path) -> list[Task]:
            return [Task(f"{t0:06d}-{t1:06d}", video.decode_segment, dict(
                staging=str(staging), path=str(path), tr0=t0, tr1=t1, n_train=n_train, tr_s=cfg.tr_s,
                onset_s=cfg.onset_s, frame_skip=p.frame_skip, frames_per_tr=grid.frames_per_tr, width=p.width,
                height=p.height, interpolation=p.interpolation, chunk_trs=p.chunk_trs, fps=info.fps))
                for t0, t1 in video.segments(grid.n_trs, p.segment_trs)]

        def finalize(staging: Path, results: dict) -> dict:
            return _finalize(staging, results, info, grid, n_train, attrs)

        return [Unit("video", self.name, self.version, params, {"movie": ctx.file_fp(path)}, tasks,
                     [video.FRAMES, video.PADDED, video.MEAN, video.STD], prepare=prepare, finalize=finalize,
                     label="video")]


def _source(info: video.MovieInfo) -> dict:
    return {"path": info.path, "codec": info.codec, "width": info.width, "height": info.height,
            "fps": str(info.fps), "duration_s": float(info.duration)}


def _finalize(staging: Path, results: dict, info: video.MovieInfo, grid: video.TrGrid, n_train: int,
              attrs: dict) -> dict:
    """Pixel statistics from the segments' histograms, and the unit's manifest record."""
    parts = [results[k] for k in sorted(results)]
    mean, std, n_pixels = video.pixel_stats([r["hist"] for r in parts])
    video.write_stats(staging, mean, std, n_train)
    total = lambda key: int(sum(r[key] for r in parts))  # noqa: E731
    covered = grid.onset + grid.n_trs * grid.tr
    return {
        "n_trs": grid.n_trs, "frames_per_tr": grid.frames_per_tr, "frame_skip": grid.frame_skip,
        "fps": float(info.fps), "frames_per_tr_window": float(grid.tr * info.fps), "tr_s": attrs["tr_s"],
        "onset_s": attrs["onset_s"], "train_trs": n_train, "n_segments": len(parts),
        "n_frames_in_trs": total("n_frames_in_trs"), "n_padded_frames": total("n_padded"),
        "n_dropped_frames": total("n_dropped"), "n_empty_trs": total("n_empty_trs"),
        "dropped_tail_s": float(info.duration - covered), "mean": mean.tolist(), "std": std.tolist(),
        "stats_pixels_per_channel": n_pixels, "source": _source(info),
    }
