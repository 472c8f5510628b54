"""Audio stage wiring: one ``audio/<run>`` unit per run with sound, split into Dask tasks of whole chunks."""
from __future__ import annotations

from pathlib import Path

from giblet.features import audio
from giblet.fingerprint import non_default_params
from pipelines.units import PlanContext, Stage, Task, Unit

MIN_TASKS = 4  # a default LocalCluster has min(4, cores) workers


def _has_sound(cfg, run) -> bool:
    if run.audio:
        return True
    if not run.movie:
        return False
    # A silent movie has no audio modality (absent modalities are skipped) -- unless the
    # config asks for audio codes, in which case plan() says the track is missing.
    return cfg.audio.model is not None or audio.has_audio_track(cfg.input_path(run.movie))


class AudioStage(Stage):
    name = "audio"
    version = audio.VERSION

    def enabled(self, cfg) -> bool:
        return any(_has_sound(cfg, run) for run in cfg.study_runs.values())

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        runs = [run for run in ctx.cfg.study_runs.values() if _has_sound(ctx.cfg, run)]
        if not runs:
            return []
        model = audio.resolve_model(ctx.cfg.audio.model, ctx.cfg.root, hash_dir=ctx.file_fp)  # hashes cached by stat
        return [self._run_unit(ctx, run, model) for run in runs]

    def _run_unit(self, ctx: PlanContext, run, model) -> Unit:
        cfg, p = ctx.cfg, ctx.cfg.audio
        key = "audio" if run.audio else "movie"
        n_codebooks = model.n_codebooks(p.bandwidth)
        source = audio.probe_source(cfg.input_path(getattr(run, key)), key)
        source_fp = ctx.file_fp(Path(source.path))
        frames_per_tr = audio.code_frames_per_tr(cfg.tr_s, model.frame_rate)
        n_upper = audio.upper_bound_trs(source.duration_s, cfg.tr_s, run.onset_s)
        if n_upper is None:  # no duration in the header (rare): decode once to count
            wave, _ = audio.cached_waveform(source.path, key, source_fp, model.sampling_rate, run.onset_s)
            n_upper = max(1, audio.count_trs(len(wave), model.hop_length, cfg.tr_s, model.frame_rate))
        name = audio.codes_name(run.name)

        params = non_default_params(p)
        params.update(tr_s=cfg.tr_s, onset_s=run.onset_s, source=key)
        attrs = {
            "model": model.name, "model_hash": model.fingerprint, "bandwidth_kbps": p.bandwidth,
            "n_codebooks": n_codebooks, "codebook_size": model.codebook_size, "sampling_rate": model.sampling_rate,
            "hop_length": model.hop_length, "frame_rate": model.frame_rate, "code_frames_per_tr": frames_per_tr,
            "tr_s": cfg.tr_s, "onset_s": run.onset_s, "run": run.name, "segment_s": p.segment_s,
            "context_s": p.context_s, "source": source.path,
            "downmix": "mean of channels, then libswresample (PyAV AudioResampler)",
            "tr_rule": f"code frame k covers stimulus time onset_s + k/{model.frame_rate:g} s; TR i holds frames "
                       f"[floor(i * tr_s * {model.frame_rate:g}), +{frames_per_tr})",
        }
        # A task is whole chunks, about one full batch of windows (progress and resume per task),
        # but at least MIN_TASKS of them when the audio allows, so the workers share short audio.
        n_chunks = -(-n_upper // p.chunk_trs)
        per_batch = max(1, round(p.batch_size * p.segment_s / (p.chunk_trs * cfg.tr_s)))
        per_task = max(1, min(per_batch, -(-n_chunks // MIN_TASKS))) * p.chunk_trs
        spans = [(t0, min(t0 + per_task, n_upper)) for t0 in range(0, n_upper, per_task)]

        def tasks(unit: Unit, staging: Path) -> list[Task]:
            return [Task(f"trs-{t0:06d}", audio.encode_trs, dict(
                staging=str(staging), name=name, source=source.path, source_key=key, source_fp=source_fp,
                model=model.name, model_fp=model.fingerprint, device=p.device, sampling_rate=model.sampling_rate,
                tr_s=cfg.tr_s, onset_s=run.onset_s, tr0=t0, tr1=t1, bandwidth=p.bandwidth, segment_s=p.segment_s,
                context_s=p.context_s, batch_size=p.batch_size, fast_path=p.fast_path, threads=p.threads,
                concurrent=unit.slots or p.workers)) for t0, t1 in spans]

        def prepare(unit: Unit, staging: Path) -> None:
            audio.create_codes(staging, name, n_upper, n_codebooks, frames_per_tr, p.chunk_trs, attrs)

        def finalize(unit: Unit, staging: Path, results: dict) -> dict:
            meta = audio.finish_codes(staging, name, results, p.chunk_trs)
            return {**meta, **{k: attrs[k] for k in ("model", "model_hash", "bandwidth_kbps", "n_codebooks",
                                                     "frame_rate", "code_frames_per_tr", "tr_rule", "source")},
                    "audio_duration_s": round(meta["n_samples"] / model.sampling_rate, 3),
                    "header_duration_s": source.duration_s}

        return Unit(f"audio/{run.name}", self.name, self.version, params,
                    {key: source_fp, "model": model.fingerprint}, tasks, [name], prepare=prepare,
                    finalize=finalize, label=f"audio {run.name} ({n_codebooks} codebooks, {len(spans)} task(s))",
                    run=run.name, max_workers=p.workers, cleanup=audio.release_caches, device=p.device)
