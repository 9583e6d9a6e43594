"""A frozen learned optimizer for any model: ``LearnedOptimizer`` and its Lightning callback."""

from lightning_l2l.optim.callback import LearnedOptimizerCallback
from lightning_l2l.optim.learned import LearnedOptimizer, param_groups_by_kind, shape_kind

__all__ = ["LearnedOptimizer", "LearnedOptimizerCallback", "param_groups_by_kind", "shape_kind"]
