"""``MetaLearner``: meta-trains an update rule with truncated BPTT (Andrychowicz et al., 2016)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, SumMetric

from lightning_l2l._distributed import destroy_process_group_at_exit
from lightning_l2l.evaluation import DEFAULT_LR_GRID, LEARNED, Comparison, compare
from lightning_l2l.nets import ZERO_GRADS, MomentMLP, PerKindRule, UpdateRule
from lightning_l2l.tasks import BatchedTask, Task, TaskFamily
from lightning_l2l.trajectory import OBJECTIVES, STEP_WEIGHTS, Trajectory, frozen_run, rule_curve, unroll

__all__ = ["MetaLearner"]

# Offsets keep the seed streams of training, validation and test tasks apart.
_VAL_SEED_OFFSET = 1_000_003
_TEST_SEED_OFFSET = 2_000_003
_RANK_SEED_STRIDE = 7_919
#: the cosine schedule anneals the meta learning rate to this fraction of ``meta_lr``
_COSINE_FLOOR = 0.05


class MetaLearner(L.LightningModule):
    """Meta-trains an update rule ``m(.; phi)`` on tasks sampled from a family (sections 2 and 3).

    One ``training_step`` is one truncation of truncated BPTT: ``unroll`` rule steps along the
    current optimizee trajectory, the meta-loss ``L(phi) = sum_t w_t f(theta_t)`` (eq. 2, averaged
    over steps and problems), one backward, clipping, one Adam step on ``phi``; a new task starts
    when the trajectory reaches ``horizon``. A truncation with a non-finite loss or meta-gradient is
    dropped (no step), counted in ``train/nonfinite_trajectories``, and its task replaced.

    Validation runs the frozen rule for ``horizon`` steps on ``num_val_tasks`` fixed tasks and logs
    ``val/final_loss`` (mean final loss per problem; what checkpointing selects on) and
    ``val/mean_loss`` (``L(phi)`` on those tasks). Test runs it on ``num_test_tasks`` fresh tasks
    against the ``baselines`` at learning rates tuned on the validation tasks and writes
    ``comparison.{md,csv,png}``. Evaluation losses are a task's ``eval_loss`` where it has one.

    Args:
        rule: the update rule to meta-train (e.g. ``CoordinatewiseLSTM``).
        task_family: training tasks; validation and test tasks come from separate seed streams of
            it unless ``eval_family`` is given.
        eval_family: family of the validation and test tasks.
        test_family: family of the test tasks only (default ``eval_family``).
        horizon: optimizee steps per trajectory (paper: 100).
        unroll: steps per truncation (paper: 20); at most ``horizon``.
        meta_lr: Adam learning rate on ``phi``.
        meta_lr_schedule: ``"constant"`` or ``"cosine"`` (to ``0.05 * meta_lr`` over ``max_steps``).
        grad_clip: norm clip of the meta-gradient (``0``: none).
        second_derivatives: backpropagate through the optimizee gradients (paper: off).
        truncations_per_epoch: training steps per epoch (how often validation runs).
        num_val_tasks: validation tasks (also tune the baselines).
        num_test_tasks: test tasks.
        seed: base seed of every task stream.
        baselines: names from :data:`~lightning_l2l.evaluation.BASELINES` the test compares against.
        lr_grid: learning rates the baselines are tuned over.
        report_dir: where test writes its report (default: the logger's directory).
        meta_objective: ``"mean"`` (the paper's ``L(phi)``), ``"log_mean"`` (mean log loss) or
            ``"log_eval"`` (mean log held-out loss, every ``eval_every`` steps and at the end of each
            truncation; :func:`~lightning_l2l.trajectory.unroll`).
        step_weights: ``w_t``: ``"uniform"`` (paper) or ``"linear"``
            (:func:`~lightning_l2l.trajectory.step_weight`).
        init_weights: start from these weights (a shipped name, ``.safetensors`` or ``.ckpt``)
            instead of the rule's initialisation, when a fit starts from scratch. A single-network
            source initialises every network of a :class:`~lightning_l2l.nets.PerKindRule` (section 3.3).
        tasks_per_step: optimizees per meta-step, run side by side as one
            :class:`~lightning_l2l.tasks.BatchedTask` (paper: 1).
        zero_grads: ``"update"`` (paper: an exactly-zero gradient goes through the rule) or
            ``"skip"`` (no update, state kept: what :class:`~lightning_l2l.LearnedOptimizer` does by
            default); see :func:`~lightning_l2l.nets.apply_rule`.
        eval_every: with ``meta_objective="log_eval"``, the held-out loss enters the objective every
            this many optimizee steps (``0``: at the end of each truncation only).
    """

    def __init__(
        self,
        rule: UpdateRule,
        task_family: TaskFamily,
        eval_family: TaskFamily | None = None,
        test_family: TaskFamily | None = None,
        horizon: int = 100,
        unroll: int = 20,
        meta_lr: float = 3e-3,
        meta_lr_schedule: str = "cosine",
        grad_clip: float = 1.0,
        second_derivatives: bool = False,
        truncations_per_epoch: int = 100,
        num_val_tasks: int = 2,
        num_test_tasks: int = 2,
        seed: int = 0,
        baselines: list[str] | None = None,
        lr_grid: list[float] | None = None,
        report_dir: str | None = None,
        meta_objective: str = "mean",
        step_weights: str = "uniform",
        init_weights: str | None = None,
        tasks_per_step: int = 1,
        zero_grads: str = "update",
        eval_every: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"rule must be an UpdateRule (e.g. CoordinatewiseLSTM), got {type(rule).__name__}")
        if not isinstance(task_family, TaskFamily):
            raise TypeError(
                f"task_family must be a TaskFamily (e.g. lightning_l2l.tasks.QuadraticFamily), got {type(task_family).__name__}"
            )
        if horizon < 1:
            raise ValueError(f"Invalid horizon: {horizon} (expected >= 1 optimizee steps per trajectory; the paper uses 100)")
        if unroll < 1:
            raise ValueError(f"Invalid unroll: {unroll} (expected >= 1 steps per truncation; the paper uses 20)")
        if unroll > horizon:
            raise ValueError(
                f"unroll ({unroll}) is longer than the horizon ({horizon}): a truncation cannot run past the end "
                "of its trajectory; set unroll <= horizon (the paper: unroll 20, horizon 100)"
            )
        if meta_lr <= 0:
            raise ValueError(f"Invalid meta_lr: {meta_lr} (expected > 0)")
        if meta_lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"Invalid meta_lr_schedule: {meta_lr_schedule!r} (expected 'constant' or 'cosine')")
        if meta_objective not in OBJECTIVES:
            raise ValueError(f"Invalid meta_objective: {meta_objective!r} (expected one of {OBJECTIVES})")
        if step_weights not in STEP_WEIGHTS:
            raise ValueError(f"Invalid step_weights: {step_weights!r} (expected one of {STEP_WEIGHTS})")
        if zero_grads not in ZERO_GRADS:
            raise ValueError(f"Invalid zero_grads: {zero_grads!r} (expected one of {ZERO_GRADS})")
        if eval_every < 0:
            raise ValueError(f"Invalid eval_every: {eval_every} (expected >= 0 steps; 0: the end of each truncation only)")
        if grad_clip < 0:
            raise ValueError(f"Invalid grad_clip: {grad_clip} (expected >= 0; 0 disables clipping)")
        for name, n in (("truncations_per_epoch", truncations_per_epoch), ("num_val_tasks", num_val_tasks),
                        ("num_test_tasks", num_test_tasks), ("tasks_per_step", tasks_per_step)):
            if n < 1:
                raise ValueError(f"Invalid {name}: {n} (expected >= 1)")
        from lightning_l2l.evaluation import BASELINES, PAPER_BASELINES

        baselines = list(baselines) if baselines is not None else list(PAPER_BASELINES)
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; available: {sorted(BASELINES)}")
        for name, fam in (("eval_family", eval_family), ("test_family", test_family)):
            if fam is not None and not isinstance(fam, TaskFamily):
                raise TypeError(f"{name} must be a TaskFamily or None, got {type(fam).__name__}")
        self.save_hyperparameters(ignore=["rule", "task_family", "eval_family", "test_family"])
        self.automatic_optimization = False
        self.rule = rule
        self.task_family = task_family
        self.eval_family = eval_family or task_family
        self.test_family = test_family or self.eval_family
        self.baselines = baselines
        self.lr_grid = list(lr_grid) if lr_grid is not None else list(DEFAULT_LR_GRID)
        self._traj: Trajectory | None = None
        self._generator: torch.Generator | None = None
        self.val_tasks: list[Task] = []
        self.test_tasks: list[Task] = []
        self._test_curves: list[torch.Tensor] = []
        self.comparison: Comparison | None = None
        self.report_paths: dict[str, Path] = {}
        self.val_final = MeanMetric()
        self.val_mean = MeanMetric()
        self.test_final = MeanMetric()
        self.nonfinite = SumMetric()
        self.nonfinite_count = 0

    # ----------------------------------------------------------------------------------- set-up
    def on_fit_start(self) -> None:
        # After a resumed fit has restored its checkpoint (trainer.ckpt_path is set by then) and before
        # the sanity check: only a fit from scratch starts from init_weights.
        if self.hparams.init_weights is not None and self.trainer.ckpt_path is None:
            self.load_init_weights()

    def load_init_weights(self) -> None:
        """Copy ``init_weights`` into the rule (what a fit from scratch does at its start)."""
        from lightning_l2l.nets.serialization import WeightsError
        from lightning_l2l.pretrained import available, resolve

        weights = self.hparams.init_weights
        if weights is None:
            raise ValueError("init_weights is not set: there is nothing to load")
        if str(weights).endswith((".ckpt", ".safetensors")) and not Path(weights).is_file():
            raise WeightsError(
                f"init_weights={weights!r}: no such file. A config that continues an earlier meta-training run "
                "starts from that run's checkpoint: run the config that writes it first (its header says which), "
                "or pass other weights (--model.init_weights NAME_OR_PATH; shipped names: "
                f"{', '.join(available())}), or --model.init_weights=null to start from the rule's initialisation"
            )
        source, _ = resolve(weights)
        if source.config() == self.rule.config():
            self.rule.load_state_dict(source.state_dict())
            return
        if (isinstance(self.rule, MomentMLP) and isinstance(source, MomentMLP) and self.rule.alignment_betas
                and not source.alignment_betas):
            self.rule.widen_from(source)  # raises, saying why, where the rules differ in more than that
            return
        if (isinstance(self.rule, PerKindRule) and not isinstance(source, PerKindRule)
                and all(net.config() == source.config() for net in self.rule.networks.values())):
            # one shared network -> a copy per kind, which meta-training then lets drift apart
            for net in self.rule.networks.values():
                net.load_state_dict(source.state_dict())
            return
        raise ValueError(
            f"init_weights={weights!r} holds a {source.config()} but the rule to meta-train is a "
            f"{self.rule.config()}; configure `rule` as the network those weights belong to (`l2l export` "
            "writes its config beside the weights), or as a PerKindRule whose every network is that "
            "network (each starts as a copy), or leave init_weights unset to start from a random "
            "initialisation"
        )

    def setup(self, stage: str) -> None:
        seed = int(self.hparams.seed)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._generator = torch.Generator().manual_seed(seed + _RANK_SEED_STRIDE * rank)
        val_gen = torch.Generator().manual_seed(seed + _VAL_SEED_OFFSET)
        test_gen = torch.Generator().manual_seed(seed + _TEST_SEED_OFFSET)
        self.val_tasks = [self.eval_family.sample(val_gen) for _ in range(self.hparams.num_val_tasks)]
        self.test_tasks = [self.test_family.sample(test_gen) for _ in range(self.hparams.num_test_tasks)]
        if self.hparams.meta_objective == "log_eval":  # fail now, not after the first unroll
            probe = self.task_family.sample(torch.Generator().manual_seed(seed))
            with torch.no_grad():
                missing = probe.eval_loss(probe.init_params()) is None
            if missing:
                raise ValueError(
                    f"meta_objective='log_eval' needs tasks with a held-out eval_loss, and {type(self.task_family).__name__}'s "
                    "tasks define none; use meta_objective='log_mean', or a family whose tasks hold out examples "
                    "(e.g. lightning_l2l.tasks.GeneralFamily)"
                )
        destroy_process_group_at_exit()  # gloo ranks would otherwise abort at exit (lightning_l2l._distributed)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        opt = torch.optim.Adam(self.rule.parameters(), lr=self.hparams.meta_lr)
        if self.hparams.meta_lr_schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=self._schedule_length(), eta_min=_COSINE_FLOOR * self.hparams.meta_lr
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _schedule_length(self) -> int:
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("meta_lr_schedule='cosine' needs a finite trainer.max_steps (or max_epochs)")
        return int(total)

    def on_train_start(self) -> None:
        # A fit resumed with another max_steps (e.g. extending a run) restores the checkpoint's cosine
        # schedule, whose T_max is the old length: past it, CosineAnnealingLR would raise the rate again.
        # The schedule follows this fit's length instead, as if it had been configured so from the start.
        sched = self.lr_schedulers()
        if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            return
        total = self._schedule_length()
        if sched.T_max == total:
            return
        step = min(sched.last_epoch, total)
        rank_zero_warn(
            f"meta_lr_schedule='cosine': the checkpoint's schedule spans {sched.T_max} meta-steps but this fit "
            f"runs to max_steps={total}; the rate now follows a cosine over {total} steps (at step {step}).",
        )
        sched.T_max = total
        opt = sched.optimizer
        for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
            group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * step / total)) / 2
        sched._last_lr = [group["lr"] for group in opt.param_groups]

    def train_dataloader(self) -> DataLoader:
        # Tasks are sampled inside the module (a trajectory spans several training steps); the
        # loader only paces the epoch: one item per truncation.
        return DataLoader(range(self.hparams.truncations_per_epoch), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(range(self.hparams.num_val_tasks), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(range(self.hparams.num_test_tasks), batch_size=None)

    # --------------------------------------------------------------------------------- training
    def _new_trajectory(self) -> Trajectory:
        assert self._generator is not None, "setup() has not run"
        n = self.hparams.tasks_per_step
        tasks = [self.task_family.sample(self._generator) for _ in range(n)]
        task = tasks[0] if n == 1 else BatchedTask(tasks)
        return Trajectory.start(self.rule, task.to(self.device), self.device)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self._traj is None or self._traj.step >= self.hparams.horizon:
            self._traj = self._new_trajectory()
        steps = min(self.hparams.unroll, self.hparams.horizon - self._traj.step)
        result = unroll(
            self.rule, self._traj, steps, differentiable=True, second_derivatives=self.hparams.second_derivatives,
            objective=self.hparams.meta_objective, step_weights=self.hparams.step_weights,
            horizon=self.hparams.horizon, zero_grads=self.hparams.zero_grads, eval_every=self.hparams.eval_every,
        )
        opt = self.optimizers()
        finite = bool(result.finite and torch.isfinite(result.meta_loss))
        # Under DDP every rank must take the backward (its all-reduce) or none: a rank with a
        # non-finite truncation makes all ranks skip this meta-step; only that rank drops its task.
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            if finite:
                self._traj.detach()
            else:  # dropped: the trajectory never reaches the weights, and a fresh task replaces it
                self._drop_trajectory()
            return
        opt.zero_grad()
        self.manual_backward(result.meta_loss)
        # With a GradScaler (precision="16-mixed"), non-finite scaled gradients mean the scale was too
        # high, not that the trajectory is bad: the scaler skips that step and lowers its scale. In every
        # other precision a non-finite meta-gradient drops the truncation and its task.
        if not self._grad_scaler_active():
            grads = [p.grad for p in self.rule.parameters() if p.grad is not None]
            if not all(torch.isfinite(g).all() for g in grads):
                opt.zero_grad()
                self._drop_trajectory()
                return
        opt.step()  # clips in on_before_optimizer_step, after a GradScaler has unscaled the gradients
        scheduler = self.lr_schedulers()
        if scheduler is not None:  # manual optimization: Lightning leaves stepping to us
            scheduler.step()
        self._traj.detach()
        self.log("train/meta_loss", result.meta_loss.detach(), prog_bar=True)
        self.log("train/optimizee_loss", result.curve[-1])  # at the end of this truncation
        self.log("train/nonfinite_trajectories", float(self.nonfinite_count))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called inside opt.step(), after 16-mixed's GradScaler has unscaled the gradients: clipping
        # before opt.step() would clip the scaled ones (about 65,536 times too large).
        if self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    def _grad_scaler_active(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _drop_trajectory(self) -> None:
        self.nonfinite_count += 1
        self._traj = None
        self.log("train/nonfinite_trajectories", float(self.nonfinite_count))

    # ------------------------------------------------------------------------------- validation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        task = self.val_tasks[int(batch)].to(self.device)
        # the steps' minibatch losses and the eval_loss at the end only (an eval_loss at every step would
        # double the cost of a validation on image tasks)
        curve, final = frozen_run(self.rule, task, self.hparams.horizon, self.device, zero_grads=self.hparams.zero_grads)
        final = final if torch.isfinite(final) else torch.tensor(math.inf)
        self.val_final.update(final, weight=task.num_problems)
        self.val_mean.update(curve[1:].mean(), weight=task.num_problems)
        self.log("val/final_loss", self.val_final, prog_bar=True)
        self.log("val/mean_loss", self.val_mean)

    # -------------------------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        self._test_curves = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        task = self.test_tasks[int(batch)].to(self.device)
        curve = rule_curve(self.rule, task, self.hparams.horizon, self.device, zero_grads=self.hparams.zero_grads)
        self._test_curves.append(curve.cpu())
        self.test_final.update(curve[-1], weight=task.num_problems)
        self.log("test/learned_final_loss", self.test_final)

    def on_test_epoch_end(self) -> None:
        n = len(self._test_curves)
        tasks = self.test_tasks[:n]
        self.comparison = compare(
            None, self.val_tasks, tasks, self.hparams.horizon, self.baselines, self.lr_grid,
            learned_curves=self._test_curves, device=self.device,
        )
        c = self.comparison
        metrics = {f"test/{name}_final_loss": c.final(name) for name in c.curves if name != LEARNED}
        metrics["test/ratio_to_best_baseline"] = c.ratio()
        for name, value in metrics.items():
            self.log(name, value)
        self.report_paths = c.save(self._report_dir(), title=f"{type(tasks[0]).__name__}: learned vs tuned baselines")
        summary = {"ratio_to_best_baseline": c.ratio(), "best_baseline": c.best_baseline(),
                   "final_losses": {k: c.final(k) for k in c.curves}, "lrs": c.lrs,
                   "num_problems": c.num_problems, "horizon": c.num_steps, "grid_edge": c.grid_edge}
        (self._report_dir() / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._log_report()
        if self.trainer.is_global_zero:
            print(f"\nLearned rule vs tuned baselines on {c.num_problems} held-out problems "
                  f"({n} tasks, horizon {c.num_steps}):\n{c.table()}")
            if c.grid_edge:
                print(f"warning: tuned learning rate at the edge of the grid for {c.grid_edge}; widen lr_grid")
            print("report: " + ", ".join(str(p) for p in self.report_paths.values()))

    def _report_dir(self) -> Path:
        if self.hparams.report_dir:
            path = Path(self.hparams.report_dir)
        elif self.trainer.log_dir is not None:
            path = Path(self.trainer.log_dir)
        else:
            path = Path(self.trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _log_report(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                c = self.comparison
                assert c is not None
                names = list(c.curves)
                rows = [[s, *(float(c.curves[n][s]) for n in names)] for s in range(c.num_steps + 1)]
                logger.experiment.log({
                    "test/comparison_plot": wandb.Image(str(self.report_paths["plot"])),
                    "test/curves": wandb.Table(columns=["step", *names], data=rows),
                })

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain data only, so that the checkpoint loads with torch.load(weights_only=True).
        checkpoint["l2l_rule_config"] = json.dumps(self.rule.config())
        kind_map = getattr(self.task_family, "kind_map", None)
        if kind_map is not None:  # the routing of parameters to the rule's kinds, for `l2l export` to ship
            checkpoint["l2l_kind_map"] = json.dumps(dict(kind_map))
        checkpoint["l2l_nonfinite_trajectories"] = self.nonfinite_count
        if self._generator is not None:  # a resumed run continues the task stream, not restarts it
            checkpoint["l2l_task_generator_state"] = self._generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_count = int(checkpoint.get("l2l_nonfinite_trajectories", 0))
        state = checkpoint.get("l2l_task_generator_state")
        if state is not None and self._generator is not None:
            self._generator.set_state(state)
