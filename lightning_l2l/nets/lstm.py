"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016), section 2.1."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_l2l.nets._fused import (
    fused_lstm_forward,
    fused_lstm_step,
    fused_lstm_supports,
    fused_lstm_trains,
)
from lightning_l2l.nets.base import DEFAULT_KIND, UpdateRule
from lightning_l2l.nets.preprocess import PREPROCESSINGS, num_features, preprocess

__all__ = ["CoordinatewiseLSTM", "LSTMLayer"]


class LSTMLayer(nn.Module):
    """One LSTM layer with forget gate (Hochreiter & Schmidhuber 1997; Gers et al. 2000).

    Same equations as :class:`torch.nn.LSTMCell`, laid out for many tiny rows: the three sigmoid
    gates come from one matmul and the cell input from another, and the input and the hidden state
    are never concatenated (docs/implementation.md). The forget gate's bias starts at 1 so that the
    cell remembers by default.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        fan = input_size + hidden_size
        self.weight_ifo = nn.Parameter(torch.empty(3 * hidden_size, fan))  # input, forget, output gates
        self.bias_ifo = nn.Parameter(torch.empty(3 * hidden_size))
        self.weight_g = nn.Parameter(torch.empty(hidden_size, fan))  # cell input
        self.bias_g = nn.Parameter(torch.empty(hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            self.bias_ifo[hidden_size : 2 * hidden_size] += 1.0

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        # [x, h] @ W.T as x @ W_x.T + h @ W_h.T: no (n, input + hidden) concatenation. The matmul
        # outputs are fresh tensors, so the activations run in place (addmm's backward does not read
        # its output).
        n_in = x.shape[1]
        # nested, not in-place addmm_: under autocast the first product is already in the low dtype
        gates = torch.addmm(torch.addmm(self.bias_ifo, x, self.weight_ifo[:, :n_in].t()), h,
                            self.weight_ifo[:, n_in:].t())
        i, f, o = gates.sigmoid_().chunk(3, dim=1)  # each (n, hidden)
        g = torch.addmm(torch.addmm(self.bias_g, x, self.weight_g[:, :n_in].t()), h, self.weight_g[:, n_in:].t())
        c = torch.addcmul(f * c, i, _tanh(g))
        return o * _tanh(c), c


def _tanh(x: Tensor) -> Tensor:
    """``tanh(x)``; on CPU in float32/64 as ``2 sigmoid(2x) - 1`` (equal to within 2e-7; faster there,
    docs/implementation.md). Other devices and 16-bit tensors keep ``torch.tanh``: near 0 the form
    loses the few bits 16-bit floats have (bfloat16 rounds it to 0 for ``|x| < 4e-3``).
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return torch.tanh(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.sigmoid(2 * x) * 2 - 1
    return torch.sigmoid(2 * x).mul_(2).sub_(1)


class CoordinatewiseLSTM(UpdateRule):
    """A small LSTM with shared weights applied to every coordinate separately (section 2.1).

    For each coordinate ``i`` with gradient ``g_i`` and state ``h_i``:

    .. math::  [u_i, h_i'] = \\mathrm{LSTM}(\\mathrm{pre}(g_i), h_i; \\phi), \\qquad
               \\theta_i \\leftarrow \\theta_i + s \\cdot W_{out} u_i

    All coordinates go through one batched call: the coordinate index is the batch dimension. On CPU
    in float32 the frozen step (:meth:`step_`) and the differentiable one (``forward`` with gradients
    on, no autocast) run fused C kernels (:mod:`lightning_l2l.nets._fused`; the same numbers to float32
    rounding); ``L2L_FUSED=0`` in the environment turns them off.

    Args:
        hidden_size: units per LSTM layer (paper: 20).
        num_layers: stacked LSTM layers (paper: 2).
        preprocessing: ``"log_sign"`` (Appendix A) or ``"none"`` (the raw gradient).
        p: the constant of the log-sign preprocessing (paper: 10).
        output_scale: constant multiplying the network's output (paper: 0.1 for MNIST).
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocessing: str = "log_sign",
        p: float = 10.0,
        output_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"Invalid hidden_size: {hidden_size} (expected >= 1; the paper uses 20)")
        if num_layers < 1:
            raise ValueError(f"Invalid num_layers: {num_layers} (expected >= 1; the paper uses 2)")
        if preprocessing not in PREPROCESSINGS:
            raise ValueError(f"Invalid preprocessing: {preprocessing!r} (expected one of {PREPROCESSINGS})")
        if not p > 0:  # also refuses NaN
            raise ValueError(f"Invalid p: {p} (expected > 0; the paper uses 10)")
        self._record_init_args(locals())
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocessing = preprocessing
        self.p = float(p)
        self.output_scale = float(output_scale)
        in_features = num_features(preprocessing)
        self.cells = nn.ModuleList(
            LSTMLayer(in_features if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.out = nn.Linear(hidden_size, 1)
        # Start close to "do nothing": a small output layer keeps the first meta-iterations from
        # throwing the optimizee far away, which is where most NaN trajectories come from.
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def init_state(
        self,
        num_coords: int,
        kind: str = DEFAULT_KIND,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        dtype = dtype or self.state_dtype()
        return torch.zeros(num_coords, self.num_layers, 2, self.hidden_size, device=device, dtype=dtype)

    def forward(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> tuple[Tensor, Tensor]:
        if grad.dim() != 1:
            raise ValueError(f"expected a flat (n,) gradient, got shape {tuple(grad.shape)}")
        if state.shape[0] != grad.shape[0]:
            raise ValueError(f"state holds {state.shape[0]} coordinates but the gradient has {grad.shape[0]}")
        if fused_lstm_trains(self, grad, state):  # CPU, float32, differentiable: one autograd node (nets/_fused.py)
            return fused_lstm_forward(self, grad, state)
        weight_dtype = self.out.weight.dtype
        x = preprocess(grad, self.preprocessing, self.p).to(weight_dtype)  # (n, features)
        state = state.to(weight_dtype)
        new_h = []
        for layer, cell in enumerate(self.cells):
            h, c = cell(x, state[:, layer, 0], state[:, layer, 1])  # each (n, hidden)
            new_h.append(torch.stack((h, c), dim=1))  # (n, 2, hidden)
            x = h
        update = self.out(x).squeeze(-1) * self.output_scale  # (n,)
        return update.to(grad.dtype), torch.stack(new_h, dim=1)  # (n,), (n, layers, 2, hidden)

    def step_(
        self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND, keep: Tensor | None = None, *, fused: bool = True
    ) -> Tensor:
        """The frozen step in place; on CPU in float32 one fused kernel (:mod:`lightning_l2l.nets._fused`)
        where it builds, else :meth:`forward` (the same updates to float32 rounding)."""
        if fused and grad.dim() == 1 and state.shape[0] == grad.shape[0] and fused_lstm_supports(self, grad, state):
            return fused_lstm_step(self, grad, state, keep)
        return super().step_(grad, state, kind, keep, fused=fused)
