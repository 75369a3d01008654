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
from typing import Any, Callable, Dict, List, Sequence, Tuple, Type, TypeVar

import yaml

from ..checks import cut
from ..errors import OptionMessage
from ..recipes import find_recipe, list_recipes
from ..strict_yaml import safe_load_strict
from ..training.runs import error_line
from ._parser import OneLineParser

__all__ = ['build_parser', 'parse_config', 'parse_checked', 'flag_message', 'load_yaml', 'yaml_aliases',
           'recipe_command']

T = TypeVar('T')
R = TypeVar('R')

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
    """``--list-configs``: print the shipped recipes, the command each is for, and exit (as ``--version`` does)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        for name in list_recipes():  # each with the command that takes it: not all are for this one
            print(f'{name:34s} {recipe_command(name):33s} {find_recipe(name)}')
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
    p = OneLineParser(prog=prog, description=description, allow_abbrev=False)
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


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error becomes one ``ValueError`` line with the file and position."""
    try:
        return safe_load_strict(path.read_text(encoding='utf-8')) or {}  # a key given twice is refused
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ValueError(f'--config {path} is not valid YAML{where}: {problem}') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f'--config {path} cannot be read: {e}') from None


def _describe(value: Any) -> str:
    """``value`` as the error shows it; a string says so (``'false'`` in quotes is not false)."""
    return f'{cut(value)} (a string)' if isinstance(value, str) else cut(value)  # never expands an anchor bomb


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
                    raise ValueError(f'expected a list of {nargs} values, got {cut(value)}')
                if nargs == '+' and not value and default != []:
                    raise ValueError('expected a list of at least one value, got []')
                elem = typing.get_args(tp)[0]
                value = [_scalar(elem, v) for v in value]
            else:
                value = _scalar(tp, value)
            choices = f.metadata.get('choices')
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f'got {cut(value)}; valid choices: {list(choices)}')
        except ValueError as e:
            raise ValueError(f'--config {path}: {key}: {e}') from None
        out[key] = value
    return out


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
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f'--config {path} must hold a mapping of option: value, got {type(data).__name__}')
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = yaml_aliases(cls)
    out: Dict[str, Any] = {}
    for k, v in data.items():
        key = str(k).replace('-', '_')
        key = aliases.get(key, key)
        if key not in names:
            raise ValueError(f'--config {path}: unknown option {cut(k)}; valid options: {sorted(names)}')
        if key in out:
            raise ValueError(f'--config {path}: {key!r} is given twice (as {k!r} and under another name)')
        out[key] = v
    return check_yaml_types(cls, out, path)


def flag_message(e: BaseException) -> str:
    """The one line that explains ``e``, with the library's option names rendered as this CLI's flags.

    Args:
        e: an error from the library; one with an :class:`~timm_dropres.errors.OptionMessage` (an
            ``OptionError``, a run folder or checkpoint refusal, a diverged run) names options by their config
            field names, which become ``--field-name`` here.

    Returns:
        The message (a DataLoader worker's traceback reduced to its last line, see ``error_line``).
    """
    if isinstance(e, OptionMessage) and (e.options or e.values):  # (one from a loader worker is plain text)
        return e.render(_flag)
    return error_line(e)


def _parse(parser: argparse.ArgumentParser, cls: Type[T], argv: Sequence[str] | None, recipes: bool,
           prog: str | None) -> T:
    """``argv`` (YAML from ``--config`` first, flags on top) into a ``cls`` instance; bad input is a usage error."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            path = find_recipe(pre.config) if recipes else Path(pre.config)
            parser.set_defaults(**load_yaml(path, cls))
        except (FileNotFoundError, ValueError) as e:
            parser.error(flag_message(e) + (_other_command(pre.config, prog) if recipes else ''))
    args = vars(parser.parse_args(argv))
    args.pop('config')
    try:
        return cls(**args)  # the config class validates its values
    except (ValueError, FileNotFoundError) as e:
        parser.error(flag_message(e))


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
    return _parse(build_parser(cls, description, prog, recipes=recipes), cls, argv, recipes, prog)


def parse_checked(cls: Type[T], argv: Sequence[str] | None, description: str, prog: str | None,
                  check: Callable[[T], R], recipes: bool = False) -> Tuple[T, R]:
    """:func:`parse_config`, then the library's boundary check (``check(config)``), both as usage errors.

    Args:
        cls: the config dataclass.
        argv: the arguments (None: ``sys.argv[1:]``).
        description: the parser's description.
        prog: the program name.
        check: the library function that checks what needs the registry or the file system, e.g.
            :func:`timm_dropres.training.build.resolve_model`.
        recipes: as for :func:`parse_config`.

    Returns:
        ``(config, check(config))``; an error of either exits with argparse's usage error (status 2), naming
        the flags.
    """
    parser = build_parser(cls, description, prog, recipes=recipes)
    cfg = _parse(parser, cls, argv, recipes, prog)
    try:
        return cfg, check(cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.error(flag_message(e))

def _other_command(config: str, prog: str | None) -> str:
    """`` (<recipe> is a recipe for <command>)`` when ``--config`` names a shipped recipe of another command."""
    try:
        path = find_recipe(config).resolve()
    except FileNotFoundError:
        return ''
    name = next((n for n in list_recipes() if find_recipe(n).resolve() == path), None)
    if name is None or recipe_command(name).split()[0] == prog:
        return ''
    return f' ({name} is a recipe for {recipe_command(name)})'


def recipe_command(name: str) -> str:
    """The command a shipped recipe is for, as ``--list-configs`` shows it.

    ``accelerate/*`` are ``accelerate launch --config_file`` configs; a recipe whose every key is a
    ``dropres-finetune`` option is a ``dropres-finetune --config`` recipe; ``studies/*`` are ``dropres-study``
    specifications; the first ablation's specifications (``ablation_fmnist``, ``study_overfit``) are re-analysed by
    ``dropres-ablate --report-only --config``.

    Args:
        name: a name from :func:`list_recipes`.

    Returns:
        The command line prefix that takes the recipe, e.g. ``'dropres-finetune --config'``.
    """
    from ..training.config import FinetuneConfig

    if name.startswith('accelerate/'):
        return 'accelerate launch --config_file'
    if name.startswith('studies/'):
        return 'dropres-study'
    data = yaml.safe_load(find_recipe(name).read_text(encoding='utf-8')) or {}
    keys = {str(k).replace('-', '_') for k in data} if isinstance(data, dict) else set()
    options = {f.name for f in dataclasses.fields(FinetuneConfig)} | set(yaml_aliases(FinetuneConfig))
    if keys <= options:
        return 'dropres-finetune --config'
    return 'dropres-ablate --report-only --config'
