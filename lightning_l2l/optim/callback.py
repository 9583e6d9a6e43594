"""``LearnedOptimizerCallback``: train any LightningModule with a frozen learned optimizer."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.model_parallel import ModelParallelStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_l2l._distributed import destroy_process_group_at_exit
from lightning_l2l.nets import ZERO_GRADS, UpdateRule
from lightning_l2l.optim.learned import LearnedOptimizer
from lightning_l2l.pretrained import Weights, resolve

__all__ = ["LearnedOptimizerCallback"]

_SHARDED = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, XLAStrategy)


class LearnedOptimizerCallback(Callback):
    """Replaces a model's optimizer with a :class:`LearnedOptimizer` when ``fit`` starts.

    Add it to any ``Trainer``; the model's code does not change. At ``on_fit_start`` (after the
    model's ``configure_optimizers`` ran, before a checkpoint's optimizer state is restored, as
    Lightning's learning-rate finder swaps optimizers) the parameters the model's optimizer held
    are handed to ``LearnedOptimizer.from_module`` (one param group per layer type), so a resumed
    run restores the learned optimizer's hidden states from the checkpoint.

    Every optimizer step logs ``l2l/update_norm`` (L2 norm of all updates), ``l2l/nonfinite_fraction``
    (fraction of gradient entries that were NaN or infinite; those coordinates were not updated)
    and ``l2l/nonfinite_total`` (non-finite entries since the run began, kept across resumes).

    It refuses, in ``setup``/``on_fit_start`` and with a message saying what to do: several
    optimizers, learning-rate schedulers bound to the replaced optimizer, manual optimization, and
    sharded strategies (DeepSpeed, FSDP, ModelParallel, XLA), whose parameters are not the model's.
    Single-device and DDP strategies are supported.

    Args:
        weights: as for :class:`LearnedOptimizer`: a shipped name, a ``.safetensors`` path or a
            ``MetaLearner`` ``.ckpt`` (default ``"general"``).
        lr: multiplier of the learned update (default ``1.0``).
        chunk_size: coordinates per network call (default ``None``: 16384 on CPU, 524288 on GPUs).
        zero_grads: ``"skip"`` (default) leaves a coordinate whose gradient is exactly zero untouched,
            ``"update"`` lets the rule move it (see :class:`LearnedOptimizer`).
        compile: run the network through ``torch.compile`` (default ``False``; see :class:`LearnedOptimizer`).
        fused: the fused CPU step of the LSTM and of ``general``'s MomentMLP (default ``None``: where it runs;
            see :class:`LearnedOptimizer`).
        log_stats: log the per-step statistics (default ``True``).
    """

    def __init__(
        self,
        weights: Weights = "general",
        *,
        lr: float = 1.0,
        chunk_size: int | None = None,
        zero_grads: str = "skip",
        compile: bool = False,
        fused: bool | None = None,
        log_stats: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (a multiplier of the learned update, expected >= 0)")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size} (expected >= 1)")
        if zero_grads not in ZERO_GRADS:
            raise ValueError(f"Invalid zero_grads: {zero_grads!r} (expected one of {ZERO_GRADS})")
        if not isinstance(compile, bool):
            raise ValueError(f"Invalid compile: {compile!r} (expected True or False)")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
        resolve(weights)  # an unknown name or a bad file fails here, before any training starts
        self.weights = weights
        self.lr = lr
        self.chunk_size = chunk_size
        self.zero_grads = zero_grads
        self.compile = compile
        self.fused = fused
        self.log_stats = log_stats
        self.optimizer: LearnedOptimizer | None = None
        self.nonfinite_total = 0
        self._logged_step = -1

    @property
    def _weights_id(self) -> str:
        if isinstance(self.weights, UpdateRule):
            return f"<{type(self.weights).__name__} instance>"
        return os.fspath(self.weights)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        destroy_process_group_at_exit()  # gloo ranks would otherwise abort at exit (lightning_l2l._distributed)
        if stage != "fit":
            return
        strategy = trainer.strategy
        if isinstance(strategy, _SHARDED) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise MisconfigurationException(
                f"LearnedOptimizerCallback does not support the {type(strategy).__name__} strategy: it keeps one "
                "hidden state per coordinate of the model's own parameters, which sharded or wrapped strategies "
                "replace. Use a single device or strategy='ddp'."
            )
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(pl_module).__name__} uses manual optimization, so there is no optimizer step for "
                "LearnedOptimizerCallback to take over. Remove the callback and create "
                "lightning_l2l.LearnedOptimizer.from_module(self, weights=...) in configure_optimizers instead."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [o for o in trainer.strategy.optimizers if not isinstance(o, _MockOptimizer)]
        if len(optimizers) > 1:
            raise MisconfigurationException(
                f"{type(pl_module).__name__}.configure_optimizers returns {len(optimizers)} optimizers; "
                "LearnedOptimizerCallback replaces exactly one. Return a single optimizer (its parameters are "
                "what the learned optimizer will train), or build LearnedOptimizer yourself for each."
            )
        if trainer.strategy.lr_scheduler_configs:
            raise MisconfigurationException(
                "LearnedOptimizerCallback replaces the optimizer, but configure_optimizers also returns a "
                "learning-rate scheduler bound to the old one. Return only the optimizer, or build "
                "LearnedOptimizer in configure_optimizers and schedule its `lr` (the update multiplier)."
            )
        if optimizers:
            params = [p for group in optimizers[0].param_groups for p in group["params"]]
        else:  # configure_optimizers returned None: train every parameter
            params = [p for p in pl_module.parameters() if p.requires_grad]
        self.optimizer = LearnedOptimizer.from_module(
            pl_module, self.weights, params=params, lr=self.lr,
            chunk_size=self.chunk_size,
            zero_grads=self.zero_grads,
            compile=self.compile,
            fused=self.fused,
        )
        trainer.strategy.optimizers = [self.optimizer]
        self._logged_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.optimizer is None or trainer.global_step == self._logged_step:
            return  # no optimizer step on this batch (gradient accumulation, or skipped by AMP)
        self._logged_step = trainer.global_step
        stats = self.optimizer.last_stats
        if not stats:
            return
        self.nonfinite_total += int(stats["nonfinite"])
        if self.log_stats:
            pl_module.log("l2l/update_norm", stats["update_norm"], on_step=True, on_epoch=False)
            pl_module.log("l2l/nonfinite_fraction", stats["nonfinite_fraction"], on_step=True, on_epoch=False)
            pl_module.log("l2l/nonfinite_total", float(self.nonfinite_total), on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"weights": self._weights_id, "lr": self.lr, "nonfinite_total": self.nonfinite_total}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("weights")
        if saved is not None and saved != self._weights_id:
            rank_zero_warn(
                f"resuming with LearnedOptimizerCallback(weights={self._weights_id!r}) from a checkpoint written "
                f"with weights={saved!r}: the restored hidden states belong to the other weights"
            )
        self.nonfinite_total = int(state_dict.get("nonfinite_total", 0))
