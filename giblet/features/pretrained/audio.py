"""Audio extractors: speech/audio-model features of each TR's sound, with preceding context.

Rules (docs/store.md, "Pretrained features"):

- Waveform: decoded, downmixed and resampled by the audio stage's reader
  (``giblet.features.audio.read_waveform``: PyAV, channel mean, libswresample) to the
  feature extractor's ``sampling_rate``; sample 0 is stimulus time 0 (the movie's first
  video frame, or a separate audio file's first sample).
- Grid: a movie's soundtrack follows the movie's TR grid (the video stage's count: every
  stage of a run then agrees); a separate audio file has ``ceil((seconds - onset_s) / tr_s)``
  TRs. Audio missing at either end (before time 0, after the track ends) is silence (zeros).
- Window: TR ``i`` is fed as ``L = c + n`` samples, ``c = round(context_s * rate)`` of
  context then the TR's ``n = round(tr_s * rate)``, starting at sample
  ``round((onset_s + i tr_s) * rate) - c``; the feature extractor prepares it (Whisper's
  pads it to 30 s; on a GPU Whisper's log-mel is computed there by :func:`whisper_logmel`).
- Pooling: the model's output frames span its input evenly (``D`` seconds: the samples fed,
  or the padded log-mel length); frame ``f`` is the TR's when its centre ``(f + 1/2) D / T``
  lies in ``[c, L) / rate``; ``mean`` over those frames or the ``last`` of them.
"""
from __future__ import annotations

import functools
import math
import time

import numpy as np

from giblet.errors import InputError
from giblet.features.media import resolve_device
from giblet.features.pretrained import model as M
from giblet.features.pretrained.parts import save_part

RULE = ("TR i is fed round(context_s * rate) samples of context and its own round(tr_s * rate) samples, starting at "
        "sample round((onset_s + i * tr_s) * rate) - context (sample 0 = stimulus time 0; silence outside the "
        "track); output frame f of T spans the input evenly and is the TR's when its centre (f + 1/2) * D / T lies "
        "in the TR's own samples")


@functools.lru_cache(maxsize=1)
def waveform(path: str, key: str, fingerprint: str, rate: int) -> np.ndarray:
    """``(sample,) float32`` mono at ``rate``, sample 0 at stimulus time 0 (once per worker)."""
    from giblet.features.audio import read_waveform

    wave, _ = read_waveform(path, key, rate, 0.0)
    wave.setflags(write=False)
    return wave


def count_trs(n_samples: int, rate: int, tr_s: float, onset_s: float) -> int:
    """TRs of a separate audio file: every TR that starts before the audio ends."""
    return max(0, math.ceil((n_samples / rate - onset_s) / tr_s - 1e-9))


def windows(wave: np.ndarray, trs: range, rate: int, tr_s: float, onset_s: float, context_s: float) -> np.ndarray:
    """``(tr, L) float32``: each TR's window (see the module docstring), zeros outside the audio."""
    c, n = round(context_s * rate), round(tr_s * rate)
    out = np.zeros((len(trs), c + n), np.float32)
    for j, i in enumerate(trs):
        start = round((onset_s + i * tr_s) * rate) - c
        a, b = max(0, start), min(len(wave), start + c + n)
        if b > a:
            out[j, a - start:b - start] = wave[a:b]
    return out


def input_seconds(inputs: dict, processor, rate: int) -> float:
    """Seconds of audio the model's input spans (after the extractor's padding)."""
    if "input_values" in inputs:
        return inputs["input_values"].shape[-1] / rate
    if "input_features" in inputs:  # log-mel frames, hop_length samples apart (Whisper: 3000 x 160 = 30 s)
        return inputs["input_features"].shape[-1] * int(processor.hop_length) / rate
    raise InputError(f"the feature extractor returns {sorted(inputs)}; giblet knows input_values and input_features")


def frame_mask(n_frames: int, seconds: float, keep_from_s: float, keep_to_s: float) -> np.ndarray:
    """``(n_frames,) bool``: output frames whose centre lies in ``[keep_from_s, keep_to_s)``."""
    centres = (np.arange(n_frames) + 0.5) * seconds / n_frames
    return (centres >= keep_from_s - 1e-9) & (centres < keep_to_s - 1e-9)


def max_batch(window_samples: int, batch_size: int, device: str) -> int:
    """``batch_size``, capped on CUDA by the 32-bit index bound of the first convolution
    (``model.MAX_CONV_ELEMENTS``)."""
    if not device.startswith("cuda"):
        return max(1, batch_size)
    return max(1, min(batch_size, M.MAX_CONV_ELEMENTS // (window_samples * M.CONV_CHANNELS)))


def on_device_logmel(processor) -> bool:
    """Whether :func:`whisper_logmel` reproduces ``processor`` (Whisper's extractor, its defaults)."""
    return (type(processor).__name__ == "WhisperFeatureExtractor" and not getattr(processor, "dither", 0.0)
            and getattr(processor, "padding_side", "right") == "right" and not getattr(processor, "padding_value", 0.0))


def whisper_logmel(processor, w: np.ndarray, device: str) -> dict:
    """``{"input_features": (batch, n_mels, frames) float32}`` on ``device``: Whisper's log-mel of
    windows ``w`` ``(batch, L)``, zero-padded (or cut) to the extractor's ``n_samples``.

    The same torch arithmetic as ``WhisperFeatureExtractor._torch_extract_fbank_features``
    (hand-written only because the extractor pads on the host and returns host arrays: here
    only the ``L`` samples travel and the features stay on the model's device).
    """
    import torch

    n = int(processor.n_samples)
    x = torch.zeros((len(w), n), dtype=torch.float32, device=device)
    x[:, :min(n, w.shape[1])] = torch.from_numpy(np.ascontiguousarray(w[:, :n])).to(device, non_blocking=True)
    window = torch.hann_window(processor.n_fft, device=device)
    stft = torch.stft(x, processor.n_fft, processor.hop_length, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(processor.mel_filters).to(device, torch.float32).T @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    return {"input_features": (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0}


def _batches(wave, trs: range, processor, rate, tr_s, onset_s, context_s, size, device: str = "cpu",
             logmel: bool = False):
    """Feature-extractor inputs for ``size`` TRs at a time: ``logmel``: :func:`whisper_logmel` on
    ``device``; else the extractor (on the GPU where it can: ``model.processor_kwargs``)."""
    kw = M.processor_kwargs(processor, device)
    for a in range(0, len(trs), size):
        w = windows(wave, trs[a:a + size], rate, tr_s, onset_s, context_s)
        if logmel:
            yield whisper_logmel(processor, w, device)
        else:
            yield processor(list(w), sampling_rate=rate, return_tensors="pt", **kw)


def extract_audio(staging: str, where: str, source: str, source_key: str, source_fp: str, n_trs_movie: int | None,
                  model: str, model_fp: str, device: str, dtype: str, layers: list[int], pooling: str,
                  context_s: float, tr_s: float, onset_s: float, tr0: int, tr1: int, batch_size: int,
                  out_dtype: str) -> dict:
    """Task: features of TRs ``[tr0, tr1)`` (fewer when the audio ends first), saved as parts.

    ``n_trs_movie``: the movie's TR count (a movie's soundtrack), or None (a separate audio
    file: counted from its samples). Returns the TR count, device and timings.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device, where)
    m = M.load(model, model_fp, "audio", dev, dtype, where)
    rate = int(m.processor.sampling_rate)
    wave = waveform(source, source_key, source_fp, rate)
    n = n_trs_movie if n_trs_movie is not None else count_trs(len(wave), rate, tr_s, onset_s)
    trs = range(tr0, min(tr1, n))
    t1 = time.perf_counter()
    c, length = round(context_s * rate), round(context_s * rate) + round(tr_s * rate)

    def keep(inputs: dict, n_frames: int) -> np.ndarray:
        seconds = input_seconds(inputs, m.processor, rate)
        if seconds + 1e-6 < length / rate:
            raise InputError(f"{where}.context_s: a window of {length / rate:g} s is longer than the {m.model_type} "
                             f"model's input ({seconds:g} s); lower context_s")
        mask = frame_mask(n_frames, seconds, c / rate, length / rate)
        if not mask.any():
            raise InputError(f"{where}: none of the {n_frames} output frames of a {seconds:g} s input falls in a "
                             f"{tr_s:g} s TR; the model's frames are too coarse for this TR")
        return np.repeat(mask[None], _rows(inputs), axis=0)

    run = M.pooled_layers(m, layers, pooling, where, keep)
    size = max_batch(length, batch_size, dev)
    logmel = dev.startswith("cuda") and on_device_logmel(m.processor)
    batches = _batches(wave, trs, m.processor, rate, tr_s, onset_s, context_s, size, dev, logmel)
    pooled = [run(x) for x in M.prefetch(batches)]
    if pooled:
        save_part(staging, tr0, {f"layer-{k}": np.concatenate([b[j] for b in pooled]) for j, k in enumerate(layers)},
                  out_dtype)
    return {"tr0": tr0, "tr1": tr1, "n_trs": n, "n_inputs": len(trs), "n_samples": int(len(wave)),
            "sampling_rate": rate, "device": dev, "preprocess": "torch" if logmel else "processor", "load_s": round(t1 - t0, 3),
            "extract_s": round(time.perf_counter() - t1, 3), "stimulus_s": round(len(trs) * tr_s, 3)}


def _rows(inputs: dict) -> int:
    return next(len(v) for v in inputs.values() if hasattr(v, "shape"))


def release() -> None:
    waveform.cache_clear()
