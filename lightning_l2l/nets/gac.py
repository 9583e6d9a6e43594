"""Update rules that share information between coordinates: LSTM+GAC and NTM-BFGS.

Andrychowicz et al. (2016), arXiv 1606.04474, section "Information sharing between
coordinates": the coordinatewise LSTM cannot implement anything that needs the other coordinates
(second-order methods, gradient clipping by a global norm). Two variants relax it:

1. **LSTM+GAC**: a subset of the cells in each LSTM layer are *global averaging cells*; they work
   like the other cells, but their outgoing activations are replaced at every step by their average
   over all coordinates (the paper notes that this is enough to implement L2 gradient clipping).
2. **NTM-BFGS**: an LSTM+GAC controller with an external memory shared by all coordinates, by
   analogy with (L-)BFGS, whose coordinatewise processes communicate through an inverse-Hessian
   approximation: the memory is read by a matrix-vector product and written by low-rank outer
   products; the controller, read and write heads included, work coordinatewise.

Both write their step as :meth:`~lightning_l2l.nets.UpdateRule.steps`, a generator that yields each
quantity to average and is sent its mean, so that :func:`~lightning_l2l.nets.apply_rule` takes the
mean over every coordinate of the kind (or of each tensor, ``over="tensor"``) whatever the chunks.
Called directly, ``rule(grad, state, kind)`` averages over the coordinates it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_l2l.nets.base import DEFAULT_KIND, SHARE_OVER, RuleSteps, UpdateRule, run_steps
from lightning_l2l.nets.lstm import LSTMLayer
from lightning_l2l.nets.preprocess import PREPROCESSINGS, num_features, preprocess

__all__ = ["LSTMGAC", "NTMBFGS"]


def _mean_over_all(values: Tensor) -> Tensor:
    return values.mean(0, keepdim=True)  # (1, d)


class _SharingLSTM(UpdateRule):
    """The shared part: argument checks, the LSTM+GAC layers, and ``forward`` as one group."""

    def _configure(
        self,
        hidden_size: int,
        num_layers: int,
        global_cells: int | Sequence[int],
        over: str,
        preprocessing: str,
        p: float,
        output_scale: float,
    ) -> None:
        """Check the controller's arguments and keep them (``global_cells`` as one int per layer)."""
        if hidden_size < 1:
            raise ValueError(f"Invalid hidden_size: {hidden_size} (expected >= 1; the paper uses 20)")
        if num_layers < 1:
            raise ValueError(f"Invalid num_layers: {num_layers} (expected >= 1; the paper uses 2)")
        if preprocessing not in PREPROCESSINGS:
            raise ValueError(f"Invalid preprocessing: {preprocessing!r} (expected one of {PREPROCESSINGS})")
        if not p > 0:  # also refuses NaN
            raise ValueError(f"Invalid p: {p} (expected > 0; the paper uses 10)")
        if over not in SHARE_OVER:
            raise ValueError(f"Invalid over: {over!r} (expected one of {SHARE_OVER})")
        cells = [global_cells] * num_layers if isinstance(global_cells, int) else list(global_cells)
        if len(cells) != num_layers or any(isinstance(k, bool) or not isinstance(k, int) for k in cells):
            raise ValueError(
                f"Invalid global_cells: {global_cells!r} (expected an int, or one int per layer: {num_layers} of them)"
            )
        if any(not 0 <= k <= hidden_size for k in cells):
            raise ValueError(f"Invalid global_cells: {global_cells!r} (each between 0 and hidden_size={hidden_size})")
        self.hidden_size, self.num_layers, self.global_cells, self.over = hidden_size, num_layers, cells, over
        self.preprocessing, self.p, self.output_scale = preprocessing, float(p), float(output_scale)

    def _quiet_output(self, in_features: int) -> None:
        """The output layer, started close to "do nothing" as :class:`CoordinatewiseLSTM`'s."""
        self.out = nn.Linear(in_features, 1)
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def _build_lstm(self, in_features: int, hidden_size: int, num_layers: int) -> None:
        self.cells = nn.ModuleList(
            LSTMLayer(in_features if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )

    def _lstm_steps(self, x: Tensor, state: Tensor) -> RuleSteps:
        """The LSTM+GAC layers on ``x`` (n, features) from ``state`` (n, layers, 2, hidden).

        Returns ``(top activations (n, hidden), new state (n, layers, 2, hidden))``.
        """
        n = x.shape[0]
        new_h = []
        for layer, cell in enumerate(self.cells):
            h, c = cell(x, state[:, layer, 0], state[:, layer, 1])  # each (n, hidden)
            k = self.global_cells[layer]
            if k:
                mean = yield h[:, :k]  # (n, k) -> its mean over the group: (n or 1, k)
                h = torch.cat((mean.to(h.dtype).expand(n, k), h[:, k:]), dim=1)  # (n, hidden)
            new_h.append(torch.stack((h, c), dim=1))  # (n, 2, hidden)
            x = h
        return x, torch.stack(new_h, dim=1)  # (n, hidden), (n, layers, 2, hidden)

    def _check_inputs(self, grad: Tensor, state: Tensor) -> None:
        if grad.dim() != 1:
            raise ValueError(f"expected a flat (n,) gradient, got shape {tuple(grad.shape)}")
        if state.shape[0] != grad.shape[0]:
            raise ValueError(f"state holds {state.shape[0]} coordinates but the gradient has {grad.shape[0]}")

    def shared_over(self, kind: str = DEFAULT_KIND) -> str:
        return self.over

    def forward(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> tuple[Tensor, Tensor]:
        """One step with every mean taken over the ``n`` coordinates given (one group)."""
        return run_steps(self.steps(grad, state, kind), _mean_over_all)


class LSTMGAC(_SharingLSTM):
    """The coordinatewise LSTM with global averaging cells (LSTM+GAC; arXiv 1606.04474, section
    "Information sharing between coordinates").

    In layer ``l`` the first ``k_l`` of the ``hidden_size`` cells are global averaging cells: after
    the LSTM update their outgoing activations are replaced by the mean over the group ``G`` of
    coordinates (every coordinate of the kind updated in the call, or of the tensor, or of the row):

    .. math::  h^l_{i,j} \\leftarrow \\frac{1}{|G|} \\sum_{i' \\in G} h^l_{i',j}, \\quad j < k_l

    and that average is what the next layer and the next step see. The cell states stay per
    coordinate. With ``global_cells=0`` in every layer this is :class:`CoordinatewiseLSTM` (same
    weights, same numbers), which is refused: use that class.

    Args:
        hidden_size: units per LSTM layer (paper: 20).
        num_layers: stacked LSTM layers (paper: 2).
        global_cells: global averaging cells per layer (the first ones of the layer): one int for
            every layer, or one per layer (default 4; the paper does not give its number).
        over: ``"kind"`` (default): average over every coordinate of the parameter kind in the call
            (``LearnedOptimizer``: of the param group on one device); ``"tensor"``: over each tensor's;
            ``"row"``: over each row's (first dimension of a tensor of 2+ dimensions: each function
            of a ``(functions, dim)`` batch of quadratics; a vector is one row).
        preprocessing: ``"log_sign"`` (Appendix A) or ``"none"``.
        p: the constant of the log-sign preprocessing (paper: 10).
        output_scale: constant multiplying the network's output (paper: 0.1 for MNIST).
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        global_cells: int | list[int] = 4,
        over: str = "kind",
        preprocessing: str = "log_sign",
        p: float = 10.0,
        output_scale: float = 0.1,
    ) -> None:
        super().__init__()
        self._configure(hidden_size, num_layers, global_cells, over, preprocessing, p, output_scale)
        if not any(self.global_cells):
            raise ValueError(
                "Invalid global_cells: 0 in every layer is the coordinatewise LSTM; use CoordinatewiseLSTM"
            )
        self._record_init_args(locals())
        self._build_lstm(num_features(preprocessing), hidden_size, num_layers)
        self._quiet_output(hidden_size)

    def shared_stages(self, kind: str = DEFAULT_KIND) -> int:
        return sum(1 for k in self.global_cells if k)

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

    def steps(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> RuleSteps:
        self._check_inputs(grad, state)
        weight_dtype = self.out.weight.dtype
        x = preprocess(grad, self.preprocessing, self.p).to(weight_dtype)  # (n, features)
        top, new_state = yield from self._lstm_steps(x, state.to(weight_dtype))
        update = self.out(top).squeeze(-1) * self.output_scale  # (n,)
        return update.to(grad.dtype), new_state


class NTMBFGS(_SharingLSTM):
    """An LSTM+GAC controller with an external memory shared by all coordinates (NTM-BFGS; arXiv
    1606.04474, section "Information sharing between coordinates" and its appendix).

    The memory is an ``n x n`` matrix over the group's ``n`` coordinates, kept in factored form as the
    last ``memory_size`` outer products written, ``M = U V^T / n`` with ``U, V`` of shape
    ``(n, memory_size)``; coordinate ``i`` keeps row ``i`` of ``U`` and ``V`` in its state, so the
    memory never leaks between groups and chunks slice it like any state. At every step, from the
    controller's top activations ``x_i`` (its input: the preprocessed gradient and the previous read):

    .. math::  a_i, b_i = \\tanh(W_a x_i), \\tanh(W_b x_i) \\in \\mathbb{R}^R, \\quad
               U \\leftarrow [U_{:, R:}, a], \\; V \\leftarrow [V_{:, R:}, b]

    (a rank-``R`` write, ``R = write_rank``; the oldest rank-``R`` write drops out, as L-BFGS keeps
    its last pairs), then a read by a matrix-vector product with a coordinatewise key
    ``q_i = \\tanh(w_q \\cdot x_i)``:

    .. math::  m_i = (M q)_i = \\sum_s U_{is} \\, \\tfrac{1}{n}\\sum_j V_{js} q_j, \\qquad
               u_i = s \\cdot W_{out} [x_i, m_i]

    The ``1/n`` (means, not sums) keeps a read the same size for a 10-d quadratic and a 10^5-coordinate
    layer. BFGS's update of the inverse Hessian ``H`` is a rank-2 write of this form and its step the
    read ``-H g``.

    Args:
        hidden_size: units per controller LSTM layer (paper: 20).
        num_layers: controller LSTM layers (paper: 2).
        global_cells: global averaging cells per controller layer (default 4; 0 allowed: the memory
            is shared anyway).
        memory_size: outer products the memory keeps (``U``, ``V`` columns); a multiple of ``write_rank``.
        write_rank: rank of each step's write (BFGS: 2).
        over: ``"kind"``, ``"tensor"`` or ``"row"`` (see :class:`LSTMGAC`): the group that shares
            averages and one memory.
        preprocessing: ``"log_sign"`` (Appendix A) or ``"none"``.
        p: the constant of the log-sign preprocessing (paper: 10).
        output_scale: constant multiplying the network's output (paper: 0.1 for MNIST).
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        global_cells: int | list[int] = 4,
        memory_size: int = 8,
        write_rank: int = 2,
        over: str = "kind",
        preprocessing: str = "log_sign",
        p: float = 10.0,
        output_scale: float = 0.1,
    ) -> None:
        super().__init__()
        self._configure(hidden_size, num_layers, global_cells, over, preprocessing, p, output_scale)
        if isinstance(write_rank, bool) or not isinstance(write_rank, int) or write_rank < 1:
            raise ValueError(f"Invalid write_rank: {write_rank!r} (expected an int >= 1; BFGS writes rank 2)")
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < write_rank:
            raise ValueError(f"Invalid memory_size: {memory_size!r} (expected an int >= write_rank={write_rank})")
        if memory_size % write_rank:
            raise ValueError(
                f"Invalid memory_size: {memory_size} (expected a multiple of write_rank={write_rank}: the memory "
                "keeps the last memory_size // write_rank writes)"
            )
        self._record_init_args(locals())
        self.memory_size, self.write_rank = memory_size, write_rank
        self._build_lstm(num_features(preprocessing) + 1, hidden_size, num_layers)  # + the previous read
        self.heads = nn.Linear(hidden_size, 1 + 2 * write_rank)  # read key q, write vectors a and b
        self._quiet_output(hidden_size + 1)  # [x, read] -> update

    @property
    def _lstm_size(self) -> int:
        return self.num_layers * 2 * self.hidden_size

    def shared_stages(self, kind: str = DEFAULT_KIND) -> int:
        return sum(1 for k in self.global_cells if k) + 1  # the GAC layers, then the memory read

    def init_state(
        self,
        num_coords: int,
        kind: str = DEFAULT_KIND,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        dtype = dtype or self.state_dtype()
        # per coordinate: controller (layers, 2, hidden), U row, V row, previous read
        return torch.zeros(num_coords, self._lstm_size + 2 * self.memory_size + 1, device=device, dtype=dtype)

    def steps(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> RuleSteps:
        self._check_inputs(grad, state)
        n, size, k, r = grad.shape[0], self._lstm_size, self.memory_size, self.write_rank
        weight_dtype = self.out.weight.dtype
        state = state.to(weight_dtype)
        lstm = state[:, :size].view(n, self.num_layers, 2, self.hidden_size)
        u, v, read = state[:, size : size + k], state[:, size + k : size + 2 * k], state[:, size + 2 * k :]
        x = torch.cat((preprocess(grad, self.preprocessing, self.p).to(weight_dtype), read), dim=1)  # (n, features + 1)
        top, lstm = yield from self._lstm_steps(x, lstm)  # (n, hidden), (n, layers, 2, hidden)
        heads = torch.tanh(self.heads(top))  # (n, 1 + 2r)
        q, a, b = heads[:, :1], heads[:, 1 : 1 + r], heads[:, 1 + r :]  # (n, 1), (n, r), (n, r)
        u = torch.cat((u[:, r:], a), dim=1)  # (n, k): the oldest rank-r write drops out
        v = torch.cat((v[:, r:], b), dim=1)  # (n, k)
        vq = yield v * q  # (n, k) -> V^T q / n: (n or 1, k)
        read = (u * vq.to(u.dtype)).sum(1, keepdim=True)  # (n, 1) = (U V^T q / n)_i
        update = self.out(torch.cat((top, read), dim=1)).squeeze(-1) * self.output_scale  # (n,)
        new_state = torch.cat((lstm.reshape(n, size), u, v, read), dim=1)  # (n, state)
        return update.to(grad.dtype), new_state
