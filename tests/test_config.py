import pytest
import yaml

from giblet.config import load_config, parse_config
from giblet.errors import ConfigError, GibletError


def test_relative_paths_resolve_against_config_folder(tmp_path):
    cfg_path = tmp_path / "sub" / "c.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text(yaml.safe_dump({"output": "out.zarr", "inputs": {"fmri": {"s1": "bold/s1.nii.gz"}}}))
    cfg = load_config(cfg_path)
    assert cfg.output_path == tmp_path / "sub" / "out.zarr"
    assert cfg.input_path(cfg.inputs.fmri["s1"]) == tmp_path / "sub" / "bold" / "s1.nii.gz"


def test_unknown_keys_suggest_and_all_problems_reported_at_once():
    raw = {"tr_s": "fast", "fmri": {"detrnd": True, "chunk_trs": 0}, "inptus": {}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    msg = str(err.value)
    assert "did you mean 'detrend'" in msg and "did you mean 'inputs'" in msg
    assert "tr_s: expected float, got 'fast'" in msg
    assert "3 problem(s)" in msg
    assert isinstance(err.value, ValueError) and isinstance(err.value, GibletError)


def test_overrides_are_typed_by_yaml_and_checked():
    cfg = parse_config({"inputs": {"fmri": {"a": "x.nii"}}}, overrides=("fmri.detrend=true", "fmri.high_pass=0.01",
                                                                        "tr_s=2", "text.columns=[A, B]"))
    assert cfg.fmri.detrend is True and cfg.fmri.high_pass == 0.01 and cfg.tr_s == 2.0
    assert cfg.text.columns == ["A", "B"]
    with pytest.raises(ConfigError, match="fmri.chunk_trs: must be an integer >= 1"):
        parse_config({}, overrides=("fmri.chunk_trs=0",))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_config({}, overrides=("fmri.detrend",))
    with pytest.raises(ConfigError, match="mask_reference: 'sub-09' is not a subject"):
        parse_config({"inputs": {"fmri": {"sub-01": "a"}}}, overrides=("fmri.mask_reference=sub-09",))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_shipped_preprocess_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs" / "preprocess").glob("*.yaml"))
    assert configs, "configs/preprocess/*.yaml must exist"
    for path in configs:
        load_config(path)
