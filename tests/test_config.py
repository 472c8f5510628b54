from pathlib import Path

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


# -- one loader, one path rule ---------------------------------------------------------------------
TRAIN_TINY = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml"


def test_yaml_paths_follow_the_file_and_override_paths_the_working_directory(tmp_path, monkeypatch):
    from giblet.training.config import load_train_config

    folder, cwd = tmp_path / "configs", tmp_path / "shell"
    folder.mkdir()
    cwd.mkdir()
    (cwd / "enc").mkdir()
    monkeypatch.chdir(cwd)
    study = folder / "study.yaml"
    study.write_text(yaml.safe_dump({"output": "out.zarr", "inputs": {"fmri": {"s1": "bold/s1.nii.gz"}}}))
    cfg = load_config(study, ["inputs.fmri.s2=s2.nii.gz", "inputs.movie=movie.mp4", "fmri.mask_file=../m.nii",
                              "audio.model=enc", "text.model=./minilm"])
    assert cfg.input_path(cfg.inputs.fmri["s1"]) == folder / "bold" / "s1.nii.gz"  # written in the YAML
    assert cfg.input_path(cfg.inputs.fmri["s2"]) == cwd / "s2.nii.gz"  # typed in the shell
    assert cfg.input_path(cfg.inputs.movie) == cwd / "movie.mp4"
    assert cfg.input_path(cfg.fmri.mask_file) == tmp_path / "m.nii"
    assert (cfg.audio.model, cfg.text.model) == (str(cwd / "enc"), str(cwd / "minilm"))
    assert cfg.output_path == folder / "out.zarr"
    assert load_config(study, ["output=o.zarr"]).output_path == cwd / "o.zarr"
    block = load_config(study, ["inputs.fmri={a: a.nii}", "inputs.fmri.b=b.nii"])  # a whole block, then a key in it
    assert {s: block.input_path(p) for s, p in block.inputs.fmri.items()} == {"a": cwd / "a.nii", "b": cwd / "b.nii"}
    for name in ("random", "facebook/encodec_24khz"):  # names, not paths: kept as written
        assert load_config(study, [f"audio.model={name}"]).audio.model == name
    train = folder / "train.yaml"
    train.write_text(yaml.safe_dump({"store": "s.zarr", "out": "runs/a"}))
    tcfg = load_train_config(train, ["out=runs/b"])
    assert (tcfg.store, tcfg.out) == (str(folder / "s.zarr"), str(cwd / "runs" / "b"))


def test_output_may_not_climb_out_of_its_folder_via_dotdot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output: ../../elsewhere.zarr\n")
    with pytest.raises(ConfigError, match=r"output: '../../elsewhere.zarr' escapes the config folder via '\.\.'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"escapes the working directory via '\.\.'.*\(override 'output=../x.zarr'\)"):
        load_config(path, ["output=../x.zarr"])


def test_a_key_given_twice_in_the_yaml_is_refused_with_file_line_and_key(tmp_path):
    from giblet.training.config import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text("inputs:\n  fmri:\n    sub-01: a.nii.gz\n    sub-02: b.nii.gz\n    sub-01: c.nii.gz\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: line 5: key 'sub-01' is given twice in one mapping (the later value would "
                               f"silently win); keep one")
    train = tmp_path / "t.yaml"
    train.write_text("store: s.zarr\noptim: {lr: 1.0e-3}\noptim: {lr: 2.0e-3}\n")
    with pytest.raises(ConfigError, match="line 3: key 'optim' is given twice"):
        load_train_config(train)
    path.write_text("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n")  # a merge key is no duplicate
    from giblet.config import read_yaml

    assert read_yaml(path, "")["other"] == {"x": 1, "y": 2}


@pytest.mark.parametrize("item,needle", [
    ("tr_s=.inf", "tr_s: must be a finite number, got inf (override 'tr_s=.inf')"),
    ("split.val_fraction=.nan", "split.val_fraction: must be a finite number, got nan (override "
                                "'split.val_fraction=.nan')"),
    ("audio.segment_s=-.inf", "audio.segment_s: must be a finite number, got -inf"),
    ("=5", "override '=5': empty key; expected KEY=VALUE"),
    ("fmri..detrend=true", "override 'fmri..detrend=true': empty key; expected KEY=VALUE"),
    ("fmri.detrnd=true", "fmri.detrnd: unknown key; did you mean 'detrend'? (override 'fmri.detrnd=true')"),
    ("video.width=wide", "video.width: expected int, got 'wide' (str) (override 'video.width=wide')"),
])
def test_override_problems_quote_the_override_and_numbers_must_be_finite(item, needle):
    with pytest.raises(ConfigError) as info:
        parse_config({}, overrides=(item,))
    assert needle in str(info.value) and "1 problem(s)" in str(info.value)


def test_non_finite_numbers_are_refused_in_yaml_and_in_every_schema(tmp_path):
    from giblet.training.config import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text("tr_s: .nan\n")
    with pytest.raises(ConfigError, match="tr_s: must be a finite number, got nan"):
        load_config(path)
    with pytest.raises(ConfigError) as info:
        load_train_config(TRAIN_TINY, ["store=s.zarr", "loss.weights.fmri=.inf", "optim.betas=[.nan, 0.9]",
                                       "log.scale_tolerance=inf"])
    msg = str(info.value)
    assert "3 problem(s)" in msg and "loss.weights.fmri: must be a finite number, got inf" in msg
    assert "optim.betas[0]: must be a finite number, got nan" in msg and "log.scale_tolerance" in msg
    assert load_train_config(TRAIN_TINY, ["store=s.zarr", "optim.lr=3e-4"]).optim.lr == 3e-4  # YAML 1.1 reads text


def test_train_config_checks_every_value_before_any_work():
    from giblet.training.config import load_train_config

    with pytest.raises(ConfigError) as info:  # no store is opened: it does not even exist
        load_train_config(TRAIN_TINY, ["store=/nonexistent/s.zarr", "ddp.compress=fp8", "device=tpu",
                                       "precision=fp16", "data.batch_size=0", "resume=maybe"])
    msg = str(info.value)
    assert "5 problem(s)" in msg and "ddp.compress='fp8'; choose none or bf16" in msg
    assert "device: must be one of auto, cpu, cuda, got 'tpu'" in msg and "precision: must be one of" in msg
    assert "data.batch_size: must be an integer >= 1, got 0" in msg and "resume: 'maybe'; choose true" in msg
    for value, parsed in (("true", True), ("false", False), ("weights_only", "weights_only")):
        assert load_train_config(TRAIN_TINY, ["store=s", f"resume={value}"]).resume == parsed


def test_entry_files_import_no_private_names_from_giblet():
    import ast

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "pipelines").glob("*.py")) + sorted((root / "stats").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("giblet"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
