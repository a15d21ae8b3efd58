"""YAML configs checked against a dataclass: unknown keys and wrong types are errors, not ignored.

Each job declares its options once as a dataclass; the CLI exposes every field as ``--field``
and a YAML file may set any of them. Precedence: dataclass default < YAML < command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from deepemd.errors import DeepEMDError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check ``value`` against a simple type hint (int/float/str/bool, Optional, tuple/list of)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        concrete = [a for a in args if a is not type(None)]
        if len(concrete) == 1:  # Optional[X]: X's own message is the clearest
            return _coerce(name, value, concrete[0], source)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg, source)
            except DeepEMDError as exc:
                errors.append(str(exc))
        raise DeepEMDError(f"option '{name}' has value {value!r} of the wrong type", source,
                           f"give one of: {', '.join(getattr(a, '__name__', str(a)) for a in args)}")
    if origin in (tuple, list):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise DeepEMDError(f"option '{name}' must be a list, got {value!r}", source)
        inner = args[0] if args else Any
        items = [_coerce(name, v, inner, source) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
    raise DeepEMDError(f"option '{name}' must be {getattr(hint, '__name__', hint)}, got {value!r}", source,
                       "correct the value's type")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping or raise one clear error."""
    path = Path(path)
    if not path.is_file():
        raise DeepEMDError("config file not found", path, "check the --config path (see configs/ for examples)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DeepEMDError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
    if not isinstance(data, dict):
        raise DeepEMDError("a config must be a mapping of option: value", path)
    return data


def build_config(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Make a ``cls`` instance from ``values``; unknown keys get a did-you-mean error, or the
    new name of a renamed option (``cls.__renamed__``: old key -> what to write instead)."""
    types_ = _field_types(cls)
    unknown = [k for k in values if k not in types_]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, types_, n=1)
        renamed = getattr(cls, "__renamed__", {})
        hint = (f"renamed: {renamed[key]}" if key in renamed
                else f"did you mean '{close[0]}'?" if close
                else f"known options: {', '.join(sorted(types_))}")
        raise DeepEMDError(f"unknown config key '{key}'", source, hint)
    kwargs = {k: _coerce(k, v, types_[k], source) for k, v in values.items()}
    return cls(**kwargs)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Expose every dataclass field as ``--field-name`` (default None = "not given")."""
    docs = getattr(cls, "__field_docs__", {})
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_ = docs.get(f.name, "")
        hint = _field_types(cls)[f.name]
        if hint is bool:  # `--flag` alone means true; `--flag false` still works
            parser.add_argument(flag, dest=f.name, default=None, nargs="?", const="true",
                                metavar="true|false", help=f"{help_} (default: {default})".strip())
            continue
        nargs = "+" if typing.get_origin(hint) in (tuple, list) else None
        parser.add_argument(flag, dest=f.name, default=None, nargs=nargs,
                            help=f"{help_} (default: {default})".strip())


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Defaults < ``--config`` YAML < explicit command-line flags."""
    values: dict[str, Any] = {}
    source = "command line"
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(read_yaml(config_path))
        source = str(config_path)
    names = {f.name for f in dataclasses.fields(cls)}
    cli_values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = build_config(cls, values, source)
    return dataclasses.replace(cfg, **{k: _coerce(k, v, _field_types(cls)[k], "command line")
                                       for k, v in cli_values.items()})
