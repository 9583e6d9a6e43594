"""lightning_l2l: learning to learn by gradient descent by gradient descent, for PyTorch Lightning.

Andrychowicz et al., "Learning to learn by gradient descent by gradient descent", NeurIPS 2016.
"""

from lightning_l2l.meta import MetaLearner
from lightning_l2l.nets import CoordinatewiseLSTM, PerKindRule, ScaledRule, UpdateRule, load_rule, save_rule
from lightning_l2l.optim import LearnedOptimizer, LearnedOptimizerCallback
from lightning_l2l.tasks import ModuleTask, ModuleTaskFamily, QuadraticFamily, Task, TaskFamily

__version__ = "0.2.0.dev0"

__all__ = [
    "MetaLearner",
    "LearnedOptimizer",
    "LearnedOptimizerCallback",
    "UpdateRule",
    "CoordinatewiseLSTM",
    "PerKindRule",
    "ScaledRule",
    "load_rule",
    "save_rule",
    "Task",
    "TaskFamily",
    "QuadraticFamily",
    "ModuleTask",
    "ModuleTaskFamily",
]
