"""``GeneralFamily``: the wide task mixture the ``general`` weights are meta-trained on."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_l2l.nets import MomentMLP
from lightning_l2l.tasks import GeneralFamily, GeneralTask
from lightning_l2l.tasks.general import ARCHITECTURES
from lightning_l2l.trajectory import frozen_run
from tests.image_data import FASHION_SAMPLE_DIR

SAMPLE = str(FASHION_SAMPLE_DIR)  # 2,000 real Fashion-MNIST images: the same loader on any machine


def _family(**kwargs) -> GeneralFamily:
    return GeneralFamily(data_dir=SAMPLE, num_train=256, num_eval=64, **kwargs)


def _tasks(n: int, seed: int = 0, **kwargs) -> list[GeneralTask]:
    family, g = _family(**kwargs), torch.Generator().manual_seed(seed)
    return [family.sample(g) for _ in range(n)]


def test_docstring_defaults() -> None:
    family = GeneralFamily()
    assert family.split == "train" and family.architectures == ARCHITECTURES
    assert (family.num_train, family.num_eval) == (2048, 512)
    assert family.batch_sizes == (16, 32, 64, 128) and family.init_scales == (0.5, 1.0, 2.0)


def test_sampling_is_a_pure_function_of_the_generator() -> None:
    a, b = _tasks(6, seed=3), _tasks(6, seed=3)
    for ta, tb in zip(a, b, strict=True):
        assert repr(ta) == repr(tb)
        for (na, pa), (nb, pb) in zip(ta.init_params().items(), tb.init_params().items(), strict=True):
            assert na == nb and torch.equal(pa, pb)
        assert torch.equal(ta.inputs, tb.inputs) and torch.equal(ta.eval_targets, tb.eval_targets)
        assert torch.equal(ta.loss(ta.init_params(), 5), tb.loss(tb.init_params(), 5))


def test_the_mixture_covers_every_architecture_and_setting() -> None:
    tasks = _tasks(60)
    specs = [t.spec for t in tasks]
    assert {s.architecture for s in specs} == set(ARCHITECTURES)
    assert {s.batch_size for s in specs} == {16, 32, 64, 128}
    assert {s.init_scale for s in specs} == {0.5, 1.0, 2.0}
    details = " ".join(f"{s.data} {s.detail}" for s in specs)
    for word in ("batch norm", "no norm", "LayerNorm", "sigmoid", "relu", "tanh", "gelu", "Fashion-MNIST",
                 "Gaussian clusters", "teacher regression", "running-sum", "MSE"):
        assert word in details, word


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_and_reports_held_out_loss(arch: str) -> None:
    """Finite losses and gradients; 100 steps of Adam-like updates lower the held-out loss."""
    task = _tasks(1, seed=1, architectures=[arch])[0]
    assert task.spec.architecture == arch
    params = {n: p.requires_grad_() for n, p in task.init_params().items()}
    loss = task.loss(params, 0)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert math.isfinite(loss.detach().item()) and all(g is None or torch.isfinite(g).all() for g in grads)
    before = float(task.eval_loss(task.init_params()))
    _, after = frozen_run(MomentMLP(lr=3e-3), task, 100, zero_grads="skip")
    assert math.isfinite(before) and float(after) < before, (repr(task), before, float(after))


def test_held_out_examples_are_not_training_examples() -> None:
    for task in _tasks(12, seed=2):
        train = {tuple(row.flatten().tolist()) for row in task.inputs}
        assert not any(tuple(row.flatten().tolist()) in train for row in task.eval_inputs), repr(task)


def test_splits_draw_other_tasks_from_the_same_seed() -> None:
    train, val = _tasks(4, seed=5, split="train"), _tasks(4, seed=5, split="val")
    assert [repr(t) for t in train] != [repr(t) for t in val]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "holdout"}, "Invalid split"),
        ({"architectures": ["transformer"]}, "Invalid architectures"),
        ({"architectures": []}, "Invalid architectures"),
        ({"dataset": "cifar10"}, "Invalid dataset"),
        ({"num_eval": 0}, "Invalid sizes"),
        ({"batch_sizes": [0]}, "Invalid batch_sizes"),
        ({"init_scales": [0.0]}, "Invalid init_scales"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GeneralFamily(**kwargs)
