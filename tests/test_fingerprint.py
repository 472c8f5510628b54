import os

from giblet.config import FmriParams
from giblet.fingerprint import FileHashCache, hash_obj, non_default_params, unit_fingerprint


def test_hash_is_order_independent_and_value_sensitive():
    assert hash_obj({"a": 1, "b": [1, 2]}) == hash_obj({"b": [1, 2], "a": 1})
    assert hash_obj({"a": 1}) != hash_obj({"a": 2})
    assert hash_obj(3.0) == hash_obj(3)  # 3.0 and 3 are the same parameter


def test_only_non_default_params_enter():
    assert non_default_params(FmriParams()) == {}
    assert non_default_params(FmriParams(detrend=True)) == {"detrend": True}


def test_unit_fingerprint_changes_with_each_part():
    base = unit_fingerprint("fmri", 1, {}, {"bold": "abc"})
    assert base == unit_fingerprint("fmri", 1, {}, {"bold": "abc"})
    assert base != unit_fingerprint("fmri", 2, {}, {"bold": "abc"})
    assert base != unit_fingerprint("fmri", 1, {"detrend": True}, {"bold": "abc"})
    assert base != unit_fingerprint("fmri", 1, {}, {"bold": "abd"})
    assert base != unit_fingerprint("video", 1, {}, {"bold": "abc"})


def test_file_hash_is_content_based_and_cached(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    cache = FileHashCache(tmp_path / "cache.json")
    h1 = cache.fingerprint(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same content
    assert cache.fingerprint(f) == h1
    f.write_bytes(b"hellp")
    assert cache.fingerprint(f) != h1
    cache.save()
    again = FileHashCache(tmp_path / "cache.json")
    assert again.fingerprint(f) == cache.fingerprint(f)


def test_one_declared_rule_says_which_parameters_key_the_cache(tmp_path):
    """How a stage runs (batch sizes, devices, read blocks, task sizes) never enters a unit's
    fingerprint, in every stage alike; what it stores always does. The rule is declared on the
    field (``giblet.config_loader.runtime``), not written by hand in each stage."""
    import dataclasses

    import yaml

    from giblet.config import STAGE_BLOCKS, StudyConfig, load_config
    from giblet.synth import make_study
    from pipelines.engine import plan_for

    runtime = {(b, f.name) for b in STAGE_BLOCKS for f in dataclasses.fields(getattr(StudyConfig(), b))
               if not f.metadata.get("fingerprint", True)}
    assert {("audio", "batch_size"), ("text", "batch_size"), ("audio", "device"), ("text", "device"),
            ("fmri", "read_block_trs"), ("video", "segment_trs")} <= runtime
    config = make_study(tmp_path, n_subjects=1, n_trs=12, shape=(8, 9, 7), movie_size=(48, 28), fps=10, seed=1,
                        stages={"audio": {"model": "random"}})
    plan = lambda *o: {u.key: u.fingerprint for u in plan_for(load_config(config, o))[1] if u.ready}  # noqa: E731
    base = plan()
    assert {"video/run-1", "audio/run-1", "text/run-1", "fmri/mask"} <= set(base)
    how = ["audio.batch_size=3", "text.batch_size=5", "audio.device=cpu", "text.device=cpu",
           "fmri.read_block_trs=7", "video.segment_trs=32"]
    assert plan(*how) == base
    for what, unit in (("audio.bandwidth=6.0", "audio/run-1"), ("text.chunk_trs=64", "text/run-1"),
                       ("video.width=80", "video/run-1"), ("fmri.mask_trs=50", "fmri/mask")):
        changed = plan(what)
        assert changed[unit] != base[unit] and {k: v for k, v in changed.items() if k != unit} == \
            {k: v for k, v in base.items() if k != unit}, what
    assert yaml.safe_load(config.read_text())["inputs"]  # a one-run study: the shorthand
