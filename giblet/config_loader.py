"""The generic config loader: frozen dataclasses are the schema, YAML holds the values.

:func:`load_yaml_config` reads a YAML file (keys must be unique in each mapping), applies
``block.key=value`` overrides, checks every field's type (numbers must be finite) and runs
the schema's own value checks; every problem (unknown key with a "did you mean", wrong type,
bad value) is collected and reported in one ``ConfigError``, quoting the override that caused
it. Path-valued fields are declared once, in the field's metadata (``PATH``, ``PATH_OR_NAME``,
``INSIDE``), and the rule is the same for every command: a path written in a YAML file is
relative to that file's folder, a path given as a ``KEY=VALUE`` override is relative to the
working directory (where the shell user typed it). The metadata covers a field holding one
path, or a dict / list of them (``inputs.fmri: {subject: path}``); a dataclass nested
anywhere brings its own declarations. Used by the preprocessing schema (``giblet.config``)
and the training schema (``giblet.training.config``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import yaml

from giblet.errors import ConfigError

# Field metadata read by the loader (``field(default=None, metadata=PATH)``).
PATH: dict = {"path": "path"}  # a filesystem path, or a dict / list of paths
PATH_OR_NAME: dict = {"path": "or_name"}  # a path, or a bare name (a repo id, "random") kept as written
INSIDE: dict = {"path": "path", "inside": True}  # a path giblet writes and deletes in: no '..' when relative
INTERNAL: dict = {"internal": True}  # filled by the loader (config_path); never read from YAML or overrides


def runtime(default: Any, why: str, meta: dict | None = None) -> Any:
    """A stage parameter that does not enter the unit's fingerprint (``why`` says why): the one
    declared rule ``giblet.fingerprint.non_default_params`` follows for every stage. ``meta``:
    more field metadata (e.g. ``PATH``)."""
    return field(default=default, metadata={**(meta or {}), "fingerprint": False, "why": why})



# -- the generic loader ------------------------------------------------------------------------------
T = TypeVar("T")
Check = Callable[[Any, list], None]  # check(cfg, problems): append one message per bad value
Expand = Callable[[Any, dict, list], Any]  # expand(cfg, raw, problems) -> cfg: fill fields from other inputs


def load_yaml_config(path: str | Path, schema: type[T], overrides: tuple | list = (), *,
                     check: Optional[Check] = None, keep_relative: bool = False, what: str = "config file",
                     missing_fix: str = "pass the path of a YAML config", expand: Optional[Expand] = None) -> T:
    """A YAML file plus ``KEY=VALUE`` overrides, as a validated ``schema`` instance.

    Args:
        schema: a frozen dataclass; nested dataclasses are blocks. Field metadata ``PATH``,
            ``PATH_OR_NAME`` or ``INSIDE`` marks path-valued fields (also dicts / lists of
            paths); a field named ``config_path`` (metadata ``INTERNAL``) receives the file's
            absolute path.
        overrides: ``block.key=value`` strings; values are parsed as YAML.
        check: the schema's value checks, run once the types are right.
        expand: fills fields from other inputs once the types are right, before ``check``
            (the ``bids`` block writes ``runs``); gets the raw mapping (overrides applied).
        keep_relative: leave relative YAML paths as written (the schema resolves them against
            ``config_path``'s folder itself); otherwise they become absolute. Override paths
            always become absolute, against the working directory.

    Raises:
        ConfigError: one line listing every problem.
    """
    raw = read_yaml(path, missing_fix, what)
    return build_config(schema, raw, overrides, config_path=str(Path(path).resolve()), check=check,
                        keep_relative=keep_relative, expand=expand)


def build_config(schema: type[T], raw: Optional[dict], overrides: tuple | list = (), *,
                 config_path: Optional[str] = None, check: Optional[Check] = None, keep_relative: bool = False,
                 expand: Optional[Expand] = None) -> T:
    """:func:`load_yaml_config` for a mapping already read (YAML paths relative to
    ``config_path``'s folder, or to the working directory when there is no file)."""
    problems: list[str] = []
    raw = copy.deepcopy(dict(raw or {}))  # overrides edit nested blocks: never the caller's
    for item in overrides:
        _set_override(raw, str(item), problems)
    cwd = Path.cwd()
    ctx = _Context(Path(config_path).parent if config_path else cwd, cwd, keep_relative, problems)
    cfg = _build(schema, raw, "", ctx, None)
    if not problems:
        if any(f.name == "config_path" for f in dataclasses.fields(schema)):
            cfg = dataclasses.replace(cfg, config_path=config_path)
        if expand is not None:
            cfg = expand(cfg, raw, problems)
        if check is not None and not problems:
            check(cfg, problems)
    if problems:
        raise ConfigError(f"{config_path or 'config'}: {len(problems)} problem(s): " + "; ".join(problems))
    return cfg


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line = key, line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last one silently: a subject listed twice would quietly lose its first path)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, missing_fix: str, what: str = "config file") -> dict:
    """A YAML file's top-level mapping (:class:`UniqueKeyLoader`), or a one-line ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found; {missing_fix}")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: line {exc.line}: key {exc.key!r} is given twice in one mapping (the later "
                          f"value would silently win); keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}; fix the syntax") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw or {}


@dataclass(frozen=True)
class _Override:
    """A value set by a ``KEY=VALUE`` override (``text``): quoted in problems, and its paths
    are relative to the working directory."""

    value: Any
    text: str


def _set_override(raw: dict, item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep:
        problems.append(f"override {item!r}: expected KEY=VALUE, e.g. fmri.detrend=true")
        return
    if not all(p.strip() for p in parts):
        problems.append(f"override {item!r}: empty key; expected KEY=VALUE, e.g. fmri.detrend=true")
        return
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader) if text != "" else None
    except _DuplicateKey as exc:
        problems.append(f"override {item!r}: key {exc.key!r} is given twice; keep one")
        return
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, _Override):  # a block set by an earlier override: its keys are all from the CLI
            child = child.value if isinstance(child.value, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"override {item!r}: '{part}' is not a block")
            return
        node = child
    node[parts[-1]] = _Override(value, item)


@dataclass
class _Context:
    root: Path  # the YAML file's folder
    cwd: Path  # where override paths start
    keep_relative: bool
    problems: list

    def problem(self, where: str, msg: str, src: Optional[str]) -> None:
        self.problems.append(f"{where}: {msg}" + (f" (override {src!r})" if src else ""))

    def path(self, value: str, where: str, spec: dict, src: Optional[str]) -> str:
        """``value`` resolved by the one path rule (see the module docstring); a URL
        (``s3://...``) is kept as written."""
        from giblet.location import is_url

        if is_url(value):
            return value
        p, base = Path(value).expanduser(), self.cwd if src else self.root
        if spec.get("inside") and not p.is_absolute() and ".." in p.parts:
            name = "the working directory" if src else "the config folder"
            self.problem(where, f"{value!r} escapes {name} via '..' (giblet replaces and deletes folders inside "
                                f"it); give an absolute path or a path inside {base}", src)
            return value
        if (spec.get("path") == "or_name" and not p.is_absolute() and not value.startswith((".", "~"))
                and not (base / p).exists()):
            return value  # a name (a repo id, "random"), not a path
        if self.keep_relative and not src:
            return value  # the schema resolves it against config_path's folder (and records it as written)
        return str(p if p.is_absolute() else (base / p).resolve())


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, ctx: _Context, src: Optional[str], spec: Optional[dict] = None) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float; paths
    resolved where ``spec`` marks them). ``src``: the override that set it, if one did."""
    if isinstance(value, _Override):
        return _coerce(value.value, tp, where, ctx, value.text, spec)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms[:-1]:  # the first arm the value fits (Union[bool, str]: true, or a word)
            trial = dataclasses.replace(ctx, problems=[])
            out = _coerce(value, arm, where, trial, src, spec)
            if not trial.problems:
                return out
        return _coerce(value, arms[-1], where, ctx, src, spec)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.problem(where, f"expected a mapping, got {value!r}", src)
            return tp()
        return _build(tp, value, where, ctx, src)
    if origin is dict:
        if not isinstance(value, dict):
            ctx.problem(where, f"expected a mapping of {_type_name(args[0])} to {_type_name(args[1])}, got {value!r}",
                        src)
            return {}
        return {str(k): _coerce(v, args[1], f"{where}.{k}", ctx, src, spec) for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            ctx.problem(where, f"expected a list, got {value!r}", src)
            return []
        return [_coerce(v, args[0], f"{where}[{i}]", ctx, src, spec) for i, v in enumerate(value)]
    return _leaf(value, tp, where, ctx, src, spec)


def _leaf(value: Any, tp: Any, where: str, ctx: _Context, src: Optional[str], spec: Optional[dict]) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as text
            value, number = float(value), True
        except ValueError:
            pass
    if tp is float and number:
        value = float(value)
        if not math.isfinite(value):
            ctx.problem(where, f"must be a finite number, got {value}", src)
            return None
    if tp is str and number:
        value = str(value)
    if tp in (int, float, bool, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        ctx.problem(where, f"expected {tp.__name__}, got {value!r} ({type(value).__name__})", src)
        return None
    if spec and isinstance(value, str) and value:
        return ctx.path(value, where, spec, src)
    return value


def _build(cls: type, data: dict, where: str, ctx: _Context, src: Optional[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = [n for n, f in fields.items() if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        at = f"{where}.{key}" if where else key
        if key in fields and key not in names:
            continue  # an internal field (e.g. config_path in a dumped config): the loader fills it
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            ctx.problem(at, f"unknown key{hint}", value.text if isinstance(value, _Override) else src)
            continue
        spec = fields[key].metadata if "path" in fields[key].metadata else None
        coerced = _coerce(value, hints[key], at, ctx, src, spec)
        if coerced is not None or (value.value if isinstance(value, _Override) else value) is None:
            kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a value
        ctx.problem(where or "config", str(exc), src)
        return cls()


def to_dict(cfg: Any) -> dict:
    """Plain-dict form of a config (for YAML dumps and store attrs)."""
    return dataclasses.asdict(cfg)
