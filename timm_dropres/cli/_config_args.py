"""Build an argparse parser from a config dataclass, with every flag also settable from YAML (``--config``).

The dataclass is the single source of option names, defaults and help, so the library, the CLI and
the YAML files cannot drift apart. argparse/pyyaml have no such bridge built in; this is ~60 lines.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Dict, Sequence, Type, TypeVar

import yaml

__all__ = ['build_parser', 'parse_config', 'load_yaml']

T = TypeVar('T')


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is optional) for annotations like ``int | None`` or ``List[float] | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _key_value(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a Python literal (``[16,32]``, ``0.1``, ``True``), else a string."""
    key, sep, value = text.partition('=')
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f'expected key=value with a Python identifier as key, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


class _MergeKeyValues(argparse.Action):
    """Collect ``key=value`` pairs into a dict, on top of the YAML's dict (command line wins)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        merged = dict(getattr(namespace, self.dest) or {})
        merged.update(dict(values))
        setattr(namespace, self.dest, merged)


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def build_parser(cls: Type[Any], description: str, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', metavar='YAML', help='read options from a YAML file; flags given on the command line '
                                                    'override it')
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        meta = dict(f.metadata)
        kw: Dict[str, Any] = dict(help=meta.pop('help', ''), dest=f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if tp is bool:
            kw['action'] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (dict, typing.Dict):
            kw['type'] = _key_value
            kw['nargs'] = '*'
            kw['metavar'] = 'KEY=VALUE'
            kw['action'] = _MergeKeyValues
        elif typing.get_origin(tp) in (list, typing.List):
            kw['type'] = typing.get_args(tp)[0]
            kw['nargs'] = meta.pop('nargs', '+')
        else:
            kw['type'] = tp
        if 'choices' in meta:
            kw['choices'] = list(meta.pop('choices'))
        kw['default'] = default
        p.add_argument(_flag(f.name), **kw)
    return p


def load_yaml(path: str | Path, cls: Type[Any]) -> Dict[str, Any]:
    """Read a YAML mapping of options; keys may use dashes or underscores. Unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'--config {path} does not exist')
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f'--config {path} must hold a mapping of option: value, got {type(data).__name__}')
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in data.items():
        key = str(k).replace('-', '_')
        if key not in names:
            raise ValueError(f'--config {path}: unknown option {k!r}; valid options: {sorted(names)}')
        out[key] = v
    return out


def parse_config(cls: Type[T], argv: Sequence[str] | None, description: str, prog: str | None = None) -> T:
    """Parse ``argv`` (YAML from ``--config`` first, command-line flags on top) into a ``cls`` instance."""
    parser = build_parser(cls, description, prog)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            parser.set_defaults(**load_yaml(pre.config, cls))
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    args = vars(parser.parse_args(argv))
    args.pop('config')
    try:
        return cls(**args)  # the config class validates its values
    except ValueError as e:
        parser.error(str(e))
