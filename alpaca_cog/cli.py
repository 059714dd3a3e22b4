"""Command lines derived from Cog-typed signatures, so each parameter is declared once (litgpt-style).

`python predict.py --prompt ...` and `python train.py --train_data ...` accept exactly the inputs
that Cog's server accepts, with the same defaults, choices and bounds.
"""

import argparse
import inspect
import pathlib
import re
import types
import typing
from typing import Any, Callable

import yaml
from cog.input import FieldInfo


def _base_type(tpe: Any) -> tuple[Any, bool]:
    """(T, optional) for T, Optional[T] or T | None."""
    if typing.get_origin(tpe) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tpe) if a is not type(None)]
        return args[0], True
    return tpe, False


def input_fields(fn: Callable) -> list[tuple[str, Any, FieldInfo, bool]]:
    hints = typing.get_type_hints(fn)
    fields = []
    for name, param in inspect.signature(fn).parameters.items():
        if name == "self":
            continue
        tpe, optional = _base_type(hints[name])
        default = param.default
        info = default if isinstance(default, FieldInfo) else FieldInfo(default=None if default is inspect.Parameter.empty else default)
        required = info.default is None and not optional
        fields.append((name, tpe, info, required))
    return fields


def parser_for(fn: Callable, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or inspect.getdoc(fn))
    parser.add_argument("--config", type=pathlib.Path, help="a YAML file of inputs; flags given as well override it")
    for name, tpe, info, _ in input_fields(fn):
        kwargs: dict[str, Any] = dict(default=info.default, help=info.description)
        if tpe is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = pathlib.Path if issubclass(tpe, pathlib.Path) else tpe
            kwargs["choices"] = info.choices
        if kwargs["help"] and info.default is not None:
            kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def _read_config(path: pathlib.Path, input_types: dict[str, Any], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Inputs from a YAML mapping, typed as the command line would type them; errors name the file and key."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"--config: cannot read {path}: {e}")
    if not isinstance(values, dict):
        parser.error(f"--config: {path} must hold a mapping of input names to values")
    for key, value in values.items():
        if key not in input_types:
            parser.error(f"--config: {path}: unknown input {key!r} (inputs: {', '.join(input_types)})")
        tpe = input_types[key]
        if value is None:
            continue
        if issubclass(tpe, pathlib.Path) and isinstance(value, str):
            values[key] = pathlib.Path(value)
        elif tpe is float and type(value) is int:
            values[key] = float(value)
        elif type(value) is not tpe:
            parser.error(f"--config: {path}: {key}: expected {tpe.__name__}, got {value!r}")
    return values


def parse_inputs(fn: Callable, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> dict[str, Any]:
    """Parse argv (and --config) and check the same bounds Cog's server checks; returns fn's keyword arguments only."""
    fields = input_fields(fn)
    config = parser.parse_known_args(argv)[0].config
    if config is not None:
        parser.set_defaults(**_read_config(config, {name: tpe for name, tpe, *_ in fields}, parser))
    args = vars(parser.parse_args(argv))
    for name, _, info, required in fields:
        value = args[name]
        if value is None:
            if required:
                parser.error(f"--{name} is required")
            continue
        if info.ge is not None and value < info.ge:
            parser.error(f"--{name}: {value} is less than the minimum of {info.ge}")
        if info.le is not None and value > info.le:
            parser.error(f"--{name}: {value} is greater than the maximum of {info.le}")
        if info.min_length is not None and len(value) < info.min_length:
            parser.error(f"--{name}: must not be empty")
        if info.regex is not None and not re.match(info.regex, value):
            parser.error(f"--{name}: {value!r} does not match {info.regex!r}")
        if info.choices is not None and value not in info.choices:  # a --config value skips argparse's own check
            parser.error(f"--{name}: {value!r} is not one of {info.choices}")
    return {name: args[name] for name, *_ in fields}


def defaults(fn: Callable) -> dict[str, Any]:
    """fn's default inputs, as Cog's server and the command line fill them in."""
    return {name: info.default for name, _, info, _ in input_fields(fn)}
