"""Text stage: annotation rows -> per-TR embeddings, on the real Sherlock file and synthetic rows."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

import giblet
from giblet import synth
from giblet.config import load_config, parse_config
from giblet.errors import ConfigError, InputError, InputMissingError
from giblet.features import text
from giblet.fingerprint import FileHashCache, hash_tree
from giblet.verify import _check_text, verify_store
from pipelines import engine
from pipelines.units import PlanContext
from pipelines.status import status_lines
from tests.conftest import REAL_XLSX

MODEL = text.default_model_path()
TR_COLS = ("Start Time (TRs, 1.5s)", "End Time (TRs, 1.5s)")
DETAILS = "Scene Details - A Level"


@pytest.fixture(scope="session")
def encoder():
    return text.SentenceEncoder(MODEL, "cpu")


@pytest.fixture(scope="session")
def reference():
    """The model as sentence-transformers runs it: the independent reference."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MODEL), device="cpu")
    return lambda strings: st.encode(list(strings), convert_to_numpy=True)


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def real_sheet() -> pd.DataFrame:
    return text.read_table(REAL_XLSX)  # header spaces stripped


# -- the real spreadsheet ------------------------------------------------------------------
def test_real_file_in_seconds_is_refused_because_its_clock_restarts():
    """The file holds both Sherlock runs: 'Start Time (s)' restarts at 0 for run 2 (row 484),
    while the TR columns run on (947 ...). Read as one run, overlaying both on one axis would be
    wrong; the fix named is a `runs:` block (tests/test_runs.py builds the two-run study)."""
    with pytest.raises(InputError, match=r"row 491 starts at 39, before row 483 \(1420\).*give the study a `runs:` "
                                         r"block"):
        text.read_rows(REAL_XLSX, "Start Time (s)", "End Time (s)", [DETAILS])


def test_real_file_counts_in_seconds_and_in_trs():
    sec = text.read_rows(REAL_XLSX, "Start Time (s) ", "End Time (s) ", [DETAILS], allow_unsorted=True)
    # rows 484-490 repeat rows 2-8 (the cartoon before each run) with the same times and text
    assert sec.counts == {"n_rows": 1000, "n_untimed": 0, "n_empty_text": 0, "n_duplicates": 7, "n_zero_length": 1}
    assert sec.sheet_row[:3] == [2, 3, 4] and 484 not in sec.sheet_row and 491 in sec.sheet_row
    trs = text.read_rows(REAL_XLSX, *TR_COLS, [DETAILS], time_unit="tr")
    assert trs.counts == {"n_rows": 1000, "n_untimed": 2, "n_empty_text": 0, "n_duplicates": 0, "n_zero_length": 0}
    assert (trs.start[0], trs.end[0], trs.start[1]) == (0.0, 12.0, 12.0)  # TRs 1-8 -> [0, 12) s
    grid = text.clip_to_grid(trs, 1.5, 0.0, None, "x")
    assert grid.n_trs == 1976 and grid.counts["n_past_end"] == 0  # both runs, as in the Sherlock fMRI data
    assert max(trs.end) == 1976 * 1.5


@pytest.fixture(scope="module")
def real_study(tmp_path_factory):
    """A synthetic fMRI study (1 subject, 24 TRs) + the real spreadsheet + a 30 s movie."""
    root = tmp_path_factory.mktemp("real_text")
    config = synth.make_study(root, n_subjects=1, n_trs=24, shape=(10, 12, 8), movie=False, annotations=False,
                              seed=3, stages={"audio": {"model": "random"}})
    shutil.copy(REAL_XLSX, root / "sherlock.xlsx")
    rng = np.random.default_rng(0)
    synth.write_movie(root / "movie.mp4", synth.scenes(30.0, rng), 30.0, size=(64, 36), fps=10, rng=rng)
    raw = yaml.safe_load(config.read_text())
    raw["inputs"].update(annotations="sherlock.xlsx", movie="movie.mp4")
    raw["text"] = {"start_column": TR_COLS[0], "end_column": TR_COLS[1], "time_unit": "tr", "device": "cpu"}
    config.write_text(yaml.safe_dump(raw))
    return config


def build(config, *overrides):
    return engine.run(load_config(config, overrides), only=["fmri", "text"], progress=False)  # in-process: small


def test_real_file_end_to_end_cache_and_column_change(real_study, reference):
    report = build(real_study)
    assert sorted(report.ran) == ["fmri/mask", "fmri/sub-01/run-1", "text/run-1"]
    s = giblet.open_store(report.store)
    meta = s.unit_meta("text/run-1")
    assert meta["n_trs"] == 20 and s.n_trs() == 20  # 30 s movie / 1.5 s; the fMRI run has 24
    assert s.n_trs("run-1", "sub-01") == 20  # the subject serves min(24 BOLD TRs, 20 stimulus TRs)
    assert (meta["n_rows"], meta["n_untimed"], meta["n_duplicates"]) == (1000, 2, 0)
    # 6 timed rows start inside the movie (TRs 1, 9, 11, 12, 16, 20); the other 992 start after it
    assert (meta["n_used_rows"], meta["n_past_end"], meta["n_distinct_strings"]) == (6, 992, 6)
    assert meta["n_uncovered_trs"] == 0 and meta["model_hash"] == hash_tree(MODEL)
    emb, has = s.text(), s.has_text()
    assert emb.shape == (20, 384) and emb.dtype == np.float32 and has.all()
    details = real_sheet()[DETAILS].str.strip()
    ref = reference([details[0], details[1]])
    # TR 0 (0-1.5 s) is covered only by segment 1 (TRs 1-8), so it is segment 1's embedding
    assert cosine(emb[0], ref[0]) > 0.999 and cosine(emb[7], ref[0]) > 0.999
    assert cosine(emb[8], ref[1]) > 0.999  # segment 2 covers TRs 9-10
    assert s.split["train"] == {"run-1": (0, 16)}  # n_val = floor(0.2 * 20 + 1/2) = 4
    mean, std = s.text_stats()  # over the training TRs that have text: all 16 here
    np.testing.assert_allclose(mean, emb[:16].mean(0), atol=1e-6)
    np.testing.assert_allclose(std, emb[:16].std(0), atol=1e-6)
    assert verify_store(report.store) == []

    assert build(real_study).ran == []  # cache hit
    # a new column list makes the text unit, and only it, stale (what the engine rebuilds)
    cfg = load_config(real_study, [f"text.columns=['{DETAILS}', 'Name - All']"])
    lines, done = status_lines(cfg, engine.plan_for(cfg)[1])
    state = {ln.split()[0]: ln.split()[1] for ln in lines}
    assert not done and [key for key, v in state.items() if v == "stale"] == ["text/run-1"]
    assert "parameter columns" in next(ln for ln in lines if ln.startswith("text/run-1"))
    assert state["fmri/sub-01/run-1"] == "stale?"  # undecided until text/run-1 is built: it sets the TRs served
    assert build(real_study, f"text.columns=['{DETAILS}', 'Name - All']").ran == ["text/run-1"]  # still 20 TRs
    # verify's text invariant: a TR marked uncovered must be a zero row under fill=zeros
    zarr.open_array(str(report.store / "stimuli/run-1/text/has_text"), mode="r+")[:] = np.arange(20) != 3
    assert any("stimuli/run-1/text/has_text: chunk" in p and "checksum mismatch" in p
               for p in verify_store(report.store))
    problems = _check_text(giblet.open_store(report.store), "run-1")  # the invariants, past the checksum failure
    assert any("TR 3 has no text (has_text False) but a non-zero row" in p for p in problems)
    assert any("manifest counts 0 uncovered TRs, has_text has 1" in p for p in problems)


def test_encoder_matches_sentence_transformers(encoder, reference):
    strings = ["Sherlock looks at John.", "  A cab drives through London at night.  ", "x", "word " * 400]
    mine, ref = encoder.encode(strings, batch_size=2), reference(strings)
    assert mine.shape == (4, 384) and mine.dtype == np.float32
    assert min(cosine(a, b) for a, b in zip(mine, ref)) > 0.9999  # incl. stripping and truncation at 256 tokens
    np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-5)  # the Normalize module


# -- synthetic rows: the overlap rule, exactly -------------------------------------------------
ROWS = [  # start, end (seconds), text; tr_s 1.5, onset_s 0.5: TR i is [0.5 + 1.5 i, 2 + 1.5 i)
    (0.0, 0.5, "Before the scan."),               # ends at onset_s: covers nothing
    (0.5, 2.0, "Sherlock plays the violin."),     # TR 0, 1.5 s
    (1.25, 3.5, "John reads the newspaper."),     # TR 0 0.75 s, TR 1 1.5 s
    (1.25, 3.5, "John reads the newspaper."),     # exact duplicate: dropped
    (6.5, 7.1, "A cab stops outside."),           # TR 4, 0.6 s; TRs 2-3 uncovered
    (7.1, 7.1, "An instant."),                    # zero length: dropped
]


def write_rows(path, rows, sep=","):
    pd.DataFrame(rows, columns=["Start Time (s) ", " End Time (s)", "Scene Details - A Level "]).to_csv(
        path, sep=sep, index=False)
    return path


def synthetic(tmp_path, stimulus_end=None, rows=ROWS):
    r = text.read_rows(write_rows(tmp_path / "a.csv", rows), "Start Time (s)", "End Time (s)", [DETAILS])
    return text.clip_to_grid(r, 1.5, 0.5, stimulus_end, "a.csv")


def test_coverage_is_the_overlap_in_seconds(tmp_path):
    rows = synthetic(tmp_path)
    assert rows.n_trs == 5 and rows.counts["n_duplicates"] == 1 and rows.counts["n_zero_length"] == 1
    assert rows.counts["n_before_onset"] == 1 and rows.counts["n_past_end"] == 0
    row, tr, sec = text.coverage(np.array(rows.start), np.array(rows.end), 1.5, 0.5, rows.n_trs)
    assert list(zip(row.tolist(), tr.tolist())) == [(0, 0), (1, 0), (1, 1), (2, 4)]
    np.testing.assert_allclose(sec, [1.5, 0.75, 1.5, 0.6])


def test_mean_is_overlap_weighted_and_gaps_are_marked(tmp_path, encoder):
    rows = synthetic(tmp_path)
    e = dict(zip(rows.text, encoder.encode(rows.text)))
    emb, has, n = text.assemble(rows, 1.5, 0.5, "mean", encoder.encode)
    assert has.tolist() == [True, True, False, False, True] and n == 3
    a, b, c = (e[t] for t in rows.text)
    np.testing.assert_allclose(emb[0], (1.5 * a + 0.75 * b) / 2.25, atol=1e-6)
    np.testing.assert_allclose(emb[[1, 4]], [b, c], atol=1e-6)
    assert (emb[2:4] == 0).all()
    filled = text.fill_gaps(emb, has, "ffill")
    np.testing.assert_array_equal(filled[2], emb[1])
    np.testing.assert_array_equal(filled[3], emb[1])
    assert text.fill_gaps(emb, has, "zeros") is emb
    mean, std = text.covered_stats(filled[:4], has[:4])  # TRs 0-3 (training), of which 0 and 1 have text
    np.testing.assert_allclose(mean, emb[:2].mean(0), atol=1e-6)
    np.testing.assert_allclose(std, emb[:2].std(0), atol=1e-6)


def test_concat_embeds_the_joined_text_of_each_tr(tmp_path, encoder):
    rows = synthetic(tmp_path)
    emb, has, n = text.assemble(rows, 1.5, 0.5, "concat", encoder.encode)
    joined = "Sherlock plays the violin. John reads the newspaper."
    ref = encoder.encode([joined, "John reads the newspaper."])
    np.testing.assert_allclose(emb[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(emb[1], ref[1], atol=1e-5)
    assert n == 3 and has.tolist() == [True, True, False, False, True]


def test_movie_end_fixes_the_grid_and_rows_past_it_are_counted(tmp_path):
    rows = ROWS + [(8.0, 9.0, "Credits.")]  # starts at the end of the 5th whole TR
    got = synthetic(tmp_path, stimulus_end=8.9, rows=rows)  # floor((8.9 - 0.5) / 1.5) = 5 whole TRs
    assert got.n_trs == 5 and got.counts["n_past_end"] == 1 and "Credits." not in got.text
    movie = tmp_path / "m.mp4"
    synth.write_movie(movie, synth.scenes(6.0, np.random.default_rng(1)), 6.0, size=(32, 18), fps=10, audio=False)
    assert text.stimulus_duration(movie) == pytest.approx(6.0, abs=0.01)


def test_tsv_and_tr_units(tmp_path):
    path = tmp_path / "a.tsv"
    pd.DataFrame({"from": [1, 3], "to": [2, 3], "what": ["one", "two"], "who": ["", "Sherlock"]}).to_csv(
        path, sep="\t", index=False)
    rows = text.read_rows(path, "from", "to", ["what", "who"], time_unit="tr", tr_s=2.0)
    assert rows.start == [0.0, 4.0] and rows.end == [4.0, 6.0] and rows.text == ["one", "two; Sherlock"]


# -- bad inputs -----------------------------------------------------------------------------
@pytest.mark.parametrize("rows, kw, match", [
    ([(0, 1, "a")], {"columns": ["Scene Details"]},
     r"no column 'Scene Details' \(text.columns\); did you mean 'Scene Details - A Level'\? its columns are: "
     r"'Start Time \(s\)', 'End Time \(s\)', 'Scene Details - A Level'"),
    ([(0, 1, "a")], {"start_column": "Start"}, "no column 'Start' .text.start_column"),
    ([(0, "1:23", "a")], {}, r"row 2, column 'End Time \(s\)': '1:23' is not a number"),
    ([(0, 1, "a"), (-2, 1, "b")], {}, r"row 3, column 'Start Time \(s\)': -2 is negative"),
    ([(5, 3, "a")], {}, r"row 2: end 3 < start 5"),
    ([(5, None, "a")], {}, "row 2 has a start time but no end time"),
    ([(5, 6, "a"), (2, 3, "b")], {}, r"row 3 starts at 2, before row 2 \(5\).*allow_unsorted"),
    ([(None, None, "a")], {}, "no usable row"),
])
def test_bad_rows_fail_in_one_line(tmp_path, rows, kw, match):
    args = {"start_column": "Start Time (s)", "end_column": "End Time (s)", "columns": [DETAILS], **kw}
    with pytest.raises(InputError, match=match) as err:
        r = text.read_rows(write_rows(tmp_path / "a.csv", rows), args.pop("start_column"), args.pop("end_column"),
                           args.pop("columns"), **args)
        text.clip_to_grid(r, 1.5, 0.0, None, "a.csv")
    assert "\n" not in str(err.value)


def test_rows_that_miss_the_grid_fail_before_the_model_loads(tmp_path):
    rows = text.read_rows(write_rows(tmp_path / "a.csv", [(0, 0.5, "a"), (20, 30, "b")]), "Start Time (s)",
                          "End Time (s)", [DETAILS])
    with pytest.raises(InputError, match=r"no row of a.csv falls within the 5 TRs .7.5 s after onset_s=0.5.*"
                                         r"'n_past_end': 1, 'n_before_onset': 1"):
        text.clip_to_grid(rows, 1.5, 0.5, 8.0, "a.csv")


def test_bad_files_and_models_fail_in_one_line(tmp_path):
    with pytest.raises(InputMissingError, match="does not exist"):
        text.read_table(tmp_path / "nope.xlsx")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(InputError, match="must be .xlsx, .xls, .csv or .tsv"):
        text.read_table(tmp_path / "a.json")
    (tmp_path / "bad.xlsx").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable xlsx table"):
        text.read_table(tmp_path / "bad.xlsx")
    with pytest.raises(InputMissingError, match="is not a folder"):
        text.SentenceEncoder(tmp_path / "no-model")
    broken = tmp_path / "broken"  # a config but no weights
    broken.mkdir()
    shutil.copy(MODEL / "config.json", broken / "config.json")
    with pytest.raises(InputError, match="does not load as a transformers model") as err:
        text.SentenceEncoder(broken, "cpu")
    assert "\n" not in str(err.value)
    odd = tmp_path / "odd"  # checked before any weights load
    (odd / "1_Pooling").mkdir(parents=True)
    shutil.copy(MODEL / "modules.json", odd / "modules.json")
    (odd / "1_Pooling/config.json").write_text('{"pooling_mode_weightedmean_tokens": true}')
    with pytest.raises(InputError, match="pooling .'weightedmean_tokens'. is not supported"):
        text.SentenceEncoder(odd, "cpu")


def test_config_checks_and_model_hash(tmp_path):
    with pytest.raises(ConfigError, match="text.combine: must be mean or concat.*text.fill: must be zeros or ffill"
                                          ".*text.time_unit: must be s"):
        parse_config({"text": {"combine": "sum", "fill": "bfill", "time_unit": "ms"}})
    ctx = PlanContext(cfg=parse_config({"inputs": {"annotations": "a.csv"}}), store=tmp_path,
                      files=FileHashCache(None))
    assert ctx.file_fp(MODEL) == hash_tree(MODEL)  # the text stage's model fingerprint
