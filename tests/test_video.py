"""Video stage: exact timestamp -> TR assignment (frames carry their own index), padding
rules, bad files, and the round trip through the real engine, store and reader."""
from __future__ import annotations

import math
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
import zarr

import giblet
from giblet.config import VIDEO_INTERPOLATIONS, load_config
from giblet.errors import ConfigError, InputError, InputMissingError
from giblet.features import video
from giblet.features.colour import DEFAULT, FLAGS, Colour, colour_of
from giblet.synth import decode_frame_index, make_study, scenes, write_movie
from giblet.verify import verify_store
from pipelines import cli, engine

W, H = 160, 90


@pytest.fixture(scope="module")
def movie(tmp_path_factory) -> Path:
    """20 s, 192x108, 25 fps H.264 (keyframe every 2 s) whose frames carry their index."""
    path = tmp_path_factory.mktemp("movie") / "m.mp4"
    rng = np.random.default_rng(3)
    write_movie(path, scenes(20, rng), 20, size=(192, 108), fps=25, rng=rng, audio=False)
    return path


def decode_all(path, tmp, tr_s=1.5, onset_s=0.0, frame_skip=4, frames_per_tr=None, segment_trs=64, chunk_trs=16,
               size=(W, H)):
    """Run the stage's prepare + every segment task directly; return grid, results, frames, padded."""
    info = video.probe_movie(path)
    grid = video.make_grid(info, tr_s, onset_s, frame_skip, frames_per_tr)
    staging = Path(tmp) / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    names = video.array_names("run-1")
    video.create_arrays(staging, names, grid, *size, chunk_trs, {})
    results = [video.decode_segment(str(staging), names, str(path), t0, t1, tr_s, onset_s, frame_skip,
                                    grid.frames_per_tr, *size, "area", chunk_trs, info.fps)
               for t0, t1 in video.segments(grid.n_trs, segment_trs)]
    frames = zarr.open_array(str(staging / names["frames"]))[...]
    padded = zarr.open_array(str(staging / names["padded"]))[...]
    moments = zarr.open_array(str(staging / names["moments"]))[...]
    np.testing.assert_array_equal(moments, video.pixel_moments(frames))  # every TR's moments, as written
    return grid, results, frames, padded


def frame_indices(frames: np.ndarray) -> np.ndarray:
    """(tr, frame) source-frame index read back from the pixels of each stored frame."""
    return np.array([[decode_frame_index(f) for f in tr] for tr in frames])


def expected(n_trs, fps, tr_s, onset_s, skip, fpt):
    """Source index of every slot, stated per TR: TR k spans frames ceil((onset + k tr) fps) ..."""
    tr, onset = Fraction(str(tr_s)), Fraction(str(onset_s))
    idx, pad = np.zeros((n_trs, fpt), int), np.zeros((n_trs, fpt), bool)
    for k in range(n_trs):
        first, end = math.ceil((onset + k * tr) * fps), math.ceil((onset + (k + 1) * tr) * fps)
        kept = list(range(first, end, skip))[:fpt]
        idx[k] = kept + [kept[-1]] * (fpt - len(kept))
        pad[k, len(kept):] = True
    return idx, pad


@pytest.mark.parametrize("onset_s,skip,fpt,segment_trs,chunk_trs,want_fpt,want_padded", [
    (0.0, 4, None, 64, 16, 10, 0),  # 37.5 frames per TR: 38/37 frames -> 10 kept either way
    (0.2, 1, None, 4, 2, 38, 6),  # onset on a frame time; TR boundaries fall on frames; 37-frame TRs padded
    (0.52, 3, None, 2, 2, 13, 0),  # onset between frames; many segments, each seeks once
    (0.2, 4, 6, 4, 4, 6, 0),  # frames_per_tr below the natural 10: extra frames dropped
])
def test_frames_are_assigned_to_trs_by_timestamp_exactly(movie, tmp_path, onset_s, skip, fpt, segment_trs,
                                                         chunk_trs, want_fpt, want_padded):
    grid, results, frames, padded = decode_all(movie, tmp_path, onset_s=onset_s, frame_skip=skip,
                                               frames_per_tr=fpt, segment_trs=segment_trs, chunk_trs=chunk_trs)
    assert grid.n_trs == math.floor((20 - onset_s) / 1.5) and grid.frames_per_tr == want_fpt
    assert frames.shape == (grid.n_trs, want_fpt, H, W, 3) and frames.dtype == np.uint8
    want_idx, want_pad = expected(grid.n_trs, 25, 1.5, onset_s, skip, want_fpt)
    np.testing.assert_array_equal(frame_indices(frames), want_idx)
    np.testing.assert_array_equal(padded, want_pad)
    assert sum(r["n_padded"] for r in results) == int(want_pad.sum()) == want_padded
    assert len(results) == math.ceil(grid.n_trs / segment_trs)
    # every frame in a TR window was decoded once, by exactly one segment
    bounds = [math.ceil((Fraction(str(onset_s)) + k * Fraction(3, 2)) * 25) for k in range(grid.n_trs + 1)]
    assert sum(r["n_frames_in_trs"] for r in results) == bounds[-1] - bounds[0]
    natural_kept = sum(len(range(bounds[k], bounds[k + 1], skip)) for k in range(grid.n_trs))
    assert sum(r["n_dropped"] for r in results) == natural_kept - int((~want_pad).sum())


def test_pixels_match_an_opencv_area_resize(movie, tmp_path):
    import cv2

    _, _, frames, _ = decode_all(movie, tmp_path)
    cap = cv2.VideoCapture(str(movie))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 75)  # TR 2, slot 0: frame ceil(2 * 37.5)
    ok, bgr = cap.read()
    ref = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (W, H), interpolation=cv2.INTER_AREA)
    diff = np.abs(frames[2, 0].astype(int) - ref)
    assert ok and diff.mean() < 2.0 and np.percentile(diff, 99) <= 6  # same image, RGB order, area filter


def test_a_tr_without_frames_shows_the_frame_on_screen(tmp_path):
    path = tmp_path / "slow.mp4"  # 2 fps: frames at 0, 0.5, 1.0 ... s; TR 0.4 s -> every 5th TR is empty
    rng = np.random.default_rng(0)
    write_movie(path, scenes(6, rng), 6, size=(192, 108), fps=2, rng=rng, audio=False)
    grid, results, frames, padded = decode_all(path, tmp_path, tr_s=0.4, frame_skip=1, segment_trs=4, chunk_trs=2)
    assert grid.n_trs == 15 and grid.frames_per_tr == 1
    first = [math.ceil(k * Fraction(2, 5) * 2) for k in range(16)]  # first frame at or after each TR start
    empty = [k for k in range(15) if first[k] == first[k + 1]]
    assert empty == [4, 9, 14]
    # a TR's own first frame, or for an empty TR the frame on screen when it starts (the one before)
    want = [first[k] - (k in empty) for k in range(15)]
    np.testing.assert_array_equal(frame_indices(frames)[:, 0], want)
    np.testing.assert_array_equal(np.flatnonzero(padded[:, 0]), empty)
    assert sum(r["n_empty_trs"] for r in results) == 3


def test_pixel_stats_and_float_helpers():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 3, 4, 5, 3), dtype=np.uint8)
    moments = np.concatenate([video.pixel_moments(part) for part in (x[:4], x[4:])])  # per TR: parts add up
    flat = x.reshape(7, -1, 3).astype(np.int64)
    np.testing.assert_array_equal(moments, np.stack([flat.sum(1), (flat ** 2).sum(1)], axis=1))  # exact integers
    mean, std = video.pixel_stats(moments, pixels_per_tr=3 * 4 * 5)
    ref = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-5)
    white = np.full((1, 1, 200, 200, 3), 255, np.uint8)  # one TR's sum of squares is past int32 (2.6e9)
    np.testing.assert_array_equal(video.pixel_moments(white)[0], [[255 * 40000] * 3, [255 * 255 * 40000] * 3])
    w_mean, w_std = video.pixel_stats(video.pixel_moments(white), 40000)
    assert (w_mean == 1).all() and (w_std == 0).all()
    assert np.isnan(video.pixel_stats(moments[:0], 60)).all()  # no TR: NaN, not a division by zero
    z = video.to_float(x, mean, std)
    np.testing.assert_allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.reshape(-1, 3).std(0), 1, atol=1e-4)
    flat = video.to_float(x, np.array([0.5, 0.5, 0.5]), np.array([0.2, 0.0, 0.2]))
    assert np.isfinite(flat).all() and (flat[..., 1] == 0).all() and video.to_float(x).max() <= 1.0
    assert set(VIDEO_INTERPOLATIONS) == set(video.INTERPOLATIONS)


# -- colour: matrix and range from the stream's flags ---------------------------------------

KR_KB = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}  # luma weights of R and B
AVCOL = {"bt601": 6, "bt709": 1}  # SMPTE 170M / BT.709 codes for matrix, primaries, transfer


def write_yuv_movie(path, frames, matrix, full, flagged, lossless=True, fps=2):
    """H.264 of ``(n, y, x, 3) uint8`` RGB frames turned into 4:2:0 YUV by the textbook formulas
    (numpy, not swscale), flagged with their matrix and range or not (unflagged = limited)."""
    kr, kb = KR_KB[matrix]
    x = np.asarray(frames, np.float64) / 255
    y = x @ np.array([kr, 1 - kr - kb, kb])
    cb, cr = (x[..., 2] - y) / (2 - 2 * kb), (x[..., 0] - y) / (2 - 2 * kr)
    y, c = (255 * y, 255) if full else (16 + 219 * y, 224)
    n, h, w = y.shape
    half = lambda p: p.reshape(n, h // 2, 2, w // 2, 2).mean((2, 4))  # noqa: E731 (2x2 chroma box)
    q = lambda p: np.clip(np.round(p), 0, 255).astype(np.uint8).reshape(n, -1)  # noqa: E731
    planes = np.concatenate([q(y), q(128 + c * half(cb)), q(128 + c * half(cr))], 1).reshape(n, h * 3 // 2, w)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "veryfast", **({"qp": "0"} if lossless else {"crf": "18"})}
        cc = vs.codec_context
        if flagged:
            cc.colorspace = cc.color_primaries = cc.color_trc = AVCOL[matrix]
        if flagged or full:
            cc.color_range = 2 if full else 1
        for i, plane in enumerate(planes):
            frame = av.VideoFrame.from_ndarray(plane, format="yuv420p")
            frame.pts = i
            for pkt in vs.encode(frame):
                out.mux(pkt)
        for pkt in vs.encode(None):
            out.mux(pkt)


FLAT = np.concatenate([[(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (255, 255, 255), (0, 0, 0),
                        (230, 120, 30), (20, 160, 170)], np.random.default_rng(0).integers(0, 256, (8, 3))])
CASES = {  # matrix, full range, flagged -> the conversion the stage must choose
    "bt601 flagged": ("bt601", False, True, Colour("bt601", "limited", FLAGS, FLAGS)),
    "bt709 flagged": ("bt709", False, True, Colour("bt709", "limited", FLAGS, FLAGS)),
    "unflagged": ("bt601", False, False, Colour("bt601", "limited", DEFAULT, DEFAULT)),
    "bt709 full range": ("bt709", True, True, Colour("bt709", "full", FLAGS, FLAGS)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flat_colours_decode_to_their_true_rgb(tmp_path, case):
    matrix, full, flagged, want = CASES[case]
    path = tmp_path / "flat.mp4"  # one flat colour a frame, 2 fps; 0.5 s TRs keep every frame
    write_yuv_movie(path, np.broadcast_to(FLAT[:, None, None], (len(FLAT), 36, 64, 3)), matrix, full, flagged)
    assert video.probe_movie(path).colour == want
    _, _, frames, _ = decode_all(path, tmp_path, tr_s=0.5, frame_skip=1, size=(16, 9))
    err = frames[:, 0].astype(int) - FLAT[:, None, None]
    # 8-bit YUV rounding alone: ~0.3 levels on average, 2 at most, no bias (the stored mean is unbiased)
    assert np.abs(err).max() <= 2 and np.abs(err).mean() <= 0.4 and abs(err.mean()) <= 0.2


def colour_blocks(n, h, w, rng):
    """``(n, h, w, 3) uint8`` frames of saturated rectangles: sharp colour edges at any pixel."""
    pal = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
                    (255, 255, 255), (0, 0, 0), (128, 128, 128)], np.uint8)
    frames = np.empty((n, h, w, 3), np.uint8)
    for f in frames:
        f[:] = pal[rng.integers(len(pal))]
        for _ in range(12):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            f[y0:y0 + rng.integers(2, h // 2), x0:x0 + rng.integers(2, w // 2)] = pal[rng.integers(len(pal))]
    return frames


@pytest.mark.parametrize("case", ["unflagged", "bt709 flagged", "bt709 full range"])
def test_pixels_match_opencv_at_colour_edges_within_the_documented_bound(tmp_path, case):
    import cv2

    matrix, full, flagged, _ = CASES[case]
    path = tmp_path / "edges.mp4"
    write_yuv_movie(path, colour_blocks(4, 72, 128, np.random.default_rng(0)), matrix, full, flagged, lossless=False)
    _, _, frames, _ = decode_all(path, tmp_path, tr_s=0.5, frame_skip=1, size=(32, 18))
    cap, ref = cv2.VideoCapture(str(path)), []  # OpenCV's FFmpeg applies the same flags
    while (got := cap.read())[0]:
        ref.append(cv2.resize(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB), (32, 18), interpolation=cv2.INTER_AREA))
    diff = np.abs(frames[:, 0].astype(int) - np.array(ref))
    # docs/store.md: the two place 4:2:0 chroma half a sample apart, so saturated edges differ
    assert len(ref) == len(frames) and diff.mean() <= 3 and np.percentile(diff, 99) <= 40 and diff.max() <= 80


def test_colour_rule_reads_the_flags_and_defaults_to_bt601_limited():
    yuv, yuvj = av.VideoFormat("yuv420p"), av.VideoFormat("yuvj420p")
    assert colour_of(1, 2, yuv, "m.mp4") == Colour("bt709", "full", FLAGS, FLAGS)
    assert colour_of(5, 1, yuv, "m.mp4") == colour_of(6, 1, yuv, "m.mp4") == Colour("bt601", "limited", FLAGS, FLAGS)
    assert colour_of(2, 0, yuv, "m.mp4") == Colour("bt601", "limited", DEFAULT, DEFAULT)  # at any frame size
    assert colour_of(2, 0, yuvj, "m.mp4") == Colour("bt601", "full", DEFAULT, "pixel format (yuvj)")
    assert colour_of(9, 1, yuv, "m.mp4").reformat_args() == {
        "src_colorspace": "BT2020", "dst_colorspace": "BT2020", "src_color_range": "MPEG", "dst_color_range": "JPEG"}
    rgb = colour_of(0, 0, av.VideoFormat("gbrp"), "m.mp4")
    assert rgb.matrix == "none" and rgb.reformat_args() == {}
    with pytest.raises(InputError, match=r"m.mp4 flags YUV matrix AVColorSpace 8 .*-vf colorspace=all=bt709"):
        colour_of(8, 1, yuv, "/data/m.mp4")


# -- bad inputs ---------------------------------------------------------------------------

def test_missing_garbage_truncated_and_videoless_files_fail_in_one_line(movie, tmp_path):
    with pytest.raises(InputMissingError, match="does not exist; fix inputs.movie"):
        video.probe_movie(tmp_path / "nope.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a readable movie"):
        video.probe_movie(garbage)
    cut = tmp_path / "cut.mp4"  # an mp4 cut short loses its index (moov at the end)
    cut.write_bytes(movie.read_bytes()[: movie.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        video.probe_movie(cut)
    wav = tmp_path / "sound.wav"
    with av.open(str(wav), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for pkt in list(stream.encode(frame)) + list(stream.encode(None)):
            out.mux(pkt)
    with pytest.raises(InputError, match="has no video stream \\(streams: audio\\)"):
        video.probe_movie(wav)
    info = video.probe_movie(movie)
    with pytest.raises(InputError, match="covers no whole TR"):
        video.make_grid(info, 1.5, 19.0, 4, None)


def test_truncated_stream_with_intact_header_fails_at_decode(tmp_path):
    mkv = tmp_path / "m.mkv"  # Matroska keeps its header (duration) at the front
    rng = np.random.default_rng(0)
    write_movie(mkv, scenes(10, rng), 10, size=(96, 54), fps=25, rng=rng, audio=False)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    assert video.probe_movie(cut).duration == 10  # the header still promises 10 s
    with pytest.raises(InputError, match=r"cut.mkv ends at \d+\.\d+ s while its header promises at least 9.00 s"):
        decode_all(cut, tmp_path)


def test_config_checks_for_the_video_block(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"inputs": {"movie": "m.mp4"}}))
    with pytest.raises(ConfigError, match="video.segment_trs: 100 is not a multiple of video.chunk_trs=16.*"
                                          "set video.segment_trs=96"):
        load_config(cfg, ["video.segment_trs=100"])
    with pytest.raises(ConfigError, match="2 problem.*video.interpolation.*video.width"):
        load_config(cfg, ["video.interpolation=cubic", "video.width=0"])


# -- through the engine ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_template(tmp_path_factory) -> Path:
    """1 subject x 20 TRs of fMRI and a 33 s movie (22 whole TRs), generated once."""
    root = tmp_path_factory.mktemp("video_study")
    return make_study(root, n_subjects=1, n_trs=20, shape=(8, 10, 6), annotations=False, audio_track=False,
                      extra_s=3.0, seed=2, stages={"fmri": {"mask_strategy": "background"}})


@pytest.fixture
def study(study_template, tmp_path) -> Path:
    dst = tmp_path / "study"
    shutil.copytree(study_template.parent, dst)
    return dst / study_template.name


def build(config, *overrides):
    return engine.run(load_config(config, overrides), only=["fmri", "video"], progress=False)  # in-process


def test_round_trip_cache_hit_and_targeted_recompute(study):
    report = build(study, "video.segment_trs=16", "video.chunk_trs=8")
    assert "video/run-1" in report.ran
    s = giblet.open_store(report.store)
    meta = s.unit_meta("video/run-1")
    assert meta["n_trs"] == 22 and s.align["runs"]["run-1"]["n_trs_by_unit"]["video/run-1"] == 22
    assert s.n_trs() == 20  # trimmed to fMRI
    assert meta["n_segments"] == 2 and meta["frames_per_tr"] == 10 and meta["fps"] == 25.0
    frames = s.video()
    assert frames.shape == (20, 10, H, W, 3) and frames.dtype == np.uint8
    want, _ = expected(22, 25, 1.5, 0.0, 4, 10)
    np.testing.assert_array_equal(frame_indices(frames), want[:20])
    mean, std = s.video_stats()
    assert s.split["train"] == {"run-1": (0, 16)}  # the store's split of the 20-TR grid: n_val = floor(4 + 1/2)
    train = s.array("stimuli/run-1/video/frames")[:16].reshape(-1, 3) / 255.0  # the training TRs, padding included
    np.testing.assert_allclose(mean, train.mean(0), rtol=1e-6)  # exact from the integer moments
    np.testing.assert_allclose(std, train.std(0), rtol=1e-6)
    z = s.video_float(slice(0, 16), zscore=True).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-4)
    assert s.video_float(slice(0, 2)).max() <= 1.0
    assert verify_store(report.store) == []
    assert s.array("stimuli/run-1/video/frames").attrs["colour"] == Colour("bt601", "limited", DEFAULT, DEFAULT).attrs()
    ds = s.to_xarray()
    assert ds["video_frames"].dims == ("tr", "frame", "height", "width", "channel")

    assert build(study, "video.segment_trs=16", "video.chunk_trs=8").ran == []  # cache hit
    assert build(study, "video.segment_trs=8", "video.chunk_trs=8").ran == []  # segmenting is not output
    again = build(study, "video.width=96", "video.chunk_trs=8")
    assert again.ran == ["video/run-1"] and giblet.open_store(again.store).video().shape == (20, 10, H, 96, 3)
    later = build(study, "onset_s=5.0")  # the movie now covers 18 TRs: shorter than the fMRI
    # the fMRI unit stores exactly the TRs it serves: min(20 in its file, 18 of stimulus)
    assert sorted(later.ran) == ["fmri/sub-01/run-1", "video/run-1"]
    s = giblet.open_store(later.store)
    rec = s.align["runs"]["run-1"]
    assert s.n_trs() == 18 and rec["n_trs_by_unit"] == {"video/run-1": 18} and rec["subjects"] == {"sub-01": 18}
    fmri_run = s.unit_meta("fmri/sub-01/run-1")["runs"]["run-1"]
    assert (fmri_run["file_trs"], fmri_run["n_trs"]) == (20, 18) and s.fmri("sub-01").shape[0] == 18
    np.testing.assert_array_equal(frame_indices(s.video(slice(0, 1)))[0], np.arange(125, 163, 4))


def test_corrupt_movie_fails_the_run_with_one_line(study, capsys):
    path = study.parent / "movie.mp4"
    data = bytearray(path.read_bytes())
    n = len(data)
    data[n // 3: n // 3 + 20000] = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    assert cli.main(["run", str(study), "--only", "video", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("giblet-preprocess: error: video:") and "is corrupt: decoding failed after t =" in err
