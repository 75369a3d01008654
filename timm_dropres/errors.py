"""Errors that name options in library terms, for every layer (below all subpackages, like ``files``).

A library function names the options it refuses by their field or parameter names (``lr``, ``out_dir``); each
front end renders its own names for them (the CLIs: ``--lr``, ``--out-dir``), so the library is tied to no
front end.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ['OptionMessage', 'OptionError']


class OptionMessage:
    """A message that names options by their config field names, for an error of any kind.

    Mixed into an exception class (before the builtin base), it takes a ``str.format`` template whose
    positional fields are the options it names and whose keyword fields are values, so a front end can name
    the options its own way with :meth:`render`. :class:`OptionError` is the bad-option one (a ``ValueError``);
    errors of other kinds (a run folder that cannot be used, a checkpoint that cannot be resumed, a run that
    diverged) mix it into their own base, so their hints name options the same way.

    Args:
        template: the message, e.g. ``'{0} must be > 0, got {value}'``.
        *options: the config fields the message names, in the template's positional order.
        **values: the values the template shows.
    """

    def __init__(self, template: str, *options: str, **values: Any) -> None:
        self.template, self.options, self.values = template, options, values
        super().__init__(self.render(lambda name: name))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every option named by ``name(field)``.

        Args:
            name: maps a field (or parameter) name to the name a front end uses for it.

        Returns:
            The message; a plain message (no options, no values) is returned as it is, braces and all.
        """
        if not self.options and not self.values:
            return self.template
        return self.template.format(*(name(o) for o in self.options), **self.values)


class OptionError(OptionMessage, ValueError):
    """A bad option value, phrased in library terms: options are named by their config field names.

    Args:
        template: the message, e.g. ``'{0} must be > 0, got {value}'``.
        *options: the config fields the message names, in the template's positional order.
        **values: the values the template shows.

    Example:
        >>> e = OptionError('{0} must be > 0, got {value}', 'lr', value=-1.0)
        >>> str(e), e.render(lambda name: '--' + name.replace('_', '-'))
        ('lr must be > 0, got -1.0', '--lr must be > 0, got -1.0')
    """
