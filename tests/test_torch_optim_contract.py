"""PyTorch's generic optimizer tests, ported to ``LearnedOptimizer``.

A port of the tests of ``TestOptimRenewed`` in pytorch/pytorch ``test/test_optim.py`` that apply to an
optimizer with ``lr`` as its only generic hyperparameter, on CPU, in float32 and float64. The error
inputs are those of ``get_error_inputs_for_all_optims`` in ``torch/testing/_internal/common_optimizers.py``
(copied: importing that module needs PyTorch's test-only dependencies).
Where a learned rule legitimately differs from a hand-written optimizer, the test says why and pins
the documented behaviour instead. Tests of flags ``LearnedOptimizer`` does not have (``foreach``,
``fused``, ``capturable``, ``maximize``, ``weight_decay``, ``differentiable``) and of CUDA are left out.
"""

from __future__ import annotations

import io
import warnings
from copy import deepcopy

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lightning_l2l import LearnedOptimizer

DTYPES = [torch.float32, torch.float64]
#: the single-network default and a per-layer-type rule (section 3.3): both must keep the contract
WEIGHTS = ["quadratic", "conv"]
#: the ``OptimizerInput`` kwargs of the port (PyTorch's ``optim_inputs_func_*`` for an lr-only optimizer)
INPUTS = {
    "default": {},
    "non-default lr": {"lr": 0.5},
    "tensor lr": {"lr": torch.tensor(0.5)},
    "kind fc": {"kind": "fc"},
    "zero_grads update": {"zero_grads": "update"},
    "chunk 1": {"chunk_size": 1},
}


@pytest.fixture(params=WEIGHTS)
def weights(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    return request.param


def _weight_bias(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = Parameter(torch.randn(10, 5, generator=g, dtype=dtype))
    bias = Parameter(torch.randn(10, generator=g, dtype=dtype))
    inp = torch.randn(5, generator=g, dtype=dtype)
    return weight, bias, inp


def _assert_same(a, b):
    """Equal to the bit: tensors, and the dicts, lists and plain values around them (state dicts)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _closure(optimizer, weight, bias, inp):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(inp) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


# ------------------------------------------------------------------------------------------ errors
def _error_inputs():
    """``(desc, params, kwargs, error type, regex)``: PyTorch's ``get_error_inputs_for_all_optims`` on CPU."""
    p, p2 = Parameter(torch.randn(1, 1)), Parameter(torch.randn(1, 1))
    return [
        ("invalid param type", p, {}, TypeError,
         "params argument given to the optimizer should be an iterable of Tensors or dicts"),
        ("a param group cannot have duplicate parameters", [p, p], {}, UserWarning,
         ".*a parameter group with duplicate parameters.*"),
        ("duplicate parameters should not occur across param groups either", [{"params": p}, {"params": p}], {},
         ValueError, "some parameters appear in more than one parameter group"),
        ("Tensor lr must be 1-element", None, {"lr": torch.tensor([0.001, 0.001])}, ValueError,
         "Tensor lr must be 1-element"),
        ("all optimizer params should be with/without names", [("weight", p), p2], {}, ValueError,
         "all optimizer params should be with/without names. Some param names are missing"),
        ("all optimizer param groups should be with/without names.",
         [{"params": [p], "lr": 1e-2}, {"params": [("weight", p2)]}], {}, ValueError,
         "all optimizer param groups should be with/without names. cannot add param group with names to the optimizer"),
    ]


@pytest.mark.parametrize("case", range(len(_error_inputs())), ids=[e[0] for e in _error_inputs()])
def test_errors(case, weights):
    _, params, kwargs, error_type, regex = _error_inputs()[case]
    params = params if params is not None else [Parameter(torch.randn(2, 3))]
    if issubclass(error_type, Warning):
        with pytest.warns(error_type, match=regex):
            LearnedOptimizer(params, weights, **kwargs)
    else:
        with pytest.raises(error_type, match=regex):
            LearnedOptimizer(params, weights, **kwargs)


# ------------------------------------------------------------------------------------- direction
@pytest.mark.parametrize("kwargs", INPUTS.values(), ids=INPUTS.keys())
def test_forloop_goes_right_direction(weights, dtype, kwargs):
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([weight, bias], weights, **kwargs)
    closure = _closure(optimizer, weight, bias, inp)
    initial = closure().item()
    for _ in range(5):
        optimizer.step(closure)
    assert closure().item() < initial


@pytest.mark.parametrize("schedulers", ["step", "plateau"])
def test_param_group_with_lrscheduler_goes_right_direction(weights, dtype, schedulers):
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([{"params": [weight]}, {"params": [bias], "lr": 0.5}], weights)
    scheduler = StepLR(optimizer, gamma=0.9, step_size=10) if schedulers == "step" else ReduceLROnPlateau(optimizer)
    closure = _closure(optimizer, weight, bias, inp)
    initial = closure().item()
    for _ in range(20):
        loss = optimizer.step(closure)
        scheduler.step(loss) if schedulers == "plateau" else scheduler.step()
    assert closure().item() < initial
    if schedulers == "step":
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * 0.9**2)


def test_param_groups_lr(weights, dtype):
    """A group's own ``lr`` is used for it: ``lr=0`` leaves that group's parameters where they are."""
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([{"params": [weight]}, {"params": [bias], "lr": 0.0}], weights)
    closure = _closure(optimizer, weight, bias, inp)
    bias_before, weight_before = bias.detach().clone(), weight.detach().clone()
    for _ in range(3):
        optimizer.step(closure)
    torch.testing.assert_close(bias.detach(), bias_before, rtol=0, atol=0)
    assert not torch.equal(weight.detach(), weight_before)


# ------------------------------------------------------------------------------------- tensor lr
@pytest.mark.parametrize("num_dim", [0, 1, 2])
def test_tensor_lr(weights, dtype, num_dim):
    """A 1-element tensor ``lr`` of any number of dimensions steps exactly as the same float."""
    lr = 0.3
    weight, bias, inp = _weight_bias(dtype)
    weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    optimizer = LearnedOptimizer([weight, bias], weights, lr=lr)
    optimizer_c = LearnedOptimizer([weight_c, bias_c], weights, lr=torch.tensor(lr, dtype=dtype).reshape([1] * num_dim))
    for _ in range(5):
        optimizer.step(_closure(optimizer, weight, bias, inp))
        optimizer_c.step(_closure(optimizer_c, weight_c, bias_c, inp))
        torch.testing.assert_close(weight, weight_c)
        torch.testing.assert_close(bias, bias_c)


# ------------------------------------------------------------------------------------------ complex
def test_complex_is_refused_and_view_as_real_works(weights, dtype):
    """Exception: PyTorch's optimizers treat a complex parameter as its real view (``test_complex``).
    A learned rule was meta-trained on real coordinates and nothing says how it should treat the real
    and imaginary parts of one number, so it refuses complex parameters with a ``ValueError`` that says
    to optimize ``torch.view_as_real(p)``: that is the comparison ``test_complex`` makes, and it works."""
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    with pytest.raises(ValueError, match="view_as_real"):
        LearnedOptimizer([torch.randn(5, 5, dtype=complex_dtype, requires_grad=True)], weights)
    real = torch.view_as_real(torch.randn(5, 5, dtype=complex_dtype)).clone().requires_grad_()
    optimizer = LearnedOptimizer([real], weights)
    before = real.detach().clone()
    real.grad = torch.randn_like(real)
    optimizer.step()
    assert not torch.equal(real.detach(), before)


# ---------------------------------------------------------------------------------------- no-ops
def test_step_is_noop_when_params_have_no_grad(weights, dtype):
    params = [torch.randn(2, 3, requires_grad=False, dtype=dtype) for _ in range(2)]
    old_params = [p.clone() for p in params]
    optimizer = LearnedOptimizer(params, weights)
    optimizer.step(lambda: torch.tensor([1.0]))
    for p, old in zip(params, old_params, strict=True):
        torch.testing.assert_close(p, old, rtol=0, atol=0)
    assert len(optimizer.state) == 0


def test_step_is_noop_for_zero_grads(weights, dtype):
    """``zero_grads="skip"`` (the default): an exactly-zero gradient moves nothing and starts no state
    drift, however many steps, as with PyTorch's optimizers without weight decay."""
    params = [torch.randn(2, 3, requires_grad=True, dtype=dtype) for _ in range(2)]
    old_params = [p.detach().clone() for p in params]
    optimizer = LearnedOptimizer(params, weights)
    for p in params:
        p.grad = torch.zeros_like(p)
    for _ in range(100):
        optimizer.step()
    for p, old in zip(params, old_params, strict=True):
        torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)
    for p in params:  # the state is the rule's initial state: the zeros were never fed to it
        initial = optimizer.rule.init_state(p.numel(), "default", dtype=optimizer.state_dtype(p))
        torch.testing.assert_close(optimizer.state[p]["hidden"], initial, rtol=0, atol=0)


def test_zero_grads_update_moves_the_parameter_as_meta_training_does(weights, dtype):
    """Exception, opted into: with ``zero_grads="update"`` an exactly-zero gradient goes through the
    rule like any other (the paper, and ``MetaLearner``'s default), and a learned rule's output at a
    zero input is in general not zero, so ``test_step_is_noop_for_zero_grads`` does not hold. It is
    the update the rule was meta-trained to make on such coordinates."""
    p = torch.randn(2, 3, requires_grad=True, dtype=dtype)
    before = p.detach().clone()
    optimizer = LearnedOptimizer([p], weights, zero_grads="update")
    p.grad = torch.zeros_like(p)
    optimizer.step()
    assert not torch.equal(p.detach(), before)
    assert optimizer.last_stats["num_coords"].item() == p.numel()


def test_zero_entries_are_skipped_per_coordinate(weights, dtype):
    """Skipping is per coordinate: in one gradient, the zero entries stay and the others move."""
    p = torch.randn(4, 3, requires_grad=True, dtype=dtype)
    before = p.detach().clone()
    optimizer = LearnedOptimizer([p], weights)
    grad = torch.randn_like(p)
    grad[1] = 0.0
    p.grad = grad
    optimizer.step()
    torch.testing.assert_close(p.detach()[1], before[1], rtol=0, atol=0)
    assert (p.detach()[[0, 2, 3]] != before[[0, 2, 3]]).all()


def test_grads_are_never_inplaced_into(weights, dtype):
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([weight, bias], weights)
    for _ in range(3):
        _closure(optimizer, weight, bias, inp)()
        grads = [weight.grad.clone(), bias.grad.clone()]
        optimizer.step()
        torch.testing.assert_close(weight.grad, grads[0], rtol=0, atol=0)
        torch.testing.assert_close(bias.grad, grads[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ state dict
def test_state_dict_deterministic(weights, dtype):
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([{"params": [weight]}, {"params": [bias], "lr": 0.5}], weights)
    closure = _closure(optimizer, weight, bias, inp)
    for _ in range(20):  # prime the optimizer
        optimizer.step(closure)
    weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    optimizer_c = LearnedOptimizer([{"params": [weight_c]}, {"params": [bias_c], "lr": 0.5}], weights)
    closure_c = _closure(optimizer_c, weight_c, bias_c, inp)
    state_dict = deepcopy(optimizer.state_dict())
    state_dict_c = deepcopy(optimizer.state_dict())
    optimizer_c.load_state_dict(state_dict_c)
    for _ in range(20):  # both go on identically
        optimizer.step(closure)
        optimizer_c.step(closure_c)
        torch.testing.assert_close(weight, weight_c, rtol=0, atol=0)
        torch.testing.assert_close(bias, bias_c, rtol=0, atol=0)
    _assert_same(state_dict, state_dict_c)  # loading did not modify it
    _assert_same(optimizer.state_dict(), optimizer_c.state_dict())
    optimizer_c.param_groups.extend(optimizer_c.param_groups)  # repeated groups: same representation
    assert optimizer.state_dict()["param_groups"][-1] == optimizer_c.state_dict()["param_groups"][-1]


def test_can_load_older_state_dict(weights, dtype):
    """A state dict saved before ``l2l_weights`` existed (no fingerprint) loads and steps."""
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([weight, bias], weights)
    closure = _closure(optimizer, weight, bias, inp)
    for _ in range(3):
        optimizer.step(closure)
    state_dict = optimizer.state_dict()
    del state_dict["l2l_weights"]
    optimizer_c = LearnedOptimizer([weight, bias], weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer_c.load_state_dict(state_dict)
    optimizer_c.step(_closure(optimizer_c, weight, bias, inp))


def test_save_load_equality_with_weights_only(weights, dtype):
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([weight, bias], weights, lr=torch.tensor(0.7))
    closure = _closure(optimizer, weight, bias, inp)
    for _ in range(3):
        optimizer.step(closure)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _assert_same(loaded, optimizer.state_dict())
    weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    optimizer_c = LearnedOptimizer([weight_c, bias_c], weights)
    optimizer_c.load_state_dict(loaded)
    optimizer.step(closure)
    optimizer_c.step(_closure(optimizer_c, weight_c, bias_c, inp))
    torch.testing.assert_close(weight, weight_c, rtol=0, atol=0)


def test_non_empty_state(weights, dtype):
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([weight, bias], weights)
    optimizer.step(_closure(optimizer, weight, bias, inp))
    assert len(optimizer.state) == 2
    for state in optimizer.state.values():
        assert state


def test_deepcopy_copies_all_public_attrs(weights, dtype):
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([weight, bias], weights)
    optimizer.step(_closure(optimizer, weight, bias, inp))

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public(optimizer) == public(deepcopy(optimizer))


def test_optimizer_can_be_printed(weights, dtype):
    weight, bias, _ = _weight_bias(dtype)
    text = repr(LearnedOptimizer([{"params": [weight]}, {"params": [bias], "lr": 0.5, "kind": "fc"}], weights))
    assert text.startswith("LearnedOptimizer (") and "Parameter Group 1" in text and "kind: fc" in text


def test_named_parameters(weights, dtype):
    """Named parameters (``(name, tensor)`` pairs) are accepted and their names kept in the state dict."""
    weight, bias, inp = _weight_bias(dtype)
    optimizer = LearnedOptimizer([("weight", weight), ("bias", bias)], weights)
    initial = _closure(optimizer, weight, bias, inp)().item()
    for _ in range(5):
        optimizer.step(_closure(optimizer, weight, bias, inp))
    assert _closure(optimizer, weight, bias, inp)().item() < initial
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_mixed_device_dtype(weights):
    """Parameters of several dtypes in one group each step as they would alone."""
    params = [torch.randn(3, 4, dtype=d, requires_grad=True) for d in (torch.float32, torch.float64, torch.float32)]
    alone = [p.detach().clone().requires_grad_() for p in params]
    optimizer = LearnedOptimizer(params, weights)
    optimizers = [LearnedOptimizer([q], weights) for q in alone]
    for step in range(3):
        for p, q, opt in zip(params, alone, optimizers, strict=True):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step), dtype=p.dtype)
            p.grad, q.grad = g, g.clone()
            opt.step()
        optimizer.step()
        for p, q in zip(params, alone, strict=True):
            # the two float32 tensors share one network call (24 coordinates) where alone each had its own
            # (12): a batch of another size may round the matmuls differently (1 ulp on AVX-512 machines)
            exact = p.dtype == torch.float64
            torch.testing.assert_close(p, q, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7)


# ------------------------------------------------------------------------------------------ hooks
def _param(dtype):
    p = torch.rand(2, 3, dtype=dtype, requires_grad=True)
    p.grad = torch.rand(2, 3, dtype=dtype)
    return p


def test_step_pre_hook(weights, dtype):
    data = 5

    def pre_hook(opt, args, kwargs):
        nonlocal data
        data += 2

    opt = LearnedOptimizer([_param(dtype)], weights)
    handle = opt.register_step_pre_hook(pre_hook)
    for _ in range(3):
        opt.step()
    assert data == 11
    handle.remove()
    opt.step()
    assert data == 11


def test_step_post_hook(weights, dtype):
    data = 2

    def post_hook(opt, args, kwargs):
        nonlocal data
        data += 1

    opt = LearnedOptimizer([_param(dtype)], weights)
    handle = opt.register_step_post_hook(post_hook)
    for _ in range(3):
        opt.step()
    assert data == 5
    handle.remove()
    opt.step()
    assert data == 5


def test_step_all_hooks(weights, dtype):
    data = []

    def global_pre(opt, args, kwargs):
        data.append(0)

    def global_post(opt, args, kwargs):
        data.append(5)

    def local_pre(opt, args, kwargs):
        data.append(1)

    def local_post(opt, args, kwargs):
        data.append(2)

    opt = LearnedOptimizer([_param(dtype)], weights)
    opt2 = LearnedOptimizer([_param(dtype)], weights)
    global_handles = [register_optimizer_step_pre_hook(global_pre), register_optimizer_step_post_hook(global_post)]
    opt.register_step_pre_hook(local_pre)
    opt.register_step_post_hook(local_post)
    try:
        opt.step()
        opt2.step()
        opt.step()
        assert data == [0, 1, 2, 5, 0, 5, 0, 1, 2, 5]
    finally:
        for handle in global_handles:
            handle.remove()
    opt.step()
    opt2.step()
    assert data == [0, 1, 2, 5, 0, 5, 0, 1, 2, 5, 1, 2]


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def test_state_dict_pre_hook(weights, dtype):
    opt = LearnedOptimizer([_param(dtype)], weights)
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1


def test_state_dict_post_hook(weights, dtype):
    opt = LearnedOptimizer([_param(dtype)], weights)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False


def test_state_dict_pre_post_hook(weights, dtype):
    opt = LearnedOptimizer([_param(dtype)], weights)
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = opt.state_dict()
    assert "test" not in state_dict["state"]
    assert state_dict["ran_state_dict_pre_hook"] is True


def test_state_dict_post_hook_sees_the_fingerprint(weights, dtype):
    """Post-hooks get the whole state dict, ``l2l_weights`` included (a hook may drop or rewrite it)."""
    opt = LearnedOptimizer([_param(dtype)], weights)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("l2l_weights" in sd) or sd.pop("l2l_weights") and None)
    assert "l2l_weights" not in opt.state_dict()
    assert seen == [True]


def _load_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(optimizer, state_dict):
    my_state_dict = deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def test_load_state_dict_pre_hook_and_prepend(weights, dtype):
    param = _param(dtype)
    opt = LearnedOptimizer([param], weights, lr=0.001)
    opt.step()
    state_dict = opt.state_dict()
    opt2 = LearnedOptimizer([param], weights, lr=0.001)
    opt2.register_load_state_dict_pre_hook(_load_pre_hook1)
    opt2.load_state_dict(state_dict)
    assert opt2.param_groups[0]["lr"] == 0.002
    opt2.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
    opt2.load_state_dict(state_dict)
    assert opt2.param_groups[0]["lr"] == 0.002  # prepended: hook1 runs last and wins


def test_load_state_dict_pre_hook_result_is_what_loads(weights, dtype):
    """The hidden states loaded are those of the state dict a pre-hook returns, not the one passed in."""
    param = _param(dtype)
    opt = LearnedOptimizer([param], weights)
    opt.step()
    state_dict = opt.state_dict()

    def zero_hidden(optimizer, sd):
        sd = deepcopy(sd)
        sd["state"][0]["hidden"].zero_()
        return sd

    opt2 = LearnedOptimizer([param], weights)
    opt2.register_load_state_dict_pre_hook(zero_hidden)
    opt2.load_state_dict(state_dict)
    assert opt2.state[param]["hidden"].abs().sum() == 0
    assert opt.state[param]["hidden"].abs().sum() > 0


def test_load_state_dict_post_hook(weights, dtype):
    ran = []
    opt = LearnedOptimizer([_param(dtype)], weights)
    opt.register_load_state_dict_post_hook(lambda o: ran.append(o is opt))
    opt.load_state_dict(opt.state_dict())
    assert ran == [True]


def test_load_state_dict_post_hook_prepend(weights, dtype):
    order = []
    opt = LearnedOptimizer([_param(dtype)], weights)
    opt.register_load_state_dict_post_hook(lambda o: order.append(1))
    opt.register_load_state_dict_post_hook(lambda o: order.append(2), prepend=True)
    opt.load_state_dict(opt.state_dict())
    assert order == [2, 1]


# ------------------------------------------------------------------------------------------ sparse
def test_rosenbrock_sparse_is_refused(weights):
    """Exception: ``test_rosenbrock_sparse`` only runs for optimizers that support sparse gradients.
    A learned rule keeps a state per coordinate and updates the coordinates it sees; a sparse gradient
    would leave the state of the others stale, so sparse gradients raise ``RuntimeError`` naming dense
    gradients or ``torch.optim.SparseAdam`` as the fix."""
    p = torch.tensor([1.5, 1.5], requires_grad=True)
    opt = LearnedOptimizer([p], weights)
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (2,))
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.5, 1.5]), rtol=0, atol=0)
