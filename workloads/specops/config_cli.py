"""Config fields as command-line flags, derived from the pydantic models by pydantic-settings.

`add_config_arguments(parser, Model)` gives a command `--config FILE`, `--print-config` and one
flag per field (`--epochs`, `--engine.batchSize` or `--engine.batch_size`, lists as JSON, comma
lists or repeated flags, `null` for unset), each listed in `--help` with its description, type and
default, grouped by section. Entries of a list of sections are set by index
(`--datasets.0.maxSamples 10`; index = length appends an entry). `resolve(args)` reads the YAML
with the strict loader of `specops.config`, applies the flags on top and validates once, so a
bad flag fails like a bad file: one line naming the field as it was typed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.alias_generators import to_snake
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

from specops.config import ConfigError, Contract, load_config

_LIST_ITEM = re.compile(r"^--((?:[A-Za-z_][A-Za-z0-9_]*\.)*[A-Za-z_][A-Za-z0-9_]*)\.(\d+)\.([A-Za-z0-9_.]+)$")
_SOURCE = "_config_source"


def add_config_arguments(parser: argparse.ArgumentParser, model: type[Contract], what: str) -> None:
    """Register `--config`, `--print-config` and every field of `model` (and of its list entries)."""
    parser.add_argument("--config", type=Path, metavar="FILE", help=f"{what} YAML file; flags override it")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file + flags + defaults) as YAML and exit; the output can be "
        "fed back with --config",
    )
    # pydantic-settings builds parsers for BaseSettings classes only: this twin of `model` only
    # shapes the parser and is never instantiated (no environment variable is read).
    settings = type(
        model.__name__, (BaseSettings, model), {"model_config": SettingsConfigDict(**model.model_config)}
    )
    source: CliSettingsSource[Any] = CliSettingsSource(
        settings,
        root_parser=parser,
        cli_parse_args=False,
        cli_implicit_flags=False,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_use_class_docs_for_groups=True,
        cli_parse_none_str="null",
    )
    for path, item in _list_sections(model):
        group = parser.add_argument_group(
            f"{path}.N options", f"Entry N of `{path}` ({_doc(item)}); N = its length appends one."
        )
        for flag, info in leaf_fields(item):
            group.add_argument(
                f"--{path}.N.{flag}",
                help=_describe(info),
                metavar=_type_name(info.annotation),
                default=argparse.SUPPRESS,
            )
    flags = tuple(s for action in parser._actions for s in action.option_strings if s.startswith("--"))
    parser.set_defaults(**{_SOURCE: _Registered(model, source, flags)})


def takes_config(args: argparse.Namespace) -> bool:
    """Whether the parsed command was registered with `add_config_arguments`."""
    return hasattr(args, _SOURCE)


def resolve(args: argparse.Namespace, argv: Sequence[str], extra: Sequence[str] = ()) -> Contract:
    """The validated config: the `--config` file (or nothing), then the flags parsed into `args`
    from `argv`, then the list-entry flags in `extra` (what argparse left over). Raises
    ConfigError naming the field as it was typed."""
    registered: _Registered = getattr(args, _SOURCE)
    known = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != _SOURCE})
    overrides = _flatten(registered.source(parsed_args=known)())
    overrides.update(_list_item_overrides(registered, extra))
    spelled = _spellings(argv)
    typed = {spelled.get(tuple(to_snake(p) for p in key.split(".")), key): v for key, v in overrides.items()}
    source: Path | dict[str, Any] = args.config if args.config is not None else {}
    return load_config(registered.model, source, typed, label="the command line")


def print_config(config: BaseModel) -> str:
    """Every field, defaults and nulls included, camelCase: `--config` reads it back unchanged."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


# --------------------------------------------------------------------------- helpers


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"engine": {"batchSize": "4"}} -> {"engine.batchSize": "4"} (workload configs hold no maps)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _spellings(argv: Sequence[str]) -> dict[tuple[str, ...], str]:
    """snake_case path -> the flag as typed (`--engine.batchSize` -> ("engine", "batch_size"))."""
    out: dict[tuple[str, ...], str] = {}
    for token in argv:
        if token.startswith("--"):
            flag = token[2:].partition("=")[0]
            out[tuple(to_snake(p) for p in flag.split("."))] = flag
    return out


class _Registered(NamedTuple):
    model: type[Contract]
    source: CliSettingsSource[Any]
    flags: tuple[str, ...]


def _list_item_overrides(registered: _Registered, extra: Sequence[str]) -> dict[str, Any]:
    """`--datasets.0.maxSamples 10` -> {"datasets.0.maxSamples": "10"}; anything else is refused."""
    out: dict[str, Any] = {}
    items = list(extra)
    while items:
        token = items.pop(0)
        flag, eq, value = token.partition("=")
        match = _LIST_ITEM.match(flag)
        if match is None:
            raise ConfigError(f"unrecognized argument {token!r}{_suggest(flag, registered.flags)}")
        section = _model_at(registered.model, match[1].split("."), list_of=True)
        leaf = _model_at(section, match[3].split("."), list_of=False) if section else None
        if section is None or leaf is None:
            raise ConfigError(
                f"unrecognized argument {flag!r}: no such field{_suggest(flag, registered.flags)}"
            )
        if not eq:
            if not items:
                raise ConfigError(f"argument {flag}: expected one argument")
            value = items.pop(0)
        out[flag[2:]] = _raw(value)
    return out


def _raw(value: str) -> Any:
    """A flag's text as pydantic should see it: `null` unsets, JSON lists/maps are parsed."""
    if value == "null":
        return None
    if value.startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _suggest(flag: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(flag, known, n=1)
    return f" (did you mean {close[0]}?)" if close else "; `--help` lists every field"


def _field(model: type[BaseModel], name: str) -> Any:
    """The FieldInfo of `name` (snake_case or its camelCase alias), or None."""
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return info
    return None


def _model_at(model: type[BaseModel], parts: list[str], list_of: bool) -> Any:
    """Walk field names (either spelling) through nested sections: the list entry model
    (`list_of`), or True for a plain field; None when the path names nothing."""
    current: Any = model
    for i, part in enumerate(parts):
        found = _field(current, part) if isinstance(current, type) else None
        if found is None:
            return None
        annotation = found.annotation
        last = i == len(parts) - 1
        if last and list_of:
            return list_item_model(annotation)
        current = section_model(annotation) if not last else True
        if current is None and not last:
            return None
    return current


def _list_sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    out: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        item = list_item_model(info.annotation)
        if item is not None:
            out.append((path, item))
        section = section_model(info.annotation)
        if section is not None:
            out.extend(_list_sections(section, path + "."))
    return out


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        section = section_model(info.annotation)
        out.extend(leaf_fields(section, path + ".") if section else [(path, info)])
    return out


def _options(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def section_model(annotation: Any) -> type[BaseModel] | None:
    for option in _options(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    for option in _options(annotation):
        if get_origin(option) is list:
            (item,) = get_args(option)
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


def _type_name(annotation: Any) -> str:
    names = []
    for option in _options(annotation):
        base = get_args(option)[0] if get_origin(option) is Annotated else option
        if get_origin(base) is Literal:
            names.append("{" + ",".join(str(a) for a in get_args(base)) + "}")
        else:
            names.append(getattr(base, "__name__", str(base)))
    return "|".join(names)


def _describe(info: Any) -> str:
    if info.is_required():
        return f"{info.description or ''} (required)".strip()
    value = info.get_default(call_default_factory=True)
    shown = value if isinstance(value, str) else json.dumps(value, default=str)
    return f"{info.description or ''} (default: {shown})".strip()


def _doc(model: type[BaseModel]) -> str:
    return (model.__doc__ or model.__name__).strip().splitlines()[0].rstrip(".")
