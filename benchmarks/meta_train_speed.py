"""Meta-training throughput on CPU: optimizee steps and coordinate-steps per second.

    python benchmarks/meta_train_speed.py [--threads N] [--truncations 30]

One "truncation" is what one MetaLearner.training_step does: ``unroll`` optimizee steps with the
coordinatewise LSTM (forward with graph), the backward through all of them, a clip and an Adam step
on the rule. Measured on quadratic tasks of growing size (coordinates = num_functions x dim), with
the paper's LSTM (2 x 20 units, log-sign preprocessing). Also times the frozen rule (evaluation /
LearnedOptimizer-style, no meta-gradient). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lightning_l2l.nets import CoordinatewiseLSTM
from lightning_l2l.tasks import QuadraticFamily
from lightning_l2l.trajectory import Trajectory, unroll


def time_truncations(num_functions: int, unroll_len: int, truncations: int) -> tuple[float, float]:
    torch.manual_seed(0)
    rule = CoordinatewiseLSTM()
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    family = QuadraticFamily(dim=10, num_functions=num_functions)
    gen = torch.Generator().manual_seed(0)
    traj = Trajectory.start(rule, family.sample(gen))

    def one() -> None:
        nonlocal traj
        if traj.step >= 100:
            traj = Trajectory.start(rule, family.sample(gen))
        result = unroll(rule, traj, unroll_len)
        opt.zero_grad()
        result.meta_loss.backward()
        torch.nn.utils.clip_grad_norm_(rule.parameters(), 1.0)
        opt.step()
        traj.detach()

    for _ in range(3):  # warm-up
        one()
    start = time.perf_counter()
    for _ in range(truncations):
        one()
    train = (time.perf_counter() - start) / (truncations * unroll_len)

    traj = Trajectory.start(rule, family.sample(gen))
    start = time.perf_counter()
    unroll(rule, traj, 100, differentiable=False)
    frozen = (time.perf_counter() - start) / 100
    return train, frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--truncations", type=int, default=30)
    parser.add_argument("--unroll", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"unroll {args.unroll}, CoordinatewiseLSTM(20, 2 layers)\n")
    print("| coordinates | meta-train: optimizee steps/s | meta-train: coordinate-steps/s "
          "| frozen rule: steps/s | frozen rule: coordinate-steps/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for num_functions in (128, 1024, 8192):
        coords = num_functions * 10
        train, frozen = time_truncations(num_functions, args.unroll, max(3, args.truncations * 128 // num_functions))
        print(f"| {coords:,} | {1 / train:,.0f} | {coords / train:,.3g} | {1 / frozen:,.0f} | {coords / frozen:,.3g} |")


if __name__ == "__main__":
    main()
