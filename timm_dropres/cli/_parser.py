"""argparse with one-line errors: ``prog: error: <message>``, and the closest flag for a mistyped one.

argparse answers a mistyped ``--modle`` with the whole usage block (45 lines for ``dropres-finetune``) and no
hint. :class:`OneLineParser` prints one line instead, suggests the closest flags (``difflib``, as Python 3.14's
``suggest_on_error`` does for choices) and points to ``--help``. Python before 3.14 has no such option.
"""
from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, List, NoReturn

__all__ = ['OneLineParser']


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line, with "did you mean" for unknown flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: List[str] = []  # filled by add_argument, from each action's public option_strings
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags += [s for s in action.option_strings if s.startswith('--')]
        return action

    def suggest(self, flag: str) -> List[str]:
        """The known flags closest to ``flag`` (at most three, best first)."""
        return difflib.get_close_matches(flag.split('=', 1)[0], self.flags, n=3, cutoff=0.6)

    def error(self, message: str) -> NoReturn:
        m = re.match(r'unrecognized arguments: (.*)$', message)
        if m:
            hints = []
            for token in m.group(1).split():
                close = self.suggest(token) if token.startswith('-') else []
                if close:
                    hints.append(f'{token}: did you mean {" or ".join(close)}?')
            if hints:
                message += ' (' + '; '.join(hints) + ')'
        message = ' '.join(message.split())  # argparse's messages may hold newlines (our --config errors do not)
        self.exit(2, f'{self.prog}: error: {message}; {self.prog} --help lists every option\n')
