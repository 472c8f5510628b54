"""The stimulus of a generated study (:mod:`giblet.synth`): scenes, their per-TR latent
features, the movie and the annotation sheets in the real Sherlock layout.

A run's stimulus is a sequence of *scenes* (whole seconds long), each with a colour, a tone
and a text label; its latent features ``z(t)`` (per TR) are the scene's colour (3), tone
loudness (1) and a label score (1). Runs may open with the same scenes (``opening``), as
every Sherlock run opens with the same cartoon.

Every frame carries its own index (counted from the movie's first frame) as a 12-bit code
of large black/white blocks in a top strip (:func:`decode_frame_index`), readable after
resizing and lossy coding.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

LABELS = [
    "Sherlock examines a body on the floor of a dark flat.",
    "John walks through the park with a cane, looking tired.",
    "Mrs. Hudson brings tea into the cluttered sitting room.",
    "A black car waits outside as rain falls on the street.",
    "Lestrade briefs reporters at a crowded press conference.",
    "A cab drives through London at night with its lights on.",
]
N_LATENT = 5  # r, g, b, loudness, label score
INDEX_BITS = 12
SHERLOCK_COLUMNS = [
    "Segment Number", "Start Time (s) ", "End Time (s) ", "Start Time (TRs, 1.5s)", "End Time (TRs, 1.5s)",
    "Scene Segments", "Scene Details - A Level ", "Space-In/Outdoor", "Name - All", "Name - Focus",
    "Name - Speaking", "Location", "Camera Angle", "Music Presence ", "Words on Screen ",
    "Arousal - Rater 1", "Valence - Rater 1", "Arousal - Rater 2", "Valence - Rater 2",
    "Arousal - Rater 3", "Valence - Rater 3", "Arousal - Rater 4", "Valence - Rater 4",
]
_TR_COLUMNS = ("Start Time (TRs, 1.5s)", "End Time (TRs, 1.5s)")


def scenes(duration_s: float, rng: np.random.Generator, opening: list[dict] | tuple = ()) -> list[dict]:
    """Scenes of 3-8 whole seconds covering ``[0, duration_s)``.

    Args:
        opening: scenes to start with (kept where they start before ``duration_s``); the
            new scenes drawn from ``rng`` follow the last of them.
    """
    out = [dict(sc) for sc in opening if sc["start"] < duration_s]
    t = out[-1]["end"] if out else 0
    while t < duration_s:
        length = int(rng.integers(3, 9))
        label = int(rng.integers(len(LABELS)))
        out.append({"start": t, "end": t + length, "label": label,
                    "color": rng.uniform(0.15, 0.85, size=3), "tone_hz": float(rng.choice([220, 330, 440, 550])),
                    "loudness": float(rng.uniform(0.1, 0.9))})
        t += length
    return out


def latents(scene_list: list[dict], n: int, tr_s: float, onset_s: float = 0.0,
            end_s: float | None = None) -> np.ndarray:
    """``(n, N_LATENT) float64`` scene features averaged over each TR window (10 samples a TR).

    Args:
        end_s: the movie's end; samples at or after it count as zeros (a blank screen while
            a scan runs on). None: the last scene continues.
    """
    label_score = np.linspace(-1, 1, len(LABELS))
    table = np.array([np.r_[c["color"], c["loudness"], label_score[c["label"]]] for c in scene_list])
    starts = np.array([c["start"] for c in scene_list], dtype=np.float64)
    times = onset_s + tr_s * (np.arange(n)[:, None] + (np.arange(10) + 0.5) / 10.0)  # (n, 10)
    idx = np.searchsorted(starts, times, side="right") - 1
    idx[(idx < 0) | (times >= scene_list[-1]["end"])] = len(scene_list) - 1
    features = table[idx]  # (n, 10, N_LATENT)
    if end_s is not None:
        features[times >= end_s] = 0.0
    return features.mean(axis=1)


def frame_code_blocks(index: int, width: int, strip: int) -> list[tuple[int, int, int]]:
    """(x0, x1, value) blocks of the frame-index code along the top strip."""
    block = width // INDEX_BITS
    return [(b * block, (b + 1) * block, 255 * ((index >> b) & 1)) for b in range(INDEX_BITS)]


def decode_frame_index(frame: np.ndarray) -> int:
    """Read the frame index back from an (h, w, 3) uint8 frame of any size."""
    h, w = frame.shape[:2]
    strip = max(1, h // 6)
    block = w / INDEX_BITS
    value = 0
    for b in range(INDEX_BITS):
        x0, x1 = int(b * block + block * 0.3), int((b + 1) * block - block * 0.3)
        patch = frame[1: strip - 1 if strip > 2 else strip, max(x0, 0): max(x1, x0 + 1)]
        if patch.mean() > 127:
            value |= 1 << b
    return value


def write_movie(path: Path, scene_list: list[dict], duration_s: float, size=(192, 108), fps: int = 25,
                audio_rate: int = 44100, rng: np.random.Generator | None = None, audio: bool = True) -> None:
    """H.264 video (+ stereo AAC track) of the scenes; each frame carries its index."""
    import av

    rng = rng or np.random.default_rng(0)
    w, h = size
    strip = h // 6
    n_frames = int(round(duration_s * fps))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "veryfast", "crf": "18", "g": str(2 * fps)}
        astream = None
        if audio:
            astream = out.add_stream("aac", rate=audio_rate)
            astream.layout = "stereo"
        n_audio = int(round(duration_s * audio_rate))
        a_pos, a_chunk = 0, 1024
        yy = np.linspace(0, 1, h)[:, None, None]
        scene, background = None, None  # one image per scene, then the frame code on a copy
        for i in range(n_frames):
            t = i / fps
            sc = next((c for c in scene_list if c["start"] <= t < c["end"]), scene_list[-1])
            if sc is not scene:
                shade = np.clip(sc["color"] * 255 * (0.8 + 0.4 * yy), 0, 255)  # (h, 1, 3)
                scene, background = sc, np.broadcast_to(shade, (h, w, 3)).astype(np.uint8)
            frame = background.copy()
            frame[:strip] = 0
            for x0, x1, v in frame_code_blocks(i, w, strip):
                frame[:strip, x0:x1] = v
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            for pkt in vs.encode(vf):
                out.mux(pkt)
            while astream is not None and a_pos < min(n_audio, int((i + 1) / fps * audio_rate)):
                n = min(a_chunk, n_audio - a_pos)
                tt = (a_pos + np.arange(n)) / audio_rate
                samples = np.empty((2, n), dtype=np.float32)
                sc_a = next((c for c in scene_list if c["start"] <= tt[0] < c["end"]), scene_list[-1])
                tone = sc_a["loudness"] * 0.5 * np.sin(2 * np.pi * sc_a["tone_hz"] * tt)
                samples[0] = tone + rng.normal(0, 0.01, n)
                samples[1] = 0.8 * tone + rng.normal(0, 0.01, n)
                af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
                af.sample_rate = audio_rate
                af.pts = a_pos
                af.time_base = Fraction(1, audio_rate)
                for pkt in astream.encode(af):
                    out.mux(pkt)
                a_pos += n
        for stream in [vs] + ([astream] if astream is not None else []):
            for pkt in stream.encode(None):
                out.mux(pkt)


VOWELS_HZ = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))


def speech_like(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """``(sample,) float32`` a speech-like signal: phrases of syllables, each a vowel (a glottal
    pulse train at a gliding 90-230 Hz pitch through three formant resonators) or a fricative
    (high-passed noise), with syllable envelopes and pauses between phrases. Tones (the movie
    track) exercise few codes; this has speech's harmonics, formants, onsets and silences."""
    from scipy.signal import butter, lfilter

    rng = np.random.default_rng(seed)
    out, pos, n = np.zeros(int(seconds * rate), np.float32), 0, int(seconds * rate)
    hp = butter(4, 3000, "highpass", fs=rate)
    while pos < n:
        for _ in range(rng.integers(3, 12)):  # one phrase
            m = min(n - pos, int(rng.uniform(0.08, 0.35) * rate))
            if m <= 0:
                break
            if rng.random() < 0.75:
                f0 = np.linspace(*rng.uniform(90, 230, 2), m) * (1 + 0.01 * rng.normal(size=m))
                pulses = np.diff(np.floor(np.cumsum(f0 / rate)), prepend=0.0)  # one impulse per pitch period
                seg = lfilter([1.0], [1.0, -0.95], pulses)  # glottal roll-off
                for f, bw in zip(VOWELS_HZ[rng.integers(len(VOWELS_HZ))], (80, 120, 160)):
                    r = np.exp(-np.pi * bw / rate)
                    seg = lfilter([1 - r], [1.0, -2 * r * np.cos(2 * np.pi * f / rate), r * r], seg)
            else:
                seg = lfilter(*hp, rng.normal(size=m))
            env = np.sin(np.pi * np.arange(m) / m) ** 0.5
            seg = env * seg / (np.abs(seg).max() + 1e-9) * rng.uniform(0.1, 0.6)
            out[pos:pos + m] = seg
            pos += m
        pos += int(rng.uniform(0.15, 0.6) * rate)  # a pause (silence plus the noise floor below)
    return out + rng.normal(0, 0.003, n).astype(np.float32)


# -- annotation sheets ------------------------------------------------------------------------------
def annotation_rows(scene_list: list[dict], duration_s: float, tr_s: float, rng: np.random.Generator, *,
                    gap: tuple[float, float] | None = None, n_trs: int | None = None, first_tr: int = 1) -> list[dict]:
    """One run's scene rows in the Sherlock layout, in time order.

    Seconds count from the run's start; the TR columns are 1-based, inclusive and numbered
    from ``first_tr`` (a sheet covering several runs continues them across runs). Rows of
    scenes starting in ``gap`` are left out (an unannotated stretch); the last row ends at
    the movie's last whole second. As in the real sheet, rows starting at or after TR
    ``n_trs`` (past the scan; default: the movie's whole TRs) have empty TR cells, and TR
    numbers never reach into the next run's.
    """
    n_trs = int(duration_s // tr_s) if n_trs is None else n_trs
    rows = []
    for i, sc in enumerate(scene_list):
        if gap and gap[0] <= sc["start"] < gap[1]:
            continue
        end = min(sc["end"], int(np.floor(duration_s)))
        if end <= sc["start"]:
            continue
        scanned = sc["start"] < n_trs * tr_s
        rows.append({
            "Segment Number": 0, "Start Time (s) ": sc["start"], "End Time (s) ": end,
            _TR_COLUMNS[0]: float(first_tr + np.floor(sc["start"] / tr_s)) if scanned else np.nan,
            _TR_COLUMNS[1]: float(first_tr - 1 + min(np.ceil(end / tr_s), n_trs)) if scanned else np.nan,
            "Scene Segments": f"{i + 1}. Scene" if i % 4 == 0 else None,
            "Scene Details - A Level ": LABELS[sc["label"]],
            "Space-In/Outdoor": "Indoor" if sc["label"] % 2 == 0 else "Outdoor",
            "Name - All": ["Sherlock", "John", "Mrs. Hudson", None, "Lestrade", None][sc["label"]],
            "Name - Focus": None, "Name - Speaking": None,
            "Location": ["Flat", "Park", "Baker Street", "Street", "Scotland Yard", "London"][sc["label"]],
            "Camera Angle": "Medium", "Music Presence ": "Yes" if sc["loudness"] > 0.5 else "No",
            "Words on Screen ": None,
            **{f"Arousal - Rater {r}": int(rng.integers(1, 6)) for r in range(1, 5)},
            **{f"Valence - Rater {r}": "+" for r in range(1, 5)},
        })
    return rows


def _past_end_row(first: dict, duration_s: float) -> dict:
    past = int(np.ceil(duration_s)) + 5
    return {**first, "Start Time (s) ": past, "End Time (s) ": past + 4, _TR_COLUMNS[0]: np.nan,
            _TR_COLUMNS[1]: np.nan, "Scene Details - A Level ": "Credits roll after the episode ends."}


def _save_sheet(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    rows = [{**r, "Segment Number": i + 1} for i, r in enumerate(rows)]  # numbered down the sheet, as in the real file
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=SHERLOCK_COLUMNS).to_excel(path, index=False)


def write_annotations(path: Path, scene_list: list[dict], duration_s: float, tr_s: float,
                      rng: np.random.Generator, gap: tuple[int, int] | None = None, n_trs: int | None = None) -> None:
    """One run's sheet in the real Sherlock layout: header spaces, empty cells, a duplicated
    block of rows at the end (exact copies), a row past the movie end and an optional gap.
    ``n_trs``: the scan's TRs (rows after it have empty TR cells; default: the movie's)."""
    rows = annotation_rows(scene_list, duration_s, tr_s, rng, gap=gap, n_trs=n_trs)
    rows += [dict(r) for r in rows[: max(1, len(rows) // 4)]]
    _save_sheet(path, rows + [_past_end_row(rows[0], duration_s)])


def write_run_annotations(path: Path, runs: list[dict], tr_s: float, rng: np.random.Generator) -> None:
    """One sheet for several runs, laid out like the real Sherlock file.

    Each run's rows follow the previous run's; the seconds columns restart at 0 at each
    run's first row; the TR columns continue across runs (run k's first TR number is the
    TR count of runs 1..k-1 plus 1). Quirks per run: a gap, one row repeated right after
    itself (an exact duplicate that does not step back in time) and a row past the movie
    end. Runs sharing their opening scenes repeat those rows exactly (seconds and text),
    as the real file repeats the cartoon rows at the start of run 2.

    Args:
        runs: per run, in order: ``{"scenes", "duration_s", "n_trs", "gap"}`` (``gap`` may
            be None).
    """
    sheet, first_tr = [], 1
    for run in runs:
        rows = annotation_rows(run["scenes"], run["duration_s"], tr_s, rng, gap=run.get("gap"), n_trs=run["n_trs"],
                               first_tr=first_tr)
        k = int(rng.integers(len(rows)))
        rows.insert(k + 1, dict(rows[k]))
        sheet += rows + [_past_end_row(rows[0], run["duration_s"])]
        first_tr += run["n_trs"]
    _save_sheet(path, sheet)
