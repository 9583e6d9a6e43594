"""Shared fixtures: tiny, fast and deterministic.

Fixtures any test file may use:

- ``generator``: a CPU ``torch.Generator`` seeded with 0.
- ``quadratic_family``: ``QuadraticFamily(dim=3, num_functions=4)`` (float32).
- ``quadratic_task``: one task drawn from ``quadratic_family`` with ``generator``.
- ``quadratic_task64``: a float64 ``QuadraticTask`` (dim 3, 2 functions) for exact parity checks.
- ``lstm_rule``: ``CoordinatewiseLSTM(hidden_size=4)`` (2 layers, log-sign preprocessing).
- ``linear_rule``: ``CoordinatewiseLinear(lr=0.1)`` (update ``-0.1 * g``, float32).
- ``regression_data``: float64 ``(inputs (16, 3), targets (16, 2))`` for a tiny linear regression.
- ``module_task64``: a float64 full-batch ``ModuleTask`` training ``nn.Linear(3, 2)`` with MSE on
  ``regression_data``.

An autouse fixture seeds the global RNG with ``torch.manual_seed(0)`` before every test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_l2l.nets import CoordinatewiseLinear, CoordinatewiseLSTM
from lightning_l2l.tasks import ModuleTask, QuadraticFamily, QuadraticTask
from lightning_l2l.tasks.images import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]


def _fashion_mnist_line() -> str:
    from tests.image_data import FASHION_SAMPLE_DIR, full_fashion_mnist

    if full_fashion_mnist():
        return f"Fashion-MNIST: the full set at {FASHION_MNIST_DIR}"
    return (
        f"Fashion-MNIST: the full set is not at {FASHION_MNIST_DIR} (`make test` installs it where apt-get can); "
        f"the conv-net configs run on the 2,000-image sample in {FASHION_SAMPLE_DIR.relative_to(ROOT)}, "
        "and the tests that need all 70,000 images skip"
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Say which Fashion-MNIST this run tests on (the conv-net configs read it)."""
    return _fashion_mnist_line()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The same line after the results (``-q`` hides the header)."""
    terminalreporter.write_line(_fashion_mnist_line())


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: the suite is thousands of tiny ops, which threads only slow down
    (spin-waiting), many times over on a busy 2-core CI machine."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded with 0."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def quadratic_family() -> QuadraticFamily:
    """Four 3-d quadratics per task (float32, N(0, 1) entries)."""
    return QuadraticFamily(dim=3, num_functions=4)


@pytest.fixture
def quadratic_task(quadratic_family: QuadraticFamily, generator: torch.Generator) -> QuadraticTask:
    """One task of ``quadratic_family``."""
    return quadratic_family.sample(generator)


@pytest.fixture
def quadratic_task64(generator: torch.Generator) -> QuadraticTask:
    """A float64 task of two 3-d quadratics with a theta_0 far enough from the optimum to move."""
    return QuadraticFamily(dim=3, num_functions=2, init_std=1.0, dtype=torch.float64).sample(generator)


@pytest.fixture
def lstm_rule() -> CoordinatewiseLSTM:
    """The paper's LSTM rule, shrunk to 4 hidden units."""
    return CoordinatewiseLSTM(hidden_size=4)


@pytest.fixture
def linear_rule() -> CoordinatewiseLinear:
    """Learned SGD starting at lr 0.1."""
    return CoordinatewiseLinear(lr=0.1)


@pytest.fixture
def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    """16 float64 samples of a noisy 3 -> 2 linear map."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    return x, y


@pytest.fixture
def module_task64(regression_data: tuple[torch.Tensor, torch.Tensor]) -> ModuleTask:
    """Full-batch float64 MSE regression with ``nn.Linear(3, 2)`` (parameters ``weight``, ``bias``)."""
    x, y = regression_data
    module = nn.Linear(3, 2).double()
    return ModuleTask(module, x, y, loss_fn=nn.functional.mse_loss, batch_size=None)
