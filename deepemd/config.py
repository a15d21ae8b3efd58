"""YAML configs checked against a dataclass: unknown keys and wrong types are errors, not ignored.

Each job declares its options once as a dataclass of :func:`option` fields (default, help text,
valid choices, bounds, all beside the field); the CLI exposes every field as ``--field`` and a
YAML file may set any of them. Precedence: dataclass default < YAML < command line. Every value
is checked when it is read, before any work starts: type, choices (with a did-you-mean) and
bounds, so ``--batch-size 0`` fails in the parser, not after feature extraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

from deepemd.errors import DeepEMDError

T = TypeVar("T")

#: ``choices`` of an option: a fixed sequence, or a zero-argument callable giving the names
#: (usually a registry's), called only when a value is checked or ``--help`` is printed.
Choices = Sequence[str] | Callable[[], Sequence[str]]


def option(
    default: Any,
    help: str,
    *,
    choices: Choices | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> Any:
    """A dataclass field with its help text and the rules its value must meet.

    ``minimum`` / ``maximum`` bound a number (or every item of a tuple of numbers); ``None``
    stays allowed for ``Optional`` fields, meaning "not given".
    """
    meta = {
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
    }
    return dataclasses.field(default=default, metadata=meta)


def registry_choices(module: str, attribute: str) -> Callable[[], list[str]]:
    """Choices read from ``module.attribute`` (a :class:`deepemd.registry.Registry`, or any
    iterable of names) on first use, so declaring an option does not import torch."""

    def names() -> list[str]:
        found = getattr(importlib.import_module(module), attribute)
        return list(found.names() if hasattr(found, "names") else found)

    return names


def same_option(cls: type, name: str, default: Any) -> Any:
    """Field ``name`` of ``cls`` with another default: a job retunes a shared option's default
    without repeating its help or rules."""
    base = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=base.metadata)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _choice_names(choices: Choices | None) -> list[str] | None:
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check ``value`` against a simple type hint (int/float/str/bool, Optional, tuple/list of)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        concrete = [a for a in args if a is not type(None)]
        if len(concrete) == 1:  # Optional[X]: X's own message is the clearest
            return _coerce(name, value, concrete[0], source)
        for arg in concrete:
            try:
                return _coerce(name, value, arg, source)
            except DeepEMDError:
                continue
        raise DeepEMDError(
            f"option '{name}' has value {value!r} of the wrong type",
            source,
            f"give one of: {', '.join(getattr(a, '__name__', str(a)) for a in args)}",
        )
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
    raise DeepEMDError(
        f"option '{name}' must be {getattr(hint, '__name__', hint)}, got {value!r}", source, "correct the value's type"
    )


def _check_rules(name: str, value: Any, meta: typing.Mapping[str, Any], source: str) -> None:
    """The option's declared choices and bounds, checked on the coerced value."""
    if value is None:
        return
    items = value if isinstance(value, (tuple, list)) else (value,)
    names = _choice_names(meta.get("choices"))
    if names is not None:
        for item in items:
            base = str(item).partition(":")[0]  # "fcn:uniform": the choice is the part before ':'
            if base not in names:
                close = difflib.get_close_matches(base, names, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(names)}"
                raise DeepEMDError(f"option '{name}' has unknown value '{item}'", source, hint)
    low, high = meta.get("minimum"), meta.get("maximum")
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if not math.isfinite(item):
            raise DeepEMDError(f"option '{name}' must be a finite number, got {item!r}", source)
        too_low = low is not None and (item <= low if meta.get("exclusive_minimum") else item < low)
        if too_low or (high is not None and item > high):
            bound = (f"> {low:g}" if meta.get("exclusive_minimum") else f">= {low:g}") if too_low else f"<= {high:g}"
            raise DeepEMDError(
                f"option '{name}' must be {bound}, got {item!r}",
                source,
                f"set --{name.replace('_', '-')} to a value {bound}",
            )


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice: its own fix, unlike a syntax error."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKeyError(
                None, None, f"key '{key}' is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_syntax_error(exc: yaml.YAMLError) -> tuple[str, str]:
    """Message and fix for a YAML syntax error, at the line and column where the parser stopped."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    fix = "write one 'key: value' per line; close every [ and {, and quote a value holding ': ' or ' #'"
    return f"not valid YAML{where} ({problem})", fix


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping or raise one clear error (also for a key given twice)."""
    path = Path(path)
    if not path.is_file():
        raise DeepEMDError("config file not found", path, "check the --config path (see configs/ for examples)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise DeepEMDError(
            f"not valid YAML (not UTF-8 text: byte {exc.start})", path, "save the config as UTF-8 text"
        ) from None
    except _DuplicateKeyError as exc:
        raise DeepEMDError(f"not valid YAML ({exc.problem})", path, "write each option once, as 'key: value'") from None
    except yaml.YAMLError as exc:
        message, fix = _yaml_syntax_error(exc)
        raise DeepEMDError(message, path, fix) from None
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
        hint = (
            f"renamed: {renamed[key]}"
            if key in renamed
            else f"did you mean '{close[0]}'?"
            if close
            else f"known options: {', '.join(sorted(types_))}"
        )
        raise DeepEMDError(f"unknown config key '{key}'", source, hint)
    kwargs = {k: _coerce(k, v, types_[k], source) for k, v in values.items()}
    fields = _fields(cls)
    for k, v in kwargs.items():
        _check_rules(k, v, fields[k].metadata, source)
    return cls(**kwargs)


class _ChoicesAction(argparse.Action):
    """Stores the raw value like the default action; keeps the option's lazy choices so the help
    formatter can list them without importing registries at start-up."""

    def __init__(self, *args: Any, lazy_choices: Choices | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_choices = lazy_choices

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)


#: Docstring markup a terminal would show raw: ``x``, `x`, :class:`x` / :func:`~x` and **x**.
_MARKUP = re.compile(r":[a-z]+:`~?([^`]+)`|``([^`]+)``|`([^`]+)`|\*\*(.+?)\*\*")


def plain_text(text: str) -> str:
    """``text`` without its RST/markdown markup: ``--help`` shows dataclass docstrings.

    >>> plain_text("`deepemd demo`: with ``index`` and :class:`~deepemd.Registry`, **once**")
    'deepemd demo: with index and deepemd.Registry, once'
    """
    return _MARKUP.sub(lambda match: next(group for group in match.groups() if group), text)


def shown_default(default: Any) -> str | None:
    """A default as it is typed on the command line, or None where there is nothing to show
    (None and an empty tuple mean "not given": the help says what happens then)."""
    if default is None or default == () or default is argparse.SUPPRESS:
        return None
    if isinstance(default, bool):
        return str(default).lower()
    return " ".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)


class HelpFormatter(argparse.HelpFormatter):
    """Plain-text help: markup stripped, then each option's default (``field_default`` of a
    dataclass option, see :func:`add_dataclass_arguments`, else argparse's) unless its help
    already says it, then its valid choices (read from its registry)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = plain_text(action.help or "")
        # a flag taking no value (store_true, --help) has no default worth a word
        if action.option_strings and action.nargs != 0 and "default" not in text:
            shown = shown_default(getattr(action, "field_default", action.default))
            if shown is not None:
                text = f"{text} (default: {shown})".strip()
        names = _choice_names(getattr(action, "lazy_choices", None))
        if names:
            text = f"{text} [choices: {', '.join(names)}]"
        return text.replace("%", "%%")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Expose every dataclass field as ``--field-name``. Argparse's default is None ("not
    given", so YAML values stand); the field's own default is kept as the action's
    ``field_default`` for :class:`HelpFormatter` to show."""
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        text = str(f.metadata.get("help", ""))
        hint = types_[f.name]
        if hint is bool:  # `--flag` alone means true; `--flag false` still works
            action = parser.add_argument(
                flag, dest=f.name, default=None, nargs="?", const="true", metavar="true|false", help=text
            )
        else:
            nargs = "+" if typing.get_origin(hint) in (tuple, list) else None
            lazy = f.metadata.get("choices")
            action = parser.add_argument(
                flag, dest=f.name, default=None, nargs=nargs, help=text, action=_ChoicesAction, lazy_choices=lazy
            )
        action.field_default = default  # type: ignore[attr-defined]  # read by HelpFormatter


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Defaults < ``--config`` YAML < explicit command-line flags; every value checked."""
    values: dict[str, Any] = {}
    source = "command line"
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(read_yaml(config_path))
        source = str(config_path)
    cfg = build_config(cls, values, source)
    fields, types_ = _fields(cls), _field_types(cls)
    overrides = {}
    for key, raw in vars(args).items():
        if key in fields and raw is not None:
            overrides[key] = _coerce(key, raw, types_[key], "command line")
            _check_rules(key, overrides[key], fields[key].metadata, "command line")
    return dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]  # cfg is a dataclass instance


def add_command(
    subparsers: argparse._SubParsersAction, name: str, cls: type[T], run: Callable[[T], int | None], help_: str
) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of ``cls``: ``--config`` YAML plus one flag per
    field, choices listed in ``--help``; ``run`` gets the checked config."""
    parser = subparsers.add_parser(
        name, help=help_.replace("%", "%%"), description=(cls.__doc__ or help_).strip(), formatter_class=HelpFormatter
    )
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it; see configs/)")
    add_dataclass_arguments(parser, cls)
    parser.set_defaults(func=lambda args: run(checked_outputs(config_from_args(cls, args))), config_class=cls)
    return parser


def checked_outputs(cfg: T) -> T:
    """``cfg`` once its ``out`` folder (from a flag or the YAML) is known to be usable: a file
    there, a file above it or a folder this user may not write is refused before any work."""
    out = getattr(cfg, "out", None)
    if out:
        from deepemd.io import check_output_folder

        check_output_folder(out)
    return cfg
