"""Configs: one path for every command. Precedence: defaults < YAML file < command-line flags.

A stage declares a flat @dataclass of its settings; `resolve_config` builds it:

    @dataclass
    class SFTConfig:
        out: str = "runs/sft"
        lr: float = 2e-5
    cfg = resolve_config(SFTConfig, yaml_path="sft.yaml", overrides=parse_set(["lr=1e-5", "out=runs/x"]))
    print(format_config(cfg))                    # printed at start
    save_config(cfg, run_dir / "config.yaml")    # and saved beside every checkpoint (state.save_checkpoint does it)

The one override syntax, on every command (`phiforge pretrain/sft/dpo/recipe`): `--set key=value`, dotted for a key
inside a mapping (`--set model_args.hidden_size=64` changes one entry of model_args; `phiforge recipe --set
pretrain.max_steps=600`). Values are YAML scalars/lists/mappings (`--set betas=[0.9,0.95]`, `--set compile=true`),
checked against the field's type by pydantic; an unknown key names the closest known one. The older `--key value`
spelling of the stages still works, with one deprecation line on stderr (`warn_old_spelling`). Keys use dashes or
underscores. Configs are data: no code is executed or imported.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from phiforge.utils import UserError, atomic_write_text

DEPRECATED_UNTIL = "phiforge 0.2"


def parse_value(value: str) -> Any:
    """A flag value as YAML ('1e-3' -> 0.001, '[a, b]' -> list); a value that is not YAML stays a string."""
    if value == "":
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value  # e.g. an unbalanced bracket: keep the raw string


def parse_set(items: list[str]) -> dict[str, Any]:
    """['max_steps=600', 'model_args.hidden_size=64'] -> {'max_steps': 600, 'model_args.hidden_size': 64}."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item!r}: use --set key=value (dotted for a nested key: section.key=value)")
        out[key.replace("-", "_")] = parse_value(value)
    return out


def nest(flat: dict[str, Any]) -> dict:
    """{'pretrain.max_steps': 600} -> {'pretrain': {'max_steps': 600}}."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def old_pairs(argv: list[str]) -> list[tuple[str, str]]:
    """The old spelling as (key, raw value) pairs: ['--lr', '1e-3', '--out=runs/x', '--compile'] ->
    [('lr', '1e-3'), ('out', 'runs/x'), ('compile', 'true')]. A flag followed by another flag (or nothing) is true."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}: set a config value with --set key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """The old spelling, parsed: ['--lr', '1e-3', '--out=runs/x', '--compile'] -> {'lr': 0.001, 'out': 'runs/x',
    'compile': True}."""
    return {k: parse_value(v) for k, v in old_pairs(argv)}


def warn_old_spelling(prog: str, flags: list[list[str]]) -> None:
    """One line on stderr: the old-spelling flags given and their --set spelling."""
    new = []
    for tokens in flags:
        (key, value), = old_pairs(tokens)
        new.append(f"--set {shlex.quote(f'{key}={value}')}")
    print(f"{prog}: deprecated: {' '.join(t for f in flags for t in f)} is the old spelling of {' '.join(new)} "
          f"(it works until {DEPRECATED_UNTIL})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Types: pydantic checks and converts each value against its field's annotation


@functools.lru_cache(maxsize=None)
def _adapter(typ: Any):
    from pydantic import ConfigDict, StrictBool, TypeAdapter

    if typ is bool:
        typ = StrictBool
    return TypeAdapter(typ, config=ConfigDict(coerce_numbers_to_str=True))


def _expected(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        return " or ".join(_expected(a) if a is not type(None) else "null" for a in args)
    base = origin or typ
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping"}.get(base, getattr(base, "__name__", str(base)))


def check_value(name: str, value: Any, typ: Any) -> Any:
    """`value` converted to field type `typ` (int, float, str, bool, list, dict, X | None), or a UserError naming the
    key, the value and the expected type. YAML 1.1 reads '1e-3' as a string: a float field takes it."""
    from pydantic import ValidationError

    origin = typing.get_origin(typ)
    args = typing.get_args(typ) if origin in (typing.Union, types.UnionType) else (typ,)
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    if isinstance(value, bool) and bool not in inner:  # pydantic's lax mode would read true as 1
        raise UserError(f"config {name}: expected {_expected(typ)}, got {value!r}")
    try:
        return _adapter(inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]).validate_python(value)
    except ValidationError:
        raise UserError(f"config {name}: expected {_expected(typ)}, got {value!r}") from None


# ----------------------------------------------------------------------------------------------------------------


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from a file, with errors a user can act on."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {p} must be a mapping of key: value, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def unknown_key(key: str, known: list[str], origin: str, prefix: str = "", kind: str = "config") -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return UserError(f"unknown {kind} key {prefix + key!r}" + (f" in {origin}" if origin else "") + hint)


def apply_settings(cfg: Any, settings: dict[str, Any], origin: str) -> Any:
    """A copy of dataclass `cfg` with `settings` applied (type-checked). A dotted key (model_args.hidden_size)
    changes one entry of a mapping field. Unknown keys raise UserError with the closest known key suggested."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg) if f.init]
    changes: dict[str, Any] = {}
    for key, value in settings.items():
        key, _, sub = key.partition(".")
        if key not in names:
            raise unknown_key(key, names, origin)
        if sub:
            current = changes.get(key, getattr(cfg, key))
            if not isinstance(current, dict):
                raise UserError(f"config {key}.{sub}: {key} is not a mapping")
            value = {**current, **nest({sub: value})}
        changes[key] = check_value(key, value, hints[key])
    return dataclasses.replace(cfg, **changes)


def resolve_config(cls: type, yaml_path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Build dataclass `cls`: its defaults, then the YAML file, then overrides (a dict, or an old-spelling argv
    list)."""
    cfg = cls()
    if yaml_path:
        cfg = apply_settings(cfg, load_yaml(yaml_path), str(yaml_path))
    if overrides:
        flags = parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else dict(overrides)
        cfg = apply_settings(cfg, flags, "command-line flags")
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def format_config(cfg: Any) -> str:
    """The resolved config as YAML text (what is printed at start and saved beside checkpoints)."""
    return dump_yaml(config_dict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, format_config(cfg))
