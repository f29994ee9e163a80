"""Shared pytest configuration: offline hub, the ``slow`` marker, image fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Make the package importable when pytest is run from anywhere without an install.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: full-size timm configs (several seconds each); run in CI, skip locally with "
        "-m 'not slow'",
    )


@pytest.fixture
def make_images():
    """Factory for a seeded random image batch: ``make_images(batch, size, in_chans=3, seed=0)``.

    ``size`` is an int (square) or ``(height, width)``.
    """

    def _make(batch: int, size, in_chans: int = 3, seed: int = 0) -> torch.Tensor:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        torch.manual_seed(seed)
        return torch.randn(batch, in_chans, h, w)

    return _make


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread
    (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models run fastest single-threaded: OpenMP synchronisation would dominate their small ops,
    above all on busy shared cores. The setting is restored after the module.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
