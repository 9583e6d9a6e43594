"""A user's LightningModule trained with the learned optimizer: from YAML and through the callback."""

from __future__ import annotations

import types
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_l2l import LearnedOptimizer, LearnedOptimizerCallback, pretrained
from lightning_l2l.nets import CoordinatewiseLSTM, save_rule

SHIPPED = "quadratic" in pretrained.available()


class UserModel(L.LightningModule):
    """What a user already has: a model, a loss, data, and an optimizer of their choice."""

    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


@pytest.fixture
def weights(tmp_path: Path) -> str:
    """The shipped weights once they are in the package; until then a small random LSTM on disk."""
    if SHIPPED:
        return "quadratic"
    return str(save_rule(CoordinatewiseLSTM(hidden_size=6), tmp_path / "weights" / "tiny"))


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, deterministic=True)
    args.update(kwargs)
    return L.Trainer(**args)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------- LightningCLI
def _cli(args: list[str]) -> LightningCLI:
    return LightningCLI(UserModel, auto_configure_optimizers=True, save_config_callback=None, args=args)


def _cli_trainer_args(tmp_path: Path) -> list[str]:
    return ["--trainer.max_steps", "8", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]


def test_lightning_cli_optimizer_flag(tmp_path, weights):
    """`--optimizer lightning_l2l.LearnedOptimizer --optimizer.weights ...`: no code change in the project."""
    before = _params(UserModel())
    with pytest.warns(UserWarning, match="configure_optimizers` will be overridden"):
        cli = _cli(["fit", "--optimizer", "lightning_l2l.LearnedOptimizer", "--optimizer.weights", weights,
                    "--optimizer.chunk_size", "1000", *_cli_trainer_args(tmp_path)])
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, LearnedOptimizer) and opt.chunk_size == 1000
    assert cli.trainer.global_step == 8
    assert len(opt.state) == 4 and all(torch.isfinite(p).all() for p in cli.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(cli.model), strict=True))


def test_lightning_cli_yaml(tmp_path, weights):
    config = {"optimizer": {"class_path": "lightning_l2l.LearnedOptimizer",
                            "init_args": {"weights": weights, "lr": 0.5}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="overridden"):
        cli = _cli(["fit", "--config", str(path), *_cli_trainer_args(tmp_path)])
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, LearnedOptimizer) and opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["kind"] is None  # params come without their layers: kinds by shape


def test_lightning_cli_callback_from_command_line(tmp_path, weights):
    cli = _cli(["fit", "--trainer.callbacks+=lightning_l2l.LearnedOptimizerCallback",
                f"--trainer.callbacks.weights={weights}", *_cli_trainer_args(tmp_path)])
    assert isinstance(cli.trainer.optimizers[0], LearnedOptimizer)
    assert [g["kind"] for g in cli.trainer.optimizers[0].param_groups] == ["fc"]


@pytest.mark.skipif(not SHIPPED, reason="needs the shipped quadratic weights")
def test_lightning_cli_trains_with_shipped_weights(tmp_path):
    cli = _cli(["fit", "--optimizer", "lightning_l2l.LearnedOptimizer", "--optimizer.weights", "quadratic",
                *_cli_trainer_args(tmp_path), "--trainer.max_steps", "40"])
    x, y = next(iter(cli.model.train_dataloader()))
    fresh = UserModel()
    assert F.mse_loss(cli.model.net(x), y) < 0.5 * F.mse_loss(fresh.net(x), y)


# ----------------------------------------------------------------------------------- callback
def test_callback_replaces_optimizer_and_logs_stats(tmp_path, weights):
    L.seed_everything(0)
    model = UserModel()
    cb = LearnedOptimizerCallback(weights=weights)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1, callbacks=[cb])
    trainer.fit(model)
    assert trainer.optimizers == [cb.optimizer] and isinstance(cb.optimizer, LearnedOptimizer)
    assert [g["kind"] for g in cb.optimizer.param_groups] == ["fc"]
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"l2l/update_norm", "l2l/nonfinite_fraction", "l2l/nonfinite_total"} <= set(header)
    norms = [row.split(",")[header.index("l2l/update_norm")] for row in metrics[1:]]
    assert sum(1 for v in norms if v and float(v) > 0) == 6
    assert cb.nonfinite_total == 0



def test_callback_compile_reaches_the_optimizer(tmp_path, weights, monkeypatch):
    """compile=True is handed to the LearnedOptimizer and its steps go through the compiled network (here
    a pass-through stand-in for torch.compile: the compiled network's numbers are tested in test_optim)."""
    compiled_modules = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled_modules.append(module) or module)
    runs = {}
    for compile in (False, True):
        L.seed_everything(0)
        model = UserModel()
        cb = LearnedOptimizerCallback(weights=weights, compile=compile, fused=False)  # compile=True runs forward
        _trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model)
        assert cb.optimizer.compile is compile and bool(cb.optimizer._compiled) is compile
        runs[compile] = _params(model)
    assert compiled_modules == [cb.optimizer.rule]
    for a, b in zip(runs[False], runs[True], strict=True):
        assert torch.equal(a, b)

def test_callback_with_gradient_accumulation_logs_per_step(tmp_path, weights):
    model = UserModel()
    cb = LearnedOptimizerCallback(weights=weights)
    trainer = _trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[cb])
    trainer.fit(model)
    assert trainer.global_step == 3 and cb._logged_step == 3


def _resume_run(tmp_path: Path, weights: str, steps: int, ckpt_path: str | None = None, save: bool = False):
    L.seed_everything(0)
    model = UserModel()
    callbacks: list = [LearnedOptimizerCallback(weights=weights)]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="half", save_last=False,
                                         every_n_train_steps=steps))
    trainer = _trainer(tmp_path, max_steps=steps, callbacks=callbacks, enable_checkpointing=save)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def test_callback_resume_matches_uninterrupted_run(tmp_path, weights):
    """8 steps, checkpoint, resume to 16 == 16 steps straight (hidden states come back from the checkpoint).

    The checkpoint is at an epoch boundary (4 batches per epoch): Lightning cannot resume a plain
    DataLoader mid-epoch (it restarts the epoch, and says so), whatever the optimizer.
    """
    straight, _ = _resume_run(tmp_path / "a", weights, 16)
    _resume_run(tmp_path / "b", weights, 8, save=True)
    ckpt = tmp_path / "b" / "ckpt" / "half.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert "hidden" in saved["optimizer_states"][0]["state"][0]
    assert any("LearnedOptimizerCallback" in k for k in saved["callbacks"])
    resumed, trainer = _resume_run(tmp_path / "c", weights, 16, ckpt_path=str(ckpt))
    assert trainer.global_step == 16
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # the same resume with the hidden states wiped differs: the resume really restored them
    saved["optimizer_states"][0]["state"] = {}
    torch.save(saved, tmp_path / "wiped.ckpt")
    wiped, _ = _resume_run(tmp_path / "d", weights, 16, ckpt_path=str(tmp_path / "wiped.ckpt"))
    assert not all(torch.equal(p, q) for p, q in zip(straight.parameters(), wiped.parameters(), strict=True))


@pytest.mark.skipif(not SHIPPED, reason="needs the shipped quadratic weights")
@pytest.mark.parametrize(("weights", "steps"), [("quadratic", 40), (None, 200)])
def test_callback_trains_with_shipped_weights(tmp_path, weights, steps):
    """The paper's LSTM (``quadratic``) and the default (``general``: Adam-sized steps, so more of them)."""
    L.seed_everything(0)
    model = UserModel()
    x, y = next(iter(model.train_dataloader()))
    before = float(F.mse_loss(model.net(x), y))
    callback = LearnedOptimizerCallback() if weights is None else LearnedOptimizerCallback(weights=weights)
    _trainer(tmp_path, max_steps=steps, callbacks=[callback]).fit(model)
    assert float(F.mse_loss(model.net(x), y)) < 0.5 * before


class NoOptimizerModel(UserModel):
    def configure_optimizers(self):
        return None



class WithScheduler(UserModel):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]


class Manual(UserModel):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class PartOfTheModel(UserModel):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[2].parameters(), lr=0.1)


def test_callback_without_an_optimizer_trains_every_parameter(tmp_path, weights):
    model = NoOptimizerModel()
    cb = LearnedOptimizerCallback(weights=weights)
    _trainer(tmp_path, max_steps=2, callbacks=[cb]).fit(model)
    assert len(cb.optimizer.state) == 4


def test_callback_keeps_the_optimizers_parameters(tmp_path, weights):
    model = PartOfTheModel()
    frozen = _params(model.net[0])
    cb = LearnedOptimizerCallback(weights=weights)
    _trainer(tmp_path, max_steps=2, callbacks=[cb]).fit(model)
    assert sum(len(g["params"]) for g in cb.optimizer.param_groups) == 2
    for a, b in zip(frozen, _params(model.net[0]), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "model_cls, message",
    [(WithScheduler, "learning-rate scheduler"), (Manual, "manual optimization")],
)
def test_callback_refuses_what_it_cannot_do(tmp_path, weights, model_cls, message):
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[LearnedOptimizerCallback(weights=weights)])
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(model_cls())


def test_callback_refuses_several_optimizers(weights):
    """Lightning itself refuses several optimizers under automatic optimization; the callback checks too."""
    model = UserModel()
    two = [torch.optim.SGD(model.net[0].parameters(), lr=0.1), torch.optim.SGD(model.net[2].parameters(), lr=0.1)]
    fake_trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(optimizers=two, lr_scheduler_configs=[]))
    with pytest.raises(MisconfigurationException, match="returns 2 optimizers; LearnedOptimizerCallback replaces"):
        LearnedOptimizerCallback(weights=weights).on_fit_start(fake_trainer, model)


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, DeepSpeedStrategy])
def test_callback_refuses_sharded_strategies(strategy_cls, weights):
    cb = LearnedOptimizerCallback(weights=weights)
    fake_trainer = types.SimpleNamespace(strategy=strategy_cls.__new__(strategy_cls))
    with pytest.raises(MisconfigurationException, match=f"does not support the {strategy_cls.__name__}"):
        cb.setup(fake_trainer, UserModel(), "fit")
    cb.setup(fake_trainer, UserModel(), "validate")  # only fit swaps optimizers


def test_callback_state_dict_round_trip(weights):
    cb = LearnedOptimizerCallback(weights=weights, lr=0.5)
    cb.nonfinite_total = 7
    other = LearnedOptimizerCallback(weights=weights)
    other.load_state_dict(cb.state_dict())
    assert other.nonfinite_total == 7
    mismatched = LearnedOptimizerCallback(weights=CoordinatewiseLSTM(hidden_size=2))
    with pytest.warns(UserWarning, match="written with weights="):
        mismatched.load_state_dict(cb.state_dict())


def test_callback_bad_arguments():
    with pytest.raises(ValueError, match="unknown weights 'mnst'; available: "):
        LearnedOptimizerCallback(weights="mnst")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        LearnedOptimizerCallback(lr=-1)
    with pytest.raises(ValueError, match="Invalid chunk_size"):
        LearnedOptimizerCallback(chunk_size=0)
    with pytest.raises(ValueError, match="Invalid compile: 'yes'"):
        LearnedOptimizerCallback(compile="yes")
    with pytest.raises(ValueError, match="Invalid zero_grads: 'none'"):
        LearnedOptimizerCallback(zero_grads="none")


class FrozenBias(UserModel):
    """A model whose last bias gets an exactly-zero gradient at every step (as a pruned or unused one would)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + 0.0 * self.net[2].bias.sum()

    def on_after_backward(self):
        self.net[2].bias.grad.zero_()


@pytest.mark.parametrize("zero_grads", ["skip", "update"])
def test_callback_zero_grads_reaches_the_optimizer(tmp_path, weights, zero_grads):
    model = FrozenBias()
    before = model.net[2].bias.detach().clone()
    cb = LearnedOptimizerCallback(weights=weights, zero_grads=zero_grads)
    _trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model)
    assert cb.optimizer.zero_grads == zero_grads
    assert torch.equal(model.net[2].bias.detach(), before) is (zero_grads == "skip")


@pytest.mark.parametrize("precision, param_dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_callback_under_lightning_precision(tmp_path, weights, precision, param_dtype):
    model = UserModel()
    cb = LearnedOptimizerCallback(weights=weights)
    _trainer(tmp_path, max_steps=3, precision=precision, callbacks=[cb]).fit(model)
    params = list(model.parameters())
    assert params[0].dtype == param_dtype
    assert all(cb.optimizer.state[p]["hidden"].dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p).all() for p in params)
