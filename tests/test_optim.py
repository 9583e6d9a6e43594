"""LearnedOptimizer follows torch.optim's contract and reproduces meta-training's updates."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from lightning_l2l import LearnedOptimizer, MetaLearner
from lightning_l2l.nets import CoordinatewiseLinear, CoordinatewiseLSTM, PerKindRule, save_rule
from lightning_l2l.optim.learned import ACCELERATOR_CHUNK_SIZE, CPU_CHUNK_SIZE
from lightning_l2l.tasks import ModuleTask, QuadraticFamily, QuadraticTask
from lightning_l2l.trajectory import Trajectory, unroll


def _sgd_rule(lr: float) -> CoordinatewiseLinear:
    """Learned SGD with its scale exactly ``-lr`` in float64 (not a float32 rounding of it)."""
    rule = CoordinatewiseLinear(lr=lr).double()
    with torch.no_grad():
        rule.scale.fill_(-lr)
    return rule


def _run(opt: torch.optim.Optimizer, task, params: dict[str, torch.Tensor], steps: int) -> list[float]:
    """``steps`` closure steps of ``opt`` on ``task``; the losses before each step."""
    losses = []
    for t in range(steps):

        def closure(t=t):
            opt.zero_grad()
            loss = task.loss(params, t)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


# ------------------------------------------------------------------------------------ contract
def test_docstring_defaults():
    sig = inspect.signature(LearnedOptimizer.__init__)
    assert sig.parameters["weights"].default == "general"
    assert sig.parameters["lr"].default == 1.0
    assert sig.parameters["kind"].default is None
    assert sig.parameters["chunk_size"].default is None
    assert sig.parameters["compile"].default is False
    assert CPU_CHUNK_SIZE == 16384 and ACCELERATOR_CHUNK_SIZE == 524288
    for name in ("lr", "kind", "chunk_size", "compile"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    doc = LearnedOptimizer.__doc__
    assert 'Default: ``"general"``' in doc and "default ``1.0``" in doc
    assert "Default ``None``: 16384 on CPU" in doc and "524288 on GPUs" in doc
    assert "Andrychowicz" in doc


def test_defaults_go_into_every_group(linear_rule):
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    opt = LearnedOptimizer([{"params": [a]}, {"params": [b], "kind": "fc", "lr": 0.5}], linear_rule, lr=2.0)
    assert opt.defaults == {"lr": 2.0, "kind": None}
    assert opt.param_groups[0]["lr"] == 2.0 and opt.param_groups[0]["kind"] is None
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["kind"] == "fc"
    assert len(opt.state) == 0  # lazy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"chunk_size": 0}, "Invalid chunk_size: 0"),
        ({"kind": 3}, "Invalid kind: 3"),
        ({"compile": "yes"}, "Invalid compile: 'yes'"),
    ],
)
def test_bad_values_raise_value_error(linear_rule, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnedOptimizer([nn.Parameter(torch.zeros(2))], linear_rule, **kwargs)


def test_default_chunk_size_by_device(linear_rule):
    opt = LearnedOptimizer([nn.Parameter(torch.zeros(2))], linear_rule)
    assert opt._chunk(torch.device("cpu")) == CPU_CHUNK_SIZE
    assert opt._chunk(torch.device("cuda", 0)) == ACCELERATOR_CHUNK_SIZE
    assert LearnedOptimizer([nn.Parameter(torch.zeros(2))], linear_rule, chunk_size=7)._chunk(torch.device("cpu")) == 7


def test_bad_group_values_raise(linear_rule):
    opt = LearnedOptimizer([nn.Parameter(torch.zeros(2))], linear_rule)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -0.1})
    with pytest.raises(ValueError, match="Invalid kind"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "kind": ["fc"]})
    with pytest.raises(ValueError, match="floating-point"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.long)]})


def test_matches_sgd_step_for_step_float64(quadratic_task64: QuadraticTask):
    """A rule that outputs ``-lr * g`` is SGD: 20 steps agree with torch.optim.SGD in float64 (STYLE 6)."""
    rule = _sgd_rule(0.01)
    ours = quadratic_task64.init_params()["theta"].requires_grad_()
    ref = ours.detach().clone().requires_grad_()
    l_ours = _run(LearnedOptimizer([ours], rule), quadratic_task64, {"theta": ours}, 20)
    l_ref = _run(torch.optim.SGD([ref], lr=0.01), quadratic_task64, {"theta": ref}, 20)
    torch.testing.assert_close(torch.tensor(l_ours), torch.tensor(l_ref), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_lr_multiplies_the_update(quadratic_task64: QuadraticTask):
    rule = _sgd_rule(0.01)
    ours = quadratic_task64.init_params()["theta"].requires_grad_()
    ref = ours.detach().clone().requires_grad_()
    _run(LearnedOptimizer([ours], rule, lr=0.5), quadratic_task64, {"theta": ours}, 5)
    _run(torch.optim.SGD([ref], lr=0.005), quadratic_task64, {"theta": ref}, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_loss_falls_over_20_closure_steps(quadratic_task: QuadraticTask):
    theta = quadratic_task.init_params()["theta"].requires_grad_()
    losses = _run(LearnedOptimizer([theta], CoordinatewiseLinear(lr=0.02)), quadratic_task, {"theta": theta}, 20)
    assert losses[-1] < 0.5 * losses[0]


def test_step_without_closure_returns_none_and_zero_grad(linear_rule):
    p = nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([p], linear_rule)
    p.sum().backward()
    assert opt.step() is None
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))
    opt.zero_grad()
    assert p.grad is None


def test_closure_runs_with_grad_enabled(linear_rule):
    p = nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([p], linear_rule)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        assert float(opt.step(closure)) == 3.0


def test_add_param_group_gets_its_own_state(lstm_rule):
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    opt = LearnedOptimizer([a], lstm_rule)
    (a**2).sum().backward()
    opt.step()
    opt.add_param_group({"params": [b], "kind": "fc"})
    assert opt.param_groups[1]["lr"] == 1.0
    opt.zero_grad()
    ((a**2).sum() + (b**2).sum()).backward()
    opt.step()
    assert opt.state[a]["hidden"].shape == (4, 2, 2, 4)
    assert opt.state[b]["hidden"].shape == (3, 2, 2, 4)


# -------------------------------------------------------------------------------------- parity
def _opt_run(task, rule, steps, **kwargs) -> tuple[dict[str, torch.Tensor], LearnedOptimizer]:
    params = {n: p.requires_grad_() for n, p in task.init_params().items()}
    groups: dict[str, list[torch.Tensor]] = {}
    for n, p in params.items():
        groups.setdefault(task.kinds().get(n, "default"), []).append(p)
    opt = LearnedOptimizer([{"params": ps, "kind": k} for k, ps in groups.items()], rule, **kwargs)
    for t in range(steps):
        opt.zero_grad()
        task.loss(params, t).backward()
        opt.step()
    return {n: p.detach() for n, p in params.items()}, opt


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_parity_with_meta_learner_unroll_float64(chunk_size):
    """The same 30 updates as MetaLearner's training unroll (differentiable, as in training_step)."""
    family = QuadraticFamily(dim=3, num_functions=4, init_std=1.0, dtype=torch.float64)
    learner = MetaLearner(CoordinatewiseLSTM(hidden_size=6).double(), family, horizon=30, unroll=10)
    learner.setup("fit")
    traj = learner._new_trajectory()
    for _ in range(3):  # three truncations, as training_step runs them
        unroll(learner.rule, traj, 10, differentiable=True)
        traj.detach()
    ours, opt = _opt_run(traj.task, learner.rule, 30, chunk_size=chunk_size)
    torch.testing.assert_close(ours["theta"], traj.params["theta"], rtol=0, atol=1e-12)
    theta = opt.param_groups[0]["params"][0]
    torch.testing.assert_close(opt.state[theta]["hidden"], traj.states["default"], rtol=0, atol=1e-12)
    assert not any(p.requires_grad for p in opt.rule.parameters())
    assert all(p.requires_grad for p in learner.rule.parameters())  # the caller's rule is untouched


def test_parity_per_kind_module_task(module_task64: ModuleTask):
    """A module with two kinds and a PerKindRule: each kind through its own network, as in unroll."""
    rule = PerKindRule({"fc": CoordinatewiseLSTM(hidden_size=4), "conv": CoordinatewiseLSTM(hidden_size=3)},
                       default="conv").double()
    task = copy.copy(module_task64)
    task._kinds = {"weight": "fc", "bias": "norm"}  # bias goes to the default (conv) network
    traj = Trajectory.start(rule, task)
    unroll(rule, traj, 15, differentiable=False)
    ours, opt = _opt_run(task, rule, 15)
    for name in ("weight", "bias"):
        torch.testing.assert_close(ours[name], traj.params[name], rtol=0, atol=1e-12)
    bias = opt.param_groups[1]["params"][0]
    assert opt.state[bias]["hidden"].shape == (2, 2, 2, 3)


def test_weights_from_safetensors_path_match_the_rule(tmp_path, quadratic_task64):
    rule = CoordinatewiseLSTM(hidden_size=5)
    path = save_rule(rule, tmp_path / "mine")
    a, _ = _opt_run(quadratic_task64, rule, 5)
    b, opt = _opt_run(quadratic_task64, str(path), 5)
    torch.testing.assert_close(a["theta"], b["theta"], rtol=0, atol=0)
    assert opt.weights_metadata["source"] == str(path)


def test_from_module_loads_the_weights_once(monkeypatch, lstm_rule):
    """``from_module`` reads the recorded routing and builds the optimizer from one load of the weights;
    an ``UpdateRule`` passed in is still copied (freezing it leaves the caller's rule trainable)."""
    from lightning_l2l.optim import learned

    calls: list[object] = []
    real = learned.resolve
    monkeypatch.setattr(learned, "resolve", lambda weights: calls.append(weights) or real(weights))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
    opt = LearnedOptimizer.from_module(model, "conv")
    assert calls == ["conv"]
    assert opt.weights_metadata["source"] == "conv" and "kind_map" in opt.weights_metadata
    assert {g["kind"] for g in opt.param_groups} == {"conv", "fc"}
    opt = LearnedOptimizer.from_module(model, lstm_rule)
    assert len(calls) == 2 and opt.rule is not lstm_rule
    assert all(p.requires_grad for p in lstm_rule.parameters())
    assert not any(p.requires_grad for p in opt.rule.parameters())


# ---------------------------------------------------------------------------------- state dict
def _lstm_setup(rule, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(device=device, dtype=dtype)
    x = torch.randn(8, 3, device=device, dtype=dtype)
    return model, x


def _train(model, opt, x, steps):
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_state_dict_round_trip_continues_identically(lstm_rule):
    model, x = _lstm_setup(lstm_rule)
    opt = LearnedOptimizer.from_module(model, lstm_rule)
    _train(model, opt, x, 3)
    sd = opt.state_dict()
    assert sd["state"][0]["hidden"].shape == (12, 2, 2, 4)
    assert "l2l_weights" in sd and [g["kind"] for g in sd["param_groups"]] == ["fc"]
    twin = copy.deepcopy(model)
    opt2 = LearnedOptimizer.from_module(twin, lstm_rule)
    opt2.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(opt.state[p]["hidden"], opt2.state[q]["hidden"], rtol=0, atol=0)
    _train(model, opt, x, 3)
    _train(twin, opt2, x, 3)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_state_dict_survives_torch_save(tmp_path, lstm_rule):
    model, x = _lstm_setup(lstm_rule)
    opt = LearnedOptimizer.from_module(model, lstm_rule)
    _train(model, opt, x, 2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    twin = copy.deepcopy(model)
    opt2 = LearnedOptimizer.from_module(twin, lstm_rule)
    opt2.load_state_dict(sd)
    _train(model, opt, x, 2)
    _train(twin, opt2, x, 2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, state_dtype", [(torch.float64, torch.float64), (torch.float16, torch.float32),
                                                (torch.bfloat16, torch.float32)])
def test_state_dict_across_dtypes(lstm_rule, dtype, state_dtype):
    model, x = _lstm_setup(lstm_rule)
    opt = LearnedOptimizer.from_module(model, lstm_rule)
    _train(model, opt, x, 2)
    other = copy.deepcopy(model).to(dtype)
    opt2 = LearnedOptimizer.from_module(other, lstm_rule)
    opt2.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        h = opt2.state[q]["hidden"]
        assert h.dtype == state_dtype  # not the parameter's dtype: the state dtype is chosen on purpose
        torch.testing.assert_close(h.float(), opt.state[p]["hidden"], rtol=0, atol=0)
    _train(other, opt2, x.to(dtype), 1)
    assert all(opt2.state[q]["hidden"].dtype == state_dtype for q in other.parameters())


def test_load_state_dict_refuses_other_architecture(lstm_rule):
    model, x = _lstm_setup(lstm_rule)
    opt = LearnedOptimizer.from_module(model, lstm_rule)
    _train(model, opt, x, 1)
    opt2 = LearnedOptimizer.from_module(model, CoordinatewiseLSTM(hidden_size=7))
    with pytest.warns(UserWarning, match="other update-rule weights"):
        opt2.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="made with other weights"):
        _train(model, opt2, x, 1)


def test_state_is_a_view_of_one_buffer_per_kind(lstm_rule):
    model, x = _lstm_setup(lstm_rule)
    opt = LearnedOptimizer.from_module(model, lstm_rule)
    _train(model, opt, x, 1)
    storages = {opt.state[p]["hidden"].untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1
    # replacing a state from outside (e.g. moving it) is picked up at the next step
    first = next(model.parameters())
    opt.state[first]["hidden"] = opt.state[first]["hidden"].clone()
    _train(model, opt, x, 1)
    assert len({opt.state[p]["hidden"].untyped_storage().data_ptr() for p in model.parameters()}) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_dict_across_devices(lstm_rule):
    model, x = _lstm_setup(lstm_rule)
    opt = LearnedOptimizer.from_module(model, lstm_rule)
    _train(model, opt, x, 2)
    gpu = copy.deepcopy(model).cuda()
    opt2 = LearnedOptimizer.from_module(gpu, lstm_rule)
    opt2.load_state_dict(opt.state_dict())
    _train(model, opt, x, 2)
    _train(gpu, opt2, x.cuda(), 2)
    for p, q in zip(model.parameters(), gpu.parameters(), strict=True):
        assert opt2.state[q]["hidden"].is_cuda
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-5)


def test_lr_scheduler_acts_on_the_update_multiplier(quadratic_task64: QuadraticTask):
    rule = _sgd_rule(0.01)
    ours = quadratic_task64.init_params()["theta"].requires_grad_()
    ref = ours.detach().clone().requires_grad_()
    opt, sgd = LearnedOptimizer([ours], rule), torch.optim.SGD([ref], lr=0.01)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, sgd)]
    for t in range(4):
        for o, p, s in ((opt, ours, scheds[0]), (sgd, ref, scheds[1])):
            o.zero_grad()
            quadratic_task64.loss({"theta": p}, t).backward()
            o.step()
            s.step()
    assert opt.param_groups[0]["lr"] == 1.0 / 16
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_deepcopy_and_pickle_keep_rule_and_state(lstm_rule, monkeypatch):
    import pickle

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # pass-through: no compilation cost
    model, x = _lstm_setup(lstm_rule)
    opt = LearnedOptimizer.from_module(model, lstm_rule, chunk_size=5, compile=True)
    _train(model, opt, x, 2)
    assert opt._compiled  # a closure that does not pickle: the clones rebuild it
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.chunk_size == 5 and isinstance(clone.rule, CoordinatewiseLSTM) and clone.last_stats == {}
        assert clone.compile is True and clone._compiled == {}
        assert clone.state_dict()["l2l_weights"] == opt.state_dict()["l2l_weights"]


def _inductor_works() -> bool:
    """Whether torch.compile's default backend builds and runs a kernel here (on CPU it needs a C++
    compiler and Python's headers; a machine without them gets the fallback, tested below)."""
    try:
        return bool(torch.compile(lambda x: torch.sigmoid(x) * 2)(torch.zeros(3)).eq(1).all())
    except Exception:
        return False


def _conv_run(compile: bool, steps: int = 4, fused: bool | None = None) -> tuple[torch.Tensor, LearnedOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(4, 1, 4, 4)
    # chunk_size 16: full and shorter chunks, two kinds through the shipped conv PerKindRule
    opt = LearnedOptimizer.from_module(model, "conv", chunk_size=16, compile=compile, fused=fused)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt


def test_compiled_network_matches_eager_updates():
    """compile=True: the same updates as eager to float rounding, computed by the compiled network
    (dynamo compiled frames; no fallback warning), on chunks of several lengths and two kinds."""
    import warnings

    from torch._dynamo.utils import counters

    if not _inductor_works():
        pytest.skip("torch.compile cannot build kernels on this machine (on CPU: needs g++/clang++ and Python.h)")
    eager, _ = _conv_run(compile=False, fused=False)
    counters.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled, opt = _conv_run(compile=True)
    assert not [w for w in seen if "torch.compile failed" in str(w.message)]
    assert counters["stats"]["unique_graphs"] >= 1
    assert all(call.__name__ == "call" for call in opt._compiled.values())  # still the compiled path
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    assert not torch.equal(compiled, _conv_run(compile=False, steps=0)[0])  # it trained


@pytest.mark.parametrize("fails_at", ["compile", "call"])
def test_compile_failure_warns_once_and_continues_eagerly(monkeypatch, fails_at):
    """A backend that cannot compile (here a stand-in for a machine without a C++ compiler, which this
    one has; or a Python dynamo does not support, where torch.compile raises at once) costs one warning,
    not the run: the steps are the eager ones, bit for bit."""
    calls = []

    def broken_compile(module, **kwargs):
        calls.append(kwargs)
        if fails_at == "compile":
            raise RuntimeError("torch.compile is not supported on this Python\nmore details")

        def run(*args):
            raise RuntimeError("no working C++ compiler found\nmore details")
        return run

    eager, _ = _conv_run(compile=False, fused=False)  # compile=True falls back to the network's forward
    monkeypatch.setattr(torch, "compile", broken_compile)
    message = {"compile": "torch.compile is not supported on this Python", "call": r"no working C\+\+ compiler found"}[fails_at]
    with pytest.warns(RuntimeWarning, match=rf"torch.compile failed on cpu \(RuntimeError: {message}\)") as seen:
        fallen, opt = _conv_run(compile=True)
    assert len([w for w in seen if "torch.compile failed" in str(w.message)]) == 1
    assert seen[0].filename == learned_module_file()  # points at LearnedOptimizer.step, not into torch
    assert len(calls) == 1 and calls[0] == {"dynamic": True}  # tried once, then eager
    assert torch.equal(fallen, eager)
    assert all(isinstance(rule, PerKindRule) for rule in opt._compiled.values())


def learned_module_file() -> str:
    from lightning_l2l.optim import learned

    return learned.__file__


def test_compile_does_not_blame_the_compiler_for_the_rules_own_error(monkeypatch):
    """When the eager rule fails on the same call, that error propagates, without a compile warning, and
    the compiled path stays in place (it is not the compiler's fault)."""
    import warnings

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # pass-through stand-in
    model = nn.Linear(3, 2)
    opt = LearnedOptimizer.from_module(model, "quadratic", compile=True)

    def broken_forward(*args, **kwargs):
        raise ValueError("the rule itself is broken")

    opt.rule.forward = broken_forward
    model(torch.randn(4, 3)).sum().backward()
    with warnings.catch_warnings(record=True) as seen, pytest.raises(ValueError, match="the rule itself is broken"):
        warnings.simplefilter("always")
        opt.step()
    assert not [w for w in seen if "torch.compile failed" in str(w.message)]
    assert all(call.__name__ == "call" for call in opt._compiled.values())


def test_scalar_empty_and_non_contiguous_parameters(lstm_rule):
    scalar = nn.Parameter(torch.tensor(1.0))
    empty = nn.Parameter(torch.zeros(0, 3))
    wide = nn.Parameter(torch.randn(4, 3).t())  # non-contiguous
    opt = LearnedOptimizer([scalar, empty, wide], lstm_rule)
    for _ in range(2):
        opt.zero_grad()
        (scalar**2 + empty.sum() + (wide**2).sum()).backward()
        opt.step()
    assert opt.state[scalar]["hidden"].shape == (1, 2, 2, 4)
    assert opt.state[empty]["hidden"].shape == (0, 2, 2, 4)
    assert wide.shape == (3, 4) and torch.isfinite(wide).all()


def test_step_time_benchmark_rows_and_an_uncompiled_row_said_so(monkeypatch, capsys, tmp_path):
    """benchmarks/step_time.py, shrunk: its worker times each optimizer (in this process here), and a
    compile=True row whose compilation failed (torch.compile replaced by a failing stand-in) says so."""
    import json

    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("step_time")
    cfg = dict(size=500, device="cpu", threads=1, steps=2, warmup=1, weights="quadratic", chunk_size=None)
    rows = [bench.worker({**cfg, "optimizer": name}) for name in ("adam", "learned", "eager")]

    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows.append(bench.worker({**cfg, "optimizer": "compiled", "warmup": 2}))
    for r in rows:
        r.update(bandwidth=1e10, matmul=1e10, floor_mem_s=1e-6, floor_flops_s=1e-6, floor_s=1e-6)
        assert r["params"] == sum(p.numel() for p in bench.mlp(500).parameters()) and r["step_s"] > 0
        assert r["first_step_s"] > 0 and r["peak_bytes"] >= 0
    assert [r["compile_fell_back"] for r in rows] == [False, False, False, True]
    lines = bench.table(rows).splitlines()
    assert "| Adam |" in lines[2] and "| LearnedOptimizer |" in lines[3]
    assert "| LearnedOptimizer (fused=False) |" in lines[4]
    assert "| LearnedOptimizer (compile=True) (compilation failed: eager) |" in lines[5]
    ratio = rows[1]["step_s"] / rows[0]["step_s"]
    assert lines[2].endswith("|  |") and lines[3].endswith(f"| {ratio:.0f} |")  # x Adam
    json.dumps(rows)  # --json writes them
