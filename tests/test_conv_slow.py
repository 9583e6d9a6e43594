"""The shipped ``conv`` weights against the numbers published for them (slow: ``make test-slow``, ~2 min on 1 core).

Protocol of ``benchmarks/conv_compare.py`` (docs/results/conv/summary.md): the tasks of
configs/conv.yaml's ``test_family`` with labels 0-9 (Fashion-MNIST test pool), the first 6 tasks of
``MetaLearner``'s test seed stream, the loss on 500 fixed images of the pool at step 100. The
issue's bar (beat the best tuned baseline on the 10-, 5- and 2-class problems) is NOT met by these
weights (docs/results/conv); these tests pin what is claimed: the published learned numbers
reproduce, the rule is the two-LSTM of section 3.3, and it does beat tuned SGD on 10 classes.
"""

from __future__ import annotations

import pytest
import torch

from lightning_l2l.evaluation import baseline_curve
from lightning_l2l.nets import PerKindRule
from lightning_l2l.pretrained import available, resolve
from lightning_l2l.tasks import ConvFamily
from lightning_l2l.tasks.images import FASHION_MNIST_DIR
from lightning_l2l.trajectory import rule_curve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("conv" not in available(), reason="needs the shipped conv weights"),
    pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                       reason="needs `apt-get install dataset-fashion-mnist`"),
]

TEST_SEED, NUM_TEST = 2_000_003, 6
#: docs/results/conv/summary.md, 10 classes: shipped conv 0.4282, tuned SGD (lr 0.316) 0.4432
PUBLISHED_CONV, PUBLISHED_SGD, SGD_LR = 0.4282, 0.4432, 0.31622776601683794


def _test_tasks() -> list:
    family = ConvFamily(split="test", channels=[8, 8, 8], kernel_size=3, eval_size=500)
    gen = torch.Generator().manual_seed(TEST_SEED)
    return [family.sample(gen) for _ in range(NUM_TEST)]


def test_shipped_conv_is_the_two_lstm_rule():
    rule, meta = resolve("conv")
    assert isinstance(rule, PerKindRule) and set(rule.kinds()) == {"conv", "fc"} and rule.default == "fc"
    assert meta["meta_hparams"]["unroll"] == 50 and "configs/conv.yaml" in meta["command"]


def test_shipped_conv_reproduces_its_published_number_and_beats_tuned_sgd():
    rule, _ = resolve("conv")
    rule.requires_grad_(False)
    tasks = _test_tasks()
    learned = sum(float(rule_curve(rule, t, 100)[-1]) for t in tasks) / NUM_TEST
    sgd = sum(float(baseline_curve("sgd", SGD_LR, t, 100)[-1]) for t in tasks) / NUM_TEST
    assert learned == pytest.approx(PUBLISHED_CONV, rel=0.02)
    assert sgd == pytest.approx(PUBLISHED_SGD, rel=0.02)
    assert learned < sgd
