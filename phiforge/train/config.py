"""Training configs: one precedence for every stage, code defaults < YAML file < command-line flags.

A stage declares a flat @dataclass of its settings; `resolve_config` builds it:

    @dataclass
    class SFTConfig:
        out: str = "runs/sft"
        lr: float = 2e-5
    cfg = resolve_config(SFTConfig, yaml_path="recipe.yaml", overrides=["--lr", "1e-5", "--out=runs/x"])
    print(format_config(cfg))                    # printed at start
    save_config(cfg, run_dir / "config.yaml")    # and saved beside every checkpoint (state.save_checkpoint does it)

Flag values are parsed as YAML scalars/lists/dicts (`--betas "[0.9, 0.95]"`, `--compile true`), then checked
against the field's type. Keys use dashes or underscores. Configs are data: no code is executed or imported.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from phiforge.utils import UserError, atomic_write_text


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """['--lr', '1e-3', '--out=runs/x', '--compile'] -> {'lr': 0.001, 'out': 'runs/x', 'compile': True}.
    A flag followed by another flag (or nothing) is boolean true."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}: overrides look like --key value or --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key.replace("-", "_")] = value  # not YAML (e.g. an unbalanced bracket): keep the raw string
        i += 1
    return out


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Check `value` against a dataclass field type (int, float, str, bool, list, dict, Optional[...])."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _coerce(name, value, a)
            except UserError:
                pass
        raise UserError(f"config {name}: {value!r} is not a valid {typ}")
    base = origin or typ
    if base is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config {name}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config {name}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config {name}: expected a number, got {value!r}")
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config {name}: expected a string, got {value!r}")
    if base in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise UserError(f"config {name}: expected a list, got {value!r}")
    if base is dict:
        if isinstance(value, dict):
            return dict(value)
        raise UserError(f"config {name}: expected a mapping, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with errors a user can act on."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must be a mapping of key: value, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_settings(cfg: Any, settings: dict[str, Any], origin: str) -> Any:
    """A copy of dataclass `cfg` with `settings` applied (type-checked). Unknown keys raise UserError with the
    closest known key suggested."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg) if f.init]
    changes = {}
    for key, value in settings.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise UserError(f"unknown config key {key!r} in {origin}{hint}")
        changes[key] = _coerce(key, value, hints[key])
    return dataclasses.replace(cfg, **changes)


def resolve_config(cls: type, yaml_path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Build dataclass `cls`: its defaults, then the YAML file, then overrides (argv list or dict)."""
    cfg = cls()
    if yaml_path:
        cfg = apply_settings(cfg, load_yaml(yaml_path), str(yaml_path))
    if overrides:
        flags = parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else dict(overrides)
        cfg = apply_settings(cfg, flags, "command-line flags")
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def format_config(cfg: Any) -> str:
    """The resolved config as YAML text (what is printed at start and saved beside checkpoints)."""
    return yaml.safe_dump(config_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, format_config(cfg))
