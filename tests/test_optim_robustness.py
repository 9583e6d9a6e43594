"""LearnedOptimizer on awkward inputs: missing and non-finite gradients, dtypes, kinds, chunking."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_l2l import LearnedOptimizer
from lightning_l2l.nets import CoordinatewiseLSTM, PerKindRule
from lightning_l2l.optim import param_groups_by_kind, shape_kind


def _grads(opt: LearnedOptimizer, params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()
    opt.step()


def _snapshot(opt, params):
    return [opt.state[p]["hidden"].clone() if "hidden" in opt.state.get(p, {}) else None for p in params]


# ------------------------------------------------------------------------------ missing grads
def test_parameter_without_grad_is_skipped(lstm_rule):
    """a, b, c share a buffer; b has no gradient at step 2: b and its state stay, a and c move as alone."""
    torch.manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(n)) for n in (3, 4, 5))
    opt = LearnedOptimizer([a, b, c], lstm_rule)
    a2, c2 = nn.Parameter(a.detach().clone()), nn.Parameter(c.detach().clone())
    ref = LearnedOptimizer([a2, c2], lstm_rule)
    g1 = [torch.randn(3), torch.randn(4), torch.randn(5)]
    g2 = [torch.randn(3), None, torch.randn(5)]
    _grads(opt, [a, b, c], g1)
    _grads(ref, [a2, c2], [g1[0], g1[2]])
    b_before, hb_before = b.detach().clone(), opt.state[b]["hidden"].clone()
    _grads(opt, [a, b, c], g2)
    _grads(ref, [a2, c2], [g2[0], g2[2]])
    torch.testing.assert_close(b.detach(), b_before, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[b]["hidden"], hb_before, rtol=0, atol=0)
    # float32 matmuls over batches of other sizes may round differently in the last bit
    torch.testing.assert_close(a, a2, rtol=0, atol=1e-6)
    torch.testing.assert_close(c, c2, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[c]["hidden"], ref.state[c2]["hidden"], rtol=0, atol=1e-6)
    assert int(opt.last_stats["num_coords"]) == 8


def test_state_is_lazy_and_frozen_parameters_cost_nothing(lstm_rule):
    used, frozen = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(1000), requires_grad=False)
    opt = LearnedOptimizer([used, frozen], lstm_rule)
    _grads(opt, [used, frozen], [torch.randn(3), None])
    assert "hidden" in opt.state[used] and frozen not in opt.state
    # a parameter that gets its first gradient later gets a fresh state; the others keep theirs
    h_used = opt.state[used]["hidden"].clone()
    frozen.requires_grad_(True)
    _grads(opt, [used, frozen], [None, torch.randn(1000)])
    torch.testing.assert_close(opt.state[used]["hidden"], h_used, rtol=0, atol=0)
    assert opt.state[frozen]["hidden"].shape == (1000, 2, 2, 4)


def test_no_gradients_at_all_is_a_no_op(lstm_rule):
    p = nn.Parameter(torch.randn(3))
    opt = LearnedOptimizer([p], lstm_rule)
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)
    assert opt.last_stats == {} and len(opt.state) == 0


# ------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries_update_nothing_and_keep_state(lstm_rule, bad):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6))
    q = nn.Parameter(p.detach().clone())
    opt, ref = LearnedOptimizer([p], lstm_rule), LearnedOptimizer([q], lstm_rule)
    g1 = torch.randn(6)
    _grads(opt, [p], [g1])
    _grads(ref, [q], [g1])
    h_before, p_before = opt.state[p]["hidden"].clone(), p.detach().clone()
    g2 = torch.randn(6)
    g2_bad = g2.clone()
    g2_bad[[1, 4]] = bad
    _grads(opt, [p], [g2_bad])
    _grads(ref, [q], [g2])
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["hidden"]).all()
    good = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(p.detach()[~good], p_before[~good], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[p]["hidden"][~good], h_before[~good], rtol=0, atol=0)
    torch.testing.assert_close(p.detach()[good], q.detach()[good], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[p]["hidden"][good], ref.state[q]["hidden"][good], rtol=0, atol=0)
    assert int(opt.last_stats["nonfinite"]) == 2
    assert float(opt.last_stats["nonfinite_fraction"]) == pytest.approx(2 / 6)


def test_all_nan_gradient_with_small_chunks(lstm_rule):
    p = nn.Parameter(torch.randn(10))
    opt = LearnedOptimizer([p], lstm_rule, chunk_size=3)
    _grads(opt, [p], [torch.randn(10)])
    before, h = p.detach().clone(), opt.state[p]["hidden"].clone()
    _grads(opt, [p], [torch.full((10,), float("nan"))])
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[p]["hidden"], h, rtol=0, atol=0)
    assert float(opt.last_stats["update_norm"]) == 0.0


# ----------------------------------------------------------------------------------- refused
def test_sparse_gradients_are_refused(lstm_rule):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = LearnedOptimizer(emb.parameters(), lstm_rule)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_complex_parameters_are_refused(lstm_rule):
    with pytest.raises(ValueError, match="complex parameters.*view_as_real"):
        LearnedOptimizer([nn.Parameter(torch.zeros(3, dtype=torch.complex64))], lstm_rule)


# ------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters(lstm_rule, dtype):
    """16-bit parameters: float32 state, update computed from the same gradient and cast."""
    torch.manual_seed(0)
    g = torch.randn(2, 50).to(dtype)
    p = nn.Parameter(torch.randn(2, 50).to(dtype))
    q = nn.Parameter(p.detach().float())
    opt, ref = LearnedOptimizer([p], lstm_rule), LearnedOptimizer([q], lstm_rule)
    for _ in range(3):
        _grads(opt, [p], [g])
        _grads(ref, [q], [g.float()])
    assert p.dtype == dtype and opt.state[p]["hidden"].dtype == torch.float32
    torch.testing.assert_close(opt.state[p]["hidden"], ref.state[q]["hidden"], rtol=0, atol=0)
    torch.testing.assert_close(p.detach().float(), q.detach(), rtol=2e-2, atol=2e-2)
    assert opt.state_dtype(p) == torch.float32


def test_float64_parameters_keep_float64_state(lstm_rule):
    p = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = LearnedOptimizer([p], lstm_rule)
    _grads(opt, [p], [torch.randn(4, dtype=torch.float64)])
    assert opt.state[p]["hidden"].dtype == torch.float64
    assert opt.rule.state_dtype() == torch.float32  # the shipped copy stays as loaded


def test_mixed_dtypes_in_one_group(lstm_rule):
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    c = nn.Parameter(torch.randn(3).half())
    opt = LearnedOptimizer([a, b, c], lstm_rule)
    _grads(opt, [a, b, c], [torch.randn(3), torch.randn(3, dtype=torch.float64), torch.randn(3).half()])
    assert [opt.state[x]["hidden"].dtype for x in (a, b, c)] == [torch.float32, torch.float64, torch.float32]


# ------------------------------------------------------------------------------------- kinds
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(3))  # a parameter of no known layer type

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).flatten(1)) * self.scale


def _per_kind_rule() -> PerKindRule:
    return PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=3), "fc": CoordinatewiseLSTM(hidden_size=4)},
                       default="fc")


def _hidden_sizes(opt, model):
    return {n: opt.state[p]["hidden"].shape[-1] for n, p in model.named_parameters()}


def test_shape_kind():
    assert shape_kind(torch.zeros(2, 1, 3, 3)) == "conv"
    assert shape_kind(torch.zeros(2, 3, 3)) == "conv"
    assert shape_kind(torch.zeros(3, 8)) == "fc"
    assert shape_kind(torch.zeros(3)) == "default"
    assert shape_kind(torch.zeros(())) == "default"


def _step_model(model, opt):
    model(torch.randn(4, 1, 4, 4)).pow(2).mean().backward()
    opt.step()


def test_from_module_routes_by_layer_type():
    model = ConvNet()
    groups = param_groups_by_kind(model)
    assert [(g["kind"], len(g["params"])) for g in groups] == [(None, 1), ("conv", 2), ("norm", 2), ("fc", 2)]
    opt = LearnedOptimizer.from_module(model, _per_kind_rule())
    _step_model(model, opt)
    assert _hidden_sizes(opt, model) == {
        "scale": 4,  # no layer: by shape, a vector is "default" -> the default (fc) network
        "conv.weight": 3, "conv.bias": 3,  # a conv bias is conv
        "norm.weight": 4, "norm.bias": 4,  # no norm network: the default one
        "fc.weight": 4, "fc.bias": 4,
    }


def test_without_kinds_falls_back_to_shape():
    model = ConvNet()
    opt = LearnedOptimizer(model.parameters(), _per_kind_rule())
    _step_model(model, opt)
    sizes = _hidden_sizes(opt, model)
    assert sizes["conv.weight"] == 3 and sizes["conv.bias"] == 4 and sizes["fc.weight"] == 4


def test_single_network_serves_every_kind(lstm_rule):
    model = ConvNet()
    opt = LearnedOptimizer.from_module(model, lstm_rule)
    _step_model(model, opt)
    assert set(_hidden_sizes(opt, model).values()) == {4}


def test_from_module_restricted_to_some_params(lstm_rule):
    model = ConvNet()
    opt = LearnedOptimizer.from_module(model, lstm_rule, params=model.fc.parameters(), lr=0.5)
    assert [g["kind"] for g in opt.param_groups] == ["fc"] and opt.param_groups[0]["lr"] == 0.5


# ----------------------------------------------------------------------------- one call per kind
def _count_calls(opt, monkeypatch) -> list[str]:
    calls: list[str] = []
    nets = opt.rule.networks.values() if isinstance(opt.rule, PerKindRule) else [opt.rule]
    for net in nets:  # the optimizer's in-place step: UpdateRule.step_ (the fused kernel or forward)
        original = net.step_

        def counting(grad, state, kind="default", keep=None, *, fused=True, original=original):
            calls.append(kind)
            return original(grad, state, kind, keep, fused=fused)

        monkeypatch.setattr(net, "step_", counting)
    return calls


def test_one_network_call_per_kind_per_step(monkeypatch):
    mlp = nn.Sequential(*[nn.Linear(5, 5) for _ in range(6)])
    model = nn.ModuleDict({"mlp": mlp, "conv": nn.Conv1d(5, 5, 1)})
    opt = LearnedOptimizer.from_module(model, _per_kind_rule())
    calls = _count_calls(opt, monkeypatch)
    mlp(torch.randn(2, 5)).sum().backward()  # the conv gets no gradient on this path
    opt.step()
    assert calls == ["fc"]  # 12 fc tensors, one call
    calls.clear()
    (mlp(torch.randn(2, 5)).sum() + model["conv"](torch.randn(2, 5, 1)).sum()).backward()
    opt.step()
    assert sorted(calls) == ["conv", "fc"]


def test_chunks_bound_the_call_size_and_change_nothing(monkeypatch, lstm_rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 3))
    twin = copy.deepcopy(model)
    big = LearnedOptimizer.from_module(model, lstm_rule)
    small = LearnedOptimizer.from_module(twin, lstm_rule, chunk_size=16)
    calls = _count_calls(small, monkeypatch)
    x = torch.randn(4, 10)
    for _ in range(3):
        for m, o in ((model, big), (twin, small)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    assert len(calls) == 3 * -(-143 // 16)  # 143 coordinates in chunks of 16
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
