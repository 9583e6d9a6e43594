"""The shipped ``conv`` weights against the numbers published for them (slow: ``make test-slow``, ~15 min on 1 core).

Protocol of ``benchmarks/conv_compare.py --num-val 4 --num-test 32`` (docs/results/conv/summary.md):
the tasks of configs/conv.yaml's ``test_family`` (Fashion-MNIST test pool) with the labels of each
problem, the first 32 tasks of ``MetaLearner``'s test seed stream, the loss on 500 fixed images of
the pool at step 100. The baselines run at the learning rates tuned on the validation tasks. The
issue's bar is beating the best tuned baseline on the 10-, 5- and 2-class problems: these weights
(stage 2 of the recipe at a calibrated update multiplier of 1.78) beat it clearly on 5 and 2
classes and are level with it on 10 (0.99x, the paired difference well within one standard error;
docs/results/conv); the tests pin exactly that. On another CPU the means move by up to about a
standard error (docs/results/conv/README.md), hence the tolerances.
"""

from __future__ import annotations

import pytest
import torch

from lightning_l2l.evaluation import baseline_curve
from lightning_l2l.nets import PerKindRule, ScaledRule
from lightning_l2l.pretrained import available, resolve
from lightning_l2l.tasks import ConvFamily
from lightning_l2l.tasks.images import FASHION_MNIST_DIR
from lightning_l2l.trajectory import rule_curve
from tests.benchmark_scripts import load_benchmark

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("conv" not in available(), reason="needs the shipped conv weights"),
    pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                       reason="needs `apt-get install dataset-fashion-mnist`"),
]

NUM_TEST = 32
#: docs/results/conv/summary.md: classes -> (published `conv` mean, its s.e.m., best tuned baseline, its lr,
#: its mean, its s.e.m.)
PUBLISHED = {
    10: (0.3830, 0.0041, "nag", 10**-0.75, 0.3857, 0.0040),
    5: (0.2058, 0.0025, "adam", 10**-2.0, 0.2316, 0.0036),
    2: (0.0259, 0.0016, "nag", 10**-1.25, 0.0545, 0.0026),
}
#: how far a mean may be from the published one, in its standard errors: on the machine that made the
#: numbers they are reproduced exactly; another CPU's float kernels move each task's loss at step 100 by
#: a few percent (docs/results/conv/README.md, "Machines"; tuned NAG on 2 classes: 0.0516 instead of
#: 0.0545, 1.1 s.e.). The stage-1 rule shipped before is 2.8 s.e. from this rule's 10-class mean.
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
    assert isinstance(rule, ScaledRule) and rule.multiplier == meta["update_multiplier"] == 1.78
    inner = rule.rule
    assert isinstance(inner, PerKindRule) and set(inner.kinds()) == {"conv", "fc"} and inner.default == "fc"
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
    if classes in (5, 2):  # the bar, met clearly on these two problems
        assert learned < 0.95 * tuned
    else:  # level on 10 classes (0.99x); what is claimed is parity, not a win
        assert learned < 1.02 * tuned
