"""The cost of ``training.fit`` itself, this checkout against another git revision, side by side.

Each round starts one fresh process per tree (the revision's ``src/`` exported to a temporary
folder, and this checkout's), alternating, so drifting load on a shared machine hits both alike.
A process composes the config from its own tree's ``conf/``, builds the data set, model and
optimizer, fits once to warm up, then times ``--fits`` fits in CPU time of the process (one
torch thread, so waiting for a core another process holds is not counted); the figure kept per
tree is the minimum over all its fits (other processes only ever add time). Data come from this
checkout's cache, so no tree regenerates them.

    python benchmarks/bench_fit.py --baseline 2ec8bd3 [--rounds 5] [--fits 3] [-- overrides]

Overrides go to both trees, e.g. ``model=cnn trainer.epochs=10``; the default case is the
study's default trial (residual MLP, Adam, 25 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(tree: Path, overrides: list[str], fits: int) -> dict:
    """Run in a child: time ``fits`` fits of the composed config, with the tree's gradalign."""
    import torch

    import gradalign
    from gradalign.components import build_dataset, build_optimizer
    from gradalign.config import register_resolvers
    from gradalign.experiment import seeded_model
    from gradalign.report.configs import compose_config
    from gradalign.training import fit

    register_resolvers(tree)
    cfg = compose_config(
        tree / "conf", [f"paths.data_cache={ROOT / '.cache' / 'data'}", *overrides]
    )
    torch.set_num_threads(cfg.trainer.threads)
    splits = build_dataset(cfg)
    times = []
    for i in range(fits + 1):
        model = seeded_model(cfg, splits)
        optimizer = build_optimizer(cfg, model.parameters())
        start = time.process_time()
        fit(
            model,
            optimizer,
            splits,
            epochs=cfg.trainer.epochs,
            batch_size=cfg.trainer.batch_size,
            data_seed=cfg.seed.data,
            device="cpu",
        )
        if i:  # the first fit warms up the allocator and the kernels
            times.append(time.process_time() - start)
    return {"module": gradalign.__file__, "times": times}


def export(revision: str, folder: Path) -> Path:
    """``src/`` and ``conf/`` of ``revision`` under ``folder`` (a tree without its git data)."""
    archive = folder / "tree.tar"
    with archive.open("wb") as handle:
        subprocess.run(
            ["git", "archive", revision, "src", "conf"], cwd=ROOT, stdout=handle, check=True
        )
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    return folder / "tree"


def child(tree: Path, overrides: list[str], fits: int) -> dict:
    """Run ``measure`` in a fresh process that imports gradalign from ``tree/src``."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [
        sys.executable,
        __file__,
        "--child",
        str(tree),
        "--fits",
        str(fits),
        "--",
        *overrides,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["module"].startswith(str(tree / "src")):
        raise RuntimeError(f"{tree}: imported gradalign from {result['module']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fits", type=int, default=3, help="timed fits per process")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.overrides, args.fits)))
        return
    if args.baseline is None:
        parser.error("--baseline REV is required")
    print(f"load average {os.getloadavg()[0]:.2f}; overrides {args.overrides or 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {args.baseline: export(args.baseline, Path(tmp)), "this checkout": ROOT}
        best = {name: float("inf") for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                best[name] = min(best[name], *child(tree, args.overrides, args.fits)["times"])
    base, new = best[args.baseline], best["this checkout"]
    print(f"{'tree':<16}{'fit (min CPU s)':>16}")
    for name, seconds in best.items():
        print(f"{name:<16}{seconds:>15.3f}s")
    print(f"this checkout / {args.baseline}: {new / base:.3f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
