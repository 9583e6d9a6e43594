"""Update-rule networks: coordinatewise LSTM, linear rule, per-kind routing, layouts, kinds, files."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from lightning_l2l.nets import (
    DEFAULT_KIND,
    CoordinatewiseLinear,
    CoordinatewiseLSTM,
    KindLayout,
    MomentMLP,
    PerKindRule,
    ScaledRule,
    UpdateRule,
    WeightsError,
    apply_rule,
    build_rule,
    layer_kind,
    load_rule,
    param_kinds,
    parse_multiplier,
    save_rule,
    scale_rule,
)
from lightning_l2l.nets.lstm import LSTMLayer

# --------------------------------------------------------------------------------------- helpers


def _grads(n: int) -> Tensor:
    """Gradients spanning many magnitudes and both signs, including 0 and a tiny one."""
    g = torch.randn(n) * torch.logspace(-8, 2, n)
    g[0] = 0.0
    return g


def _random_state(rule: CoordinatewiseLSTM, n: int) -> Tensor:
    return torch.randn_like(rule.init_state(n))


def _exact_sgd_rule(lr: float) -> CoordinatewiseLinear:
    """A float64 linear rule whose scale is exactly ``-lr`` (see test_linear_double_scale_is_exact)."""
    rule = CoordinatewiseLinear(lr=lr).double()
    with torch.no_grad():
        rule.scale.fill_(-lr)
    return rule


# ------------------------------------------------------------------------------ CoordinatewiseLSTM


def test_lstm_docstring_defaults() -> None:
    """CoordinatewiseLSTM() is the paper's network: 2 layers of 20 units, log-sign p=10, scale 0.1."""
    rule = CoordinatewiseLSTM()
    assert rule.hidden_size == 20
    assert rule.num_layers == 2
    assert rule.preprocessing == "log_sign"
    assert rule.p == 10.0
    assert rule.output_scale == 0.1
    assert len(rule.cells) == 2 and all(c.hidden_size == 20 for c in rule.cells)
    assert rule.cells[0].weight_ifo.shape == (60, 2 + 20)  # log-sign gives 2 input features
    assert rule.init_state(5).shape == (5, 2, 2, 20)  # (coords, layers, (h, c), hidden)
    assert rule.config()["init_args"] == {
        "hidden_size": 20,
        "num_layers": 2,
        "preprocessing": "log_sign",
        "p": 10.0,
        "output_scale": 0.1,
    }


def test_lstm_init_forget_bias_and_quiet_output() -> None:
    """The forget-gate bias starts near 1 (remember by default) and the output bias at 0."""
    rule = CoordinatewiseLSTM(hidden_size=16)
    bound = 1.0 / 16**0.5
    for cell in rule.cells:
        forget = cell.bias_ifo[16:32]
        assert ((forget >= 1 - bound) & (forget <= 1 + bound)).all()
        others = torch.cat((cell.bias_ifo[:16], cell.bias_ifo[32:]))
        assert others.abs().max() <= bound
    assert (rule.out.bias == 0).all()
    # a fresh rule from a zero state makes small steps
    update, _ = rule(torch.randn(10), rule.init_state(10))
    assert update.abs().max() < 0.1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"preprocessing": "log"}, "preprocessing"),
        ({"p": 0.0}, "p"),
        ({"p": -3.0}, "p"),
    ],
)
def test_lstm_invalid_args(kwargs: dict, name: str) -> None:
    """Bad constructor values raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        CoordinatewiseLSTM(**kwargs)


def test_lstm_forward_shapes_and_errors(lstm_rule: CoordinatewiseLSTM) -> None:
    """``(n,)`` grads and ``(n, layers, 2, hidden)`` state in, same shapes out; bad shapes raise."""
    g = _grads(6)
    update, state = lstm_rule(g, lstm_rule.init_state(6))
    assert update.shape == (6,) and state.shape == (6, 2, 2, 4)
    with pytest.raises(ValueError, match="flat"):
        lstm_rule(g.view(2, 3), lstm_rule.init_state(2))
    with pytest.raises(ValueError, match="coordinates"):
        lstm_rule(g, lstm_rule.init_state(5))


def test_lstm_zero_coordinates(lstm_rule: CoordinatewiseLSTM) -> None:
    """An empty gradient is a valid (empty) call."""
    update, state = lstm_rule(torch.zeros(0), lstm_rule.init_state(0))
    assert update.shape == (0,) and state.shape == (0, 2, 2, 4)


def test_lstm_permutation_equivariant(lstm_rule: CoordinatewiseLSTM) -> None:
    """Permuting coordinates (and their state rows) permutes the updates and new states identically."""
    n = 9
    g, state = _grads(n), _random_state(lstm_rule, n)
    perm = torch.randperm(n)
    assert not torch.equal(perm, torch.arange(n))
    update, new_state = lstm_rule(g, state)
    update_p, new_state_p = lstm_rule(g[perm], state[perm])
    assert_close(update_p, update[perm])
    assert_close(new_state_p, new_state[perm])
    # and over several steps
    s, sp = new_state, new_state_p
    for _ in range(3):
        g = _grads(n)
        u, s = lstm_rule(g, s)
        up, sp = lstm_rule(g[perm], sp)
        assert_close(up, u[perm])
        assert_close(sp, s[perm])


@pytest.mark.parametrize("j", [0, 3])
def test_lstm_state_does_not_leak_between_coordinates(lstm_rule: CoordinatewiseLSTM, j: int) -> None:
    """Changing coordinate j's gradient and state changes only coordinate j's update and state."""
    n = 5
    g, state = _grads(n), _random_state(lstm_rule, n)
    update, new_state = lstm_rule(g, state)
    g2, state2 = g.clone(), state.clone()
    g2[j] = 1e3
    state2[j] = torch.randn_like(state2[j]) * 3
    update2, new_state2 = lstm_rule(g2, state2)
    others = torch.arange(n) != j
    assert_close(update2[others], update[others], rtol=0, atol=0)
    assert_close(new_state2[others], new_state[others], rtol=0, atol=0)
    assert not torch.allclose(update2[j], update[j])  # the probe itself did change something
    # carried over several steps: a different history at j never reaches the others
    s, s2 = new_state, new_state2
    for _ in range(3):
        g = _grads(n)
        g_j = g.clone()
        g_j[j] = -50.0
        u, s = lstm_rule(g, s)
        u2, s2 = lstm_rule(g_j, s2)
        assert_close(u2[others], u[others], rtol=0, atol=0)
        assert_close(s2[others], s[others], rtol=0, atol=0)


def test_lstm_non_finite_gradient_keeps_state_finite(lstm_rule: CoordinatewiseLSTM) -> None:
    """NaN/inf gradients are seen as zero: the update and state stay finite."""
    g = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    update, state = lstm_rule(g, lstm_rule.init_state(4))
    assert torch.isfinite(update).all() and torch.isfinite(state).all()
    zero_update, _ = lstm_rule(torch.zeros(1), lstm_rule.init_state(1))
    assert_close(update[:3], zero_update.expand(3))


def test_lstm_dtypes() -> None:
    """A float64 rule keeps float64 throughout; a bfloat16 gradient gives a bfloat16 update."""
    rule = CoordinatewiseLSTM(hidden_size=3).double()
    assert rule.state_dtype() == torch.float64
    update, state = rule(torch.randn(4, dtype=torch.float64), rule.init_state(4))
    assert update.dtype == torch.float64 and state.dtype == torch.float64
    rule32 = CoordinatewiseLSTM(hidden_size=3)
    g = torch.randn(4).bfloat16()
    update, state = rule32(g, rule32.init_state(4))
    assert update.dtype == torch.bfloat16 and state.dtype == torch.float32


def test_lstm_layer_matches_torch_lstm_cell() -> None:
    """LSTMLayer computes the nn.LSTMCell equations (its docstring's claim), just laid out differently."""
    n_in, h = 3, 5
    layer = LSTMLayer(n_in, h).double()
    cell = nn.LSTMCell(n_in, h).double()
    w_i, w_f, w_o = layer.weight_ifo.chunk(3)
    b_i, b_f, b_o = layer.bias_ifo.chunk(3)
    with torch.no_grad():
        # nn.LSTMCell orders gates (input, forget, cell, output)
        w = torch.cat((w_i, w_f, layer.weight_g, w_o))  # (4h, in + h)
        cell.weight_ih.copy_(w[:, :n_in])
        cell.weight_hh.copy_(w[:, n_in:])
        cell.bias_ih.copy_(torch.cat((b_i, b_f, layer.bias_g, b_o)))
        cell.bias_hh.zero_()
    x = torch.randn(7, n_in, dtype=torch.float64)
    h0 = torch.randn(7, h, dtype=torch.float64)
    c0 = torch.randn(7, h, dtype=torch.float64)
    h1, c1 = layer(x, h0, c0)
    h_ref, c_ref = cell(x, (h0, c0))
    assert_close(h1, h_ref)
    assert_close(c1, c_ref)


# ---------------------------------------------------------------------------- CoordinatewiseLinear


def test_linear_rule_is_scaled_gradient(linear_rule: CoordinatewiseLinear) -> None:
    """``update = -lr * g``, a ``(n, 0)`` state that passes through, non-finite gradients give 0."""
    g = torch.tensor([1.0, -2.0, float("nan"), float("inf")])
    state = linear_rule.init_state(4)
    assert state.shape == (4, 0)
    update, new_state = linear_rule(g, state)
    assert_close(update, torch.tensor([-0.1, 0.2, 0.0, 0.0]))
    assert new_state.shape == (4, 0)


def test_linear_double_scale_is_exact() -> None:
    """CoordinatewiseLinear(lr=0.1).double() should output exactly -0.1 * g in float64."""
    rule = CoordinatewiseLinear(lr=0.1).double()
    assert rule.scale.item() == -0.1


# ---------------------------------------------------------------------------------- UpdateRule base


class _NoParamsRule(UpdateRule):
    """The smallest UpdateRule: no weights, update = -g."""

    def __init__(self, flag: int = 3) -> None:
        super().__init__()
        self._record_init_args(locals())

    def init_state(self, num_coords, kind=DEFAULT_KIND, *, device=None, dtype=None):
        return torch.zeros(num_coords, 1, device=device, dtype=dtype or self.state_dtype())

    def forward(self, grad, state, kind=DEFAULT_KIND):
        return -grad, state + 1


def test_update_rule_base_defaults() -> None:
    """Base-class defaults: kinds() empty, state_dtype() of the weights (or the default), config()."""
    rule = _NoParamsRule(flag=7)
    assert rule.kinds() == ()
    assert rule.state_dtype() == torch.get_default_dtype()
    assert rule.init_state(2).dtype == torch.get_default_dtype()
    assert rule.config() == {"class_path": f"{__name__}._NoParamsRule", "init_args": {"flag": 7}}
    assert CoordinatewiseLSTM(hidden_size=2).kinds() == ()
    assert CoordinatewiseLSTM(hidden_size=2).double().state_dtype() == torch.float64
    assert CoordinatewiseLSTM(hidden_size=2).double().init_state(3).dtype == torch.float64


# --------------------------------------------------------------------------------------- KindLayout

SHAPES = {"conv.w": (2, 3), "scalar": (), "fc.w": (4,), "conv.b": (1, 2, 2), "fc.b": (1,)}
KINDS = {"conv.w": "conv", "fc.w": "fc", "conv.b": "conv", "fc.b": "fc"}


@pytest.fixture
def layout() -> KindLayout:
    """Mixed kinds and shapes, including a scalar of the default kind."""
    return KindLayout(SHAPES, KINDS)


def test_layout_flatten_unflatten_round_trip(layout: KindLayout) -> None:
    """flatten groups each kind's tensors in order; unflatten restores every tensor and the name order."""
    tensors = {n: torch.randn(s) for n, s in SHAPES.items()}
    flat = layout.flatten(tensors)
    assert layout.kinds == ["conv", "default", "fc"]  # by first appearance
    assert {k: v.shape for k, v in flat.items()} == {"conv": (10,), "default": (1,), "fc": (5,)}
    assert_close(flat["conv"], torch.cat((tensors["conv.w"].flatten(), tensors["conv.b"].flatten())))
    assert_close(flat["fc"], torch.cat((tensors["fc.w"], tensors["fc.b"])))
    back = layout.unflatten(flat)
    assert list(back) == list(SHAPES)
    for name, t in tensors.items():
        assert back[name].shape == t.shape
        assert_close(back[name], t, rtol=0, atol=0)
    assert [layout.numel(k) for k in layout.kinds] == [10, 1, 5]


def test_layout_default_kind_and_unknown_names() -> None:
    """Unlisted names get ``default_kind``; kinds for names that do not exist raise ValueError."""
    lay = KindLayout({"a": (2,), "b": (3,)}, {"a": "fc"}, default_kind="other")
    assert lay.kinds == ["fc", "other"]
    with pytest.raises(ValueError, match="unknown tensors"):
        KindLayout({"a": (2,)}, {"a": "fc", "zz": "conv"})


def test_layout_init_state_shapes(layout: KindLayout, lstm_rule: CoordinatewiseLSTM) -> None:
    """One state per kind, first dimension the kind's number of coordinates."""
    states = layout.init_state(lstm_rule)
    assert {k: s.shape for k, s in states.items()} == {
        "conv": (10, 2, 2, 4),
        "default": (1, 2, 2, 4),
        "fc": (5, 2, 2, 4),
    }
    states64 = layout.init_state(lstm_rule, dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in states64.values())
    assert {k: s.shape for k, s in layout.init_state(CoordinatewiseLinear()).items()} == {
        "conv": (10, 0),
        "default": (1, 0),
        "fc": (5, 0),
    }


def test_apply_rule_matches_per_tensor_calls(layout: KindLayout, lstm_rule: CoordinatewiseLSTM) -> None:
    """One batched call per kind equals calling the rule per tensor on that tensor's state slice."""
    grads = {n: torch.randn(s) for n, s in SHAPES.items()}
    states = {k: torch.randn_like(s) for k, s in layout.init_state(lstm_rule).items()}
    out = apply_rule(lstm_rule, layout, grads, states)
    updates, new_states = out.updates, out.states
    offsets = {k: 0 for k in layout.kinds}
    for name, shape in SHAPES.items():
        kind = KINDS.get(name, DEFAULT_KIND)
        n = torch.Size(shape).numel()
        s = states[kind][offsets[kind] : offsets[kind] + n]
        u_ref, s_ref = lstm_rule(grads[name].reshape(-1), s)
        assert updates[name].shape == torch.Size(shape)
        assert_close(updates[name].reshape(-1), u_ref)
        assert_close(new_states[kind][offsets[kind] : offsets[kind] + n], s_ref)
        offsets[kind] += n


def test_apply_rule_sgd_parity_float64() -> None:
    """A -lr*g rule through apply_rule on tensors of several kinds matches torch.optim.SGD for 10 steps."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"conv.w": (2, 3), "fc.w": (3,), "fc.b": (), "norm.w": (2, 2)}
    kinds = {"conv.w": "conv", "fc.w": "fc", "fc.b": "fc", "norm.w": "norm"}
    init = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    targets = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        # coupled, non-quadratic so the gradients change in interesting ways
        sq = sum(((p[n] - targets[n]) ** 2).sum() for n in shapes)
        return sq + torch.tanh(p["conv.w"].sum() * p["fc.b"]) + (p["fc.w"] ** 4).sum()

    rule = _exact_sgd_rule(0.1)
    lay = KindLayout(shapes, kinds)
    states = lay.init_state(rule)
    params = {n: t.clone() for n, t in init.items()}
    ref = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt = torch.optim.SGD(list(ref.values()), lr=0.1)
    for _ in range(10):
        p = {n: t.detach().requires_grad_() for n, t in params.items()}
        grads = dict(zip(p, torch.autograd.grad(loss_fn(p), list(p.values())), strict=True))
        with torch.no_grad():
            out = apply_rule(rule, lay, grads, states)
            updates, states = out.updates, out.states
        params = {n: p[n].detach() + updates[n] for n in p}
        opt.zero_grad()
        loss_fn(ref).backward()
        opt.step()
        for n in shapes:
            assert_close(params[n], ref[n].detach(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- PerKindRule


def test_per_kind_routes_each_kind() -> None:
    """conv goes to the conv network, fc to fc, any other kind to ``default``."""
    rule = PerKindRule({"conv": CoordinatewiseLinear(0.1), "fc": CoordinatewiseLinear(0.2)}, default="fc")
    assert rule.kinds() == ("conv", "fc")
    lay = KindLayout({"c": (3,), "f": (2,), "n": (2,), "x": (1,)}, {"c": "conv", "f": "fc", "n": "norm"})
    grads = {"c": torch.ones(3), "f": torch.ones(2), "n": torch.ones(2), "x": torch.ones(1)}
    updates = apply_rule(rule, lay, grads, lay.init_state(rule)).updates
    assert_close(updates["c"], torch.full((3,), -0.1))
    assert_close(updates["f"], torch.full((2,), -0.2))
    assert_close(updates["n"], torch.full((2,), -0.2))  # unknown kind -> default (fc)
    assert_close(updates["x"], torch.full((1,), -0.2))  # the "default" kind too
    assert rule.network_for("norm") is rule.networks["fc"]


def test_per_kind_init_state_routes() -> None:
    """Each kind's state has the shape of its own network's state."""
    rule = PerKindRule(
        {"conv": CoordinatewiseLSTM(hidden_size=3), "fc": CoordinatewiseLSTM(hidden_size=5)}, "conv"
    )
    assert rule.init_state(4, "conv").shape == (4, 2, 2, 3)
    assert rule.init_state(4, "fc").shape == (4, 2, 2, 5)
    assert rule.init_state(4, "norm").shape == (4, 2, 2, 3)
    g = torch.randn(4)
    u, s = rule(g, rule.init_state(4, "fc"), "fc")
    u_ref, s_ref = rule.networks["fc"](g, rule.init_state(4, "fc"))
    assert_close(u, u_ref)
    assert_close(s, s_ref)


def test_per_kind_single_network_serves_all() -> None:
    """With one network and no default, that network serves every kind."""
    net = CoordinatewiseLinear(0.3)
    rule = PerKindRule({"fc": net})
    assert rule.default == "fc"
    assert rule.network_for("conv") is net
    assert_close(rule(torch.ones(2), rule.init_state(2, "conv"), "conv")[0], torch.full((2,), -0.3))


def test_per_kind_invalid_configs() -> None:
    """Two networks need a default; the default needs a network; networks must be UpdateRules."""
    nets = {"conv": CoordinatewiseLinear(), "fc": CoordinatewiseLinear()}
    with pytest.raises(ValueError, match="needs `default`"):
        PerKindRule(nets)
    with pytest.raises(ValueError, match="'norm' has no network"):
        PerKindRule(nets, default="norm")
    with pytest.raises(ValueError, match="at least one network"):
        PerKindRule({})
    with pytest.raises(TypeError, match="expected an UpdateRule"):
        PerKindRule({"fc": nn.Linear(1, 1)})  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------------- kinds


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        self.temperature = nn.Parameter(torch.ones(()))


# -------------------------------------------------------------------------------------- ScaledRule


def _per_kind_lstm() -> PerKindRule:
    torch.manual_seed(3)
    return PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=3)}, "fc")


def test_scaled_rule_is_the_rule_times_the_multiplier() -> None:
    """Updates are ``multiplier *`` the inner rule's, to the bit; state, kinds and state init are the inner rule's."""
    inner = _per_kind_lstm()
    rule = ScaledRule(inner, 1.78)
    assert rule.kinds() == ("conv", "fc") and rule.state_dtype() == torch.float32
    for kind in ("conv", "fc", "norm"):
        assert_close(rule.init_state(5, kind), inner.init_state(5, kind), rtol=0, atol=0)
        g, state = _grads(5), torch.randn_like(inner.init_state(5, kind))
        u, s = rule(g, state, kind)
        u_ref, s_ref = inner(g, state, kind)
        assert_close(u, u_ref * 1.78, rtol=0, atol=0)
        assert_close(s, s_ref, rtol=0, atol=0)
        assert not torch.equal(u, u_ref)


def test_scaled_rule_in_learned_optimizer_equals_lr() -> None:
    """``LearnedOptimizer(ScaledRule(rule, m))`` trains a model exactly as ``LearnedOptimizer(rule, lr=m)``."""
    from lightning_l2l.optim import LearnedOptimizer

    inner = _per_kind_lstm()
    runs = [_train_small_conv(lambda model, rule=rule, lr=lr: LearnedOptimizer.from_module(model, rule, lr=lr))
            for rule, lr in ((ScaledRule(inner, 2.37), 1.0), (inner, 2.37))]
    for a, b in zip(*runs, strict=True):
        assert_close(a, b, rtol=0, atol=0)


def _train_small_conv(make_optimizer, conv_bias: bool = True) -> list[Tensor]:
    """The parameters of a small conv net after 4 steps of ``make_optimizer(model)`` on fixed random data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=conv_bias), nn.Flatten(), nn.Linear(8, 3))
    opt = make_optimizer(model)
    torch.manual_seed(1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(6, 1, 4, 4)).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("multiplier", "error"),
    [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     (True, TypeError), ("2", TypeError)],
)
def test_scaled_rule_refuses_bad_multipliers(multiplier: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="multiplier"):
        ScaledRule(CoordinatewiseLinear(0.1), multiplier)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected an UpdateRule"):
        ScaledRule(nn.Linear(2, 2), 2.0)  # type: ignore[arg-type]


def test_build_rule_scaled_without_inner_rule() -> None:
    """A ScaledRule config without its inner rule is a WeightsError like any other bad config."""
    with pytest.raises(WeightsError, match="ScaledRule config needs init_args.rule"):
        build_rule({"class_path": "ScaledRule", "init_args": {"multiplier": 2.0}})
    with pytest.raises(WeightsError, match="Invalid multiplier"):
        build_rule({"class_path": "ScaledRule", "init_args": {"rule": CoordinatewiseLinear(0.1).config(),
                                                              "multiplier": -2.0}})


def test_scale_rule_per_kind_scales_each_network() -> None:
    """``scale_rule(per_kind, {conv: a, fc: b})``: conv updates are ``a *`` the conv network's, every other
    kind's (fc, and norm through the default) ``b *`` the fc network's, to the bit; the source is left alone."""
    inner = _per_kind_lstm()
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    for source, outer in ((inner, 1.0), (ScaledRule(inner, 2.0), 2.0)):  # a ScaledRule's multiplier is folded in
        rule = scale_rule(source, {"conv": 5.62, "fc": 1.33})
        assert isinstance(rule, PerKindRule) and rule.kinds() == ("conv", "fc") and rule.default == "fc"
        for kind, factor in (("conv", 5.62), ("fc", 1.33), ("norm", 1.33)):
            assert rule.network_for(kind).multiplier == outer * factor
            g, state = _grads(5), torch.randn_like(inner.init_state(5, kind))
            u, s = rule(g, state, kind)
            u_ref, s_ref = inner(g, state, kind)
            assert_close(u, u_ref * (outer * factor), rtol=0, atol=0)
            assert_close(s, s_ref, rtol=0, atol=0)
    partial = scale_rule(inner, {"conv": 3.0})  # a kind left out keeps its network as it is
    assert isinstance(partial.networks["conv"], ScaledRule) and isinstance(partial.networks["fc"], CoordinatewiseLSTM)
    number = scale_rule(inner, 1.78)
    assert isinstance(number, ScaledRule) and number.multiplier == 1.78
    for k, v in inner.state_dict().items():
        assert torch.equal(v, before[k])
    assert next(rule.parameters()).data_ptr() != next(inner.parameters()).data_ptr()  # copies, not aliases


def test_scale_rule_folds_nested_multipliers() -> None:
    """Multipliers are relative to the rule given: ScaledRules around it or around its networks (the
    shipped ``conv``'s shape) are folded in, never nested; the updates are the product's."""
    inner = _per_kind_lstm()
    shipped_shape = scale_rule(inner, {"conv": 3.0, "fc": 2.0})
    again = scale_rule(ScaledRule(shipped_shape, 0.5), {"conv": 2.0})
    conv = again.networks["conv"]  # 0.5 * 3 * 2
    assert isinstance(conv, ScaledRule) and isinstance(conv.rule, CoordinatewiseLSTM) and conv.multiplier == 3.0
    assert isinstance(again.networks["fc"], CoordinatewiseLSTM)  # 0.5 * 2: the network itself
    for kind, factor in (("conv", 3.0), ("fc", 1.0)):
        g, state = _grads(5), torch.randn_like(inner.init_state(5, kind))
        assert_close(again(g, state, kind)[0], inner(g, state, kind)[0] * factor)
    unit = scale_rule(shipped_shape, {"conv": 1 / 3.0, "fc": 0.5})  # back to the meta-trained step sizes
    assert all(isinstance(unit.networks[k], CoordinatewiseLSTM) for k in ("conv", "fc"))
    double = scale_rule(ScaledRule(ScaledRule(inner, 2.0), 3.0), 0.5)
    assert isinstance(double, ScaledRule) and isinstance(double.rule, PerKindRule) and double.multiplier == 3.0


def test_scale_rule_per_kind_round_trips_and_trains_like_kind_lrs(tmp_path: Path) -> None:
    """Saved and loaded, the per-kind scaled rule trains a model as the inner rule does with those
    multipliers applied to each kind's updates by hand (LearnedOptimizer with one param group per kind)."""
    from lightning_l2l.optim import LearnedOptimizer

    inner = _per_kind_lstm()
    loaded, _ = load_rule(save_rule(scale_rule(inner, {"conv": 4.0, "fc": 0.5}), tmp_path / "pk"))
    def per_kind_groups(model: nn.Module, rule: UpdateRule, lrs: dict[str, float]) -> LearnedOptimizer:
        return LearnedOptimizer([{"params": [model[0].weight], "kind": "conv", "lr": lrs["conv"]},
                                 {"params": list(model[2].parameters()), "kind": "fc", "lr": lrs["fc"]}], rule)

    runs = [_train_small_conv(lambda model, rule=rule, lrs=lrs: per_kind_groups(model, rule, lrs), conv_bias=False)
            for rule, lrs in ((loaded, {"conv": 1.0, "fc": 1.0}), (inner, {"conv": 4.0, "fc": 0.5}))]
    for a, b in zip(*runs, strict=True):
        assert_close(a, b, rtol=0, atol=0)


def test_scale_rule_gives_a_one_network_rule_a_step_size_per_kind() -> None:
    """One LSTM for every kind, per-kind multipliers: a copy per named kind at its multiplier, every other
    kind at the rule's own step size (an outer ScaledRule folded in); the rule itself is left as it was."""
    one = CoordinatewiseLSTM(hidden_size=3)
    before = {k: v.clone() for k, v in one.state_dict().items()}
    for rule, outer in ((one, 1.0), (ScaledRule(one, 1.5), 1.5)):
        scaled = scale_rule(rule, {"conv": 4.0, "fc": 0.5})
        assert isinstance(scaled, PerKindRule) and scaled.default == DEFAULT_KIND
        grad = torch.randn(40)
        for kind, m in (("conv", 4.0 * outer), ("fc", 0.5 * outer), ("norm", outer), (DEFAULT_KIND, outer)):
            state = one.init_state(40, kind)
            assert_close(scaled(grad, state, kind)[0], one(grad, state, kind)[0] * m, rtol=1e-6, atol=0)
        folded = [n for n in scaled.networks.values() if isinstance(n, ScaledRule)]
        assert all(not isinstance(n.rule, ScaledRule) for n in folded)
    assert all(torch.equal(v, one.state_dict()[k]) for k, v in before.items())
    # naming "default" sets the step size of every other kind (vectors without a group kind, norm, ...)
    scaled = scale_rule(one, {"conv": 3.0, "fc": 2.0, DEFAULT_KIND: 2.0})
    grad = torch.randn(40)
    for kind, m in (("conv", 3.0), ("fc", 2.0), ("norm", 2.0), (DEFAULT_KIND, 2.0)):
        state = one.init_state(40, kind)
        assert_close(scaled(grad, state, kind)[0], one(grad, state, kind)[0] * m, rtol=1e-6, atol=0)


def test_one_network_rule_at_per_kind_multipliers_in_learned_optimizer() -> None:
    """In LearnedOptimizer each param group goes to its kind's copy: a group without a kind by shape
    (conv kernels: conv, matrices: fc, vectors: default), layer kinds the mapping does not name to default."""
    from lightning_l2l import LearnedOptimizer

    one = CoordinatewiseLSTM(hidden_size=3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(4, 1, 4, 4)

    def updates(rule, groups):
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        opt = LearnedOptimizer([{"params": [params[n] for n in names], "kind": kind} for kind, names in groups], rule)
        before = {n: p.detach().clone() for n, p in params.items()}
        m(x).pow(2).mean().backward()
        opt.step()
        return {n: params[n].detach() - before[n] for n in params}

    names = [n for n, _ in model.named_parameters()]
    scaled = scale_rule(one, {"conv": 3.0, "fc": 2.0})
    expected = {"0.weight": 3.0, "0.bias": 1.0, "1.weight": 1.0, "1.bias": 1.0, "3.weight": 2.0, "3.bias": 1.0}
    for groups in ([(None, names)], [("conv", ["0.weight"]), ("norm", ["1.weight", "1.bias"]),
                                     ("fc", ["3.weight", "3.bias", "0.bias"])]):
        ours, ref = updates(scaled, groups), updates(one, groups)
        for n in names:
            m = expected[n] if groups[0][0] is None else {"conv": 3.0, "norm": 1.0, "fc": 2.0}[
                next(k for k, ns in groups if n in ns)]
            assert_close(ours[n], ref[n] * m, rtol=1e-5, atol=1e-7)


def test_scale_rule_refuses_what_it_cannot_scale() -> None:
    with pytest.raises(ValueError, match=r"no network for kinds \['norm'\]"):
        scale_rule(_per_kind_lstm(), {"conv": 2.0, "norm": 2.0})
    with pytest.raises(ValueError, match="multiplier for kind 'fc'"):
        scale_rule(_per_kind_lstm(), {"fc": -1.0})


def test_parse_multiplier() -> None:
    assert parse_multiplier("1.78") == 1.78
    assert parse_multiplier(" conv=5.62, fc=1.33 ") == {"conv": 5.62, "fc": 1.33}
    for bad in ("0", "-2", "nan", "inf", "abc", "conv=", "=2", "conv=2,conv=3", "conv=-1"):
        with pytest.raises(ValueError, match="Invalid update multiplier.*conv=5.62,fc=1.33"):
            parse_multiplier(bad)


def test_param_kinds_by_layer() -> None:
    """Conv2d -> conv, Linear -> fc, BatchNorm2d -> norm (weights and biases); qualified names."""
    net = _Net()
    kinds = param_kinds(net)
    assert kinds == {
        "features.0.weight": "conv",
        "features.0.bias": "conv",
        "features.1.weight": "norm",
        "features.1.bias": "norm",
        "head.1.weight": "fc",
        "head.1.bias": "fc",
        "temperature": "other",
    }
    assert list(kinds) == [n for n, _ in net.named_parameters()]


@pytest.mark.parametrize(
    "layer, kind",
    [
        (nn.Conv1d(1, 1, 1), "conv"),
        (nn.ConvTranspose2d(1, 1, 1), "conv"),
        (nn.Linear(1, 1), "fc"),
        (nn.LayerNorm(2), "norm"),
        (nn.GroupNorm(1, 2), "norm"),
        (nn.BatchNorm1d(2), "norm"),
        (nn.Embedding(3, 2), "embedding"),
        (nn.ReLU(), "other"),
    ],
)
def test_layer_kind(layer: nn.Module, kind: str) -> None:
    """Each layer family maps to its kind."""
    assert layer_kind(layer) == kind


# ------------------------------------------------------------------------------------ serialization


def _random_head(rule: MomentMLP) -> MomentMLP:
    """A MomentMLP whose zero-initialised head is random, so that round trips test every weight."""
    with torch.no_grad():
        rule.head.weight.normal_()
        rule.head.bias.normal_()
    return rule


def _rules() -> dict[str, UpdateRule]:
    return {
        "lstm": CoordinatewiseLSTM(
            hidden_size=3, num_layers=1, preprocessing="none", p=5.0, output_scale=0.3
        ),
        "linear": CoordinatewiseLinear(lr=0.05),
        "moments": _random_head(MomentMLP(hidden=4, layers=1, momentum_betas=(0.9, 0.99), rms_betas=(0.95, 0.999))),
        "per_kind": PerKindRule(
            {"conv": CoordinatewiseLSTM(hidden_size=3, num_layers=3), "fc": CoordinatewiseLinear(0.2)},
            default="fc",
        ),
        "scaled": ScaledRule(
            PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=3), "fc": CoordinatewiseLinear(0.2)}, default="fc"),
            1.78,
        ),
    }


def _outputs(rule: UpdateRule, kind: str) -> tuple[Tensor, Tensor]:
    g = torch.linspace(-2, 2, 5)
    state = rule.init_state(5, kind)
    u, state = rule(g, state, kind)
    return rule(g * 0.5, state, kind)


@pytest.mark.parametrize("name", ["lstm", "linear", "moments", "per_kind", "scaled"])
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    """save_rule/load_rule give a rule with the same config, weights and outputs, and the metadata back."""
    rule = _rules()[name]
    weights = save_rule(rule, tmp_path / "sub" / name, metadata={"steps": 3, "note": "x"})
    assert weights == tmp_path / "sub" / f"{name}.safetensors"
    assert weights.is_file() and weights.with_suffix(".json").is_file()
    torch.manual_seed(123)  # loading must not depend on the RNG
    loaded, metadata = load_rule(weights)
    assert type(loaded) is type(rule)
    assert metadata == {"steps": 3, "note": "x"}
    assert loaded.config() == rule.config()
    for kind in ("conv", "fc", "other"):
        for out, ref in zip(_outputs(loaded, kind), _outputs(rule, kind), strict=True):
            assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("suffix", ["", ".json", ".safetensors"])
def test_load_accepts_any_of_the_names(tmp_path: Path, suffix: str) -> None:
    """The stem, the .json and the .safetensors path all name the same rule."""
    save_rule(CoordinatewiseLinear(0.25), tmp_path / "r")
    rule, metadata = load_rule(tmp_path / f"r{suffix}")
    assert_close(rule.scale.detach(), torch.tensor(-0.25, dtype=torch.float64))  # saved dtype kept
    assert metadata == {}


def test_dotted_names_do_not_collide(tmp_path: Path) -> None:
    """Names that differ only after a dot are different files."""
    save_rule(CoordinatewiseLinear(0.1), tmp_path / "run.a")
    save_rule(CoordinatewiseLinear(0.2), tmp_path / "run.b")
    rule_a, _ = load_rule(tmp_path / "run.a")
    rule_b, _ = load_rule(tmp_path / "run.b")
    assert_close(rule_a.scale.detach(), torch.tensor(-0.1, dtype=torch.float64))
    assert_close(rule_b.scale.detach(), torch.tensor(-0.2, dtype=torch.float64))


@pytest.mark.parametrize("missing", [".json", ".safetensors"])
def test_load_missing_file(tmp_path: Path, missing: str) -> None:
    """A rule with one of its two files missing raises WeightsError saying which and why."""
    save_rule(CoordinatewiseLinear(), tmp_path / "r")
    (tmp_path / f"r{missing}").unlink()
    with pytest.raises(WeightsError, match=f"missing .*r\\{missing}.*side by side"):
        load_rule(tmp_path / "r")


def test_load_corrupt_weights(tmp_path: Path) -> None:
    """Random bytes in place of the safetensors file raise WeightsError, not a Rust panic or OSError."""
    save_rule(CoordinatewiseLSTM(hidden_size=2), tmp_path / "r")
    (tmp_path / "r.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_rule(tmp_path / "r")


def test_load_truncated_weights(tmp_path: Path) -> None:
    """A safetensors file cut in half raises WeightsError."""
    weights = save_rule(CoordinatewiseLSTM(hidden_size=2), tmp_path / "r")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_rule(tmp_path / "r")


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('{"metadata": {}}', "no 'rule' entry"),
        ("[1, 2]", "no 'rule' entry"),
        ('{"rule": {"init_args": {}}}', "'class_path'"),
        (
            '{"rule": {"class_path": "os.system", "init_args": {"command": "true"}}}',
            "unknown update rule class 'os.system'",
        ),
        ('{"rule": {"class_path": "CoordinatewiseLinear", "init_args": {"bogus": 1}}}', "bad init_args"),
    ],
)
def test_load_bad_config(tmp_path: Path, text: str, match: str) -> None:
    """Invalid JSON, a missing rule, a class outside the allow-list or bad arguments raise WeightsError."""
    save_rule(CoordinatewiseLinear(), tmp_path / "r")
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(WeightsError, match=match):
        load_rule(tmp_path / "r")


def test_not_allow_listed_class_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A class_path outside the allow-list is refused before anything runs; the error lists loadable ones."""
    calls: list[str] = []
    monkeypatch.setattr(os, "system", lambda cmd: calls.append(cmd))
    with pytest.raises(WeightsError) as err:
        build_rule({"class_path": "os.system", "init_args": {"command": "echo hi"}})
    assert calls == []
    for name in ("CoordinatewiseLSTM", "CoordinatewiseLinear", "PerKindRule"):
        assert name in str(err.value)


def test_load_weights_not_matching_config(tmp_path: Path) -> None:
    """hidden_size changed in the JSON: the tensors no longer fit, WeightsError names the mismatch."""
    save_rule(CoordinatewiseLSTM(hidden_size=3), tmp_path / "r")
    doc = json.loads((tmp_path / "r.json").read_text())
    doc["rule"]["init_args"]["hidden_size"] = 4
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match="does not match its config.*wrong shape"):
        load_rule(tmp_path / "r")


def test_load_weights_of_another_class(tmp_path: Path) -> None:
    """LSTM weights under a linear rule's config: missing and unexpected tensors are reported."""
    save_rule(CoordinatewiseLSTM(hidden_size=3), tmp_path / "r")
    doc = json.loads((tmp_path / "r.json").read_text())
    doc["rule"] = CoordinatewiseLinear().config()
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match=r"missing \['scale'\], unexpected \[.*'out.weight'"):
        load_rule(tmp_path / "r")


@pytest.mark.parametrize("name", ["lstm", "linear", "moments", "per_kind", "scaled"])
def test_config_round_trips_through_build_rule(name: str) -> None:
    """``build_rule(rule.config())`` rebuilds the same architecture; the config is plain JSON."""
    rule = _rules()[name]
    config = rule.config()
    assert json.loads(json.dumps(config)) == config
    rebuilt = build_rule(config)
    assert type(rebuilt) is type(rule)
    assert rebuilt.config() == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in rule.state_dict().items()
    }


@pytest.mark.parametrize(
    "class_path",
    [
        "CoordinatewiseLSTM",
        "lightning_l2l.nets.CoordinatewiseLSTM",
        "lightning_l2l.nets.lstm.CoordinatewiseLSTM",
    ],
)
def test_build_rule_short_class_names(class_path: str) -> None:
    """The short, the package and the module class path all build the rule."""
    rule = build_rule({"class_path": class_path, "init_args": {"hidden_size": 2}})
    assert isinstance(rule, CoordinatewiseLSTM) and rule.hidden_size == 2


def test_build_rule_per_kind_without_networks() -> None:
    """A malformed PerKindRule config is a WeightsError like any other bad config."""
    with pytest.raises(WeightsError):
        build_rule({"class_path": "PerKindRule", "init_args": {}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_lstm_tanh_matches_torch_tanh_in_every_dtype(dtype: torch.dtype) -> None:
    """The LSTM's CPU tanh (2 sigmoid(2x) - 1 in float32/64) stays accurate near 0 and in 16-bit dtypes."""
    from lightning_l2l.nets.lstm import _tanh

    x = torch.tensor([0.0, 1e-4, -1e-3, 3e-3, 0.01, -0.5, 2.0, -20.0, 80.0], dtype=dtype)
    tol = {torch.float32: 3e-7, torch.float64: 1e-15}.get(dtype, 0.0)
    assert_close(_tanh(x), torch.tanh(x), rtol=0, atol=tol)
    if dtype in (torch.float32, torch.float64):  # the sigmoid form's gradient is tanh's too
        y = x.clone().requires_grad_()
        (gy,) = torch.autograd.grad(_tanh(y).sum(), y)
        assert_close(gy, 1 - torch.tanh(x) ** 2, rtol=0, atol=1e-6)
