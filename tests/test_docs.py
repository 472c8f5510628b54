"""The docs are the contract: every CLI flag and every store array, attribute and meta key
the code has is documented, and everything the docs name exists -- so they cannot drift."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import giblet

ROOT = Path(__file__).resolve().parents[1]
CLI_MD, STORE_MD = (ROOT / "docs" / "cli.md").read_text(), (ROOT / "docs" / "store.md").read_text()


def _flags(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, set[str]]:
    """``{"giblet-preprocess run": {"--demo", ...}, ...}`` of a parser and its subcommands."""
    out: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_flags(sub, f"{prefix} {name}"))
        elif action.help != argparse.SUPPRESS:
            out.setdefault(prefix, set()).update(o for o in action.option_strings if o.startswith("--"))
    return out


def commands() -> dict[str, set[str]]:
    from pipelines.cli import _parser as preprocess
    from pipelines.evaluate import _parser as evaluate
    from pipelines.train import _parser as train
    from stats.diagnose import _parser as diagnose

    out = {}
    for name, parser in (("giblet-preprocess", preprocess()), ("giblet-train", train()),
                         ("giblet-diagnose", diagnose()), ("giblet-evaluate", evaluate())):
        out.update({f"{name}{k}": v - {"--help"} for k, v in _flags(parser).items()})
    return out


def test_every_cli_flag_is_documented_and_every_documented_flag_exists():
    cmds = commands()
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", CLI_MD))
    missing = {f"{cmd} {flag}" for cmd, flags in cmds.items() for flag in flags if flag not in documented}
    assert not missing, f"flags the code has but docs/cli.md does not mention: {sorted(missing)}"
    # a flag written in a giblet command line of the docs must exist for that command
    for line in re.findall(r"`(giblet-(?:preprocess|train|diagnose|evaluate)[^`]*)`", CLI_MD) + \
            [ln for ln in CLI_MD.splitlines() if ln.startswith(("giblet-preprocess", "giblet-train", "giblet-diagnose",
                                                                "giblet-evaluate"))]:
        words = line.split()
        cmd = words[0] + (f" {words[1]}" if words[0] == "giblet-preprocess" and len(words) > 1
                          and f"giblet-preprocess {words[1]}" in cmds else "")
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
            assert flag in cmds.get(cmd, set()) | {"--help"}, f"docs/cli.md: `{line}` uses {flag}, which {cmd} lacks"


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    """The README's first command: the 2-run demo with every modality and a missing run."""
    out = tmp_path_factory.mktemp("docs_demo") / "giblet-demo"
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--demo", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


def _pattern(name: str, s) -> str:
    """An array name with its subject and run written as docs/store.md writes them."""
    parts = name.split("/")
    if parts[0] == "fmri" and len(parts) == 4:
        parts[1:3] = ["<subject>", "<run>"]
    elif parts[0] == "stimuli":
        parts[1] = "<run>"
    return "/".join(parts)


def test_every_store_array_is_documented_with_its_dims(demo_store):
    s = giblet.open_store(demo_store)
    assert len(s.runs) == 2 and any(len(s.subject_runs(x)) == 1 for x in s.subjects)  # the demo is unkind
    seen = set()
    for name in s._arrays:
        doc = _pattern(name, s)
        seen.add(doc)
        dims = tuple(s.array(name).metadata.dimension_names)
        assert f"`{doc}`" in STORE_MD, f"docs/store.md lacks the array {doc}"
        row = next((ln for ln in STORE_MD.splitlines() if ln.startswith(f"| `{doc}`")), None)
        assert row is not None, f"docs/store.md has no table row for {doc}"
        assert f"({', '.join(dims)}{',' if len(dims) == 1 else ''})" in row, (doc, dims, row)
    tabled = set(re.findall(r"^\| `((?:fmri|stimuli)/[^`]+)`", STORE_MD, re.M))
    tabled = {t for t in tabled if not re.match(r"fmri/<subject>/<run>/(parcels|surface)/", t)}  # target sets:
    #   the demo builds none; tests/test_targets.py checks their rows against a store that has them
    # the demo has no pretrained-feature extractor: tests/test_pretrained.py holds those rows (and their
    # dims) against a store that has them
    tabled = {t for t in tabled if not t.startswith("stimuli/<run>/features/")}
    assert tabled <= seen, f"docs/store.md documents arrays no store has: {sorted(tabled - seen)}"


def test_root_attributes_and_unit_meta_keys_are_documented(demo_store):
    s = giblet.open_store(demo_store)
    table = STORE_MD[STORE_MD.index("## Root attributes"):STORE_MD.index("## fMRI")]
    for key in s.attrs:
        assert f"`{key}`" in table, f"root attribute {key} is not in docs/store.md's table"
    for key, entry in s.manifest["units"].items():
        meta = entry.get("meta") or {}
        keys = set(meta) | {k for r in (meta.get("runs") or {}).values() for k in r}
        section = {"fmri": "## fMRI", "video": "## Video", "audio": "## Audio", "text": "## Text",
                   "features": "## Pretrained features"}[entry["stage"]]
        body = STORE_MD[STORE_MD.index(section):]
        body = body[:body.index("\n## ", 4)] if "\n## " in body[4:] else body
        undocumented = sorted(k for k in keys if f"`{k}`" not in body and not (key == "fmri/mask" and k == "shape"))
        assert not undocumented, f"{key}: meta keys missing from docs/store.md ({section}): {undocumented}"


def test_the_clone_ignores_what_the_readme_commands_write():
    r = subprocess.run(["git", "check-ignore", "giblet-demo/x", "runs/x", "study.zarr/x"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.stdout.split() == ["giblet-demo/x", "runs/x", "study.zarr/x"], r.stdout


def test_readme_snippets_run_on_the_demo_store(demo_store, tmp_path, monkeypatch):
    """Every Python block of the README runs as written, from a folder holding `giblet-demo/`
    (what the README's first command leaves in the repository root); its YAML is a valid config."""
    import os

    import yaml

    from giblet.config import parse_config

    readme = (ROOT / "README.md").read_text()
    (tmp_path / "giblet-demo").mkdir()
    os.symlink(demo_store, tmp_path / "giblet-demo" / "demo.zarr")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 3
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    for text in re.findall(r"```yaml\n(.*?)```", readme, re.S):
        cfg = parse_config(yaml.safe_load(text))
        assert list(cfg.study_runs) == ["run-1", "run-2"] and cfg.study_runs["run-2"].shared_sheet
