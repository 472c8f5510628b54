"""Pretrained-feature stage: tiny random models of real architectures (ViT, wav2vec 2.0, BERT),
saved with save_pretrained and loaded through the stage's own offline path.

One tiny study is built once for the module, through the engine on an in-process Dask
cluster (the workers share this process's imports): every check reads that store.
"""
from __future__ import annotations

import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import giblet
from giblet.config import load_config, parse_config
from giblet.errors import ConfigError, InputMissingError, ModalityMissingError
from giblet.features import audio as audio_stage
from giblet.features import text as sheet
from giblet.features.pretrained import audio as A
from giblet.features.pretrained import model as M
from giblet.features.pretrained import text as T
from giblet.features.pretrained import video as V
from giblet.fingerprint import hash_tree
from giblet.synth import make_study
from pipelines import engine

TR = 1.5
COS = 0.999
WORDS = "the a man woman walks runs into room house he she sees dog cat and".split()
STORE_MD = (Path(__file__).resolve().parents[1] / "docs" / "store.md").read_text()


# -- tiny models, one study, one in-process cluster --------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.mktemp("models"))


def tiny_models(root: Path) -> dict[str, Path]:
    """Random tiny ViT, wav2vec 2.0 and BERT saved under ``root`` (also benchmarks/gpu_features_smoke.py)."""
    from transformers import (BertConfig, BertModel, BertTokenizer, ViTConfig, ViTImageProcessor, ViTModel,
                              Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model)

    torch.manual_seed(0)
    out = {k: root / k for k in ("vit", "w2v", "bert")}
    big = {"initializer_range": 0.5}  # each block changes the hidden state a lot: layers are told apart
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, **big)).save_pretrained(out["vit"])
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out["vit"])
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                                 num_conv_pos_embedding_groups=4, **big)).save_pretrained(out["w2v"])
    Wav2Vec2FeatureExtractor(sampling_rate=8000, return_attention_mask=False).save_pretrained(out["w2v"])
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, **big)).save_pretrained(out["bert"])
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(out["bert"])
    return out


def extractors(models: dict) -> dict:
    return {"vit": {"modality": "video", "model": str(models["vit"]), "layers": [1, 2], "frames_per_tr": 3,
                    "context_s": 0.5, "batch_size": 4, "segment_trs": 4, "chunk_trs": 4},
            "w2v": {"modality": "audio", "model": str(models["w2v"]), "layers": [2], "context_s": 1.0,
                    "batch_size": 3, "out_dtype": "float16"},
            "bert": {"modality": "text", "model": str(models["bert"]), "layers": [0, 2], "context_words": 3,
                     "pooling": "last"}}


@pytest.fixture(scope="module")
def cluster():
    """An in-process Dask cluster (threads): builds skip worker start-up and imports."""
    from conftest import inproc_scheduler

    return inproc_scheduler()


def build(config, scheduler, *overrides):
    return engine.run(load_config(config, overrides), only=["video", "fmri", "features"], scheduler=scheduler,
                      progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def study(tmp_path_factory, models, cluster):
    """1 subject x 8 TRs; a 48x32 movie at 10 fps with sound; a Sherlock-layout sheet; built once."""
    root = tmp_path_factory.mktemp("pretrained_study")
    config = make_study(root, n_subjects=1, n_trs=8, shape=(8, 10, 6), seed=4, fps=10, movie_size=(48, 32),
                        stages={"fmri": {"mask_strategy": "background"}, "features": extractors(models)})
    report = build(config, cluster)
    return config, report, giblet.open_store(report.store)


# -- through the engine ------------------------------------------------------------------------------------
def test_round_trip_arrays_meta_and_their_docs(study, models):
    config, report, s = study
    assert sorted(report.ran) == ["features/bert/run-1", "features/vit/run-1", "features/w2v/run-1", "fmri/mask",
                                  "fmri/sub-01/run-1", "video/run-1"]
    assert s.feature_names() == ["features/bert/layer-0", "features/bert/layer-2", "features/vit/layer-1",
                                 "features/vit/layer-2", "features/w2v/layer-2"]
    n_video = s.unit_meta("video/run-1")["n_trs"]
    assert s.align["runs"]["run-1"]["n_trs_by_unit"] == {"video/run-1": n_video}  # features never decide the grid
    for name, dtype in (("vit", "float32"), ("w2v", "float16"), ("bert", "float32")):
        meta = s.unit_meta(f"features/{name}/run-1")
        assert meta["stored_trs"] == n_video and meta["model_hash"] == hash_tree(models[name])
        for k in meta["layers"]:
            arr = s.array(f"stimuli/run-1/features/{name}/layer-{k}")
            assert arr.shape == (n_video, 32) and arr.dtype == dtype
            assert arr.metadata.dimension_names == ("tr", "embedding")
            assert arr.attrs["layer"] == k and arr.attrs["model_hash"] == meta["model_hash"] and arr.attrs["rule"]
        assert s.feature(f"features/{name}/layer-{meta['layers'][0]}").shape == (s.n_trs(), 32)
        undocumented = [k for k in meta if f"`{k}`" not in STORE_MD[STORE_MD.index("## Pretrained features"):]]
        assert not undocumented, undocumented
    assert s.array("stimuli/run-1/features/vit/layer-1").chunks == (4, 32)
    assert s.unit_meta("features/vit/run-1")["n_tasks"] == 3  # segment_trs=4 over 10 TRs
    assert s.unit_meta("features/vit/run-1")["preprocess"] == "torch"  # ViT's processor, reproduced in torch
    assert s.unit_meta("features/w2v/run-1")["preprocess"] == "processor"
    rows = {}
    for name in (a for a in s._arrays if "/features/" in a):  # every array the stage writes: its row, its dims
        doc = re.sub(r"^stimuli/[^/]+/features/[^/]+/layer-\d+$", "stimuli/<run>/features/<name>/layer-<k>", name)
        doc = re.sub(r"^stimuli/[^/]+/features/[^/]+/", "stimuli/<run>/features/<name>/", doc)
        rows[doc] = next(ln for ln in STORE_MD.splitlines() if ln.startswith(f"| `{doc}`"))
        dims = tuple(s.array(name).metadata.dimension_names)
        assert f"({', '.join(dims)}{',' if len(dims) == 1 else ''})" in rows[doc], (doc, dims)
    tabled = set(re.findall(r"^\| `(stimuli/<run>/features/[^`]+)`", STORE_MD, re.M))
    assert tabled == set(rows), tabled ^ set(rows)  # and the docs name no array the stage does not write
    ds = s.to_xarray()  # every layer its own width dimension (models and layers differ)
    assert ds["features_w2v_layer-2"].dims == ("tr", "features_w2v_layer-2_embedding")
    from giblet.verify import verify_store

    assert verify_store(report.store) == []


def test_rerun_is_a_cache_hit_and_a_changed_layer_rebuilds_only_its_extractor(study, cluster, tmp_path):
    config, _, s = study
    shutil.copytree(config.parent, tmp_path / "copy")
    copy = tmp_path / "copy" / config.name
    assert build(copy, cluster).ran == []
    assert build(copy, cluster, "features.vit.device=cpu", "features.vit.batch_size=1").ran == []  # how, not what
    before = {k: e["fingerprint"] for k, e in giblet.open_store(s.path).manifest["units"].items()}
    report = build(copy, cluster, "features.vit.layers=[2, 0]")
    assert report.ran == ["features/vit/run-1"]
    t = giblet.open_store(report.store)
    assert {k: e["fingerprint"] for k, e in t.manifest["units"].items() if k != "features/vit/run-1"} == \
           {k: v for k, v in before.items() if k != "features/vit/run-1"}
    assert [n for n in t.feature_names() if "vit" in n] == ["features/vit/layer-0", "features/vit/layer-2"]
    np.testing.assert_array_equal(t.feature("features/vit/layer-2"), s.feature("features/vit/layer-2"))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _direct(path: Path, inputs: dict, cls) -> tuple:
    net = cls.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return net(**inputs, output_hidden_states=True).hidden_states


def test_video_features_equal_a_direct_forward(study, models):
    from transformers import ViTImageProcessor, ViTModel

    config, _, s = study
    movie = str(config.parent / "movie.mp4")
    n = s.unit_meta("features/vit/run-1")["stored_trs"]
    times = [(m + Fraction(1, 2)) * Fraction(3, 2) / 3 for m in range(3 * n)]  # 3 slots per TR, onset 0
    images = list(V._rgb(movie, times, None))  # 48x32 frames are below the processor's 32-pixel edge: kept whole
    assert images[0].shape == (32, 48, 3)
    states = _direct(models["vit"], ViTImageProcessor.from_pretrained(models["vit"])(images, return_tensors="pt"),
                     ViTModel)
    want = {}
    for k in (0, 1, 2):
        per_frame = states[k].mean(1).numpy()  # mean over tokens
        context = 1  # round(0.5 s * 3 / 1.5 s) slot before each TR's own
        want[k] = np.stack([per_frame[max(0, 3 * i - context):3 * i + 3].mean(0) for i in range(n)])
    for k in (1, 2):  # the hidden state asked for, not a neighbour
        got = s.array(f"stimuli/run-1/features/vit/layer-{k}")[...]
        assert _cos(got, want[k]).min() > COS and _cos(got, want[k - 1]).mean() < 0.99


def test_audio_features_equal_a_direct_forward(study, models):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config, _, s = study
    wave, _ = audio_stage.read_waveform(str(config.parent / "movie.mp4"), "movie", 8000, 0.0)
    n = s.unit_meta("features/w2v/run-1")["stored_trs"]
    ctx, own = 8000, 12000  # 1 s of context, 1.5 s TR at 8 kHz
    padded = np.concatenate([np.zeros(ctx, np.float32), wave, np.zeros(own * n, np.float32)])
    windows = [padded[i * own:i * own + ctx + own] for i in range(n)]  # TR i's window starts at i * own - ctx
    inputs = Wav2Vec2FeatureExtractor.from_pretrained(models["w2v"])(windows, sampling_rate=8000, return_tensors="pt")
    states = _direct(models["w2v"], inputs, Wav2Vec2Model)
    centres = (np.arange(states[2].shape[1]) + 0.5) * 2.5 / states[2].shape[1]
    own = (centres >= 1.0) & (centres < 2.5)  # the TR's 1.5 s after 1 s of context
    got = s.array("stimuli/run-1/features/w2v/layer-2")[...].astype(np.float32)
    assert _cos(got, states[2][:, own].mean(1).numpy()).min() > COS
    assert _cos(got, states[1][:, own].mean(1).numpy()).mean() < 0.99  # the layer asked for
    assert _cos(got, states[2][:, ~own].mean(1).numpy()).mean() < 0.99  # the TR's frames, not the context's


def _sheet_words(s, config):
    cfg = load_config(config)
    t = cfg.text
    rows = sheet.read_rows(cfg.input_path(cfg.study_runs["run-1"].annotations), t.start_column, t.end_column,
                           list(t.columns), time_unit=t.time_unit, tr_s=TR)
    words, times = [], []
    for start, end, text in zip(rows.start, rows.end, rows.text):  # the documented spreading rule
        w = text.split()
        words += w
        times += [start + j * (end - start) / len(w) for j in range(len(w))]
    order = np.argsort(times, kind="stable")
    return [words[i] for i in order], np.floor(np.array(times)[order] / TR).astype(int)


def test_text_features_equal_a_direct_forward(study, models):
    from transformers import AutoTokenizer, BertModel

    config, _, s = study
    words, trs = _sheet_words(s, config)
    n = s.unit_meta("features/bert/run-1")["stored_trs"]
    tok = AutoTokenizer.from_pretrained(models["bert"])
    has = s.array("stimuli/run-1/features/bert/has_words")[...]
    assert has.tolist() == [bool((trs == i).any()) for i in range(n)] and not has.all()  # the sheet has a gap
    for i in np.flatnonzero(has):
        own = np.flatnonzero(trs == i)
        context = " ".join(words[max(0, own[0] - 3):own[0]])
        text = (context + " " if context else "") + " ".join(words[own[0]:own[-1] + 1])
        enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0].numpy()
        last = np.flatnonzero((offsets[:, 1] > offsets[:, 0]) & (offsets[:, 0] >= len(context) + bool(context)))[-1]
        states = _direct(models["bert"], enc, BertModel)
        for k in (0, 2):
            got = s.array(f"stimuli/run-1/features/bert/layer-{k}")[i]
            assert _cos(got, states[k][0, last].numpy()) > COS, (i, k)
            assert _cos(got, states[1][0, last].numpy()) < 0.99, (i, k)  # the layer asked for
    assert not s.array("stimuli/run-1/features/bert/layer-0")[...][~has].any()  # no words: zeros


# -- TR alignment with planted impulses (the task functions, no engine) ------------------------------------
def _write_wav(path: Path, wave: np.ndarray, rate: int) -> None:
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("pcm_f32le", rate=rate)
        st.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in list(st.encode(frame)) + list(st.encode(None)):
            out.mux(packet)


def _parts(staging: Path, name: str) -> np.ndarray:
    return np.concatenate([np.load(p / f"{name}.npy") for p in sorted((staging / "parts").iterdir())])


def test_an_audio_click_lands_in_its_tr_and_in_the_next_ones_context(models, tmp_path):
    wav, rate = tmp_path / "click.wav", 8000
    wave = np.zeros(int(9.0 * rate), np.float32)
    wave[int(4.4 * rate):int(4.4 * rate) + 40] = 0.9  # t = 4.4 s: TR 2 is [3.0, 4.5)
    _write_wav(wav, wave, rate)
    kw = dict(where="features.w2v", source=str(wav), source_key="audio", source_fp="click", n_trs_movie=None,
              model=str(models["w2v"]), model_fp="w2v", device="cpu", dtype="float32", layers=[2], pooling="mean",
              tr_s=TR, onset_s=0.0, batch_size=4, out_dtype="float32", tr0=0, tr1=100)
    moved = []
    for context_s in (0.0, 1.0):
        staging = tmp_path / f"context-{context_s}"
        rec = A.extract_audio(staging=str(staging), context_s=context_s, **kw)
        feats = _parts(staging, "layer-2")
        assert rec["n_trs"] == 6 == len(feats)  # ceil(9.0 s / 1.5 s)
        moved.append(np.flatnonzero(np.abs(feats - feats[0]).max(1) > 1e-5).tolist())  # vs TR 0: silence only
    assert moved == [[2], [2, 3]]  # its own TR; with 1 s of context, TR 3's window [3.5, 6.0) holds it too


def test_a_word_lands_in_its_tr_with_its_context(models, tmp_path):
    csv = tmp_path / "words.csv"
    csv.write_text("start,end,text\n0.0,1.0,the man\n1.4,3.0,walks into the room\n6.1,6.5,dog\n")
    rec = T.prepare_words(tmp_path, str(csv), "start", "end", ["text"], "s", False, TR, 0.0, 9.0, None, 0)
    assert rec["tr"] == [0, 0, 0, 1, 1, 1, 4] and rec["n_trs"] == 6  # "walks" at 1.4 s, "into" at 1.8 s
    items = T.tr_inputs(rec["words"], np.array(rec["tr"]), 6, context_words=2)
    assert items == [(0, "the man walks", 0), (1, "man walks into the room", 10), (4, "the room dog", 9)]
    T.extract_text(str(tmp_path), "features.bert", str(models["bert"]), "bert", "cpu", "float32", [2], "mean",
                   context_words=2, batch_size=2, out_dtype="float32")
    has, feats = _parts(tmp_path, "has_words"), _parts(tmp_path, "layer-2")
    assert has.tolist() == [True, True, False, False, True, False]
    assert feats[4].any() and not feats[[2, 3, 5]].any()


def test_video_slots_take_the_frame_on_screen(tmp_path):
    import av

    path, fps = tmp_path / "grey.mp4", 10
    with av.open(str(path), "w") as out:  # frame k is flat grey 5 k: its index is readable after decoding
        st = out.add_stream("libx264", rate=fps, options={"qp": "10", "g": "5",
                                                          "x264-params": "b-adapt=0:b-pyramid=0:scenecut=0"})
        st.width, st.height, st.pix_fmt = 32, 32, "yuv444p"
        st.codec_context.max_b_frames = 2  # B-frames no frame refers to: the ones a reader may skip
        for k in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 5 * k, np.uint8), format="rgb24")
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    slots, times = V.slot_times(1, 3, TR, 0.2, frames_per_tr=2, context=1)
    assert slots.tolist() == [1, 2, 3, 4, 5] and times == [Fraction(x, 40) for x in (53, 83, 113, 143, 173)]
    index = [round(img.mean() / 5) for img in V._rgb(str(path), times, None)]
    assert index == [int(t * fps) for t in times]  # the last frame presented at or before each slot
    from giblet.features.video import _frames_from

    # frames on screen at no slot and referred to by none (B-frames) are not decoded, and change nothing above
    decoded = [sum(1 for _ in _frames_from(path, times[0], wanted)) for wanted in (None, V.shown(str(path), times))]
    assert decoded[1] < decoded[0]
    on_b = [Fraction(23, 20), Fraction(5, 4), Fraction(13, 5)]  # frames 11, 12, 26: B-frames (I B B P P ...)
    assert [round(img.mean() / 5) for img in V._rgb(str(path), on_b, None)] == [11, 12, 26]
    # TR 1 pools slots {1, 2, 3} (one of context), TR 2 slots {3, 4, 5}
    assert V.tr_means(np.arange(5.0)[:, None], slots, 1, 3, 2, 1)[:, 0].tolist() == [1.0, 3.0]


def test_torch_preprocessing_agrees_with_the_image_processor_and_falls_back(models, caplog):
    from transformers import CLIPImageProcessor, ConvNextImageProcessor, ViTImageProcessor, ViTModel

    from giblet.features.pretrained import imageprep as IP

    rng = np.random.default_rng(3)  # smooth 90x120 frames (15x20 noise upscaled), downscaled by both paths
    noise = torch.from_numpy(rng.uniform(0, 255, (4, 3, 15, 20)).astype(np.float32))
    up = torch.nn.functional.interpolate(noise, size=(90, 120), mode="bilinear", align_corners=False)
    frames = list(up.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy())
    vit = ViTImageProcessor.from_pretrained(models["vit"])
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})  # bicubic, crop
    for processor in (vit, clip):
        want = _direct(models["vit"], processor(frames, return_tensors="pt"), ViTModel)
        got = _direct(models["vit"], IP.prepare(frames, IP.spec_of(processor), "cpu"), ViTModel)
        for k in (1, 2):
            assert _cos(got[k].mean(1).numpy(), want[k].mean(1).numpy()).min() > COS, (type(processor).__name__, k)
    convnext = ConvNextImageProcessor(size={"shortest_edge": 32})  # crop_pct resizing: not reproduced
    assert IP.spec_of(convnext) is None
    with caplog.at_level("INFO", logger=V.__name__):
        specs = [V.preprocess_spec(convnext, "features.cnx") for _ in range(2)]
    ours = [r.getMessage() for r in caplog.records if r.name == V.__name__]
    assert specs == [None, None] and len(ours) == 1 and "ConvNextImageProcessor" in ours[0]  # logged once
    used = set()
    times = [Fraction(1, 4)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(V, "_rgb", lambda path, t, edge: iter(frames[:1]))
        (batch,) = V._batches("unused.mp4", times, convnext, 4, "cpu", None, used)
    assert used == {IP.PROCESSOR} and torch.equal(batch["pixel_values"], convnext(frames[:1], return_tensors="pt")
                                                  ["pixel_values"])


def test_whisper_log_mel_in_torch_agrees_with_the_extractor(tmp_path):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    net = WhisperModel(WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                     num_mel_bins=80)).get_encoder().eval()
    fe = WhisperFeatureExtractor(feature_size=80)
    assert A.on_device_logmel(fe)
    w = (np.random.default_rng(5).standard_normal((2, 40000)) * np.linspace(0, 0.3, 40000)).astype(np.float32)
    want = fe(list(w), sampling_rate=16000, return_tensors="pt")["input_features"]
    got = A.whisper_logmel(fe, w, "cpu")["input_features"]
    assert got.shape == want.shape == (2, 80, 3000)
    with torch.no_grad():
        a, b = (net(input_features=x, output_hidden_states=True).hidden_states[1] for x in (want, got))
    assert _cos(b.mean(1).numpy(), a.mean(1).numpy()).min() > COS


def test_an_out_of_memory_batch_is_split_and_later_batches_stay_small():
    seen = []

    def forward(inputs):  # a GPU with room for 2 rows
        seen.append(len(inputs["x"]))
        if len(inputs["x"]) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [inputs["x"].numpy() * 2]

    run = M.SplitOnOOM(forward, "cuda")
    assert run({"x": torch.arange(5.0)})[0].tolist() == [0, 2, 4, 6, 8] and seen == [5, 2, 2, 1]
    assert run({"x": torch.arange(3.0)})[0].tolist() == [0, 2, 4] and seen[4:] == [2, 1]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # on CPU memory errors are not retried
        M.SplitOnOOM(forward, "cpu")({"x": torch.arange(5.0)})

    def broken():
        yield 1
        raise ValueError("decoding failed")

    with pytest.raises(ValueError, match="decoding failed"):  # the prefetch thread's error reaches the task
        list(M.prefetch(broken()))


# -- readers: dataset, trainer inputs, ridge ----------------------------------------------------------------
def test_dataset_model_and_ridge_take_stored_layers(study):
    from giblet.data import GibletDataset
    from giblet.evaluation.features import FeatureParams, store_features
    from giblet.hrf import hrf_convolve
    from giblet.models.autoencoder import AutoencoderConfig, GibletAutoencoder, ModelSpec, finish_batch

    _, _, s = study
    specs = ["features/vit/layer-2", "features/bert/layer-0"]
    ds = GibletDataset(s.path, "all", features=specs, hrf=True, normalize=True, window=1)
    assert ds.modalities == ("fmri", "video", "features") and ds.sample_spec()["features"][0] == (2, 64)
    mask = s.feature_mask(specs[1])
    z = [np.where(m[:, None], (s.feature(f) - s.feature_stats(f)[0]) / s.feature_stats(f)[1], 0)
         for f, m in ((specs[0], np.ones_like(mask)), (specs[1], mask))]
    want = np.concatenate([hrf_convolve(x.astype(np.float32), s.tr_s) for x in z], axis=1)
    sample = ds[5]
    np.testing.assert_allclose(sample["features"].numpy(), want[4:6], rtol=1e-4, atol=1e-5)
    assert sample["features_mask"].tolist() == [[True, bool(mask[4])], [True, bool(mask[5])]]
    with pytest.raises(ModalityMissingError, match=r"\[.run-1.\] do not store features/vit/layer-9 \(stored: "):
        GibletDataset(s.path, "all", features=["features/vit/layer-9"])

    spec = ModelSpec(n_voxels=s.n_voxels, window=1, features=(32, 32))
    out = GibletAutoencoder(AutoencoderConfig(d_model=16, n_heads=2, d_bottleneck=8), spec)(
        finish_batch(ds.get_batch([2, 3])))
    assert out["recon_features"].shape == (2, 64)

    f = store_features(s, FeatureParams(arrays=tuple(specs), delays=(1, 2)))
    assert list(f.bands) == specs and f.n_features == 2 * 64


# -- errors ------------------------------------------------------------------------------------------------
def test_weights_are_never_downloaded_and_configs_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    offline = r"'nobody/no-such-model' is neither a directory nor a repo in the offline.*never downloads.*HF_HUB_OFF"
    with pytest.raises(InputMissingError, match=r"features.clip.model: " + offline):
        M.resolve_model("features.clip.model", "nobody/no-such-model", tmp_path, hash_tree)
    with pytest.raises(InputMissingError, match="does not exist; save the model and its processor with save_pretra"):
        M.resolve_model("features.clip.model", "./weights/clip", tmp_path, hash_tree)
    inputs = {"inputs": {"movie": "m.mp4"}}
    bad = {"clip": {"modality": "image", "layers": [-1]}, "bert": {"modality": "text", "model": "x", "layers": [1],
                                                                   "pooling": "cls", "context_s": 2.0}}
    with pytest.raises(ConfigError) as err:
        parse_config({**inputs, "features": bad})
    msg = str(err.value)
    for part in ("features.clip.modality: must be one of video, audio, text", "features.clip.model: not set",
                 "features.clip.layers: must be a non-empty list", "features.bert.context_s: only audio and video"):
        assert part in msg, msg
    ok = parse_config({**inputs, "features": {"clip": {"modality": "video", "model": "x", "layers": [3]}}})
    assert ok.features["clip"].pooling is None and ok.features["clip"].out_dtype == "float32"
    import yaml

    section = STORE_MD[STORE_MD.index("## Pretrained features"):]
    documented = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))  # the docs' example
    assert parse_config({**inputs, **documented}).features["clip"].layers == [6, 12]
