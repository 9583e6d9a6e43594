"""Tuned baselines, learned-vs-baseline comparisons, tables and plots."""

from lightning_l2l.evaluation.baselines import (
    BASELINES,
    DEFAULT_LR_GRID,
    PAPER_BASELINES,
    TunedBaseline,
    baseline_curve,
    baseline_final_loss,
    baseline_losses_at,
    tune_baseline,
)
from lightning_l2l.evaluation.cache import digest, json_cached, rule_fingerprint
from lightning_l2l.evaluation.comparison import LEARNED, Comparison, compare, mean_curve

__all__ = [
    "BASELINES",
    "DEFAULT_LR_GRID",
    "PAPER_BASELINES",
    "TunedBaseline",
    "baseline_curve",
    "baseline_final_loss",
    "baseline_losses_at",
    "tune_baseline",
    "LEARNED",
    "Comparison",
    "compare",
    "mean_curve",
    "digest",
    "json_cached",
    "rule_fingerprint",
]
