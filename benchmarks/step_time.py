"""Step time and peak memory of ``LearnedOptimizer`` against ``torch.optim.Adam``, with floors.

    python benchmarks/step_time.py                       # CPU (and CUDA if present), 10k ... 10M parameters
    python benchmarks/step_time.py --sizes 1e4 1e5 --threads 1 --device cpu
    python benchmarks/step_time.py --sizes 1e6 --device cpu --threads 1 all --rules lstm lstm-eager moments
    python benchmarks/step_time.py --compile             # also LearnedOptimizer(compile=True)
    python benchmarks/step_time.py --sizes 1e5 --device cpu --rules lstm gac ntm   # LSTM+GAC, NTM-BFGS too
    python benchmarks/step_time.py --sizes 1e6 --device cpu --rules lstm moments moments-eager   # `general` too

For each MLP size and optimizer the script times ``optimizer.step()`` alone (gradients are
computed once and reused, so the model's forward/backward does not blur the optimizer's cost) and
measures the memory the optimizer adds at its peak (state plus temporaries). Every configuration
runs in a fresh subprocess, so peaks do not leak into each other. ``--threads 1 all`` (the default)
measures everything, floors included, at one CPU thread and at all of them; "x Adam" is a step over
Adam's at the same size and threads. The LSTM's rows use its fused CPU step where it runs
(``LearnedOptimizer(fused=None)``, the default; the header says whether it does); ``--rules
lstm-eager`` adds rows for ``fused=False``, the eager network. ``--compile`` adds rows for
``LearnedOptimizer(compile=True)``: its first step (compilation included) is reported apart, and two
untimed steps precede the timed ones. ``--rules moments`` adds rows for the default weights, ``general`` (a
:class:`~lightning_l2l.nets.MomentMLP`, its fused CPU step where it runs), ``moments-eager`` the same with
``fused=False``. ``--rules gac ntm`` adds rows for ``LearnedOptimizer`` with
a randomly initialised :class:`~lightning_l2l.nets.LSTMGAC` / :class:`~lightning_l2l.nets.NTMBFGS`
(default configs; their speed does not depend on the weights' values): with more coordinates than
``chunk_size``, each of their means over coordinates costs one more pass over the chunks.

Floors (what the step cannot beat on this machine):

- memory: bytes a step must move, over the bandwidth of a large ``copy_`` measured here. For
  Adam: read and write the parameter and both moments, read the gradient (7 x 4 bytes per
  coordinate). For the learned optimizer: read and write the parameter and the LSTM state
  (``layers x 2 x hidden`` floats), read the gradient.
- compute: the network's FLOPs per coordinate (the gate matmuls of every LSTM layer and the
  output layer), over the rate of a large square float32 matmul measured here. The LSTM's
  matmuls are skinny (``k = input + hidden``), so this floor is optimistic.

The reported floor is the larger of the two; "x floor" is measured time over it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from _memory import current_bytes, peak_bytes, reset_peak  # benchmarks/_memory.py
from torch import nn

# --------------------------------------------------------------------------------------- worker


def mlp(num_params: int) -> nn.Module:
    """Two square hidden layers of width ``w``, ``2 w^2 + 2 w`` parameters, ``w`` chosen to match."""
    width = max(2, round(math.sqrt(num_params / 2)))
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def _make_optimizer(
    name: str, model: nn.Module, weights: str | None, chunk_size: int | None
) -> torch.optim.Optimizer:
    """``adam``, ``learned``, ``eager`` (``fused=False``), ``compiled`` (``compile=True``), ``gac``, ``ntm``, ``moments``."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    from lightning_l2l import LearnedOptimizer
    from lightning_l2l.nets import LSTMGAC, NTMBFGS, CoordinatewiseLSTM, MomentMLP

    rule = weights if weights else CoordinatewiseLSTM()  # speed does not depend on the weights' values
    if name in ("gac", "ntm"):
        rule = LSTMGAC() if name == "gac" else NTMBFGS()
    if name in ("moments", "moments-eager"):  # the default weights, `general`
        from lightning_l2l.pretrained import available, resolve

        rule = resolve("general")[0] if "general" in available() else MomentMLP()
    return LearnedOptimizer.from_module(model, rule, chunk_size=chunk_size, compile=name == "compiled",
                                        fused=False if name in ("eager", "moments-eager") else None)


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    model = mlp(cfg["size"]).to(device)
    n = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = _make_optimizer(cfg["optimizer"], model, cfg["weights"], cfg["chunk_size"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sync()
        reset_peak(device)
        base = current_bytes(device)
        times = []
        for i in range(cfg["warmup"] + cfg["steps"]):
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if i == 0:
                first = time.perf_counter() - t0
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
        peak = peak_bytes(device) - base
    # LearnedOptimizer(compile=True) warns and runs eagerly where compilation fails: such a row is not compiled
    fell_back = any("torch.compile failed" in str(w.message) for w in seen)
    return {**cfg, "params": n, "step_s": sorted(times)[len(times) // 2], "first_step_s": first,
            "peak_bytes": max(peak, 0), "compile_fell_back": fell_back}


# ----------------------------------------------------------------------------------- machine


def bandwidth(device: torch.device, threads: int) -> float:
    """Bytes per second of a 256 MiB ``copy_`` (read + write), best of 5."""
    torch.set_num_threads(threads)
    a = torch.ones(64 << 20, device=device)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def matmul_rate(device: torch.device, threads: int) -> float:
    """FLOP/s of a float32 square matmul (2048 on CPU, 8192 on GPU), best of 5."""
    torch.set_num_threads(threads)
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rule_costs(weights: str | None, name: str = "learned") -> tuple[int, int]:
    """(state floats per coordinate, network FLOPs per coordinate) of the learned optimizer's rule.

    For ``gac`` and ``ntm`` the FLOPs are one pass of the network (the means, the replays of a
    chunked step and NTM-BFGS's memory products are not counted).
    """
    from lightning_l2l.nets import LSTMGAC, NTMBFGS, CoordinatewiseLSTM, MomentMLP, PerKindRule
    from lightning_l2l.pretrained import resolve

    if name == "moments":  # the MLP's matmuls and its head; the moment updates and features are elementwise
        rule = MomentMLP()  # the shape of `general`'s
        sizes = [rule.num_features] + [layer.out_features for layer in rule.mlp if isinstance(layer, nn.Linear)]
        flops = sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)) + 2 * sizes[-1] * 2
        return rule.state_size, flops
    if name in ("gac", "ntm"):
        rule = LSTMGAC() if name == "gac" else NTMBFGS()
    else:
        rule = resolve(weights)[0] if weights else CoordinatewiseLSTM()
    if isinstance(rule, PerKindRule):
        rule = rule.network_for("fc")
    assert isinstance(rule, (CoordinatewiseLSTM, LSTMGAC, NTMBFGS)), "the floor model covers the LSTM rules"
    flops, inputs = 0, 2 if rule.preprocessing == "log_sign" else 1
    inputs += isinstance(rule, NTMBFGS)  # the previous read
    for layer in range(rule.num_layers):
        fan = (inputs if layer == 0 else rule.hidden_size) + rule.hidden_size
        flops += 2 * fan * 4 * rule.hidden_size  # the four gates
    flops += 2 * rule.hidden_size  # output layer
    if isinstance(rule, NTMBFGS):
        flops += 2 * rule.hidden_size * (1 + 2 * rule.write_rank) + 2  # heads, the read's extra input
    return rule.init_state(0).shape[1:].numel(), flops


# -------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", nargs="+", default=["1", "all"],
                        help="CPU thread counts to measure at, 'all': every CPU this process may use (default: 1 all)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: by size, 3 at 10M)")
    parser.add_argument("--chunk-size", type=int, default=None, help="LearnedOptimizer chunk_size (default: its own)")
    parser.add_argument("--weights", default=None, help="weights for LearnedOptimizer (default: shipped quadratic)")
    parser.add_argument("--compile", action="store_true", help="also time LearnedOptimizer(compile=True)")
    parser.add_argument("--rules", nargs="+", choices=["lstm", "lstm-eager", "gac", "ntm", "moments", "moments-eager"],
                        default=["lstm"],
                        help="learned rules to time: lstm (the weights), lstm-eager (the same, fused=False), "
                             "gac (LSTMGAC()), ntm (NTMBFGS()), moments (the `general` weights, a MomentMLP), "
                             "moments-eager (the same, fused=False)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from lightning_l2l import pretrained
    weights = args.weights or ("quadratic" if "quadratic" in pretrained.available() else None)
    chunk = args.chunk_size
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    costs = {name: rule_costs(weights, name) for name in ("learned", "gac", "ntm", "moments")}
    costs["eager"] = costs["compiled"] = costs["learned"]
    costs["moments-eager"] = costs["moments"]
    learned = [{"lstm": "learned", "lstm-eager": "eager", "gac": "gac", "ntm": "ntm", "moments": "moments",
                "moments-eager": "moments-eager"}[r] for r in args.rules]
    all_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    thread_counts = list(dict.fromkeys(all_cpus if t == "all" else int(t) for t in args.threads))
    from lightning_l2l.nets._fused import fused_lstm_status

    why = fused_lstm_status()
    print(f"torch {torch.__version__}, CPU threads {thread_counts} of {all_cpus}, weights "
          f"{weights or 'random CoordinatewiseLSTM()'}, chunk_size {chunk or 'default'}, fused LSTM step on CPU: "
          f"{'yes' if why is None else 'no (' + why + ')'}")
    rows = []
    for device in devices:
        dev = torch.device(device)
        for threads in thread_counts if device == "cpu" else thread_counts[:1]:
            bw, rate = bandwidth(dev, threads), matmul_rate(dev, threads)
            print(f"{device}, {threads} threads: measured copy bandwidth {bw / 1e9:.1f} GB/s, "
                  f"float32 matmul {rate / 1e9:.0f} GFLOP/s")
            rows += _measure(args, device, threads, bw, rate, learned, costs, weights, chunk)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _measure(args: argparse.Namespace, device: str, threads: int, bw: float, rate: float, learned: list[str],
             costs: dict[str, tuple[int, int]], weights: str | None, chunk: int | None) -> list[dict[str, Any]]:
    """Every size and optimizer at one device and thread count, each in a fresh subprocess."""
    rows = []
    for size in args.sizes:
        for name in ("adam", *learned, *(("compiled",) if args.compile else ())):
            steps = args.steps or (3 if size >= 5e6 else 10 if size >= 5e5 else 50)
            cfg = dict(size=int(size), optimizer=name, device=device, threads=threads, steps=steps,
                       warmup=2 if name == "compiled" else 1, weights=weights, chunk_size=chunk)
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                                 text=True, check=False)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"worker failed for {cfg}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            n = row["params"]
            if name == "adam":
                bytes_moved, flops = n * 4 * 7, n * 12
            else:
                state_floats, net_flops = costs[name]
                bytes_moved, flops = n * 4 * (3 + 2 * state_floats), n * net_flops
            row.update(bandwidth=bw, matmul=rate, floor_mem_s=bytes_moved / bw, floor_flops_s=flops / rate)
            row["floor_s"] = max(row["floor_mem_s"], row["floor_flops_s"])
            rows.append(row)
            print(f"  {n:>10,d} params {name:8s} step {row['step_s'] * 1e3:9.2f} ms  "
                  f"peak +{row['peak_bytes'] / 2**20:8.1f} MiB  floor {row['floor_s'] * 1e3:8.2f} ms  "
                  f"first step {row['first_step_s'] * 1e3:9.1f} ms", flush=True)
    return rows


NAMES = {"adam": "Adam", "learned": "LearnedOptimizer", "compiled": "LearnedOptimizer (compile=True)",
         "eager": "LearnedOptimizer (fused=False)",
         "gac": "LearnedOptimizer, LSTMGAC()", "ntm": "LearnedOptimizer, NTMBFGS()",
         "moments": "LearnedOptimizer, general (MomentMLP)",
         "moments-eager": "LearnedOptimizer, general (MomentMLP), fused=False"}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown rows; "x Adam": the step over Adam's at the same device, threads and size (blank without one)."""
    adam = {(r["device"], r["threads"], r["params"]): r["step_s"] for r in rows if r["optimizer"] == "adam"}
    header = ["device", "threads", "params", "optimizer", "step (ms)", "first step (ms)", "peak memory added (MiB)",
              "memory floor (ms)", "FLOP floor (ms)", "x floor", "x Adam"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        base = adam.get((r["device"], r["threads"], r["params"]))
        x_adam = f"{r['step_s'] / base:.0f}" if base and r["optimizer"] != "adam" else ""
        lines.append(
            f"| {r['device']} | {r['threads']} | {r['params']:,} | {NAMES[r['optimizer']]}"
            f"{' (compilation failed: eager)' if r.get('compile_fell_back') else ''} | {r['step_s'] * 1e3:.2f} | "
            f"{r['first_step_s'] * 1e3:.1f} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{r['floor_mem_s'] * 1e3:.2f} | {r['floor_flops_s'] * 1e3:.2f} | {r['step_s'] / r['floor_s']:.1f} | {x_adam} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
