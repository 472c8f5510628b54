"""Audio stage: EnCodec codes per TR from the movie's own audio track (or a separate file).

Pipeline (each step a well-kept library; only the segmenting is written here):

1. **Decode** (``giblet.features.soundtrack``) the source with PyAV (libavcodec), once per unit;
   average the channels to mono and resample to the model's rate (24 kHz) with PyAV's
   ``AudioResampler`` (libswresample). Stimulus time 0 is the movie's first video frame
   (as in the video stage), or the first sample of a separate ``inputs.audio`` file.
2. **Trim** the waveform to start at stimulus time ``onset_s`` (TR 0); silence is
   prepended where ``onset_s`` lies before the first sample.
3. **Encode** with ``transformers.EncodecModel`` at an explicit ``bandwidth``, in windows
   of about ``segment_s`` seconds that also take ``context_s`` seconds of the audio before
   them (and after them, for a non-causal model); only each window's own code frames are
   kept, so window boundaries barely change the codes. Windows are batched. On CPU the
   ``stream`` path runs the same layers and weights several times faster, read from the
   model's folder without importing transformers (``giblet.features.encodec_stream`` and
   ``encodec_torch``; ``audio.fast_path``, ``audio.threads``).
4. **Bin** the continuous code stream into TRs by the fixed rule below.

TR binning rule (exact, recorded in ``audio/codes`` attrs and the unit's meta): code frame
``k`` covers stimulus time ``[onset_s + k/f, onset_s + (k+1)/f)`` with ``f = 75`` frames/s
at 24 kHz (``f = sampling_rate / hop_length``). TR ``i`` holds the ``n = floor(tr_s * f)``
frames (112 for 1.5 s) starting at frame ``floor(i * tr_s * f)`` (0, 112, 225, 337, ...);
with ``tr_s * f = 112.5`` one frame in 225 belongs to no TR. A TR exists only when all
its frames are whole frames of audio (``n_trs`` in the meta).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from giblet.errors import InputError

VERSION = 1


def codes_name(run: str) -> str:
    """Store path of one run's codes array, ``stimuli/<run>/audio/codes``."""
    from giblet import store

    return f"{store.stimulus_prefix(run, 'audio')}/codes"


# The EnCodec model side (resolve, build, load, fingerprint) lives in giblet.features.encodec.
from giblet.features.encodec import (  # noqa: E402,F401  (re-exported: part of this stage's API)
    ENCODEC_24KHZ, MAX_PAD_ELEMENTS, RANDOM, RANDOM_RECIPE, RANDOM_SEED, ModelInfo, build_random_model, load_model,
    load_spec, resolve_model, weights_hash,
)
from giblet.features.media import resolve_device, task_threads, torch_threads, trim_heap, trims_heap  # noqa: E402

# The soundtrack (probe, decode, stage) lives in giblet.features.soundtrack.
from giblet.features.soundtrack import (  # noqa: E402,F401  (re-exported: part of this stage's API)
    SourceInfo, cached_waveform, has_audio_track, probe_source, read_waveform, staged_waveform,
)

AGREEMENT_S = 5.0  # seconds of audio the first task also encodes eagerly, to record the fast path's agreement


def release_caches() -> None:
    """Drop this process's decoded soundtrack and EnCodec model (the engine runs it on every
    worker once the audio stage is done, so a worker moving on to fMRI does not keep ~0.6 GB)."""
    import gc

    cached_waveform.cache_clear()
    load_model.cache_clear()
    load_spec.cache_clear()
    gc.collect()



# -- TR binning -----------------------------------------------------------------------------

def code_frames_per_tr(tr_s: float, frame_rate: float) -> int:
    """Code frames stored per TR: ``floor(tr_s * frame_rate)`` (112 for 1.5 s at 75 Hz)."""
    return int(math.floor(tr_s * frame_rate + 1e-6))


def tr_start_frames(n_trs: int, tr_s: float, frame_rate: float) -> np.ndarray:
    """``(tr,) int64`` first code frame of each TR: ``floor(i * tr_s * frame_rate)``."""
    return np.floor(np.arange(n_trs) * (tr_s * frame_rate) + 1e-6).astype(np.int64)


def count_trs(n_samples: int, hop: int, tr_s: float, frame_rate: float) -> int:
    """TRs whose every code frame is a whole frame of audio (``n_samples // hop`` frames)."""
    whole, n = n_samples // hop, code_frames_per_tr(tr_s, frame_rate)
    guess = int(max(0, whole - n) // (tr_s * frame_rate)) + 3  # candidates: one past the answer at least
    starts = tr_start_frames(guess, tr_s, frame_rate)
    return int(np.count_nonzero(starts + n <= whole))


def upper_bound_trs(duration_s: Optional[float], tr_s: float, onset_s: float) -> Optional[int]:
    """TR count to allocate before decoding: the header duration plus a margin (2 % + 2 s).

    Headers estimate; the exact count is known after decoding, and ``finish_codes`` trims
    the array to it (an audio track longer than the margin allows fails clearly there).
    """
    if duration_s is None:
        return None
    return max(1, int(math.floor((duration_s * 1.02 + 2.0 - onset_s) / tr_s)) + 1)


# -- encoding -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """One encoded slice: waveform samples ``[start, stop)``; keeps code frames ``[keep0, keep1)``."""

    keep0: int
    keep1: int
    start: int
    stop: int


# On CPU a batch's activations are the memory of the task (~15 MB per second of audio: one 61 s
# window peaks ~0.95 GB above the model) and batching brings no speed (a 21 s window encodes
# faster per second than a 61 s one): cap the first convolution's output at 2**24 elements, one
# default 21 s window (20 s + 1 s context), ~0.35 GB per worker.
CPU_MAX_ELEMENTS = 2**24


def plan_windows(k0: int, k1: int, n_samples: int, hop: int, segment_frames: int, context_frames: int,
                 causal: bool) -> list[Window]:
    """Split code frames ``[k0, k1)`` into near-equal windows of at most ``segment_frames``.

    Each window also encodes ``context_frames`` of audio before it (after it too, for a
    non-causal model) and keeps only its own frames. Window starts are frame-aligned, so
    its frame ``j`` is frame ``start // hop + j`` of the continuous stream; ``k1`` must not
    exceed ``n_samples // hop`` (whole frames).
    """
    n_windows = max(1, math.ceil((k1 - k0) / segment_frames))
    size = math.ceil((k1 - k0) / n_windows)
    right = 0 if causal else context_frames
    return [Window(c0, min(k1, c0 + size), max(0, c0 - context_frames) * hop,
                   min(n_samples, (min(k1, c0 + size) + right) * hop)) for c0 in range(k0, k1, size)]


def _batches(windows: list[Window], n_samples: int, hop: int, batch_size: int, num_filters: int,
             max_elements: int = MAX_PAD_ELEMENTS):
    """Consecutive windows in batches of at most ``batch_size`` windows and ``max_elements``
    elements of the first convolution's output (``MAX_PAD_ELEMENTS`` on CUDA: its 32-bit
    index limit; ``CPU_MAX_ELEMENTS`` on CPU: memory, where batching buys no speed).

    A window that ends at the end of the audio off a frame boundary is encoded alone at its
    exact length: EnCodec pads the last partial frame, as in a whole-waveform encode. Other
    windows are right-padded with zeros to the batch's longest, which changes none of
    their kept frames (a causal model never looks ahead; a non-causal one has its context).
    """
    batch: list[Window] = []
    for w in windows:
        if w.stop == n_samples and n_samples % hop:
            yield [w]
            continue
        longest = max([w.stop - w.start] + [b.stop - b.start for b in batch])
        cap = min(batch_size, max(1, max_elements // (longest * num_filters)))
        if len(batch) + 1 > cap:
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def encode_frames(model, wave: np.ndarray, k0: int, k1: int, *, bandwidth: float, segment_s: float,
                  context_s: float, batch_size: int, path: str = "eager", threads: int = 1) -> np.ndarray:
    """EnCodec codes of code frames ``[k0, k1)`` of the continuous stream of ``wave``.

    Args:
        model: an ``EncodecModel`` (eval mode, on its device).
        wave: ``(sample,) float32`` mono at ``model.config.sampling_rate``.
        k0, k1: code frames to return; ``k1 <= len(wave) // hop_length``.
        bandwidth: kbps, passed to ``encode`` explicitly (never the API default).
        segment_s, context_s, batch_size: see ``plan_windows`` and ``_batches``.
        path: ``eager`` (transformers' ``encode``, batched windows, torch's threads as set)
            or ``stream`` (``giblet.features.encodec_stream``: the same windows, faster on
            CPU, ``threads`` groups of windows at once).

    Returns:
        ``(codebook, k1 - k0) int16``.
    """
    import torch

    cfg = model.config
    hop = int(np.prod(cfg.upsampling_ratios))
    rate = cfg.sampling_rate / hop
    windows = plan_windows(k0, k1, len(wave), hop, max(1, round(segment_s * rate)), round(context_s * rate),
                           bool(cfg.use_causal_conv))
    if path == "stream":
        from giblet.features.encodec_stream import for_model

        codes = for_model(model).encode([wave[w.start:w.stop] for w in windows], float(bandwidth), threads)
        out = np.empty((codes[0].shape[0], k1 - k0), np.int16)
        for w, c in zip(windows, codes):
            out[:, w.keep0 - k0: w.keep1 - k0] = c[:, w.keep0 - w.start // hop: w.keep1 - w.start // hop]
        return out
    # One upload of the samples all windows need; batches are cut from it on the device.
    s0, s1 = windows[0].start, max(w.stop for w in windows)
    span = torch.from_numpy(np.array(wave[s0:s1], np.float32)).to(next(model.parameters()).device)
    out = None
    limit = MAX_PAD_ELEMENTS if span.device.type == "cuda" else CPU_MAX_ELEMENTS
    for batch in _batches(windows, len(wave), hop, batch_size, cfg.num_filters, limit):
        with torch.inference_mode():
            x = span.new_zeros((len(batch), 1, max(w.stop - w.start for w in batch)))
            for j, w in enumerate(batch):
                x[j, 0, : w.stop - w.start] = span[w.start - s0: w.stop - s0]
            codes = model.encode(x, bandwidth=float(bandwidth), return_dict=True)
        codes = codes.audio_codes[0].cpu().numpy()  # (batch, codebook, code_frame)
        if out is None:
            out = np.empty((codes.shape[1], k1 - k0), np.int16)
        for j, w in enumerate(batch):
            first = w.keep0 - w.start // hop
            out[:, w.keep0 - k0: w.keep1 - k0] = codes[j, :, first: first + w.keep1 - w.keep0]
    return out


# -- the stage's Dask tasks and driver steps ------------------------------------------------

def create_codes(staging: Path, name: str, n_trs: int, n_codebooks: int, frames_per_tr: int, chunk_trs: int,
                 attrs: dict) -> None:
    """Driver: the staged codes array ``name``, ``(tr, codebook, code_frame) int16``."""
    from giblet import store

    store.create_array(staging, name, (n_trs, n_codebooks, frames_per_tr), "int16",
                       (chunk_trs, n_codebooks, frames_per_tr), (store.TR, store.CODEBOOK, store.CODE_FRAME), attrs)


@trims_heap  # the next task starts from the live memory, not this one's fragmented arenas
def encode_trs(staging: str, name: str, source: str, source_key: str, source_fp: str, model: str, model_fp: str,
               device: str, sampling_rate: int, tr_s: float, onset_s: float, tr0: int, tr1: int,
               bandwidth: float, segment_s: float, context_s: float, batch_size: int, fast_path: str = "eager",
               threads: Optional[int] = None, concurrent: Optional[int] = None) -> dict:
    """Task: encode TRs ``[tr0, tr1)`` (whole chunks) into the staged codes array ``name``.

    ``fast_path`` (``auto | stream | eager``) picks the encoder (``encodec_stream.choose``);
    it runs on ``threads`` threads (None: this worker's cores divided by the ``concurrent``
    audio tasks that may run beside it, ``media.task_threads``): torch's intra-op threads
    for ``eager``, groups of windows at once for ``stream``. The task
    holding TR 0 also encodes the first ``AGREEMENT_S`` seconds both ways and records
    how many codes agree. TRs past the end of the audio are left unwritten
    (``finish_codes`` trims them). Returns the record merged into the unit's meta: TR
    count, sample count, device, path, threads, timings.
    """
    from giblet import store
    from giblet.features import encodec_stream

    t0 = time.perf_counter()
    wave, info = staged_waveform(staging, source, source_key, sampling_rate, onset_s)
    t_read = time.perf_counter() - t0
    dev = resolve_device(device)
    arr = store.open_staged(staging, name)
    net, path, note = encodec_stream.load(model, model_fp, dev, fast_path, n_codebooks=arr.shape[1])
    hop = int(np.prod(net.config.upsampling_ratios))
    rate = net.config.sampling_rate / hop
    n_trs = count_trs(len(wave), hop, tr_s, rate)
    end = min(tr1, n_trs)
    n_threads = task_threads(threads, concurrent)
    t1 = time.perf_counter()
    record = {}
    with torch_threads(n_threads):
        if end > tr0:
            n = arr.shape[2]
            starts = tr_start_frames(end, tr_s, rate)[tr0:]
            codes = encode_frames(net, wave, int(starts[0]), int(starts[-1]) + n, bandwidth=bandwidth,
                                  segment_s=segment_s, context_s=context_s, batch_size=batch_size, path=path,
                                  threads=n_threads)
            if codes.shape[0] != arr.shape[1]:
                raise InputError(f"audio.model: {model} returned {codes.shape[0]} codebooks at {bandwidth:g} kbps, "
                                 f"the plan expected {arr.shape[1]}; re-save the model or report this")
            block = np.zeros((tr1 - tr0,) + tuple(arr.shape[1:]), np.int16)
            block[: end - tr0] = codes[:, (starts - starts[0])[:, None] + np.arange(n)].transpose(1, 0, 2)
            arr[tr0:tr1] = block  # whole chunks: tr0 and tr1 lie on chunk boundaries (or the array end)
        t2 = time.perf_counter()
        if tr0 == 0 and path != "eager":
            trim_heap()  # the check's eager activations (~15 MB per layer) reuse the encode's freed pages
            record = encodec_stream.agreement(net, wave[: int(AGREEMENT_S * net.config.sampling_rate)], bandwidth)
    return {"n_trs": n_trs, "n_samples": int(len(wave)), "source": source, "device": dev, "read_s": round(t_read, 3),
            "encode_s": round(t2 - t1, 3), "audio_s": round(max(0, end - tr0) * tr_s, 3), "path": path,
            "path_note": note, "threads": n_threads, **record, "weights_hash": net.giblet_weights_hash, **info}


def finish_codes(staging: Path, name: str, results: dict, chunk_trs: int) -> dict:
    """Driver: trim the staged array to the TRs the audio covers; the unit's meta record."""
    from giblet import store

    first = next(iter(results.values()))
    counts = {r["n_trs"] for r in results.values()}
    if len(counts) != 1:
        raise InputError(f"audio: {first['source']}: tasks decoded different lengths ({sorted(counts)} TRs); "
                         f"the file changed during the run: rerun")
    n_trs = counts.pop()
    arr = store.open_staged(staging, name)
    if n_trs < 1:
        raise InputError(f"audio: {first['source']} holds {first['n_samples']} samples after onset_s: shorter "
                         f"than one TR; check inputs and onset_s")
    if n_trs > arr.shape[0]:
        raise InputError(f"audio: {first['source']} decodes to {n_trs} TRs but its header promised at most "
                         f"{arr.shape[0]}; remux the file (e.g. ffmpeg -i IN -c copy OUT) so its duration is right")
    if n_trs < arr.shape[0]:
        arr.resize((n_trs,) + tuple(arr.shape[1:]))
        store.remove_staged_chunks(staging, name, -(-n_trs // chunk_trs))  # out-of-bounds files a shrink keeps
    devices = sorted({r["device"] for r in results.values()})
    audio_s = sum(r["audio_s"] for r in results.values())
    encode_s = sum(r["encode_s"] for r in results.values())
    meta = {"n_trs": n_trs, "n_samples": first["n_samples"], "weights_hash": first["weights_hash"],
            "device": ",".join(devices), "n_tasks": len(results), "encode_s": round(encode_s, 2),
            "audio_s_per_s": round(audio_s / encode_s, 2) if encode_s else None,
            **{k: first[k] for k in ("source_rate", "source_channels", "codec", "first_sample_s",
                                     "onset_shift_samples")}}
    rs = list(results.values())  # markers of tasks resumed from an older giblet may lack the newer keys
    meta.update(fast_path=",".join(sorted({r.get("path", "eager") for r in rs})),
                threads=sorted({r["threads"] for r in rs if r.get("threads")}),
                warnings=sorted({r["path_note"] for r in rs if r.get("path_note")}),
                **next(({k: r[k] for k in ("fast_path_agreement", "agreement_codes")} for r in rs
                        if "fast_path_agreement" in r), {}))
    arr.attrs.update({"n_trs": n_trs, "weights_hash": first["weights_hash"], "device": meta["device"],
                      "fast_path": meta["fast_path"]})
    return meta
