"""Bad stimulus inputs and configs through the CLI: exit 1, one line naming the file/stage,
the value and the fix, no traceback -- and no completed array modified.

(The BOLD cases live in test_cli.py; together they make the bad-input suite of issue 8.)
"""
from __future__ import annotations

import shutil

import av
import numpy as np
import pytest
import yaml

from tests.test_cli import _one_line_error, cli, store_arrays


@pytest.fixture(scope="module")
def stim_template(tmp_path_factory):
    from giblet.synth import make_study

    root = tmp_path_factory.mktemp("stim")
    return make_study(root, n_subjects=1, n_trs=12, shape=(10, 12, 8), movie_size=(64, 36), seed=5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A BERT-shaped dir (wrong for EnCodec) and an EnCodec dir (wrong for text)."""
    from transformers import BertConfig, BertModel, EncodecConfig, EncodecModel

    root = tmp_path_factory.mktemp("models")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(root / "bert")
    EncodecModel(EncodecConfig()).save_pretrained(root / "encodec")
    return root


@pytest.fixture(scope="module")
def built(stim_template, tmp_path_factory):
    """The study with its fMRI store built once (the completed arrays every case protects)."""
    root = tmp_path_factory.mktemp("built_stim")
    shutil.copytree(stim_template.parent, root / "s")
    config = root / "s" / stim_template.name
    raw = yaml.safe_load(config.read_text())
    fmri_only = dict(raw, inputs={"fmri": raw["inputs"]["fmri"]})
    config.write_text(yaml.safe_dump(fmri_only))
    assert cli("run", config).returncode == 0
    return config, raw


@pytest.fixture
def study(built, tmp_path):
    """A private copy of the built study: (config, its full raw config, the arrays to protect)."""
    config, raw = built
    shutil.copytree(config.parent, tmp_path / "s")
    config = tmp_path / "s" / config.name
    return config, yaml.safe_load(yaml.safe_dump(raw)), store_arrays(config.parent / "study.zarr")


def _run_bad(config, raw, before, *overrides, needles=()):
    config.write_text(yaml.safe_dump(raw))
    r = cli("run", config, *overrides)
    _one_line_error(r, *needles)
    after = store_arrays(config.parent / "study.zarr")
    for name, arr in before.items():
        np.testing.assert_array_equal(after[name], arr)


def _audio_only_file(path):
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=24000)
        s.layout = "mono"
        for i in range(20):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 24000, i * 1024
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)


def test_movie_without_video_stream(study):
    config, raw, before = study
    _audio_only_file(config.parent / "sound.mp4")
    raw["inputs"]["movie"] = "sound.mp4"
    _run_bad(config, raw, before, "--only", "video", needles=["sound.mp4", "video"])


def test_movie_without_audio_stream(study, tmp_path):
    from giblet.synth import scenes, write_movie

    config, raw, before = study
    write_movie(config.parent / "silent.mp4", scenes(20, np.random.default_rng(0)), 20.0, (64, 36), audio=False)
    raw["inputs"]["movie"] = "silent.mp4"
    raw["audio"] = {"model": "random"}  # audio asked for: a silent movie is an error, not a skip
    _run_bad(config, raw, before, "--only", "audio", needles=["silent.mp4", "audio"])


def test_truncated_movie(study):
    config, raw, before = study
    data = (config.parent / "movie.mp4").read_bytes()
    (config.parent / "cut.mp4").write_bytes(data[: len(data) // 3])
    raw["inputs"]["movie"] = "cut.mp4"
    _run_bad(config, raw, before, "--only", "video", needles=["cut.mp4"])


@pytest.mark.parametrize("case", ["missing_column", "non_numeric", "negative", "end_before_start"])
def test_bad_annotations(study, case):
    import pandas as pd

    config, raw, before = study
    df = pd.read_excel(config.parent / "annotations.xlsx")
    if case == "missing_column":
        df = df.drop(columns=["Scene Details - A Level "])
    elif case == "non_numeric":
        df["Start Time (s) "] = df["Start Time (s) "].astype(object)
        df.loc[2, "Start Time (s) "] = "soon"
    elif case == "negative":
        df.loc[1, "Start Time (s) "] = -4
    else:
        df.loc[3, "End Time (s) "] = df.loc[3, "Start Time (s) "] - 1
    df.to_excel(config.parent / "bad.xlsx", index=False)
    raw["inputs"]["annotations"] = "bad.xlsx"
    needles = {"missing_column": ["Scene Details - A Level", "Start Time (s)"], "non_numeric": ["soon"],
               "negative": ["-4"], "end_before_start": ["bad.xlsx"]}[case]
    _run_bad(config, raw, before, "--only", "text", needles=["bad.xlsx", *needles])


@pytest.mark.parametrize("case", ["missing", "wrong_architecture"])
def test_bad_encodec_model_dir(study, models, case):
    config, raw, before = study
    raw["audio"] = {"model": str(models / "bert") if case == "wrong_architecture" else str(models / "nope")}
    _run_bad(config, raw, before, "--only", "audio", needles=["audio"])


@pytest.mark.parametrize("case", ["missing", "wrong_architecture"])
def test_bad_text_model_dir(study, models, case):
    config, raw, before = study
    raw["text"] = {"model": str(models / "encodec") if case == "wrong_architecture" else str(models / "nope")}
    _run_bad(config, raw, before, "--only", "text", needles=["text"])


@pytest.mark.parametrize("override,needle", [
    ("videoo.width=10", "did you mean 'video'"),
    ("video.width=wide", "video.width: expected int, got 'wide'"),
    ("fmri.mask_strategy=fancy", "must be epi, background, file or fmriprep"),
    # an override's path is relative to the working directory; '..' may not climb out of it either
    ("output=../../../elsewhere.zarr", "output: '../../../elsewhere.zarr' escapes the working directory via '..'"),
    ("audio.bandwidth=-3", "audio.bandwidth"),
])
def test_bad_config_values(study, override, needle):
    config, raw, before = study
    _run_bad(config, raw, before, override, needles=[needle])
