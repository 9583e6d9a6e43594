"""Random quadratics, the first experiment of Andrychowicz et al. (2016), section 3.1."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_l2l.tasks.base import Task, TaskFamily

__all__ = ["QuadraticTask", "QuadraticFamily"]

DISTRIBUTIONS = ("normal", "uniform")


class QuadraticTask(Task):
    """``f(theta) = sum_i ||W_i theta_i - y_i||^2`` over ``num_problems`` independent quadratics.

    Args:
        W: ``(num_functions, dim, dim)``.
        y: ``(num_functions, dim)``.
        theta0: ``(num_functions, dim)`` initial parameters.
    """

    def __init__(self, W: Tensor, y: Tensor, theta0: Tensor) -> None:
        self.W, self.y, self.theta0 = W, y, theta0
        self.num_problems = W.shape[0]

    def init_params(self) -> dict[str, Tensor]:
        return {"theta": self.theta0.clone()}

    def loss(self, params: dict[str, Tensor], step: int = 0) -> Tensor:
        theta = params["theta"]  # (functions, dim)
        residual = torch.bmm(self.W, theta.unsqueeze(-1)).squeeze(-1) - self.y  # (functions, dim)
        return residual.pow(2).sum()

    def to(self, device: torch.device | str) -> QuadraticTask:
        self.W, self.y, self.theta0 = self.W.to(device), self.y.to(device), self.theta0.to(device)
        return self


class QuadraticFamily(TaskFamily):
    """Quadratics ``f(theta) = ||W theta - y||^2`` with IID random ``W`` and ``y`` (section 3.1).

    Args:
        dim: dimension of ``theta`` (paper: 10).
        num_functions: independent quadratics per task, optimised together as one
            ``(num_functions, dim)`` parameter whose loss is their sum.
        distribution: ``"normal"`` draws ``W`` and ``y`` IID from N(0, 1) as the paper states;
            ``"uniform"`` draws them from U[0, 1), as the authors' public TensorFlow code does.
        init_std: standard deviation of the Gaussian ``theta_0`` (the public code: 0.01).
        dtype: dtype of the tensors.
    """

    def __init__(
        self,
        dim: int = 10,
        num_functions: int = 128,
        distribution: str = "normal",
        init_std: float = 0.01,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dim < 1:
            raise ValueError(f"Invalid dim: {dim} (expected >= 1; the paper uses 10)")
        if num_functions < 1:
            raise ValueError(f"Invalid num_functions: {num_functions} (expected >= 1)")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"Invalid distribution: {distribution!r} (expected one of {DISTRIBUTIONS})")
        if init_std < 0:
            raise ValueError(f"Invalid init_std: {init_std} (expected >= 0)")
        self.dim, self.num_functions = dim, num_functions
        self.distribution, self.init_std, self.dtype = distribution, init_std, dtype

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        if self.distribution == "normal":
            return torch.randn(shape, generator=generator, dtype=self.dtype)
        return torch.rand(shape, generator=generator, dtype=self.dtype)

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        n, d = self.num_functions, self.dim
        W = self._draw((n, d, d), generator)
        y = self._draw((n, d), generator)
        theta0 = torch.randn((n, d), generator=generator, dtype=self.dtype) * self.init_std
        return QuadraticTask(W, y, theta0)
