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
