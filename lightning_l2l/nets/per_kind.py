"""Per-layer-type update rules: one network per parameter kind (section 3.3 of the paper)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_l2l.nets.base import DEFAULT_KIND, RuleSteps, UpdateRule

__all__ = ["PerKindRule"]


class PerKindRule(UpdateRule):
    """Routes each parameter kind (``conv``, ``fc``, ...) to its own update rule.

    The paper's CIFAR-10 optimizer uses two LSTMs, one for convolutional and one for fully
    connected parameters (Andrychowicz et al., 2016, section 3.3). A kind with no network of its
    own goes to ``default``.

    Args:
        networks: update rule per kind, e.g. ``{"conv": CoordinatewiseLSTM(), "fc": CoordinatewiseLSTM()}``.
        default: the kind whose network serves every kind not in ``networks``. ``None`` is allowed
            only with a single network, which then serves every kind.
    """

    def __init__(self, networks: dict[str, UpdateRule], default: str | None = None) -> None:
        super().__init__()
        if not networks:
            raise ValueError("PerKindRule needs at least one network, e.g. networks={'fc': CoordinatewiseLSTM()}")
        for kind, net in networks.items():
            if not isinstance(net, UpdateRule):
                raise TypeError(f"network for kind {kind!r} is a {type(net).__name__}, expected an UpdateRule")
        if default is None:
            if len(networks) > 1:
                raise ValueError(
                    f"PerKindRule with networks {sorted(networks)} needs `default`: the kind whose network "
                    "serves parameters of any other kind"
                )
            default = next(iter(networks))
        if default not in networks:
            raise ValueError(f"default kind {default!r} has no network; networks are {sorted(networks)}")
        self._record_init_args(locals())
        self.networks = nn.ModuleDict(networks)
        self.default = default

    def kinds(self) -> tuple[str, ...]:
        return tuple(self.networks.keys())

    def network_for(self, kind: str) -> UpdateRule:
        """The network that updates parameters of ``kind``."""
        net = self.networks[kind] if kind in self.networks else self.networks[self.default]
        return net  # type: ignore[return-value]

    def init_state(
        self,
        num_coords: int,
        kind: str = DEFAULT_KIND,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        return self.network_for(kind).init_state(num_coords, kind, device=device, dtype=dtype)

    def forward(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> tuple[Tensor, Tensor]:
        return self.network_for(kind)(grad, state, kind)

    def step_(
        self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND, keep: Tensor | None = None, *, fused: bool = True
    ) -> Tensor:
        return self.network_for(kind).step_(grad, state, kind, keep, fused=fused)

    def shared_stages(self, kind: str = DEFAULT_KIND) -> int:
        return self.network_for(kind).shared_stages(kind)

    def shared_over(self, kind: str = DEFAULT_KIND) -> str:
        return self.network_for(kind).shared_over(kind)

    def steps(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> RuleSteps:
        return (yield from self.network_for(kind).steps(grad, state, kind))
