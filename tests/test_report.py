"""``giblet-preprocess report``: one self-contained HTML page, opened in a real headless Chromium.

Two stores, each made once per module: a two-run study built by the engine from files made
here (``tests/test_runs.py``'s, without its annotation sheet: fMRI and video, a subject
without run 2), and one written directly through ``StoreWriter`` with what the engine study
lacks -- audio codes, annotation coverage with gaps, censored TRs with confounds, zero-variance
voxels, no video -- plus ``giblet-evaluate`` results beside it. The browser test needs
Chromium and its driver from the system package manager (``apt-get install chromium
chromium-driver``) and Selenium (the ``test`` extra); without them it fails, never skips.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from giblet import store as gs
from giblet.fingerprint import hash_obj
from giblet.report import build_report, default_output
from giblet.report.page import Section, figure, png_bytes, render
from tests.test_cli import cli
from tests.test_runs import make_two_runs

CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run")
HAND_SUBJECTS, HAND_RUNS = ("sub-a", "sub-b"), {"movie1": 20, "movie2": 14}
CENSORED = [0, 1, 7]  # of sub-a / movie1


# -- the two stores --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_store(tmp_path_factory) -> tuple[Path, str]:
    """The two-run study, built by the CLI; returns the store and the run's stderr."""
    config = make_two_runs(tmp_path_factory.mktemp("report_two_runs") / "s")
    cfg = yaml.safe_load(config.read_text())
    del cfg["annotations"]  # no text model to load: the hand-made store covers annotations
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = cli("run", config, "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1]), r.stderr


def _unit(writer, key, arrays: dict, meta: dict, params: dict, run=None) -> None:
    staging = writer.staging_dir(key, hash_obj(key))
    for name, (data, dims, attrs) in arrays.items():
        arr = gs.create_array(staging, name, data.shape, str(data.dtype), data.shape, dims, attrs)
        arr[...] = data
    writer.commit(key, {"stage": key.split("/")[0], "version": 1, "fingerprint": hash_obj(key, params),
                        "params": params, "inputs": {}, "deps": [], "meta": meta, "run": run}, staging, list(arrays))


def write_hand_store(path: Path) -> Path:
    """fMRI (2 subjects, 2 runs, sub-b without movie2, censored TRs, 2 zero-variance voxels),
    audio codes and annotations with gaps; no video. Not made by giblet.synth."""
    rng = np.random.default_rng(3)
    shape = (8, 9, 7)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = sum(g ** 2 for g in grid) < 0.8
    n_vox = int(mask.sum())
    writer = gs.StoreWriter(path)
    writer.create()
    _unit(writer, "fmri/mask", {gs.MASK: (mask, (gs.X, gs.Y, gs.Z), {"affine": np.diag([4.0, 4, 4, 1]).tolist(),
                                                                      "n_voxels": n_vox, "reference": "sub-a/movie1"}),
                                gs.VOXELS: (np.argwhere(mask).astype(np.int32), (gs.VOXEL, gs.IJK), {})}, {}, {})
    served = {r: {} for r in HAND_RUNS}
    for s in HAND_SUBJECTS:
        for run, n in HAND_RUNS.items():
            if (s, run) == ("sub-b", "movie2"):
                continue
            served[run][s] = n
            cens = np.zeros(n, bool)
            if (s, run) == ("sub-a", "movie1"):
                cens[CENSORED] = True
            bold = rng.standard_normal((n, n_vox)).astype(np.float32)
            # sub-b's movie1 is the noisiest (the lowest tSNR: the first carpet), though not the first pair
            std = rng.uniform(*((60, 90) if (s, run) == ("sub-b", "movie1") else (5, 40)), n_vox).astype(np.float32)
            std[:2] = 0  # zero-variance voxels
            bold[:, :2] = 0
            bold[cens] = np.nan
            p = gs.fmri_prefix(s, run)
            _unit(writer, p, {f"{p}/bold": (bold, (gs.TR, gs.VOXEL), {}),
                              f"{p}/mean": (rng.uniform(600, 1400, n_vox).astype(np.float32), (gs.VOXEL,), {}),
                              f"{p}/std": (std, (gs.VOXEL,), {}), f"{p}/censored": (cens, (gs.TR,), {})},
                  {"runs": {run: {"n_trs": n, "file_trs": n + 2, "n_censored": int(cens.sum()), "n_zero_variance": 2,
                                  "n_confounds": 6, "confounds_file": f"{s}_{run}_desc-confounds_timeseries.tsv"}}},
                  {"confounds": {"strategy": "simple"}}, run)
    for run, n in HAND_RUNS.items():
        codes = rng.integers(0, 64, size=(n, 2, 5)).astype(np.int16)
        _unit(writer, f"audio/{run}", {f"{gs.stimulus_prefix(run, 'audio')}/codes": (
            codes, (gs.TR, gs.CODEBOOK, gs.CODE_FRAME), {"codebook_size": 64})}, {"n_trs": n}, {}, run)
        has = np.ones(n, bool)
        has[n // 2: n // 2 + 4] = False
        t = gs.stimulus_prefix(run, "text")
        _unit(writer, f"text/{run}", {f"{t}/embeddings": (rng.standard_normal((n, 8)).astype(np.float32),
                                                          (gs.TR, gs.EMBEDDING), {}),
                                      f"{t}/has_text": (has, (gs.TR,), {})}, {"n_trs": n, "n_used_rows": 5}, {}, run)
    runs = {r: {"n_trs": n, "onset_s": 0.0, "subjects": served[r], "split": {"train": [0, n - 4], "val": [n - 4, n]},
                "n_trs_by_unit": {f"{m}/{r}": n for m in ("audio", "text")}} for r, n in HAND_RUNS.items()}
    common = {"format": gs.FORMAT, "tr_s": 2.0, "runs": runs, "run_order": list(HAND_RUNS),
              "subjects": list(HAND_SUBJECTS), "split_rule": {"val_fraction": 0.2}}
    units = {k: e["fingerprint"] for k, e in sorted(writer.manifest["units"].items())}
    writer.write_align({**common, "fingerprint": hash_obj(units), "units": units},
                       {**common, "aligned": "2000-01-01T00:00:00+00:00"})
    return path


def write_evaluation(view, out: Path) -> Path:
    """A giblet-evaluate output folder as the command writes it (its figure functions, its summary
    format), the store named relative to the folder it ran in; the glass brain left out."""
    from giblet.evaluation import maps

    rng = np.random.default_rng(4)
    rs = {s: rng.uniform(-0.1, 0.5, view.n_voxels) for s in view.subjects}
    ceilings = {s: rng.uniform(0, 0.8, view.n_voxels) for s in view.subjects}
    out.mkdir(parents=True)
    figures = {"glass_brain": str(out / "r_glass_brain.png"),
               "per_subject": str(maps.plot_subject_violins(rs, out / "r_per_subject.png", "ridge", ceilings)),
               "r_vs_ceiling": str(maps.plot_r_vs_ceiling(rs, ceilings, out / "r_vs_ceiling.png", "ridge"))}
    summary = {"evaluated": {"kind": "ridge baseline"}, "store": view.path.name, "split": "val",
               "n_trs": {s: 4 for s in view.subjects}, **maps.evaluation_summary(rs, ceilings),
               "files": {"figures": figures}}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


@pytest.fixture(scope="module")
def hand_store(tmp_path_factory) -> Path:
    import giblet

    store = write_hand_store(tmp_path_factory.mktemp("report_hand") / "hand.zarr")
    write_evaluation(giblet.open_store(store), store.parent / "giblet-evaluation-ridge-val")
    return store


def counting_reads(mp: pytest.MonkeyPatch) -> list[str]:
    """Every key ``open_store`` reads from here on (chunks and metadata)."""
    from giblet.reader import ManifestStore

    keys, get = [], ManifestStore.get

    async def counting(self, key, *args, **kwargs):
        keys.append(key)
        return await get(self, key, *args, **kwargs)

    mp.setattr(ManifestStore, "get", counting)
    return keys


@pytest.fixture(scope="module")
def pages(engine_store, hand_store) -> dict[str, Path]:
    """Both reports (the hand-made store's with one carpet plot), and what the second read."""
    with pytest.MonkeyPatch.context() as mp:
        keys = counting_reads(mp)
        hand = build_report(hand_store, carpets=1)
    return {"engine": build_report(engine_store[0]), "hand": hand, "hand_reads": keys}


# -- helpers ---------------------------------------------------------------------------------------
def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def blank_images(html: str) -> list[int]:
    """Indices of embedded PNGs whose pixels are all the same (a figure that drew nothing)."""
    import matplotlib.image as mpimg

    return [i for i, png in enumerate(embedded_pngs(html)) if np.var(mpimg.imread(io.BytesIO(png))) == 0]


@contextmanager
def chromium():
    """One headless Chromium session (Selenium) on a fresh profile, the browser log captured."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e .[test] (or pip install selenium)", pytrace=False)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("chromium or chromedriver not found: apt-get install chromium chromium-driver", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    profile = tempfile.mkdtemp(prefix="giblet-chromium-")
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}",):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(driver))
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def check_in_browser(d, page: Path, store: Path) -> list[str]:
    """Open ``page`` in the session ``d``: no console error, every image loaded, the four sections
    and every subject of ``store`` shown. Returns the images' alt texts."""
    import giblet

    d.get(page.resolve().as_uri())
    errors = [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, f"{page}: console errors {errors}"
    images = d.execute_script("return Array.from(document.images).map("
                              "i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
    assert len(images) >= 5, f"{page}: only {len(images)} images"
    broken = [alt for done, w, h, alt in images if not (done and w > 0 and h > 0)]
    assert not broken, f"{page}: images that did not load: {broken}"
    ids = d.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
    assert ids == ["summary", "fmri", "stimuli", "evaluation"]
    text = d.find_element("tag name", "body").text
    for subject in giblet.open_store(store).subjects:
        assert subject in text, f"{page}: subject {subject} not on the page"
    return [alt for *_, alt in images]


# -- tests -----------------------------------------------------------------------------------------
def test_pages_open_in_headless_chromium_with_every_image_and_section(pages, engine_store, hand_store):
    with chromium() as d:
        engine = check_in_browser(d, pages["engine"], engine_store[0])
        hand = check_in_browser(d, pages["hand"], hand_store)
    assert "contact sheet run-2" in engine and "audio code usage" not in engine
    assert {"audio code usage", "annotation coverage", "censored TRs", "r vs ceiling"} <= set(hand)


def test_every_embedded_image_has_content_and_nothing_is_fetched(pages):
    for name in ("engine", "hand"):
        html = pages[name].read_text()
        assert len(embedded_pngs(html)) >= 5
        assert blank_images(html) == [], f"{name}: blank figure(s)"
        sources = re.findall(r'(?:src|href)="([^"]*)"', html)
        assert all(s.startswith(("data:", "#")) for s in sources), f"{name}: refers outside the page: {sources}"
        assert "<script" not in html


def test_the_blank_image_check_catches_a_blank_figure():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    drawn = png_bytes(fig)
    fig = plt.figure()  # nothing drawn: one white PNG
    blank = png_bytes(fig)
    html = render("t", "", [Section("a", "A", [figure(drawn, "c", "drawn", "h"), figure(blank, "c", "blank", "h")])])
    assert blank_images(html) == [1]


def test_engine_store_page_says_what_the_store_holds(engine_store, pages):
    store, stderr = engine_store
    html = pages["engine"].read_text()
    manifest = json.loads((store / "manifest.json").read_text())
    assert pages["engine"] == default_output(store) == store.parent / "study-report.html"
    assert f"report {store}" in stderr and str(pages["engine"]) in stderr  # `run` says how to get it
    for key, unit in manifest["units"].items():  # every unit with its fingerprint
        assert key in html and unit["fingerprint"] in html
    assert "16 of 20" in html  # sub-01 run-1: 16 TRs served of the 20 in its file
    assert re.search(r"sub-03</td><td>14 of 14</td><td class=\"missing\">", html)  # no run 2
    assert "run-1: 16 TRs, 24 s, train 0–13, val 13–16" in html
    assert "sub-01_run-2.nii.gz" in html and "run-2.mp4" in html  # inputs
    assert "nilearn" in html and "zarr" in html  # library versions
    assert "TR 15 · 0:22.5" in html  # the contact sheet's last TR of run-1, at 15 x 1.5 s
    assert "Not in this store: audio, text." in html
    assert html.count("Carpet plot of") == 3
    assert "No giblet-evaluate results" in html


def test_hand_store_page_shows_censoring_audio_text_and_evaluation(hand_store, pages):
    html = pages["hand"].read_text()
    assert "sub-a_movie1_desc-confounds_timeseries.tsv" in html and "simple" in html
    assert "0, 1, 7" in html  # which TRs were censored
    assert "20 of 22 [3 censored]" in html
    assert re.search(r'<td class="bad num">2</td>', html)  # zero-variance voxels flagged
    assert "audio code usage" in html and "annotation coverage" in html
    assert "<td>movie1</td><td class=\"num\">20</td><td class=\"num\">16</td><td class=\"num\">80</td>" in html
    assert "Not in this store: video." in html
    assert "ridge baseline, split val" in html and "r_glass_brain.png is missing" in html
    assert "before the store was last rebuilt" not in html  # the summary is newer than the store
    assert html.count("Carpet plot of") == 1


def test_reads_are_bounded(pages):
    """Summaries and samples only: with one carpet plot, one (subject, run)'s bold is read --
    the one with the lowest median tSNR -- and every other array it read is a summary."""
    keys = pages["hand_reads"]
    bold = {k.rsplit("/bold/", 1)[0] for k in keys if "/bold/c" in k}
    assert bold == {"fmri/sub-b/movie1"}
    assert any("/censored/c" in k for k in keys) and any("/has_text/c" in k for k in keys)
    assert not any("/embeddings/c" in k for k in keys)  # the annotation embeddings are not needed


def test_cli_report_out_evaluation_and_errors(hand_store, engine_store, tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "deep" / "r.html"
    ev = hand_store.parent / "giblet-evaluation-ridge-val"
    assert main(["report", str(hand_store), "--out", str(out), "--evaluation", str(ev), "--carpets", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    html = out.read_text()
    assert "Carpet plot of" not in html and html.count("ridge baseline, split val") == 1  # given and found: once
    assert main(["report", str(engine_store[0]), "--out", str(tmp_path / "x.html"), "--evaluation", str(ev)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("giblet-preprocess: error: --evaluation") and "evaluates the store hand.zarr, not" in err
    assert len(err.splitlines()) == 1
    assert main(["report", str(tmp_path / "nothing.zarr")]) == 1
    assert "not a giblet store" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_store_report_in_chromium(tmp_path):
    """The README's demo (every modality, a subject without run 2): `run` names the report
    command, `report` writes the page beside the store, and it opens cleanly."""
    r = cli("run", "--demo", "--out", tmp_path / "giblet-demo", "--no-progress", timeout=900)
    assert r.returncode == 0, r.stderr
    store = Path(r.stdout.strip().splitlines()[-1])
    assert f"giblet-preprocess report {store}" in r.stderr
    r = cli("report", store)
    assert r.returncode == 0, r.stderr
    page = Path(r.stdout.strip())
    assert page == default_output(store) and page.parent == store.parent
    with chromium() as d:
        alts = check_in_browser(d, page, store)
    assert {"contact sheet run-1", "contact sheet run-2", "audio code usage", "annotation coverage"} <= set(alts)
    assert blank_images(page.read_text()) == []
