"""Audio stage wiring: one ``audio`` unit, split into Dask tasks of whole ``audio/codes`` chunks."""
from __future__ import annotations

from pathlib import Path

from giblet.features import audio
from giblet.fingerprint import non_default_params
from pipelines.registry import PlanContext, Stage, Task, Unit

MIN_TASKS = 4  # a default LocalCluster has min(4, cores) workers


class AudioStage(Stage):
    name = "audio"
    version = audio.VERSION

    def enabled(self, cfg) -> bool:
        if cfg.inputs.audio:
            return True
        if not cfg.inputs.movie:
            return False
        # A silent movie has no audio modality (absent modalities are skipped) -- unless the
        # config asks for audio codes, in which case plan() says the track is missing.
        return cfg.audio.model is not None or audio.has_audio_track(cfg.input_path(cfg.inputs.movie))

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        cfg, p = ctx.cfg, ctx.cfg.audio
        key = "audio" if cfg.inputs.audio else "movie"
        model = audio.resolve_model(p.model, cfg.root, hash_dir=ctx.file_fp)  # per-file hashes cached by stat
        n_codebooks = model.n_codebooks(p.bandwidth)
        source = audio.probe_source(cfg.input_path(getattr(cfg.inputs, key)), key)
        source_fp = ctx.file_fp(Path(source.path))
        frames_per_tr = audio.code_frames_per_tr(cfg.tr_s, model.frame_rate)
        n_upper = audio.upper_bound_trs(source.duration_s, cfg.tr_s, cfg.onset_s)
        if n_upper is None:  # no duration in the header (rare): decode once to count
            wave, _ = audio.cached_waveform(source.path, key, source_fp, model.sampling_rate, cfg.onset_s)
            n_upper = max(1, audio.count_trs(len(wave), model.hop_length, cfg.tr_s, model.frame_rate))

        params = non_default_params(p)
        for how in ("model", "device"):  # the model enters as its weights hash; device: float noise only
            params.pop(how, None)
        params.update(tr_s=cfg.tr_s, onset_s=cfg.onset_s, source=key)
        attrs = {
            "model": model.name, "model_hash": model.fingerprint, "bandwidth_kbps": p.bandwidth,
            "n_codebooks": n_codebooks, "codebook_size": model.codebook_size, "sampling_rate": model.sampling_rate,
            "hop_length": model.hop_length, "frame_rate": model.frame_rate, "code_frames_per_tr": frames_per_tr,
            "tr_s": cfg.tr_s, "onset_s": cfg.onset_s, "segment_s": p.segment_s, "context_s": p.context_s,
            "source": source.path, "downmix": "mean of channels, then libswresample (PyAV AudioResampler)",
            "tr_rule": f"code frame k covers stimulus time onset_s + k/{model.frame_rate:g} s; TR i holds frames "
                       f"[floor(i * tr_s * {model.frame_rate:g}), +{frames_per_tr})",
        }
        # A task is whole chunks, about one full batch of windows (progress and resume per task),
        # but at least MIN_TASKS of them when the audio allows, so the workers share short audio.
        n_chunks = -(-n_upper // p.chunk_trs)
        per_batch = max(1, round(p.batch_size * p.segment_s / (p.chunk_trs * cfg.tr_s)))
        per_task = max(1, min(per_batch, -(-n_chunks // MIN_TASKS))) * p.chunk_trs
        spans = [(t0, min(t0 + per_task, n_upper)) for t0 in range(0, n_upper, per_task)]

        def tasks(staging: Path) -> list[Task]:
            return [Task(f"trs-{t0:06d}", audio.encode_trs, dict(
                staging=str(staging), source=source.path, source_key=key, source_fp=source_fp, model=model.name,
                model_fp=model.fingerprint, device=p.device, sampling_rate=model.sampling_rate, tr_s=cfg.tr_s,
                onset_s=cfg.onset_s, tr0=t0, tr1=t1, bandwidth=p.bandwidth, segment_s=p.segment_s,
                context_s=p.context_s, batch_size=p.batch_size)) for t0, t1 in spans]

        def prepare(staging: Path) -> None:
            audio.create_codes(staging, n_upper, n_codebooks, frames_per_tr, p.chunk_trs, attrs)

        def finalize(staging: Path, results: dict) -> dict:
            meta = audio.finish_codes(staging, results, p.chunk_trs)
            return {**meta, **{k: attrs[k] for k in ("model", "model_hash", "bandwidth_kbps", "n_codebooks",
                                                     "frame_rate", "code_frames_per_tr", "tr_rule", "source")},
                    "audio_duration_s": round(meta["n_samples"] / model.sampling_rate, 3),
                    "header_duration_s": source.duration_s}

        return [Unit("audio", self.name, self.version, params, {key: source_fp, "model": model.fingerprint},
                     tasks, [audio.CODES], prepare=prepare, finalize=finalize,
                     label=f"audio codes ({n_codebooks} codebooks, {len(spans)} task(s))")]
