"""GAO under torch.distributed, each test in 2 gloo processes on 127.0.0.1 against a plain
single-process reference: FSDP2 (``fully_shard``, all granularities, even, uneven and empty
shards), a ``fully_shard`` training run checkpointed with DCP and resumed, a compiled step on it,
ZeroRedundancyOptimizer resume, and DDP. FSDP1 needs an accelerator to wrap a model: its refusal
is tested in test_optim.py on parameters flagged by FSDP1's own code. The code blocks of
docs/integrations.md are the code run here (the last test checks that they are).

Assertions run inside the ranks; a failure there fails the test with the rank's traceback.
"""

import os
import re
import socket
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_optim import TOL, grad_sequence, make_params
from torch import nn
from torch.nn import functional as F

from gradalign import GradientAlignmentOptimizer
from gradalign.optim.reference import ReferenceGAO

pytestmark = pytest.mark.slow
WORLD = 2
# No 0-d tensor (FSDP2 shards dim 0): 4 rows split 2+2, 5 rows 3+2, 1 row 1+0 (rank 1 holds no
# row at all).
SHAPES = [(4, 3), (5, 4), (5,), (3, 2, 2), (1, 6), (7,), (2,)]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def run_ranks(fn, *args):
    """Run fn(rank, *args) in WORLD processes that share a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(fn, port, args), nprocs=WORLD)


def _rank_main(rank, fn, port, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        fn(rank, *args)
        dist.barrier()  # no rank closes its connections while the other may still use them
    finally:
        dist.destroy_process_group()
    # The rank passed. Leave without the interpreter's finalisation: under load, gloo's worker
    # threads can still hold work objects then, whose teardown aborts the process ("terminate
    # called without an active exception", SIGABRT), which failed one test in two CI runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def assert_equal_on_all_ranks(t):
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t.contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered), gathered


class Params(nn.Module):
    def __init__(self, shapes=SHAPES, seed=0):
        super().__init__()
        self.ps = nn.ParameterList(make_params(shapes, seed=seed))


# --- FSDP2: the full-tensor cosine ----------------------------------------------------------------
def _fsdp2_matches_a_single_process(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for target in ("grad", "update"):
        for granularity in ("tensor", "global", "row"):
            for min_scale in (0.0, 0.3):
                model = Params()
                fully_shard(model, mesh=mesh)
                params = list(model.parameters())
                opt = GradientAlignmentOptimizer(
                    params,
                    "Adam",
                    lr=1e-2,
                    beta=0.8,
                    target=target,
                    granularity=granularity,
                    min_scale=min_scale,
                )
                ref_params = make_params(SHAPES)
                ref = ReferenceGAO(
                    torch.optim.Adam(ref_params, lr=1e-2), 0.8, target, granularity, min_scale
                )
                for grads in grad_sequence(SHAPES, steps=5):
                    for p, g, q in zip(params, grads, ref_params, strict=True):
                        p.grad = distribute_tensor(g, mesh, p.placements)
                        q.grad = g.clone()
                    opt.step()
                    ref.step()
                    for p, q in zip(params, ref_params, strict=True):
                        torch.testing.assert_close(p.full_tensor(), q.detach(), **TOL[q.dtype])
                        ema = opt.ema_state[p]
                        assert isinstance(ema, DTensor) and ema.placements == p.placements
                        assert ema.to_local().shape == p.to_local().shape  # no full-size copy
                        torch.testing.assert_close(ema.full_tensor(), ref.ema[q], **TOL[q.dtype])
                    torch.testing.assert_close(
                        opt.last_scales.double(), ref.last_scales, rtol=1e-6, atol=1e-7
                    )
                    assert_equal_on_all_ranks(opt.last_scales)


def test_fsdp2_gives_the_full_tensor_cosine_of_a_single_process():
    run_ranks(_fsdp2_matches_a_single_process)


# --- FSDP2 training, a DCP checkpoint, a bit-identical resume -------------------------------------
def _make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 15), nn.Tanh(), nn.Linear(15, 3)).double()


def _batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


def _one_process_reference(steps):
    """The model and GAO trained in one process on every rank's batches of each step (the mean
    of the ranks' mean losses): what data-parallel training of the same steps must give."""
    plain = _make_model(seed=0)
    plain_opt = GradientAlignmentOptimizer(plain.parameters(), "Adam", lr=1e-2, beta=0.9)
    for step in range(steps):
        batches = [_batch(step, r) for r in range(WORLD)]
        loss = sum(F.cross_entropy(plain(x), y) for x, y in batches) / WORLD
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
    return plain, plain_opt


def _train(model, opt, steps, rank):
    for step in steps:
        x, y = _batch(step, rank)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sharded(model):
    # docs/integrations.md: FSDP2
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = GradientAlignmentOptimizer(model.parameters(), "Adam", lr=1e-2, beta=0.9)
    return model, opt


def _save(model, opt, checkpoint_dir):
    # docs/integrations.md: DCP save
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)


def _load(model, opt, checkpoint_dir):
    # docs/integrations.md: DCP load
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _fsdp2_dcp_resume(rank, checkpoint_dir):
    model, opt = _sharded(_make_model(seed=0))
    _train(model, opt, range(3), rank)
    _save(model, opt, checkpoint_dir)
    _train(model, opt, range(3, 6), rank)

    resumed, resumed_opt = _sharded(_make_model(seed=1))  # other weights, all overwritten
    _load(resumed, resumed_opt, checkpoint_dir)
    _train(resumed, resumed_opt, range(3, 6), rank)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p.to_local(), q.to_local())
        assert torch.equal(opt.ema_state[p].to_local(), resumed_opt.ema_state[q].to_local())
    assert torch.equal(opt.last_scales, resumed_opt.last_scales)
    assert_equal_on_all_ranks(opt.last_scales)

    # The same 6 steps in one process on both ranks' batches (the mean of the ranks' mean losses).
    plain, plain_opt = _one_process_reference(steps=6)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(opt.last_scales, plain_opt.last_scales, rtol=1e-6, atol=1e-7)


def test_fully_shard_training_resumes_bit_identically_from_a_dcp_checkpoint(tmp_path):
    run_ranks(_fsdp2_dcp_resume, str(tmp_path / "checkpoint"))


def _fsdp2_compiled_step(rank):
    model, opt = _sharded(_make_model(seed=0))
    eager_model, eager_opt = _sharded(_make_model(seed=0))
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    seen = []
    for step in range(3):
        x, y = _batch(step, rank)
        runs = ((model, opt, compiled_step), (eager_model, eager_opt, eager_opt.step))
        for net, optimizer, step_fn in runs:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            step_fn()
        torch.testing.assert_close(opt.last_scales, eager_opt.last_scales, rtol=0, atol=1e-6)
        for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
            torch.testing.assert_close(p.to_local(), q.to_local(), rtol=0, atol=1e-6)
        assert_equal_on_all_ranks(opt.last_scales)
        seen.append(opt.last_scales.clone())
    assert not torch.equal(seen[1], seen[2])


def test_a_compiled_step_under_fully_shard_matches_eager():
    """torch.compile(opt.step) (aot_eager: Dynamo's tracing, no C++ build) on DTensor
    parameters: within 1e-6 of the eager step, last_scales updated and equal on both ranks."""
    run_ranks(_fsdp2_compiled_step)


# --- ZeroRedundancyOptimizer ----------------------------------------------------------------------
def _zero(params, granularity):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(
        params,
        optimizer_class=GradientAlignmentOptimizer,
        base="Adam",
        lr=1e-2,
        beta=0.8,
        granularity=granularity,
    )


def _zero_resume(rank, path):
    shapes = [(5, 4), (5,), (3, 2, 2), (), (1, 6), (7,)]
    seq = grad_sequence(shapes, steps=6)
    for granularity in ("tensor", "row"):
        params = make_params(shapes)
        opt = _zero(params, granularity)
        ref_params = make_params(shapes)
        ref = ReferenceGAO(torch.optim.Adam(ref_params, lr=1e-2), 0.8, "grad", granularity, 0.0)
        for step, grads in enumerate(seq):
            for p, q, g in zip(params, ref_params, grads, strict=True):
                p.grad, q.grad = g.clone(), g.clone()  # what DDP's averaging would give each rank
            opt.step()
            ref.step()
            for p, q in zip(params, ref_params, strict=True):
                torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float64])
            if step == 2:
                opt.consolidate_state_dict(to=0)
                if rank == 0:
                    torch.save({"opt": opt.state_dict(), "params": params}, path)
                dist.barrier()
        checkpoint = torch.load(path, weights_only=True)
        resumed = [nn.Parameter(p.detach().clone()) for p in checkpoint["params"]]
        resumed_opt = _zero(resumed, granularity)
        resumed_opt.load_state_dict(checkpoint["opt"])
        for grads in seq[3:]:
            for p, g in zip(resumed, grads, strict=True):
                p.grad = g.clone()
            resumed_opt.step()
        for p, q in zip(params, resumed, strict=True):
            assert torch.equal(p, q)
        dist.barrier()


def test_zero_redundancy_optimizer_resume_carries_the_ema(tmp_path):
    run_ranks(_zero_resume, str(tmp_path / "zero.pt"))


# --- DDP ------------------------------------------------------------------------------------------
def _ddp_matches_a_single_process(rank):
    model = _make_model(seed=0)
    # docs/integrations.md: DDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(model)
    opt = GradientAlignmentOptimizer(model.parameters(), "Adam", lr=1e-2, beta=0.9)

    _train(model, opt, range(4), rank)
    plain, plain_opt = _one_process_reference(steps=4)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-11)
        assert_equal_on_all_ranks(p.detach())
    assert_equal_on_all_ranks(opt.last_scales)


def test_ddp_matches_a_single_process():
    run_ranks(_ddp_matches_a_single_process)


# --- the docs' snippets are the code above --------------------------------------------------------
def _python_blocks(markdown):
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.mark.parametrize("title", ["DDP", "FSDP2", "DCP save", "DCP load"])
def test_the_integration_snippets_are_the_code_these_tests_run(title):
    """Each docs/integrations.md block titled ``# <title>`` appears, line for line, in this file
    after a ``# docs/integrations.md: <title>`` marker."""
    blocks = [b for b in _python_blocks(DOCS.read_text()) if b.startswith(f"# {title}\n")]
    assert len(blocks) == 1, f"docs/integrations.md has {len(blocks)} blocks titled {title!r}"
    doc_lines = blocks[0].splitlines()[1:]
    source = Path(__file__).read_text().splitlines()
    marked = f"# docs/integrations.md: {title}"
    marker = next(i for i, line in enumerate(source) if line.strip() == marked)
    tested = textwrap.dedent("\n".join(source[marker + 1 : marker + 1 + len(doc_lines)]))
    assert tested.splitlines() == doc_lines
