"""The trainer's log: lines from the main process only, prefixed with the rank only when there are several.

``accelerate.logging.get_logger`` prefixes every line with ``[RANK 0]``, also in a single-process run where
there is no other rank to tell apart; this adapter keeps its main-process filtering and drops the prefix there.
"""
from __future__ import annotations

import logging
from typing import Any

from accelerate import PartialState

__all__ = ['main_process_logger']


class _MainProcessAdapter(logging.LoggerAdapter):
    """Log on the main process only (``main_process_only=False``: on every process); ``[RANK i]`` when several."""

    def log(self, level: int, msg: Any, *args: Any, main_process_only: bool = True, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        state = PartialState()
        if main_process_only and not state.is_main_process:
            return
        if state.num_processes > 1:
            msg = f'[RANK {state.process_index}] {msg}'
        kwargs.setdefault('stacklevel', 2)
        self.logger.log(level, msg, *args, **kwargs)


def main_process_logger(name: str) -> logging.LoggerAdapter:
    """The logger ``name`` wrapped as described in the module docstring (the same calls as ``logging.Logger``).

    Args:
        name: the logger's name (the module's ``__name__``).

    Returns:
        An adapter that logs on the main process only (``main_process_only=False``: on every process) and
        prefixes ``[RANK i]`` only when there are several processes.
    """
    return _MainProcessAdapter(logging.getLogger(name), {})
