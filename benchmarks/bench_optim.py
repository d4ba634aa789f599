"""Cost of GAO on top of its base optimizer, measured side by side in one process.

Prints ratios against plain Adam for
  1. a whole training step (forward, backward, step) of the seed's MLP (mnist1d paper's MLP,
     40-100-100-10, residual) at batch 100, and a whole epoch of 4000 samples;
  2. the optimizer step alone on a model of >= 10 M parameters;
and the speedup over a naive per-tensor Python loop (what the note's own implementation most
likely was). ``*_compiled`` variants call ``torch.compile(opt.step)`` (compiled in the warm-up,
not timed). Variants are interleaved round-robin and the median over rounds is reported, so a
noisy shared machine slows all of them alike; on a CPU with 1 thread the clock is the process's
CPU time (time waiting for a core on a shared machine is not counted), else wall time.

    python benchmarks/bench_optim.py            # 1 thread, as the issue's targets are stated
    python benchmarks/bench_optim.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradalign import GradientAlignmentOptimizer
from gradalign.models.mlp import MLP

CLOCK = time.perf_counter  # main() picks the clock


class NaiveGAO:
    """The note's algorithm as a plain per-tensor loop: one small kernel chain per parameter."""

    def __init__(self, base: torch.optim.Optimizer, beta: float) -> None:
        self.base, self.beta, self.ema = base, beta, {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.base.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.ema.setdefault(p, torch.zeros_like(p))
                m.mul_(self.beta).add_(p.grad, alpha=1 - self.beta)
                cos = F.cosine_similarity(p.grad.flatten(), m.flatten(), dim=0)
                p.grad.mul_(cos.clamp(0, 1))
        self.base.step()


def make_optimizer(kind: str, params, lr: float = 1e-3):
    """The variant's optimizer and the step function to time (compiled for ``*_compiled``)."""
    name = kind.removesuffix("_compiled")
    if name == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif name == "adam_fused":
        opt = torch.optim.Adam(params, lr=lr, fused=True)
    elif name.startswith("gao_"):
        opt = GradientAlignmentOptimizer(params, "Adam", lr=lr, beta=0.99, target=name[4:])
    elif name == "naive":
        opt = NaiveGAO(torch.optim.Adam(params, lr=lr), beta=0.99)
    else:
        raise ValueError(kind)
    return opt, torch.compile(opt.step) if kind.endswith("_compiled") else opt.step


def interleaved(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each runner, calling them round-robin."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = CLOCK()
            run()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_training(kinds: list[str], device: torch.device, rounds: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(4000, 40, device=device)
    y = torch.randint(0, 10, (4000,), device=device)
    model0 = MLP(  # the model the pipeline trains by default (conf/model/mlp.yaml)
        input_shape=[40], n_classes=10, hidden=[100, 100], residual=True
    ).to(device)
    steps_per_call = 40
    runners = {}
    for kind in kinds:
        model = copy.deepcopy(model0)
        opt, step = make_optimizer(kind, model.parameters())

        def run(model=model, opt=opt, step=step) -> None:
            for i in range(steps_per_call):
                xb, yb = x[i * 100 % 4000 :][:100], y[i * 100 % 4000 :][:100]
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                step()
            sync(device)

        run()  # warm-up: lazy state, allocator
        runners[kind] = run
    medians = interleaved(runners, rounds)
    base = medians["adam"]
    print(f"\n[1] seed MLP (40-100-100-10, residual), batch 100, whole training step, {device}")
    for kind, t in medians.items():
        per_step = t / steps_per_call * 1e6
        epoch_ms = t / steps_per_call * 40 * 1e3
        ratio = t / base
        print(f"  {kind:17s} {per_step:8.1f} us/step {epoch_ms:7.2f} ms/epoch  x adam {ratio:5.3f}")


def bench_step_only(kinds: list[str], device: torch.device, rounds: int) -> None:
    torch.manual_seed(0)
    shapes = [(2048, 2048), (2048,), (2048, 2048), (2048,), (1024, 2048), (1024,)]
    n = sum(torch.Size(s).numel() for s in shapes)
    runners, optimizers = {}, {}
    for kind in kinds:
        params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizers[kind], step = make_optimizer(kind, params)

        def run(step=step) -> None:
            step()
            sync(device)

        run()
        runners[kind] = run
    medians = interleaved(runners, rounds)
    base = medians["adam"]
    gao = optimizers["gao_grad"]
    params = [p for group in gao.param_groups for p in group["params"]]
    ema_bytes = sum(t.numel() * t.element_size() for t in gao.ema_state.values())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    print(
        f"\n[2] optimizer step alone, {n / 1e6:.1f} M parameters in {len(shapes)} tensors, {device}"
    )
    for kind, t in medians.items():
        print(f"  {kind:17s} {t * 1e3:8.2f} ms/step  ratio to adam {t / base:5.3f}")
    print(
        f"  GAO state kept between steps: {len(gao.ema_state)} EMA tensors for {len(params)} "
        f"parameters, {ema_bytes / param_bytes:.2f}x the parameters' bytes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global CLOCK
    cpu_time = device.type == "cpu" and args.threads == 1
    CLOCK = time.process_time if cpu_time else time.perf_counter
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds, "
        f"{'CPU' if cpu_time else 'wall'} time"
    )
    kinds = ["adam", "gao_grad", "gao_update", "gao_grad_compiled", "naive"]
    if device.type == "cpu":
        kinds.insert(1, "adam_fused")
    bench_training(kinds, device, args.rounds)
    bench_step_only(kinds, device, max(5, args.rounds // 3))
    print(
        "\nratios are medians of interleaved rounds; 'naive' is a per-tensor Python loop of the "
        "same algorithm"
    )


if __name__ == "__main__":
    main()
