"""Any ``nn.Module`` as an optimizee, through ``torch.func.functional_call``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_l2l.nets.kinds import param_kinds
from lightning_l2l.tasks.base import Task, TaskFamily

__all__ = ["ModuleTask", "ModuleTaskFamily"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class ModuleTask(Task):
    """Train ``module`` on ``(inputs, targets)`` with minibatches of ``batch_size``.

    The module is never modified: its parameters are copied as ``theta_0``, and the loss runs the
    module functionally on the parameters being optimised. The minibatch of step ``t`` is a pure
    function of ``(seed, t)``, so a trajectory can be replayed exactly (the parity of
    meta-training and :class:`~lightning_l2l.LearnedOptimizer` relies on it).

    Args:
        module: the optimizee network (its current parameters are ``theta_0``).
        inputs: ``(N, ...)`` inputs.
        targets: ``(N, ...)`` targets.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch_size: minibatch size; ``None`` or ``>= N`` uses the full data every step.
        seed: seed of the minibatch sequence.
        kinds: kind per parameter name; default: from the owning layer (``conv``, ``fc``, ...).
        eval_data: ``(inputs, targets)`` the task is evaluated on (e.g. held-out examples): :meth:`eval_loss`
            is the loss on them; ``None`` (default): curves report each step's minibatch loss.
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn = nn.functional.cross_entropy,
        batch_size: int | None = 128,
        seed: int = 0,
        kinds: dict[str, str] | None = None,
        eval_data: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs have {inputs.shape[0]} rows but targets {targets.shape[0]}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected >= 1 or None for full batch)")
        self.module, self.inputs, self.targets, self.loss_fn = module, inputs, targets, loss_fn
        self.batch_size, self.seed = batch_size, seed
        self.eval_inputs, self.eval_targets = eval_data if eval_data is not None else (None, None)
        self._kinds = kinds if kinds is not None else param_kinds(module)
        self._theta0 = {n: p.detach().clone() for n, p in module.named_parameters()}
        # a copy: train-mode layers (batch norm) update running statistics in place, and the
        # user's module must stay as it was
        self._buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

    def init_params(self) -> dict[str, Tensor]:
        return {n: p.clone() for n, p in self._theta0.items()}

    def kinds(self) -> dict[str, str]:
        return dict(self._kinds)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The minibatch of optimizee step ``step``."""
        n = self.inputs.shape[0]
        if self.batch_size is None or self.batch_size >= n:
            return self.inputs, self.targets
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(n, (self.batch_size,), generator=g).to(self.inputs.device)
        return self.inputs[idx], self.targets[idx]

    def forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.module, {**self._buffers, **params}, (x,))

    def loss(self, params: dict[str, Tensor], step: int = 0) -> Tensor:
        x, y = self.batch(step)
        return self.loss_fn(self.forward(params, x), y)

    def eval_loss(self, params: dict[str, Tensor]) -> Tensor | None:
        """The loss on ``eval_data`` (``None`` without it); differentiable when called with a graph."""
        if self.eval_inputs is None:
            return None
        return self.loss_fn(self.forward(params, self.eval_inputs), self.eval_targets)

    def to(self, device: torch.device | str) -> ModuleTask:
        self.module = self.module.to(device)
        self.inputs, self.targets = self.inputs.to(device), self.targets.to(device)
        self._theta0 = {n: p.to(device) for n, p in self._theta0.items()}
        self._buffers = {n: b.to(device) for n, b in self._buffers.items()}
        if self.eval_inputs is not None:
            self.eval_inputs, self.eval_targets = self.eval_inputs.to(device), self.eval_targets.to(device)
        return self


class ModuleTaskFamily(TaskFamily):
    """Tasks that train a freshly initialised module on a fixed dataset.

    Args:
        module_factory: builds a new module; its random initialisation uses the global RNG, which
            :meth:`sample` seeds from the generator, so a task is a pure function of the generator.
        inputs: ``(N, ...)`` inputs shared by every task.
        targets: ``(N, ...)`` targets.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch_size: minibatch size (``None``: full batch).
    """

    def __init__(
        self,
        module_factory: Callable[[], nn.Module],
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn = nn.functional.cross_entropy,
        batch_size: int | None = 128,
    ) -> None:
        self.module_factory, self.inputs, self.targets = module_factory, inputs, targets
        self.loss_fn, self.batch_size = loss_fn, batch_size

    def sample(self, generator: torch.Generator) -> ModuleTask:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.module_factory()
        return ModuleTask(module, self.inputs, self.targets, self.loss_fn, self.batch_size, seed=seed)
