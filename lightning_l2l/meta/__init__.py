"""Meta-training: the ``MetaLearner`` LightningModule."""

from lightning_l2l.meta.learner import MetaLearner

__all__ = ["MetaLearner"]
