"""The shipped ``conv`` weights against the numbers published for them (slow: ``make test-slow``, ~15 min on 1 core).

Protocol of ``benchmarks/conv_compare.py --num-val 4 --num-test 32`` (docs/results/conv/summary.md):
the tasks of configs/conv.yaml's ``test_family`` (Fashion-MNIST test pool) with the labels of each
problem, the first 32 tasks of ``MetaLearner``'s test seed stream, the loss on 500 fixed images of
the pool at step 100. The baselines run at the learning rates tuned on the validation tasks. The
issue's bar is beating the best tuned baseline on the 10-, 5- and 2-class problems: these weights
(stage 2 of the recipe with calibrated update multipliers, x3.16 for the conv LSTM and x1.33 for the
fc LSTM) beat it on all three: 0.97x on 10 classes (the paired difference 2.2 standard errors below
zero), 0.85x on 5 and 0.46x on 2 (docs/results/conv); the tests pin that. On another CPU the means move by up to about a
standard error (docs/results/conv/README.md), hence the tolerances.
"""

from __future__ import annotations

import pytest
import torch

from lightning_l2l.evaluation import baseline_curve
from lightning_l2l.nets import CoordinatewiseLSTM, PerKindRule, ScaledRule
from lightning_l2l.pretrained import available, resolve
from lightning_l2l.tasks import ConvFamily
from lightning_l2l.trajectory import rule_curve
from tests.benchmark_scripts import load_benchmark
from tests.image_data import needs_full_fashion_mnist

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("conv" not in available(), reason="needs the shipped conv weights"),
    needs_full_fashion_mnist,
]

NUM_TEST = 32
#: docs/results/conv/summary.md: classes -> (published `conv` mean, its s.e.m., best tuned baseline, its lr,
#: its mean, its s.e.m.)
PUBLISHED = {
    10: (0.3750, 0.0045, "nag", 10**-0.75, 0.3857, 0.0040),
    5: (0.1972, 0.0036, "adam", 10**-2.0, 0.2316, 0.0036),
    2: (0.0251, 0.0021, "nag", 10**-1.25, 0.0545, 0.0026),
}
#: how far a mean may be from the published one, in its standard errors: on the machine that made the
#: numbers they are reproduced exactly; another CPU's float kernels move each task's loss at step 100 by
#: a few percent (docs/results/conv/README.md, "Machines"; tuned NAG on 2 classes: 0.0516 instead of
#: 0.0545, 1.1 s.e.). The rule shipped before (one multiplier, 1.78) is 1.8 s.e. from this rule's 10-class
#: mean and 2.4 s.e. from its 5-class one.
TOLERANCE_SEM = 2.0


def _mean_final(run, tasks: list) -> float:
    return sum(float(run(t)[-1]) for t in tasks) / len(tasks)


def _test_tasks(classes: int) -> list:
    """The test tasks of ``benchmarks/conv_compare.py`` (configs/conv.yaml's test family) for ``classes``."""
    compare = load_benchmark("conv_compare")
    family = ConvFamily(**{**compare.family_args(compare.ROOT / "configs" / "conv.yaml"),
                           "classes": compare.PROBLEMS[classes], "split": "test"})
    gen = torch.Generator().manual_seed(compare.TEST_SEED)
    return [family.sample(gen) for _ in range(NUM_TEST)]


def test_shipped_conv_is_the_calibrated_two_lstm_rule_of_configs_conv_stage2_yaml():
    rule, meta = resolve("conv")
    assert isinstance(rule, PerKindRule) and set(rule.kinds()) == {"conv", "fc"} and rule.default == "fc"
    assert meta["update_multiplier"] == {"conv": 3.16, "fc": 1.33}
    for kind, multiplier in meta["update_multiplier"].items():
        net = rule.networks[kind]
        assert isinstance(net, ScaledRule) and net.multiplier == multiplier and isinstance(net.rule, CoordinatewiseLSTM)
    hp = meta["meta_hparams"]
    assert (hp["unroll"], hp["num_val_tasks"], hp["truncations_per_epoch"], hp["step_weights"]) == (50, 4, 60, "linear")
    assert "configs/conv.yaml" in meta["command"] and "configs/conv_stage2.yaml" in meta["command"]


@pytest.mark.parametrize("classes", [10, 5, 2])
def test_shipped_conv_reproduces_its_published_numbers(classes):
    published, published_sem, baseline, lr, published_baseline, baseline_sem = PUBLISHED[classes]
    rule, _ = resolve("conv")
    rule.requires_grad_(False)
    tasks = _test_tasks(classes)
    learned = _mean_final(lambda t: rule_curve(rule, t, 100), tasks)
    tuned = _mean_final(lambda t: baseline_curve(baseline, lr, t, 100), tasks)
    assert abs(learned - published) < TOLERANCE_SEM * published_sem
    assert abs(tuned - published_baseline) < TOLERANCE_SEM * baseline_sem
    if classes in (5, 2):  # the bar, met by a wide margin on these two problems (0.85x, 0.46x)
        assert learned < 0.95 * tuned
    else:  # 0.97x on 10 classes: a smaller margin, but below tuned NAG
        assert learned < 0.99 * tuned
