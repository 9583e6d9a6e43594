"""Optimizee tasks: random quadratics (section 3.1) and any nn.Module through functional_call."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from lightning_l2l.nets import CoordinatewiseLSTM
from lightning_l2l.tasks import ModuleTask, ModuleTaskFamily, QuadraticFamily, QuadraticTask, Task
from lightning_l2l.trajectory import Trajectory, unroll

# ---------------------------------------------------------------------------------------- Task base


class _ScalarTask(Task):
    """The smallest task: f(x) = x^2."""

    def init_params(self) -> dict[str, Tensor]:
        return {"x": torch.ones(())}

    def loss(self, params: dict[str, Tensor], step: int) -> Tensor:
        return params["x"] ** 2


def test_task_base_defaults() -> None:
    """Default methods of Task: one problem, no kinds (all ``default``), ``to`` returns self."""
    task = _ScalarTask()
    assert task.num_problems == 1
    assert task.kinds() == {}
    assert task.to("cpu") is task


# ----------------------------------------------------------------------------------- QuadraticFamily


def test_quadratic_docstring_defaults() -> None:
    """QuadraticFamily() is the paper's 10-d problem with N(0, 1) entries and theta_0 std 0.01."""
    family = QuadraticFamily()
    assert family.dim == 10
    assert family.distribution == "normal"
    assert family.init_std == 0.01
    assert family.dtype == torch.float32
    task = family.sample(torch.Generator().manual_seed(0))
    assert task.W.shape[1:] == (10, 10) and task.init_params()["theta"].shape[1] == 10


def test_quadratic_sample_deterministic(quadratic_family: QuadraticFamily) -> None:
    """Same generator seed, same task; another seed or the next draw, another task."""
    a = quadratic_family.sample(torch.Generator().manual_seed(7))
    b = quadratic_family.sample(torch.Generator().manual_seed(7))
    for x, y in ((a.W, b.W), (a.y, b.y), (a.theta0, b.theta0)):
        assert_close(x, y, rtol=0, atol=0)
    c = quadratic_family.sample(torch.Generator().manual_seed(8))
    assert not torch.equal(a.W, c.W)
    gen = torch.Generator().manual_seed(7)
    first, second = quadratic_family.sample(gen), quadratic_family.sample(gen)
    assert torch.equal(first.W, a.W) and not torch.equal(second.W, first.W)


def test_quadratic_sample_uses_only_the_generator(quadratic_family: QuadraticFamily) -> None:
    """Sampling neither reads nor advances the global RNG."""
    state = torch.get_rng_state()
    torch.manual_seed(1)
    a = quadratic_family.sample(torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    b = quadratic_family.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a.W, b.W)
    torch.set_rng_state(state)
    quadratic_family.sample(torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_quadratic_shapes_and_num_problems(quadratic_task: QuadraticTask) -> None:
    """W is (functions, dim, dim), y and theta (functions, dim); num_problems is num_functions."""
    assert quadratic_task.W.shape == (4, 3, 3)
    assert quadratic_task.y.shape == (4, 3)
    assert quadratic_task.init_params()["theta"].shape == (4, 3)
    assert quadratic_task.num_problems == 4
    assert quadratic_task.kinds() == {}
    assert quadratic_task.to("cpu") is quadratic_task


def test_quadratic_uniform_in_unit_interval(generator: torch.Generator) -> None:
    """``distribution="uniform"`` draws W and y from U[0, 1) (the authors' TensorFlow code)."""
    task = QuadraticFamily(dim=5, num_functions=20, distribution="uniform").sample(generator)
    for t in (task.W, task.y):
        assert t.min() >= 0.0 and t.max() < 1.0
        assert 0.4 < t.mean() < 0.6
    normal = QuadraticFamily(dim=5, num_functions=20).sample(torch.Generator().manual_seed(0))
    assert normal.W.min() < 0.0  # the default is not uniform


@pytest.mark.parametrize("std", [0.0, 0.01, 0.5])
def test_quadratic_init_std(std: float, generator: torch.Generator) -> None:
    """theta_0 ~ N(0, init_std^2), roughly (1280 draws)."""
    theta0 = QuadraticFamily(dim=10, num_functions=128, init_std=std).sample(generator).theta0
    if std == 0.0:
        assert (theta0 == 0).all()
    else:
        assert theta0.std().item() == pytest.approx(std, rel=0.1)
        assert abs(theta0.mean().item()) < 0.1 * std


def test_quadratic_dtype(generator: torch.Generator) -> None:
    """``dtype`` sets the dtype of W, y and theta_0 (and so of the loss)."""
    task = QuadraticFamily(dim=2, num_functions=2, dtype=torch.float64).sample(generator)
    assert task.W.dtype == task.y.dtype == task.theta0.dtype == torch.float64
    assert task.loss(task.init_params()).dtype == torch.float64


def test_quadratic_loss_is_sum_of_problems(quadratic_task: QuadraticTask) -> None:
    """f(theta) = sum_i ||W_i theta_i - y_i||^2, computed one problem at a time by hand."""
    theta = torch.randn(4, 3)
    expected = sum(((quadratic_task.W[i] @ theta[i] - quadratic_task.y[i]) ** 2).sum() for i in range(4))
    assert_close(quadratic_task.loss({"theta": theta}), expected)
    assert_close(quadratic_task.loss({"theta": theta}, step=5), expected)  # no step dependence
    # gradients of one problem are unaffected by the others
    theta.requires_grad_()
    (grad,) = torch.autograd.grad(quadratic_task.loss({"theta": theta}), theta)
    w, y = quadratic_task.W[1], quadratic_task.y[1]
    assert_close(grad[1], 2 * w.T @ (w @ theta[1].detach() - y))


def test_quadratic_init_params_are_fresh(quadratic_task: QuadraticTask) -> None:
    """init_params returns a new tensor each call: editing it leaves theta_0 untouched."""
    p = quadratic_task.init_params()
    assert not p["theta"].requires_grad
    p["theta"].add_(1.0)
    assert_close(quadratic_task.init_params()["theta"], quadratic_task.theta0, rtol=0, atol=0)
    assert not torch.equal(p["theta"], quadratic_task.theta0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0}, "dim"),
        ({"num_functions": 0}, "num_functions"),
        ({"distribution": "cauchy"}, "distribution: 'cauchy'"),
        ({"init_std": -1.0}, "init_std"),
    ],
)
def test_quadratic_invalid_args(kwargs: dict, match: str) -> None:
    """Bad family arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        QuadraticFamily(**kwargs)


# ----------------------------------------------------------------------------------------- ModuleTask


def _classification(n: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, generator=g), torch.randint(3, (n,), generator=g)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_module_task_minibatch_deterministic() -> None:
    """The minibatch of step t is a pure function of (seed, t), and changes from step to step."""
    x, y = _classification()
    task = ModuleTask(_mlp(), x, y, batch_size=8, seed=3)
    xb, yb = task.batch(4)
    assert xb.shape == (8, 4) and yb.shape == (8,)
    xb2, yb2 = task.batch(4)
    assert torch.equal(xb, xb2) and torch.equal(yb, yb2)
    assert not torch.equal(task.batch(5)[0], xb)
    twin = ModuleTask(_mlp(), x, y, batch_size=8, seed=3)
    assert torch.equal(twin.batch(4)[0], xb)
    other = ModuleTask(_mlp(), x, y, batch_size=8, seed=4)
    assert not torch.equal(other.batch(4)[0], xb)
    # the minibatch is drawn from the dataset's rows
    assert all(any(torch.equal(row, r) for r in x) for row in xb)


@pytest.mark.parametrize("batch_size", [None, 32, 100])
def test_module_task_full_batch(batch_size: int | None) -> None:
    """``batch_size=None`` (or >= N) uses all the data every step."""
    x, y = _classification()
    task = ModuleTask(_mlp(), x, y, batch_size=batch_size)
    for step in (0, 7):
        xb, yb = task.batch(step)
        assert torch.equal(xb, x) and torch.equal(yb, y)


def test_module_task_loss_is_module_loss() -> None:
    """loss(theta_0, t) equals the module's own loss on the minibatch of step t."""
    x, y = _classification()
    module = _mlp()
    task = ModuleTask(module, x, y, batch_size=8, seed=1)
    for step in (0, 3):
        xb, yb = task.batch(step)
        assert_close(task.loss(task.init_params(), step), nn.functional.cross_entropy(module(xb), yb))
    # and on other parameters: the loss follows params, not the module's own weights
    params = {n: p + 0.1 for n, p in task.init_params().items()}
    shifted = _mlp()
    shifted.load_state_dict(params)
    xb, yb = task.batch(2)
    assert_close(task.loss(params, 2), nn.functional.cross_entropy(shifted(xb), yb))


def test_module_task_custom_loss(module_task64: ModuleTask, regression_data) -> None:
    """``loss_fn`` is used as given (MSE on a float64 regression)."""
    x, y = regression_data
    expected = nn.functional.mse_loss(module_task64.module(x), y)
    assert_close(module_task64.loss(module_task64.init_params()), expected)
    assert set(module_task64.init_params()) == {"weight", "bias"}


@pytest.mark.parametrize("differentiable", [True, False])
def test_unroll_never_modifies_the_module(differentiable: bool) -> None:
    """The module's own parameters are untouched by an unroll (and its backward)."""
    x, y = _classification()
    module = _mlp()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    task = ModuleTask(module, x, y, batch_size=8)
    rule = CoordinatewiseLSTM(hidden_size=3, output_scale=1.0)
    traj = Trajectory.start(rule, task)
    result = unroll(rule, traj, 3, differentiable=differentiable)
    if differentiable:
        result.meta_loss.backward()
    for n, p in module.named_parameters():
        assert_close(p.detach(), before[n], rtol=0, atol=0)
        assert p.grad is None
    assert any(not torch.equal(traj.params[n], before[n]) for n in before)  # the optimizee did move
    assert_close(task.init_params()["0.weight"], before["0.weight"], rtol=0, atol=0)


def test_module_task_never_modifies_module_buffers() -> None:
    """Running a loss on a task does not change the module's BatchNorm statistics."""
    x, y = _classification()
    module = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    before = {n: b.clone() for n, b in module.named_buffers()}
    task = ModuleTask(module, x, y, batch_size=8)
    task.loss(task.init_params(), 0)
    for n, b in module.named_buffers():
        assert torch.equal(b, before[n]), n


def test_module_task_kinds_from_layers() -> None:
    """Kinds come from the owning layers unless given explicitly."""
    x = torch.randn(4, 1, 4, 4)
    y = torch.randint(2, (4,))
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    task = ModuleTask(net, x, y)
    assert task.kinds() == {"0.weight": "conv", "0.bias": "conv", "2.weight": "fc", "2.bias": "fc"}
    custom = ModuleTask(net, x, y, kinds={"0.weight": "special"})
    assert custom.kinds() == {"0.weight": "special"}
    layout = Trajectory.start(CoordinatewiseLSTM(hidden_size=2), task).layout
    assert layout.kinds == ["conv", "fc"]
    assert layout.numel("conv") == 2 * 9 + 2 and layout.numel("fc") == 8 * 2 + 2


def test_module_task_invalid_args() -> None:
    """Mismatched rows and a non-positive batch size raise ValueError."""
    x, y = _classification()
    with pytest.raises(ValueError, match="rows"):
        ModuleTask(_mlp(), x, y[:-1])
    with pytest.raises(ValueError, match="Invalid batch_size"):
        ModuleTask(_mlp(), x, y, batch_size=0)


def test_module_task_family_sample_deterministic() -> None:
    """A sampled task (initial weights, minibatch seed) is a pure function of the generator."""
    x, y = _classification()
    family = ModuleTaskFamily(_mlp, x, y, batch_size=8)
    torch.manual_seed(11)
    a = family.sample(torch.Generator().manual_seed(2))
    torch.manual_seed(12)  # the global RNG does not matter
    b = family.sample(torch.Generator().manual_seed(2))
    assert a.seed == b.seed
    for n, p in a.init_params().items():
        assert_close(b.init_params()[n], p, rtol=0, atol=0)
    assert torch.equal(a.batch(3)[0], b.batch(3)[0])
    gen = torch.Generator().manual_seed(2)
    first, second = family.sample(gen), family.sample(gen)
    assert torch.equal(first.init_params()["0.weight"], a.init_params()["0.weight"])
    assert not torch.equal(second.init_params()["0.weight"], first.init_params()["0.weight"])


def test_module_task_family_keeps_global_rng() -> None:
    """Sampling seeds the module initialisation in a forked RNG: the global state is unchanged."""
    x, y = _classification()
    family = ModuleTaskFamily(_mlp, x, y)
    state = torch.get_rng_state()
    family.sample(torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_module_task_eval_data_is_the_reported_loss(regression_data) -> None:
    """With eval_data, eval_loss is the loss on those examples (moved by to()); without, None."""
    x, y = regression_data
    module = nn.Linear(3, 2).double()
    plain = ModuleTask(module, x, y, loss_fn=nn.functional.mse_loss, batch_size=4)
    held = ModuleTask(module, x[:12], y[:12], loss_fn=nn.functional.mse_loss, batch_size=4, eval_data=(x[12:], y[12:]))
    params = held.init_params()
    assert plain.eval_loss(params) is None
    expected = nn.functional.mse_loss(module(x[12:]), y[12:])
    torch.testing.assert_close(held.eval_loss(params), expected.detach())
    tracked = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.no_grad():  # as curves call it: no graph
        assert not held.eval_loss(tracked).requires_grad
    assert held.eval_loss(tracked).requires_grad  # with one: differentiable (the log_eval meta-objective)
    assert held.to("cpu").eval_inputs.device.type == "cpu"
