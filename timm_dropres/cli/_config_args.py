"""Build an argparse parser from a config dataclass, with every flag also settable from YAML (``--config``).

The dataclass is the single source of option names, defaults and help, so the library, the CLI and
the YAML files cannot drift apart. argparse/pyyaml have no such bridge built in; this is ~150 lines.

Flags are never abbreviated (``allow_abbrev=False``): timm's names that differ from ours are explicit
aliases (``--drop``, ``-b``, ``-j``, ``--model-ema``, ``--amp``, ...), listed in each field's metadata, and
are also accepted as YAML keys (``drop: 0.1``).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Sequence, Type, TypeVar

import yaml

from ..recipes import find_recipe, list_recipes

__all__ = ['build_parser', 'parse_config', 'load_yaml', 'yaml_aliases']

T = TypeVar('T')

#: timm's --amp-dtype values -> accelerate's mixed-precision names
_AMP_DTYPES = {'float16': 'fp16', 'bfloat16': 'bf16'}


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


class _Amp(argparse.Action):
    """timm's ``--amp``: mixed precision on, float16 unless a dtype was already chosen."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) in (None, 'no'):
            setattr(namespace, self.dest, 'fp16')


class _AmpDtype(argparse.Action):
    """timm's ``--amp-dtype float16|bfloat16``: mixed precision on with that dtype."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, _AMP_DTYPES[values])


class _ListRecipes(argparse.Action):
    """``--list-configs``: print the shipped recipes and exit, as ``--version`` does."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        for name in list_recipes():
            print(f'{name:40s} {find_recipe(name)}')
        parser.exit()


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def _help(text: str, default: Any) -> str:
    """``text`` plus the default, once: not when the text already says it, nor for an empty default."""
    if 'default' not in text.lower() and default not in (None, '', [], {}):
        text += f' (default: {default})'
    return text.replace('%', '%%')  # argparse %-formats help strings


def yaml_aliases(cls: Type[Any]) -> Dict[str, str]:
    """YAML keys that are timm's long flag aliases (``drop``, ``model_ema``, ``workers``) -> field names."""
    out = {}
    for f in dataclasses.fields(cls):
        for alias in f.metadata.get('aliases', ()):
            if alias.startswith('--'):
                out[alias[2:].replace('-', '_')] = f.name
    return out


def build_parser(cls: Type[Any], description: str, prog: str | None = None,
                 recipes: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with one flag (plus aliases) per field of the dataclass ``cls``.

    Args:
        cls: the config dataclass; each field's metadata holds its help text and argparse settings.
        description: the parser's description.
        prog: the program name in usage lines.
        recipes: add ``--list-configs`` (the shipped recipes are for this command).

    Returns:
        The parser; ``--config`` is its first option.
    """
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    config_help = 'read options from a YAML file; flags given on the command line override it'
    if recipes:
        config_help += ('. A shipped recipe can be named instead of a path (e.g. fashion_mnist_resnet18, '
                        'paper/preresnet110_cifar10); --list-configs lists them')
        p.add_argument('--list-configs', action=_ListRecipes, help='list the shipped recipes and exit')
    p.add_argument('--config', metavar='YAML', help=config_help)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        meta = dict(f.metadata)
        text = meta.pop('help', '')
        aliases: List[str] = list(meta.pop('aliases', ()))
        amp_flags = meta.pop('amp_flags', False)
        kw: Dict[str, Any] = dict(dest=f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if tp is bool:
            kw['action'] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (dict, typing.Dict):
            kw.update(type=_key_value, nargs='*', metavar='KEY=VALUE', action=_MergeKeyValues)
        elif typing.get_origin(tp) in (list, typing.List):
            kw['type'] = typing.get_args(tp)[0]
            kw['nargs'] = meta.pop('nargs', '+')
        else:
            kw['type'] = tp
        if 'choices' in meta:
            kw['choices'] = list(meta.pop('choices'))
        kw.update(meta)  # nargs, const, metavar
        kw['default'] = default
        action = p.add_argument(_flag(f.name), *aliases, **kw)
        action.help = _help(text, default)  # set afterwards: BooleanOptionalAction would append its own default
        if amp_flags:
            p.add_argument('--amp', action=_Amp, nargs=0, dest=f.name,
                           help=f'as timm: mixed precision, float16 unless {_flag(f.name)} or --amp-dtype says bf16')
            p.add_argument('--amp-dtype', action=_AmpDtype, dest=f.name, choices=list(_AMP_DTYPES),
                           help=f'as timm: mixed precision with this dtype (= {_flag(f.name)} fp16 / bf16)')
    return p


def load_yaml(path: str | Path, cls: Type[Any]) -> Dict[str, Any]:
    """Read a YAML mapping of options; keys may use dashes or underscores, or be timm's flag names.

    Args:
        path: the YAML file.
        cls: the config dataclass whose fields are the valid keys.

    Returns:
        ``{field name: value}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a mapping, an unknown key (the message lists the valid ones), or a key given twice
            under two names (``drop`` and ``drop_rate``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'--config {path} does not exist')
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f'--config {path} must hold a mapping of option: value, got {type(data).__name__}')
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = yaml_aliases(cls)
    out: Dict[str, Any] = {}
    for k, v in data.items():
        key = str(k).replace('-', '_')
        key = aliases.get(key, key)
        if key not in names:
            raise ValueError(f'--config {path}: unknown option {k!r}; valid options: {sorted(names)}')
        if key in out:
            raise ValueError(f'--config {path}: {key!r} is given twice (as {k!r} and under another name)')
        out[key] = v
    return out


def parse_config(cls: Type[T], argv: Sequence[str] | None, description: str, prog: str | None = None,
                 recipes: bool = False) -> T:
    """Parse ``argv`` (YAML from ``--config`` first, command-line flags on top) into a ``cls`` instance.

    Args:
        cls: the config dataclass.
        argv: the arguments (None: ``sys.argv[1:]``).
        description: the parser's description.
        prog: the program name.
        recipes: ``--config`` may name a shipped recipe, and ``--list-configs`` lists them.

    Returns:
        The validated config; bad input exits with argparse's usage error (status 2).
    """
    parser = build_parser(cls, description, prog, recipes=recipes)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            path = find_recipe(pre.config) if recipes else Path(pre.config)
            parser.set_defaults(**load_yaml(path, cls))
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    args = vars(parser.parse_args(argv))
    args.pop('config')
    try:
        return cls(**args)  # the config class validates its values
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
