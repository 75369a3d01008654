"""Run a Python script (timm's ``train.py``, ``validate.py``, ``inference.py``, ``benchmark.py``) with the plugin.

timm has no plugin entry points, so its scripts only know the ``*_dropres`` models when something
imports ``timm_dropres`` first (``train.py --device-modules timm_dropres`` does, the other scripts have
no such flag). This launcher imports the plugin, then runs the script as ``python SCRIPT ARGS`` would: same
``sys.argv``, the script's folder first on ``sys.path``, ``__name__ == '__main__'``. One difference: timm is
the installed one, already imported by the plugin (which registers its models there), also when the script sits
in a timm checkout whose own ``timm/`` ``python SCRIPT`` would import; the launcher then says so on stderr
(``pip install -e <checkout>`` makes the checkout the installed timm)::

    python -m timm_dropres.launch train.py --model resnet50_dropres.a1_in1k --pretrained --data-dir /data ...
    python -m timm_dropres.launch validate.py --model local-dir:runs/pets/best --data-dir /data/pets
    torchrun --nproc_per_node 8 -m timm_dropres.launch train.py --model resnet50_dropres ...

``dropres-timm SCRIPT ARGS`` is the same command as a console script.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ['run_script', 'main']

_USAGE = ('usage: python -m timm_dropres.launch SCRIPT [ARGS ...]\n'
          'Runs SCRIPT (e.g. timm\'s train.py, validate.py, inference.py, benchmark.py) with the *_dropres models '
          'registered.\ntimm\'s scripts are not in its pip package: take them from a checkout of '
          'https://github.com/huggingface/pytorch-image-models at the tag of your timm version.')


def _missing(script: str | Path) -> str:
    return (f'{script}: no such script. timm\'s train.py, validate.py, inference.py and benchmark.py are not in its '
            'pip package; take them from a checkout of https://github.com/huggingface/pytorch-image-models at your '
            'timm version\'s tag')


def run_script(script: str | Path, args: Sequence[str] = ()) -> None:
    """Import ``timm_dropres`` (registering its models), then run ``script`` as ``__main__`` with ``args``.

    Args:
        script: path of the Python file to run.
        args: its command-line arguments (``sys.argv[1:]`` as the script sees it).

    Raises:
        FileNotFoundError: ``script`` is not a file.
        SystemExit: whatever the script exits with.
    """
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(_missing(script))
    import timm_dropres  # noqa: F401  (registers the *_dropres models with timm)

    _note_checkout(path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.resolve().parent))  # as `python script.py` puts the script's folder first
    runpy.run_path(str(path), run_name='__main__')


def _note_checkout(script: Path) -> None:
    """One stderr line when ``script`` sits in a timm checkout other than the installed timm the run uses."""
    import timm

    checkout = script.resolve().parent / 'timm'
    installed = Path(timm.__file__).resolve().parent
    if (checkout / '__init__.py').is_file() and checkout != installed:
        print(f'dropres-timm: note: {script} sits in a timm checkout, but it runs with the installed timm '
              f'{timm.__version__} ({installed}), where the plugin registers its models, not with {checkout}; '
              f'`pip install -e {checkout.parent}` makes the checkout the installed timm', file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_dropres.launch SCRIPT [ARGS ...]``; returns the exit status (0 when the script returns)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if not Path(argv[0]).is_file():  # checked here, so that the script's own FileNotFoundError is not caught
        print(f'dropres-timm: error: {_missing(argv[0])}', file=sys.stderr)
        return 2
    run_script(argv[0], argv[1:])
    return 0


if __name__ == '__main__':
    sys.exit(main())
