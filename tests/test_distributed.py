"""Mixed precision and DDP: MetaLearner and LearnedOptimizer under Lightning's own machinery.

DDP runs two CPU processes with the gloo backend (``ddp_spawn``, so that it works from pytest).
Each rank writes what it saw to a JSON file; the test reads them back after the spawn returns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_l2l import LearnedOptimizerCallback, _distributed
from lightning_l2l.meta import MetaLearner
from lightning_l2l.nets import CoordinatewiseLSTM
from lightning_l2l.tasks import QuadraticFamily
from tests.benchmark_scripts import load_benchmark
from tests.image_data import config_data_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_master_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """A free port for this test's process group, restored afterwards.

    ``ddp_spawn`` writes ``MASTER_PORT`` into the parent's environment and keeps it there, so without this
    every later DDP test in the session would rendezvous on the first test's port.
    """
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    port = find_free_network_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    return port


def _model(**kwargs) -> MetaLearner:
    args = dict(
        rule=CoordinatewiseLSTM(hidden_size=8), task_family=QuadraticFamily(dim=4, num_functions=8),
        horizon=10, unroll=5, meta_lr=1e-2, truncations_per_epoch=4, num_val_tasks=1, num_test_tasks=1,
        meta_lr_schedule="constant",
    )
    args.update(kwargs)
    return MetaLearner(**args)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class _RecordRanks(Callback):
    """After every meta-step: this rank's rule weights and current task, written per rank."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        gathered = trainer.strategy.all_gather(_flat(pl_module.rule))  # (ranks, n)
        self.rows.append({
            "step": trainer.global_step,
            "max_weight_diff": float((gathered - gathered[0]).abs().max()),
            "task_W0": float(pl_module._traj.task.W.reshape(-1)[0]),
        })

    def on_train_end(self, trainer, pl_module) -> None:
        self.rows.append({"exit_cleanup": _distributed._registered})
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def test_ddp_meta_training_two_ranks(tmp_path, fresh_master_port):
    model = _model()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[_RecordRanks(tmp_path), ckpt], default_root_dir=tmp_path,
    )
    trainer.fit(model)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # each rank destroys its gloo group at exit (else a rank may abort in interpreter shutdown)
    assert rank0.pop() == rank1.pop() == {"exit_cleanup": True}
    assert [r["step"] for r in rank0] == [1, 2, 3, 4]
    # the rule's weights are identical on both ranks after every meta-step
    assert all(r["max_weight_diff"] == 0.0 for r in rank0 + rank1)
    # ... while the ranks meta-train on different tasks
    assert all(a["task_W0"] != b["task_W0"] for a, b in zip(rank0, rank1, strict=True))

    # a checkpoint written under DDP resumes in a single process
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed = _model()
    single = L.Trainer(accelerator="cpu", devices=1, max_steps=6, limit_val_batches=0, logger=False,
                       enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    single.fit(resumed, ckpt_path=last)
    assert single.global_step == 6
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert not torch.equal(saved["rule.out.weight"], resumed.rule.out.weight.detach())  # it trained on


class _Regression(L.LightningModule):
    """A user's model: linear regression on fixed data, Adam in configure_optimizers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


class _RecordParams(Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.diffs, self.optimizers = out, [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        gathered = trainer.strategy.all_gather(_flat(pl_module))
        self.diffs.append(float((gathered - gathered[0]).abs().max()))
        self.optimizers.add(type(trainer.optimizers[0]).__name__)

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out / f"params{trainer.global_rank}.json").write_text(
            json.dumps({"diffs": self.diffs, "optimizers": sorted(self.optimizers),
                        "exit_cleanup": _distributed._registered}))


def test_learned_optimizer_under_ddp_keeps_ranks_identical(tmp_path, fresh_master_port):
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=6, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[LearnedOptimizerCallback(weights="quadratic"), _RecordParams(tmp_path)],
    )
    trainer.fit(_Regression())
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"params{rank}.json").read_text())
        assert seen["optimizers"] == ["LearnedOptimizer"]
        assert len(seen["diffs"]) == 6 and max(seen["diffs"]) == 0.0
        assert seen["exit_cleanup"]  # the gloo group is destroyed at exit, before interpreter shutdown


def test_process_group_is_destroyed_at_exit_once(monkeypatch):
    """Lightning destroys the default process group at exit only for NCCL; a live gloo group can abort the rank
    with SIGABRT during interpreter shutdown. The handler is registered once, only with a group, and destroys it."""
    import types

    import torch.distributed as dist
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    registered = []  # the module's atexit only: torch or Lightning may register their own handlers
    monkeypatch.setattr(_distributed, "atexit", types.SimpleNamespace(register=registered.append))
    monkeypatch.setattr(_distributed, "_registered", False)
    assert not _distributed.destroy_process_group_at_exit() and registered == []  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_network_port()}", rank=0, world_size=1)
    try:
        assert _distributed.destroy_process_group_at_exit() and _distributed.destroy_process_group_at_exit()
        assert len(registered) == 1
        registered[0]()  # what the interpreter runs at exit
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_bf16_mixed_meta_training_on_cpu(tmp_path):
    """bf16-mixed runs the rule's matmuls in bfloat16 (different numbers than fp32) and stays finite."""
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        model = _model()
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=4, limit_val_batches=0,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False)
        trainer.fit(model)
        assert model.nonfinite_count == 0
        assert all(p.dtype == torch.float32 for p in model.rule.parameters())  # master weights stay fp32
        results[precision] = _flat(model.rule)
    assert torch.isfinite(results["bf16-mixed"]).all()
    assert not torch.equal(results["32-true"], results["bf16-mixed"])


def test_bf16_autocast_keeps_preprocessing_in_float32():
    rule = CoordinatewiseLSTM(hidden_size=8)
    grad = torch.tensor([1e-6, -3e-5, 2.0, 0.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from lightning_l2l.nets.preprocess import log_sign

        features = log_sign(grad)
        update, state = rule(grad, rule.init_state(4))
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, log_sign(grad))  # exactly the float32 values
    assert update.dtype == torch.float32 and torch.isfinite(update).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_meta_training_on_gpu(precision):
    torch.manual_seed(0)
    model = _model()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=4, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(model)
    assert model.nonfinite_count == 0 and torch.isfinite(_flat(model.rule)).all()



def test_precision_throughput_benchmark_shrunk_on_cpu(tmp_path, monkeypatch):
    """``benchmarks/precision_throughput.py`` on the shipped conv config, shrunk: fp32 and bf16-mixed rows."""
    bench = load_benchmark("precision_throughput")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "throughput.json"
    shrink = ["--model.horizon=4", "--model.unroll=2", "--model.num_val_tasks=1", "--model.num_test_tasks=1"]
    shrink += config_data_args(ROOT / "configs" / "conv.yaml", tmp_path, monkeypatch)  # the sample if need be
    threads = torch.get_num_threads()
    try:  # the config sets torch_num_threads: 1 for the process
        rows = bench.main(["--accelerator", "cpu", "--steps", "2", "--warmup", "1", "--json", str(out), "--", *shrink])
    finally:
        torch.set_num_threads(threads)
    assert [r["precision"] for r in rows] == ["32-true", "bf16-mixed"]
    for r in rows:
        assert r["device"] == "cpu" and r["timed_meta_steps"] == 2 and r["unroll"] == 2
        assert r["rule_weights_finite"] and r["meta_steps_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["coordinate_steps_per_s"] == pytest.approx(r["coordinates"] * 2 * r["meta_steps_per_s"])
    assert rows[0]["coordinates"] == rows[1]["coordinates"] > 1000  # the conv net's parameters
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    with pytest.raises(SystemExit, match="16-mixed needs a GPU"):
        bench.main(["--accelerator", "cpu", "--precisions", "16-mixed"])


def test_grad_scaler_unscales_before_clipping_and_skips_overflows(tmp_path):
    """16-mixed's GradScaler (here a float16 one on CPU, as on a GPU): the clip sees unscaled meta-gradients,
    and an overflowing step is the scaler's to skip (it lowers its scale), not a reason to drop the task."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    norms: list[float] = []

    class Recording(MetaLearner):
        def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            grads = [p.grad.float().norm() for p in self.rule.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
            return super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    torch.manual_seed(0)
    model = Recording(
        rule=CoordinatewiseLSTM(hidden_size=8), task_family=QuadraticFamily(dim=4, num_functions=8),
        horizon=10, unroll=5, truncations_per_epoch=4, num_val_tasks=1, num_test_tasks=1, meta_lr_schedule="constant",
    )
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[plugin], max_steps=6, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model)
    assert model.nonfinite_count == 0 and trainer.global_step == 6
    finite = [n for n in norms if math.isfinite(n)]
    assert len(norms) == 6 and len(finite) >= 4
    assert max(finite) < 1e3, norms  # scaled by 2^16 - 2^15 they would be tens of thousands
    assert torch.isfinite(_flat(model.rule)).all()


def test_gpu_check_script_names_tests_and_benchmarks_that_exist():
    """benchmarks/gpu_check.sh (the prepared GPU run) is valid bash, and every test and script it runs exists."""
    import re
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = (root / "benchmarks/gpu_check.sh").read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(root / "benchmarks/gpu_check.sh")], check=True)
    node_ids = re.findall(r"(tests/\w+\.py)::(\w+)", script)
    assert len(node_ids) >= 2
    for path, name in node_ids:
        assert re.search(rf"^def {name}\(", (root / path).read_text(), re.M), f"{path}::{name} is gone"
        assert "cuda" in name or "gpu" in name or "devices" in name
    for bench in re.findall(r"benchmarks/(\w+\.py)", script):
        assert (root / "benchmarks" / bench).is_file(), bench
