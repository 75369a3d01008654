"""Shared fixtures. Tests never reach the Hub: HF_HUB_OFFLINE is forced for the whole session."""
from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pytest  # noqa: E402
import torch  # noqa: E402

import timm_dropres  # noqa: E402,F401  (registers the models)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator (e.g. its mixed precision); the
    library never resets it (there is no public API), so tests that use other settings start from a clean one,
    as accelerate's own test cases do."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread, and on a busy 2-core box two threads spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_report_header(config: pytest.Config) -> str:
    import timm
    return f'torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}'
