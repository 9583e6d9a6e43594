"""Update-rule networks: the math shared by meta-training and :class:`~lightning_l2l.LearnedOptimizer`.

Nothing here knows about tasks, Lightning or ``torch.optim``.
"""

from lightning_l2l.nets.base import DEFAULT_KIND, SHARE_OVER, UpdateRule
from lightning_l2l.nets.gac import LSTMGAC, NTMBFGS
from lightning_l2l.nets.kinds import layer_kind, param_kinds, params_by_kind, shape_kind
from lightning_l2l.nets.layout import ZERO_GRADS, KindLayout, RuleStep, apply_rule
from lightning_l2l.nets.linear import CoordinatewiseLinear
from lightning_l2l.nets.lstm import CoordinatewiseLSTM
from lightning_l2l.nets.moments import MomentMLP
from lightning_l2l.nets.per_kind import PerKindRule
from lightning_l2l.nets.preprocess import log_sign, preprocess
from lightning_l2l.nets.scaled import ScaledRule, parse_multiplier, scale_rule
from lightning_l2l.nets.serialization import WeightsError, build_rule, load_rule, save_rule

__all__ = [
    "DEFAULT_KIND",
    "UpdateRule",
    "CoordinatewiseLSTM",
    "LSTMGAC",
    "NTMBFGS",
    "SHARE_OVER",
    "CoordinatewiseLinear",
    "MomentMLP",
    "PerKindRule",
    "ScaledRule",
    "scale_rule",
    "parse_multiplier",
    "layer_kind",
    "param_kinds",
    "params_by_kind",
    "shape_kind",
    "KindLayout",
    "RuleStep",
    "ZERO_GRADS",
    "apply_rule",
    "log_sign",
    "preprocess",
    "build_rule",
    "save_rule",
    "load_rule",
    "WeightsError",
]
