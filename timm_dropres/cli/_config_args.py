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


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error becomes one ``ValueError`` line with the file and position."""
    try:
        return yaml.safe_load(path.read_text(encoding='utf-8')) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ValueError(f'--config {path} is not valid YAML{where}: {problem}') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f'--config {path} cannot be read: {e}') from None


def _describe(value: Any) -> str:
    """``value`` as the error shows it; a string says so (``'false'`` in quotes is not false)."""
    return f'{value!r} (a string)' if isinstance(value, str) else repr(value)


def _scalar(tp: Any, value: Any) -> Any:
    """``value`` as the flag's type would give it, or ``ValueError`` saying what was expected.

    YAML already typed the value, so only what the command line could also give is accepted: a real
    boolean for a switch (``"false"`` in quotes is a string, not false), an integer for an integer option
    (``1.7`` is refused, as ``--epochs 1.7`` is), and numbers written as strings (``1e-3`` is a string to
    YAML 1.1) converted by the flag's own type.
    """
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f'expected true or false, got {_describe(value)}')
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
                tp is int and isinstance(value, float)):
            raise ValueError(f'expected {"an integer" if tp is int else "a number"}, got {_describe(value)}')
        try:
            return tp(value) if isinstance(value, str) or tp is float else value
        except ValueError:
            raise ValueError(f'expected {"an integer" if tp is int else "a number"}, got {_describe(value)}') from None
    if tp is str and not isinstance(value, str):
        raise ValueError(f'expected a string, got {_describe(value)}')
    return value


def check_yaml_types(cls: Type[Any], values: Dict[str, Any], path: str | Path) -> Dict[str, Any]:
    """Give every YAML value the type and choice checks its command-line flag has.

    argparse converts and checks what is typed on the command line, but values it receives as defaults (how
    ``--config`` works) pass unchecked; this applies the same rules, from the same dataclass fields.

    Args:
        cls: the config dataclass.
        values: ``{field name: YAML value}``.
        path: the YAML file (for the message).

    Returns:
        The values, converted (``'1e-3'`` -> 0.001).

    Raises:
        ValueError: ``--config <path>: <key>: expected ..., got ...``, naming the valid choices when there are some.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        f = fields[key]
        tp, optional = _base_type(hints[key])
        try:
            if value is None:
                if not optional:
                    raise ValueError('expected a value, got null')
            elif typing.get_origin(tp) in (dict, typing.Dict):
                if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
                    raise ValueError(f'expected a mapping of name: value, got {_describe(value)}')
            elif typing.get_origin(tp) in (list, typing.List):
                nargs = f.metadata.get('nargs', '+')
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if not isinstance(value, list):
                    raise ValueError(f'expected a list, got {_describe(value)}')
                if isinstance(nargs, int) and len(value) != nargs:
                    raise ValueError(f'expected a list of {nargs} values, got {value!r}')
                if nargs == '+' and not value and default != []:
                    raise ValueError('expected a list of at least one value, got []')
                elem = typing.get_args(tp)[0]
                value = [_scalar(elem, v) for v in value]
            else:
                value = _scalar(tp, value)
            choices = f.metadata.get('choices')
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f'got {value!r}; valid choices: {list(choices)}')
        except ValueError as e:
            raise ValueError(f'--config {path}: {key}: {e}') from None
        out[key] = value
    return out


def load_yaml(path: str | Path, cls: Type[Any]) -> Dict[str, Any]:
    """Read a YAML mapping of options; keys may use dashes or underscores. Unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'--config {path} does not exist')
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f'--config {path} must hold a mapping of option: value, got {type(data).__name__}')
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in data.items():
        key = str(k).replace('-', '_')
        if key not in names:
            raise ValueError(f'--config {path}: unknown option {k!r}; valid options: {sorted(names)}')
        out[key] = v
    return check_yaml_types(cls, out, path)


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
