"""Generated studies with a planted, known stimulus -> fMRI dependence.

``make_study(root, ...)`` writes, under ``root``: ``bold/sub-XX.nii.gz`` (int16 with
scanner-like scaling, raw units: a brain-shaped baseline of ~600-1400 plus drift, noise
and the planted response), ``movie.mp4`` (H.264 video + stereo AAC 44.1 kHz, written with
PyAV), ``annotations.xlsx`` (the real Sherlock column layout, trailing spaces included),
``truth.npz`` (the planted latents and weights; numpy only, no pickle) and a YAML config.

The stimulus is a sequence of *scenes* (whole seconds long). Each scene has a colour, a
tone and a text label; the latent features ``z(t)`` (per TR) are the scene's colour
(3), tone loudness (1) and a label score (1). Each voxel's response is
``weights[v] . (glover_hrf * z)(t)`` -- causal, peaking ~5 s after the stimulus -- so the
best achievable prediction of each voxel is known (``truth.npz: expected_r``).

Every frame also carries its own index as a 12-bit code of large black/white blocks in a
top strip (:func:`decode_frame_index`), readable after resizing and lossy coding.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import yaml

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


def scenes(duration_s: float, rng: np.random.Generator) -> list[dict]:
    """Scenes of 3-8 whole seconds covering ``[0, duration_s)``."""
    out, t = [], 0
    while t < duration_s:
        length = int(rng.integers(3, 9))
        label = int(rng.integers(len(LABELS)))
        out.append({"start": t, "end": t + length, "label": label,
                    "color": rng.uniform(0.15, 0.85, size=3), "tone_hz": float(rng.choice([220, 330, 440, 550])),
                    "loudness": float(rng.uniform(0.1, 0.9))})
        t += length
    return out


def latents(scene_list: list[dict], n: int, tr_s: float, onset_s: float = 0.0) -> np.ndarray:
    """``(tr, N_LATENT)`` scene features averaged over each TR window."""
    label_score = np.linspace(-1, 1, len(LABELS))
    step = tr_s / 10.0
    z = np.zeros((n, N_LATENT))
    for t in range(n):
        times = onset_s + t * tr_s + step * (np.arange(10) + 0.5)
        for s in times:
            sc = next((c for c in scene_list if c["start"] <= s < c["end"]), scene_list[-1])
            z[t] += np.r_[sc["color"], sc["loudness"], label_score[sc["label"]]] / 10.0
    return z


def hrf_convolve(z: np.ndarray, tr_s: float) -> np.ndarray:
    """Causal convolution of ``(tr, k)`` features with nilearn's Glover HRF."""
    from nilearn.glm.first_level import glover_hrf

    kernel = glover_hrf(t_r=tr_s, oversampling=1, time_length=32.0)
    kernel = kernel / kernel.sum()
    return np.stack([np.convolve(z[:, k], kernel)[: len(z)] for k in range(z.shape[1])], axis=1)


def brain(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' mask and a raw baseline image (~600-1400 inside, ~15 outside)."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum((g / 0.8) ** 2 for g in grid))
    inside = r < 1.0
    base = np.where(inside, 1000 + 400 * np.cos(3 * grid[0]) * np.sin(2 * grid[1]), 15.0)
    base = base * rng.uniform(0.95, 1.05, size=shape)
    return inside, base


def write_bold(path: Path, data: np.ndarray, affine: np.ndarray, tr_s: float) -> None:
    """Write float data as int16 NIfTI with slope/intercept scaling, like scanner output."""
    import nibabel as nib

    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    zooms = list(img.header.get_zooms()[:3]) + [tr_s]
    img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def make_bold(shape, n_trs, tr_s, z_hrf, weights, inside, base, rng, amplitude=0.03, noise=0.01,
              block: int = 64) -> np.ndarray:
    """``(x, y, z, tr)`` float32 raw BOLD: baseline * (1 + drift + amplitude * response) + noise.

    Built in blocks of TRs so a Sherlock-sized subject (61x73x61x946) needs one float32
    copy of the run, not several float64 ones.
    """
    t = np.arange(n_trs) / max(n_trs - 1, 1)
    lin = rng.uniform(-0.02, 0.02, size=shape).astype(np.float32)
    cos = rng.uniform(0, 0.01, size=shape).astype(np.float32)
    zc = (z_hrf[:n_trs] - z_hrf[:n_trs].mean(0)) / (z_hrf[:n_trs].std(0) + 1e-9)
    w = (weights * inside[..., None]).astype(np.float32)
    base32 = base.astype(np.float32)
    out = np.empty(shape + (n_trs,), dtype=np.float32)
    for t0 in range(0, n_trs, block):
        tb = slice(t0, min(n_trs, t0 + block))
        response = np.tensordot(w, zc[tb].T.astype(np.float32), axes=([3], [0]))  # (x, y, z, b)
        drift = lin[..., None] * t[tb].astype(np.float32) + cos[..., None] * np.cos(2 * np.pi * t[tb]).astype(np.float32)
        sig = base32[..., None] * (1.0 + drift + amplitude * response)
        sig += rng.standard_normal(size=sig.shape, dtype=np.float32) * (noise * base32[..., None])
        out[..., tb] = sig
    return out


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


def write_annotations(path: Path, scene_list: list[dict], duration_s: float, tr_s: float,
                      rng: np.random.Generator, gap: tuple[int, int] | None = None) -> None:
    """Scene rows in the real Sherlock layout: header spaces, empty cells, a duplicated
    block of rows (as in the real file), a row past the movie end and an optional gap."""
    import pandas as pd

    rows = []
    for i, sc in enumerate(scene_list):
        if gap and gap[0] <= sc["start"] < gap[1]:
            continue  # an unannotated stretch -> has_text False there
        end = min(sc["end"], int(np.floor(duration_s)))
        if end <= sc["start"]:
            continue
        rows.append({
            "Segment Number": len(rows) + 1, "Start Time (s) ": sc["start"], "End Time (s) ": end,
            "Start Time (TRs, 1.5s)": float(np.floor(sc["start"] / tr_s) + 1),
            "End Time (TRs, 1.5s)": float(np.ceil(end / tr_s)),
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
    n_dup = max(1, len(rows) // 4)
    rows += [dict(r) for r in rows[:n_dup]]  # the real file repeats a block of rows
    past = int(np.ceil(duration_s)) + 5
    rows.append({**rows[0], "Segment Number": len(rows) + 1, "Start Time (s) ": past, "End Time (s) ": past + 4,
                 "Scene Details - A Level ": "Credits roll after the episode ends."})
    pd.DataFrame(rows, columns=SHERLOCK_COLUMNS).to_excel(path, index=False)


def _write_subject(path, shape, n_trs, tr_s, z_hrf, weights, inside, base, seed, amplitude, noise, affine) -> None:
    rng = np.random.default_rng(seed)
    write_bold(path, make_bold(shape, n_trs, tr_s, z_hrf, weights, inside, base, rng, amplitude, noise), affine, tr_s)


def _run_jobs(jobs: list, workers: int, progress: bool) -> None:
    """Run ``(function, args)`` jobs in this process or in ``workers`` forked processes."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="synth files", unit="file", disable=not progress)
    if workers <= 1:
        for fn, args in jobs:
            fn(*args)
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for future in as_completed([pool.submit(fn, *args) for fn, args in jobs]):
                future.result()
                bar.update()
    bar.close()


def make_study(root: str | Path, *, n_subjects: int = 3, n_trs: int = 60, shape: tuple = (20, 24, 16),
               tr_s: float = 1.5, seed: int = 0, movie: bool = True, audio_track: bool = True,
               annotations: bool = True, movie_size: tuple = (192, 108), fps: int = 25, extra_s: float = 3.0,
               amplitude: float = 0.03, noise: float = 0.01, config_path: str | Path | None = None,
               output: str = "study.zarr", stages: dict | None = None, annotations_file: str | Path | None = None,
               workers: int = 1, progress: bool = False) -> Path:
    """Write a synthetic study under ``root`` and return the path of its YAML config.

    Args:
        n_trs: TRs per subject; the stimulus lasts ``n_trs * tr_s + extra_s`` seconds, so
            alignment must trim it (never warp it).
        shape: ``(x, y, z)`` voxel grid of the BOLD images.
        amplitude, noise: planted response and noise as fractions of the baseline.
        config_path: where to write the YAML (default ``root/study.yaml``).
        stages: extra stage blocks for the config, e.g. ``{"audio": {"model": "random"}}``.
        annotations_file: a real annotation spreadsheet to copy in instead of generating one
            (e.g. the Sherlock file; its text then does not drive the planted response).
        workers: processes writing subjects (and the movie) at once. Each subject draws from
            its own generator (``seed``, subject number), so the files do not depend on it.
        progress: a tqdm bar over the files written.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    duration = n_trs * tr_s + extra_s
    scene_list = scenes(duration, rng)
    n_stim = int(np.ceil(duration / tr_s))
    z = latents(scene_list, n_stim, tr_s)
    z_hrf = hrf_convolve(z, tr_s)
    inside, base = brain(shape, rng)
    weights = rng.normal(0, 1, size=shape + (N_LATENT,)) / np.sqrt(N_LATENT)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -1.5 * np.array(shape)
    config_path = Path(config_path) if config_path else root / "study.yaml"
    cfg_dir = config_path.parent.resolve()

    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(cfg_dir))
        except ValueError:
            return str(p.resolve())

    jobs = [(_write_subject, (root / "bold" / f"sub-{s + 1:02d}.nii.gz", shape, n_trs, tr_s, z_hrf, weights, inside,
                              base, [seed, s + 1], amplitude, noise, affine)) for s in range(n_subjects)]
    if movie:
        jobs.insert(0, (write_movie, (root / "movie.mp4", scene_list, duration, movie_size, fps, 44100,
                                      np.random.default_rng([seed, 0]), audio_track)))
    _run_jobs(jobs, workers, progress)
    inputs: dict = {"fmri": {f"sub-{s + 1:02d}": rel(root / "bold" / f"sub-{s + 1:02d}.nii.gz")
                             for s in range(n_subjects)}}
    if movie:
        inputs["movie"] = rel(root / "movie.mp4")
    if annotations_file is not None:
        import shutil

        shutil.copyfile(annotations_file, root / "annotations.xlsx")
        inputs["annotations"] = rel(root / "annotations.xlsx")
    elif annotations:
        gap_start = scene_list[len(scene_list) // 2]["start"]
        write_annotations(root / "annotations.xlsx", scene_list, duration, tr_s, rng, gap=(gap_start, gap_start + 1))
        inputs["annotations"] = rel(root / "annotations.xlsx")
    sig = amplitude * np.sqrt((weights**2).sum(-1))  # response std (fraction of baseline), latents unit-variance
    expected_r = np.where(inside, sig / np.sqrt(sig**2 + noise**2), 0.0)
    np.savez(root / "truth.npz", latents=z, latents_hrf=z_hrf, weights=weights.astype(np.float32),
             inside=inside, expected_r=expected_r.astype(np.float32), tr_s=tr_s, n_trs=n_trs,
             scene_start=np.array([c["start"] for c in scene_list]), scene_end=np.array([c["end"] for c in scene_list]),
             scene_label=np.array([c["label"] for c in scene_list]))
    config = {"output": output, "tr_s": tr_s, "onset_s": 0.0, "inputs": inputs}
    config.update(stages or {})
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


# -- Sherlock's shape ---------------------------------------------------------------------------
# Chen et al. 2017: 17 subjects, 3 mm MNI grid 61x73x61, 946 TRs of 1.5 s in the first run, a
# ~23.8-minute 640x360 25 fps movie (Sherlock episode 1, first segment) with stereo 44.1 kHz audio.
SHERLOCK = {"n_trs": 946, "shape": (61, 73, 61), "tr_s": 1.5, "movie_size": (640, 360), "fps": 25, "extra_s": 9.0}
SHERLOCK_STAGES = {
    "fmri": {"mask_strategy": "epi", "detrend": True, "high_pass": 0.01},
    "video": {"width": 160, "height": 90, "frame_skip": 4},
    # No EnCodec weights can be downloaded here: a random model of the 24 kHz architecture, recorded
    # as such in the store (same compute as the real weights). Point model: at a saved copy to use them.
    "audio": {"model": "random", "bandwidth": 3.0, "device": "auto"},
    # The Sherlock sheet's TR columns (1-based, inclusive), as configs/preprocess/sherlock.yaml reads them.
    "text": {"columns": ["Scene Details - A Level"], "start_column": "Start Time (TRs, 1.5s)",
             "end_column": "End Time (TRs, 1.5s)", "time_unit": "tr"},
}


def sherlock_study(root: str | Path, *, n_subjects: int = 17, annotations_file: str | Path | None = None,
                   workers: int = 2, seed: int = 0, progress: bool = True, output: str = "sherlock.zarr") -> Path:
    """A study of Sherlock's real shape (``SHERLOCK``) with the planted response of
    :func:`make_study`; ``annotations_file``: the real spreadsheet (else one in its layout).
    About 0.5 GB of gzip NIfTI per subject and ~1 min of one core each to write."""
    return make_study(root, n_subjects=n_subjects, seed=seed, stages=SHERLOCK_STAGES, output=output,
                      annotations_file=annotations_file, workers=workers, progress=progress, **SHERLOCK)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m giblet.synth", description="Write a synthetic study; print its config.")
    ap.add_argument("root", help="folder to write the study into")
    ap.add_argument("--preset", choices=["sherlock", "demo"], default="demo",
                    help="sherlock: 61x73x61 x 946 TRs, 23.8-min 640x360 movie; demo: the small --demo study")
    ap.add_argument("--subjects", type=int, default=None, help="subjects (default: 17 sherlock, 3 demo)")
    ap.add_argument("--annotations", default=None, help="a real annotation spreadsheet to copy in")
    ap.add_argument("--workers", type=int, default=2, help="processes writing files at once")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.preset == "sherlock":
        config = sherlock_study(args.root, n_subjects=args.subjects or 17, annotations_file=args.annotations,
                                workers=args.workers, seed=args.seed)
    else:
        config = make_study(args.root, n_subjects=args.subjects or 3, annotations_file=args.annotations,
                            workers=args.workers, seed=args.seed, progress=True)
    print(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
