"""gradalign.optim: GradientAlignmentOptimizer against the plain reference (the definition,
gradalign.optim.reference), and as a first-class torch.optim optimizer (schedulers, closures,
hooks, GradScaler, checkpoints, dtypes). PyTorch's own generic optimizer checks run on it in
test_optim_generic.py.

Only the public behaviour is tested: the internals (flat buffers, fast and per-tensor paths) are
free to change.
"""

import copy
import itertools
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradalign import GradientAlignmentOptimizer as GAO
from gradalign.optim.reference import ReferenceGAO

TARGETS = ["grad", "update"]
GRANULARITIES = ["tensor", "global", "row"]
# Shapes cover 0-d, 1-d (biases), 2-d and 3-d tensors, with a 1-row matrix among them.
SHAPES = [(5, 4), (5,), (3, 2, 2), (), (1, 6), (7,)]
BASES = {
    "Adam": (torch.optim.Adam, {"lr": 1e-2}),
    "AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "RMSprop": (torch.optim.RMSprop, {"lr": 1e-2}),
}
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    ),
]


# --- helpers ------------------------------------------------------------------------------------
def make_params(shapes=SHAPES, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device))
        for s in shapes
    ]


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


AMPLITUDES = [1.0, 0.8, -0.5, 1.2, -0.3, 1.0, 0.1, -1.0]


def grad_sequence(shapes, steps, seed=1, dtype=torch.float64):
    """Gradients along a fixed direction with amplitudes that flip sign, plus noise, so that the
    cosines with the EMA span [-1, 1] (clamped at 0 and at 0.3 for every granularity)."""
    g = torch.Generator().manual_seed(seed)
    direction = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    seq = []
    for step in range(steps):
        amp = AMPLITUDES[step % len(AMPLITUDES)]
        seq.append(
            [
                (amp * d + 0.7 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)
                for d, s in zip(direction, shapes, strict=True)
            ]
        )
    return seq


def set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone().to(p.device)


def mlp(seed=0, dtype=torch.float32, sizes=(12, 16, 16, 4)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def batch(step, n=32, dtype=torch.float32, in_dim=12, n_classes=4):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, in_dim, generator=g).to(dtype)
    return x, torch.randint(0, n_classes, (n,), generator=g)


def train_step(model, opt, step, dtype=torch.float32):
    x, y = batch(step, dtype=dtype)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def assert_params_close(actual, expected, dtype):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.detach(), e.detach(), **TOL[dtype])


# --- 1. against the reference -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("min_scale", [0.0, 0.3])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_matches_reference(target, granularity, min_scale, base, dtype):
    base_cls, kwargs = BASES[base]
    params = make_params(dtype=dtype)
    ref_params = clone_params(params)
    opt = GAO(
        base_cls(params, **kwargs),
        beta=0.8,
        target=target,
        granularity=granularity,
        min_scale=min_scale,
    )
    ref = ReferenceGAO(base_cls(ref_params, **kwargs), 0.8, target, granularity, min_scale)
    seen = []
    for grads in grad_sequence(SHAPES, steps=6, dtype=dtype):
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_params_close(params, ref_params, dtype)
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(opt.ema_state[p], ref.ema[q], **TOL[dtype])
        assert opt.last_scales.shape == (len(params),)
        torch.testing.assert_close(
            opt.last_scales.cpu().double(), ref.last_scales, rtol=1e-5, atol=1e-6
        )
        seen.append(ref.last_scales)
    seen = torch.stack(seen)
    # The sequence exercises the clamp at both ends and the interior.
    assert (seen == min_scale).any() or granularity == "row"
    assert ((seen > min_scale) & (seen < 1.0)).any()


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_matches_reference_with_missing_grads(target, granularity, beta):
    """Steps where some gradients are None (per-tensor path) interleaved with full steps."""
    base_cls, kwargs = BASES["Adam"]
    params = make_params()
    ref_params = clone_params(params)
    opt = GAO(base_cls(params, **kwargs), beta=beta, target=target, granularity=granularity)
    ref = ReferenceGAO(base_cls(ref_params, **kwargs), beta, target, granularity, 0.0)
    masks = [
        [1, 1, 1, 1, 1, 1],
        [1, 0, 1, 0, 1, 1],
        [0, 1, 0, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    for mask, grads in zip(masks, grad_sequence(SHAPES, steps=len(masks)), strict=True):
        grads = [g if keep else None for g, keep in zip(grads, mask, strict=True)]
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_params_close(params, ref_params, torch.float64)
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(opt.ema_state[p], ref.ema[q], **TOL[torch.float64])
        torch.testing.assert_close(
            opt.last_scales.double(), ref.last_scales, rtol=1e-6, atol=1e-7, equal_nan=True
        )
        assert [bool(math.isnan(s)) for s in opt.last_scales.tolist()] == [not k for k in mask]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_step_without_any_gradient_reports_nan_scales_and_changes_nothing(granularity):
    """The last step's scales must not linger: a logger would average them in again."""
    params = make_params()
    opt = GAO(torch.optim.SGD(params, lr=0.1), beta=0.9, granularity=granularity)
    set_grads(params, grad_sequence(SHAPES, steps=1)[0])
    opt.step()
    assert not torch.isnan(opt.last_scales).any()
    emas = {p: m.clone() for p, m in opt.ema_state.items()}
    before = clone_params(params)
    set_grads(params, [None] * len(params))
    opt.step()
    assert opt.last_scales.shape == (len(params),) and torch.isnan(opt.last_scales).all()
    assert all(torch.equal(opt.ema_state[p], emas[p]) for p in params)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_matches_reference_with_mixed_dtypes_and_groups(target, granularity):
    """float32 and float64 parameters in two param groups with different learning rates."""
    shapes = [(4, 3), (4,), (2, 5), (5,)]
    params = [
        p.to(dt)
        for p, dt in zip(
            make_params(shapes),
            [torch.float64, torch.float32, torch.float32, torch.float64],
            strict=True,
        )
    ]
    params = [nn.Parameter(p.detach()) for p in params]
    ref_params = clone_params(params)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-2}]

    opt = GAO(
        groups(params), torch.optim.Adam, lr=1e-2, beta=0.7, target=target, granularity=granularity
    )
    ref = ReferenceGAO(torch.optim.Adam(groups(ref_params), lr=1e-2), 0.7, target, granularity, 0.0)
    for i, grads in enumerate(grad_sequence(shapes, steps=5)):
        if i == 2:
            grads[1] = None
        grads = [None if g is None else g.to(p.dtype) for g, p in zip(grads, params, strict=True)]
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_params_close(params, ref_params, torch.float32)
        torch.testing.assert_close(
            opt.last_scales.double(), ref.last_scales, rtol=1e-5, atol=1e-6, equal_nan=True
        )
    assert [opt.ema_state[p].dtype for p in params] == [p.dtype for p in params]


# --- 1b. stacked models (stack_dims) ------------------------------------------------------------
K_MODELS = 3


def stacked(per_model):
    """Each model's tensors stacked along a new dim 0, as torch.func.stack_module_state does."""
    return [nn.Parameter(torch.stack(ts).detach().clone()) for ts in zip(*per_model, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("base", ["Adam", "SGD"])
@pytest.mark.parametrize("min_scale", [0.0, 0.3])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_stacked_models_each_match_the_reference_alone(target, granularity, min_scale, base, dtype):
    """stack_dims=1 over K models' stacked tensors steps each model as the plain per-tensor
    reference steps it alone, and last_scales[:, k] is model k's."""
    base_cls, kwargs = BASES[base]
    models = [make_params(dtype=dtype, seed=k) for k in range(K_MODELS)]
    refs = [
        ReferenceGAO(base_cls(params, **kwargs), 0.8, target, granularity, min_scale)
        for params in models
    ]
    together = stacked(models)
    opt = GAO(
        base_cls(together, **kwargs),
        beta=0.8,
        target=target,
        granularity=granularity,
        min_scale=min_scale,
        stack_dims=1,
    )
    sequences = [grad_sequence(SHAPES, steps=6, seed=10 + k, dtype=dtype) for k in range(K_MODELS)]
    for step_grads in zip(*sequences, strict=True):
        for params, ref, grads in zip(models, refs, step_grads, strict=True):
            set_grads(params, grads)
            ref.step()
        set_grads(together, [torch.stack(gs) for gs in zip(*step_grads, strict=True)])
        opt.step()
        for k, (params, ref) in enumerate(zip(models, refs, strict=True)):
            assert_params_close([p[k] for p in together], params, dtype)
            torch.testing.assert_close(
                opt.last_scales[:, k].double(), ref.last_scales, rtol=1e-5, atol=1e-6
            )
        assert opt.last_scales.shape == (len(SHAPES), K_MODELS)
    scales = torch.stack([ref.last_scales for ref in refs])
    assert not torch.equal(scales[0], scales[1])  # the models' own cosines, not a shared one


@pytest.mark.parametrize("target", TARGETS)
def test_stacked_tensor_granularity_is_row_over_dim_0(target):
    """Per model and tensor over stacked tensors of >= 2 dims is what granularity "row" computes
    over dim 0 without stacking: bit for bit."""
    shapes = [s for s in SHAPES if len(s) >= 1]
    models = [make_params(shapes, dtype=torch.float32, seed=k) for k in range(K_MODELS)]
    a, b = stacked(models), stacked(models)
    per_model = GAO(torch.optim.Adam(a, lr=1e-2), target=target, stack_dims=1)
    by_row = GAO(torch.optim.Adam(b, lr=1e-2), target=target, granularity="row")
    for step in range(4):
        grads = [
            torch.stack(gs)
            for gs in zip(
                *(grad_sequence(shapes, 4, seed=k, dtype=torch.float32)[step] for k in range(3)),
                strict=True,
            )
        ]
        set_grads(a, grads)
        set_grads(b, grads)
        per_model.step()
        by_row.step()
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_stacked_missing_gradients_give_nan_rows(granularity):
    models = [make_params(seed=k) for k in range(K_MODELS)]
    together = stacked(models)
    opt = GAO(torch.optim.SGD(together, lr=0.1), granularity=granularity, stack_dims=1)
    grads = [torch.randn(p.shape, dtype=p.dtype) for p in together]
    set_grads(together, [None, *grads[1:]])
    opt.step()
    assert torch.isnan(opt.last_scales[0]).all()
    assert (opt.last_scales[1:] == 1.0).all()  # a first step's EMA points along its gradient
    set_grads(together, [None] * len(together))
    opt.step()
    assert opt.last_scales.shape == (len(SHAPES), K_MODELS)
    assert torch.isnan(opt.last_scales).all()


@pytest.mark.parametrize("stack_dims", [-1, 1.5, True, "1"])
def test_invalid_stack_dims_raises_value_error_naming_it(stack_dims):
    with pytest.raises(ValueError, match=rf"stack_dims={re.escape(repr(stack_dims))} is not"):
        GAO(make_params(), "Adam", lr=1e-3, stack_dims=stack_dims)


def test_parameters_that_do_not_share_the_models_dims_are_refused():
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(4, 2\) does not fit"):
        GAO([torch.zeros(3, 2), torch.zeros(4, 2)], "SGD", lr=0.1, stack_dims=1)
    with pytest.raises(ValueError, match=r"parameter 0 of shape \(3,\) does not fit stack_dims=2"):
        GAO([torch.zeros(3)], "SGD", lr=0.1, stack_dims=2)
    opt = GAO([torch.zeros(3, 2)], "SGD", lr=0.1, stack_dims=1)
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(2,\) does not fit"):
        opt.add_param_group({"params": [torch.zeros(2)]})
    assert len(opt.param_groups) == 1


# --- 2. invariants ------------------------------------------------------------------------------
@pytest.mark.parametrize("min_scale", [0.0, 0.3])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_scales_stay_in_range(granularity, min_scale):
    params = make_params(dtype=torch.float32)
    opt = GAO(params, "Adam", lr=1e-2, beta=0.9, granularity=granularity, min_scale=min_scale)
    for grads in grad_sequence(SHAPES, steps=12, dtype=torch.float32):
        set_grads(params, grads)
        opt.step()
        s = opt.last_scales
        assert s.dtype == torch.float32 and torch.isfinite(s).all()
        assert (s >= min_scale).all() and (s <= 1.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999])
def test_first_step_scale_is_one(beta, granularity, dtype):
    params = make_params(dtype=dtype)
    opt = GAO(params, "SGD", lr=0.1, beta=beta, granularity=granularity)
    set_grads(params, grad_sequence(SHAPES, 1, dtype=dtype)[0])
    opt.step()
    torch.testing.assert_close(opt.last_scales, torch.ones(len(params)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("min_scale", [0.0, 0.3])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradient_opposite_to_ema_gets_min_scale(granularity, min_scale):
    """g, then -k*g with k < beta: the EMA still points along g, so cos = -1 and s = min_scale.

    (With k > beta the new gradient dominates the EMA and cos = +1.)
    """
    params = make_params(dtype=torch.float64)
    grads = grad_sequence(SHAPES, 1)[0]
    opt = GAO(params, "SGD", lr=0.1, beta=0.9, granularity=granularity, min_scale=min_scale)
    set_grads(params, grads)
    opt.step()
    set_grads(params, [-0.5 * g for g in grads])
    opt.step()
    torch.testing.assert_close(
        opt.last_scales, torch.full((len(params),), min_scale), rtol=0, atol=1e-7
    )


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_gradient_gives_zero_scale_and_no_nan(granularity, target):
    params = make_params(dtype=torch.float32)
    opt = GAO(params, "Adam", lr=1e-2, beta=0.9, target=target, granularity=granularity)
    set_grads(params, [torch.zeros_like(p) for p in params])  # EMA and gradient both zero
    opt.step()
    assert torch.equal(opt.last_scales, torch.zeros(len(params)))
    set_grads(params, grad_sequence(SHAPES, 1, dtype=torch.float32)[0])
    opt.step()
    set_grads(params, [torch.zeros_like(p) for p in params])  # gradient zero, EMA not
    opt.step()
    assert torch.equal(opt.last_scales, torch.zeros(len(params)))
    for p in params:
        assert torch.isfinite(p).all() and torch.isfinite(opt.ema_state[p]).all()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_gradient_scale_is_zero_even_with_min_scale(granularity):
    """The docstring: "a zero gradient or EMA gives s = 0 whatever eps is", and the method: "s = 0
    when a norm is 0". min_scale is the clamp of the cosine, it must not turn "no gradient
    information" into a positive step. This matters for target="update" (Adam's momentum keeps
    moving a parameter whose gradient is zero, e.g. a dead ReLU unit's row)."""
    params = make_params(dtype=torch.float64)
    opt = GAO(
        params, "Adam", lr=1e-2, beta=0.9, target="update", granularity=granularity, min_scale=0.3
    )
    set_grads(params, grad_sequence(SHAPES, 1)[0])
    opt.step()
    before = [p.detach().clone() for p in params]
    set_grads(params, [torch.zeros_like(p) for p in params])
    opt.step()
    assert torch.equal(opt.last_scales, torch.zeros(len(params)))
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)  # s = 0 with target="update": no change at all


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("base", list(BASES))
def test_update_target_with_beta_zero_is_the_base_bit_for_bit(base, granularity):
    """beta=0 makes m = g, so s = 1 and the update is exactly the base optimizer's.

    This needs cos(g, g) == 1.0 exactly: dot / sqrt(g.g * m.m) with the three dot products taken
    by the same kernel gives it (sqrt(fl(x * x)) == x in IEEE arithmetic); dot / (|g| * |m|) is
    1 +- 1 ulp, and a scale of 1 - 1 ulp moves parameters near zero by one ulp."""
    base_cls, kwargs = BASES[base]
    for dtype in (torch.float32, torch.float64):
        params = make_params(dtype=dtype)
        plain_params = clone_params(params)
        opt = GAO(base_cls(params, **kwargs), beta=0.0, target="update", granularity=granularity)
        plain = base_cls(plain_params, **kwargs)
        for grads in grad_sequence(SHAPES, steps=8, dtype=dtype):
            set_grads(params, grads)
            set_grads(plain_params, grads)
            opt.step()
            plain.step()
            for p, q in zip(params, plain_params, strict=True):
                assert torch.equal(p, q), (dtype, (p - q).abs().max())


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("base", list(BASES))
def test_grad_target_with_constant_direction_is_the_base(base, granularity):
    """Gradients c_t * d with c_t > 0 keep the EMA along d: s = 1 up to rounding."""
    base_cls, kwargs = BASES[base]
    params = make_params()
    plain_params = clone_params(params)
    opt = GAO(base_cls(params, **kwargs), beta=0.9, target="grad", granularity=granularity)
    plain = base_cls(plain_params, **kwargs)
    direction = grad_sequence(SHAPES, 1)[0]
    for c in (1.0, 0.3, 2.0, 0.01, 5.0):
        set_grads(params, [c * d for d in direction])
        set_grads(plain_params, [c * d for d in direction])
        opt.step()
        plain.step()
        torch.testing.assert_close(opt.last_scales, torch.ones(len(params)), rtol=0, atol=1e-6)
    assert_params_close(params, plain_params, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("factor", [1e-6, 1e6])
def test_scales_do_not_depend_on_gradient_magnitude(factor, granularity, dtype):
    """The cosine is scale-invariant: eps must only guard the division, not bias small grads."""
    seq = grad_sequence(SHAPES, steps=4, dtype=dtype)
    scales = []
    for c in (1.0, factor):
        params = make_params(dtype=dtype)
        opt = GAO(params, "SGD", lr=0.0, beta=0.8, granularity=granularity)
        for grads in seq:
            set_grads(params, [c * g for g in grads])
            opt.step()
        scales.append(opt.last_scales)
    torch.testing.assert_close(scales[0], scales[1], rtol=1e-5, atol=1e-6)


# --- 3. construction ----------------------------------------------------------------------------
def test_construct_from_instance():
    params = make_params()
    base = torch.optim.Adam(params, lr=1e-3)
    opt = GAO(base, beta=0.99)
    assert opt.base is base and opt.beta == 0.99
    assert (opt.target, opt.granularity, opt.min_scale) == ("grad", "tensor", 0.0)
    assert opt.cos_eps > 0


@pytest.mark.parametrize("base", [torch.optim.SGD, "SGD", "torch.optim.SGD"])
def test_construct_from_params_and_class_or_name(base):
    params = make_params()
    opt = GAO(
        params,
        base,
        lr=0.05,
        momentum=0.5,
        beta=0.5,
        target="update",
        granularity="row",
        min_scale=0.2,
        cos_eps=1e-12,
    )
    assert type(opt.base) is torch.optim.SGD
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["momentum"] == 0.5
    assert opt.param_groups[0]["params"] == params
    assert (opt.beta, opt.target, opt.granularity, opt.min_scale, opt.cos_eps) == (
        0.5,
        "update",
        "row",
        0.2,
        1e-12,
    )


def test_construct_from_name_adam():
    opt = GAO(make_params(), "Adam", lr=1e-3, betas=(0.8, 0.9))
    assert type(opt.base) is torch.optim.Adam and opt.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"beta": -0.1}, "-0.1"),
        ({"beta": 1.0}, "1.0"),
        ({"beta": 1.5}, "1.5"),
        ({"target": "weights"}, "weights"),
        ({"granularity": "layer"}, "layer"),
        ({"min_scale": -0.1}, "-0.1"),
        ({"min_scale": 1.5}, "1.5"),
        ({"cos_eps": 0}, "0"),
        ({"cos_eps": -1e-8}, "-1e-08"),
    ],
)
def test_invalid_options_raise_value_error_naming_the_value(kwargs, shown):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(shown)}"):
        GAO(make_params(), "Adam", lr=1e-3, **kwargs)
    with pytest.raises(ValueError, match=re.escape(shown)):
        GAO(torch.optim.Adam(make_params(), lr=1e-3), **kwargs)


@pytest.mark.parametrize(
    "base", ["NoSuchOptimizer", "torch.optim.NoSuch", "nosuchpkg.Adam", None, nn.Linear, 3]
)
def test_unknown_base_raises_value_error(base):
    with pytest.raises(ValueError, match=re.escape(repr(base))):
        GAO(make_params(), base, lr=1e-3)


@pytest.mark.parametrize(
    ("base", "kwargs"), [(None, {"lr": 0.1}), ("SGD", {}), (torch.optim.SGD, {"lr": 0.1})]
)
def test_instance_with_base_or_base_kwargs_is_a_type_error(base, kwargs):
    with pytest.raises(TypeError):
        GAO(torch.optim.SGD(make_params(), lr=0.1), base, **kwargs)


# --- 4. first-class behaviour -------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.2, total_steps=10, cycle_momentum=False
    ),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7),
        ],
        milestones=[3],
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, factor=0.5, patience=0
    ),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_drive_the_base_lr(name, target):
    p = nn.Parameter(torch.randn(6, dtype=torch.float64))
    g = torch.randn(6, dtype=torch.float64)
    opt = GAO(torch.optim.SGD([p], lr=0.1), beta=0.9, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = SCHEDULERS[name](opt)
        lrs = []
        for step in range(8):
            lr = opt.base.param_groups[0]["lr"]
            lrs.append(lr)
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            # Constant gradient: s = 1 (up to rounding), so the SGD step is exactly -lr * g.
            torch.testing.assert_close(opt.last_scales, torch.ones(1), rtol=0, atol=1e-6)
            torch.testing.assert_close(p.detach() - before, -lr * g, rtol=1e-6, atol=1e-12)
            if name == "ReduceLROnPlateau":
                sched.step(float(step))  # a loss that never improves
            else:
                sched.step()
            assert opt.base.param_groups[0]["lr"] == sched.get_last_lr()[0]
            assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
    assert len(set(lrs)) > 2  # the schedule really moved the lr


def test_scheduler_order_warning_still_fires_when_misused():
    """The wrapper must not hide torch's own check (it proves the test above can fail)."""
    opt = GAO([nn.Parameter(torch.randn(3))], "SGD", lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.warns(UserWarning, match=re.escape("before `optimizer.step()`")):
        sched.step()


def test_one_cycle_cycles_the_base_momentum():
    opt = GAO(make_params(), "Adam", lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    betas = [opt.base.param_groups[0]["betas"][0]]
    for _ in range(3):
        set_grads(opt.param_groups[0]["params"], grad_sequence(SHAPES, 1)[0])
        opt.step()
        sched.step()
        betas.append(opt.base.param_groups[0]["betas"][0])
    assert len(set(betas)) == len(betas)


def test_is_an_optimizer_sharing_the_base_groups_and_state():
    params = make_params()
    opt = GAO(params, "Adam", lr=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base.param_groups
    assert opt.state is opt.base.state
    assert opt.defaults == opt.base.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert opt.base.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_add_param_group(target, granularity):
    params = make_params(SHAPES[:2])
    opt = GAO(params, "Adam", lr=1e-2, target=target, granularity=granularity)
    set_grads(params, grad_sequence(SHAPES[:2], 1)[0])
    opt.step()
    ema_before = [opt.ema_state[p].clone() for p in params]
    new = make_params([(3, 4), (4,)], seed=5)
    opt.add_param_group({"params": new, "lr": 0.05})
    assert len(opt.base.param_groups) == 2 and opt.base.param_groups[1]["lr"] == 0.05
    assert opt.base.param_groups[1]["params"] == new
    before = [p.detach().clone() for p in new]
    set_grads(params, [None, None])
    set_grads(new, grad_sequence([(3, 4), (4,)], 1)[0])
    opt.step()
    for p, b in zip(new, before, strict=True):
        assert not torch.equal(p, b)
        assert opt.ema_state[p].shape == p.shape and opt.ema_state[p].abs().sum() > 0
        assert p in opt.state
    for p, e in zip(params, ema_before, strict=True):
        assert torch.equal(opt.ema_state[p], e)
    assert opt.last_scales.shape == (4,)
    assert opt.last_scales[:2].isnan().all() and not opt.last_scales[2:].isnan().any()
    # Now all four together.
    set_grads(params + new, grad_sequence(SHAPES[:2] + [(3, 4), (4,)], 1, seed=9)[0])
    opt.step()
    assert not opt.last_scales.isnan().any()


def test_zero_grad():
    params = make_params()
    opt = GAO(params, "SGD", lr=0.1)
    set_grads(params, grad_sequence(SHAPES, 1)[0])
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(params, grads, strict=True):
        assert p.grad is g and torch.equal(g, torch.zeros_like(g))
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)
    set_grads(params, grad_sequence(SHAPES, 1)[0])
    opt.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("target", TARGETS)
def test_closure_is_evaluated_once_before_the_modulation(target):
    """The closure's gradient (not the one present before the call) feeds the EMA and the step."""
    p = nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    opt = GAO([p], "SGD", lr=0.1, beta=0.5, target=target)
    g1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    p.grad = g1.clone()
    opt.step()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (p * g2).sum()  # gradient g2
        loss.backward()
        return loss

    p.grad = -100 * g1  # a stale gradient the closure replaces
    before = p.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor)
    torch.testing.assert_close(loss, (before * g2).sum())
    # m = 0.5 * 0.5 * g1 + 0.5 * g2 -> cos(g2, m) = 0.5*2 / (sqrt(2) * sqrt(0.0625 + 0.5))
    s = 1.0 / (math.sqrt(2.0) * math.sqrt(0.5625))
    torch.testing.assert_close(opt.last_scales, torch.tensor([s]))
    torch.testing.assert_close(p.detach(), before - 0.1 * s * g2)


def test_closure_returning_a_float_is_passed_through():
    p = nn.Parameter(torch.randn(3))

    def closure():
        p.grad = torch.ones(3)
        return 1.25

    assert GAO([p], "SGD", lr=0.1).step(closure) == 1.25


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_parameters_without_grad_are_skipped(target, granularity):
    params = make_params()
    opt = GAO(params, "Adam", lr=1e-2, target=target, granularity=granularity)
    set_grads(params, grad_sequence(SHAPES, 1)[0])
    opt.step()
    skipped = {1, 3}
    ema = {i: opt.ema_state[params[i]].clone() for i in skipped}
    values = {i: params[i].detach().clone() for i in skipped}
    others = {i: params[i].detach().clone() for i in range(len(params)) if i not in skipped}
    grads = grad_sequence(SHAPES, 1, seed=3)[0]
    set_grads(params, [None if i in skipped else g for i, g in enumerate(grads)])
    opt.step()
    for i in skipped:
        assert torch.equal(params[i].detach(), values[i])
        assert torch.equal(opt.ema_state[params[i]], ema[i])
        assert math.isnan(opt.last_scales[i])
    for i, v in others.items():
        assert not torch.equal(params[i].detach(), v)
        assert 0.0 <= float(opt.last_scales[i]) <= 1.0


def test_frozen_parameters_are_untouched():
    model = mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = GAO(model.parameters(), "Adam", lr=1e-2)
    for step in range(3):
        train_step(model, opt, step)
    assert torch.equal(model[0].weight.detach(), frozen)
    assert model[0].weight not in opt.state
    ema = opt.ema_state.get(model[0].weight)
    assert ema is None or not ema.any()
    assert math.isnan(opt.last_scales[0])
    assert not opt.last_scales[1:].isnan().any()


def _sparse_model(dense_dtype=torch.float32):
    torch.manual_seed(0)
    dense = nn.Linear(4, 2).to(dense_dtype)
    emb = nn.Embedding(10, 4, sparse=True)
    return dense, emb


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.float64])
def test_sparse_gradient_is_a_clear_error_that_changes_nothing(dense_dtype):
    dense, emb = _sparse_model(dense_dtype)
    params = list(dense.parameters()) + list(emb.parameters())
    opt = GAO(params, "SGD", lr=0.1)
    for p in params:  # a dense step first, so that there are EMAs to keep
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    state = [p.detach().clone() for p in params]
    ema = [opt.ema_state[p].clone() for p in params]
    out = dense(emb(torch.tensor([1, 2, 3])).to(dense_dtype)).sum()
    out.backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for p, s, e in zip(params, state, ema, strict=True):
        assert torch.equal(p.detach(), s)
        assert torch.equal(opt.ema_state[p], e), "a failed step must not advance any EMA"


@pytest.mark.parametrize("target", TARGETS)
def test_grad_scaler_skips_inf_steps_and_leaves_the_ema(target):
    model = mlp()
    twin = copy.deepcopy(model)
    opt = GAO(model.parameters(), "Adam", lr=1e-2, beta=0.9, target=target)
    twin_opt = GAO(twin.parameters(), "Adam", lr=1e-2, beta=0.9, target=target)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled()

    def scaled_step(step, poison=False):
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if poison:
            model[0].weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()

    scaled_step(0)
    train_step(twin, twin_opt, 0)
    params = [p.detach().clone() for p in model.parameters()]
    ema = [opt.ema_state[p].clone() for p in model.parameters()]
    base_state = copy.deepcopy(opt.state_dict()["state"])
    scale = scaler.get_scale()
    scaled_step(1, poison=True)
    assert scaler.get_scale() < scale
    for p, b, e in zip(model.parameters(), params, ema, strict=True):
        assert torch.equal(p.detach(), b)
        assert torch.equal(opt.ema_state[p], e)
    after = opt.state_dict()["state"]
    for i, entry in base_state.items():
        for k, v in entry.items():
            assert torch.equal(after[i][k], v), (i, k)
    scaled_step(2)
    train_step(twin, twin_opt, 2)  # the scaled run equals an unscaled run without step 1
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.ema_state[p], twin_opt.ema_state[q], rtol=1e-5, atol=1e-7)


def test_step_hooks_are_called():
    params = make_params()
    opt = GAO(params, "SGD", lr=0.1)
    calls = []
    seen_grad = {}

    def pre(optimizer, args, kwargs):
        calls.append(("pre", optimizer))
        seen_grad["pre"] = params[0].grad.clone()

    def post(optimizer, args, kwargs):
        calls.append(("post", optimizer))

    h1 = opt.register_step_pre_hook(pre)
    h2 = opt.register_step_post_hook(post)
    grads = grad_sequence(SHAPES, 2)
    set_grads(params, grads[0])
    opt.step()
    assert calls == [("pre", opt), ("post", opt)]
    assert torch.equal(seen_grad["pre"], grads[0][0])  # before the modulation
    h1.remove()
    h2.remove()
    set_grads(params, grads[1])
    opt.step()
    assert len(calls) == 2


def test_deepcopy_gives_an_independent_working_optimizer():
    params = make_params()
    opt = GAO(params, "Adam", lr=1e-2, beta=0.8)
    set_grads(params, grad_sequence(SHAPES, 1)[0])
    opt.step()
    clone = copy.deepcopy(opt)
    assert isinstance(clone, GAO) and clone.beta == 0.8
    clone_params_ = clone.param_groups[0]["params"]
    assert clone_params_[0] is not params[0]
    for p, q in zip(params, clone_params_, strict=True):
        assert torch.equal(opt.ema_state[p], clone.ema_state[q])
    before = [p.detach().clone() for p in params]
    ema = [opt.ema_state[p].clone() for p in params]
    set_grads(clone_params_, grad_sequence(SHAPES, 2)[1])
    clone.step()
    for p, b, e in zip(params, before, ema, strict=True):
        assert torch.equal(p.detach(), b) and torch.equal(opt.ema_state[p], e)


# --- 4b. torch.optim's conventions ---------------------------------------------------------------
def _real_views(params):
    return [
        nn.Parameter(torch.view_as_real(p).detach().clone() if p.is_complex() else p.detach())
        for p in params
    ]


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("target", TARGETS)
def test_complex_parameters_step_as_their_real_views(target, granularity):
    """Adam reads a complex parameter as its real view; GAO's cosine must too (the real part of
    the conjugate product over the norms), so both runs are the same numbers."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (4, 3)]
    dtypes = [torch.complex64, torch.complex64, torch.float32]
    complex_params = [
        nn.Parameter(torch.randn(s, generator=g, dtype=d))
        for s, d in zip(shapes, dtypes, strict=True)
    ]
    real_params = _real_views(complex_params)
    kwargs = {"lr": 1e-2, "beta": 0.8, "target": target, "granularity": granularity}
    opt, twin = GAO(complex_params, "Adam", **kwargs), GAO(real_params, "Adam", **kwargs)
    for _ in range(6):
        for c, r in zip(complex_params, real_params, strict=True):
            grad = torch.randn(r.shape, generator=g)
            r.grad = grad.clone()
            c.grad = torch.view_as_complex(grad.clone()) if c.is_complex() else grad.clone()
        opt.step()
        twin.step()
        for c, r in zip(complex_params, real_params, strict=True):
            assert torch.equal(torch.view_as_real(c) if c.is_complex() else c, r)
        assert torch.equal(opt.last_scales, twin.last_scales)
    assert ((opt.last_scales > 0) & (opt.last_scales < 1)).any()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_complex_cosine_is_the_real_part_of_the_conjugate_product(granularity):
    """One step from an EMA made by hand: s = Re(<g, m>) / (|g| |m|), clamped to [0, 1]."""
    p = nn.Parameter(torch.zeros(4, dtype=torch.complex128))
    opt = GAO([p], "SGD", lr=0.0, beta=0.5, granularity=granularity)
    m0 = torch.tensor([1 + 1j, 2 - 1j, 0.5j, -1 + 0j], dtype=torch.complex128)
    grad = torch.tensor([1 - 2j, 1 + 1j, -1 + 1j, 2 + 0.5j], dtype=torch.complex128)
    opt.state[p]["gao_ema"] = m0.clone()
    p.grad = grad.clone()
    opt.step()
    m = 0.5 * m0 + 0.5 * grad
    expected = (torch.vdot(m, grad).real / (grad.norm() * m.norm())).clamp(0, 1)
    torch.testing.assert_close(opt.last_scales, expected.float().view(1))
    assert 0 < float(expected) < 1


@pytest.mark.parametrize("target", TARGETS)
def test_complex_parameters_match_the_reference(target):
    params = [nn.Parameter(torch.randn(3, 4, dtype=torch.complex128)), *make_params()]
    ref_params = clone_params(params)
    opt = GAO(torch.optim.Adam(params, lr=1e-2), beta=0.8, target=target, granularity="row")
    ref = ReferenceGAO(torch.optim.Adam(ref_params, lr=1e-2), 0.8, target, "row")
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        grads = [torch.randn(q.shape, generator=g, dtype=q.dtype) for q in params]
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_params_close(params, ref_params, torch.float64)
        torch.testing.assert_close(opt.last_scales.double(), ref.last_scales, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_p_grad_is_the_callers_own_after_the_step(target, granularity):
    """No torch optimizer changes p.grad: the base steps on the scaled gradient, and afterwards
    p.grad is the same tensor with the same values (what the reference's base stepped on is the
    scaled gradient: the parameters match it)."""
    params = make_params()
    ref_params = clone_params(params)
    opt = GAO(torch.optim.Adam(params, lr=1e-2), beta=0.8, target=target, granularity=granularity)
    ref = ReferenceGAO(torch.optim.Adam(ref_params, lr=1e-2), 0.8, target, granularity)
    for grads in grad_sequence(SHAPES, steps=4):
        set_grads(params, grads)
        set_grads(ref_params, grads)
        own = [p.grad for p in params]
        opt.step()
        ref.step()
        for p, g, expected in zip(params, own, grads, strict=True):
            assert p.grad is g and torch.equal(g, expected)
        assert_params_close(params, ref_params, torch.float64)
    assert (ref.last_scales < 1).any()  # the scaled gradients differ from the caller's


def test_state_dict_hooks_registered_on_gao_run():
    params = make_params()
    opt = GAO(params, "Adam", lr=1e-2)
    set_grads(params, grad_sequence(SHAPES, 1)[0])
    opt.step()
    calls = []

    def pre(optimizer):
        calls.append(("pre", optimizer))

    def post(optimizer, state_dict):
        calls.append(("post", optimizer))
        return {**state_dict, "tag": 1}

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == [("pre", opt), ("post", opt)] and sd["tag"] == 1
    assert "gao_ema" in sd["state"][0]  # the post hook saw GAO's state dict

    def load_pre(optimizer, state_dict):
        calls.append(("load_pre", optimizer))
        state_dict["param_groups"][0]["lr"] = 0.25

    def load_pre_first(optimizer, state_dict):
        calls.append(("load_pre_first", optimizer))

    def load_post(optimizer):
        calls.append(("load_post", optimizer.param_groups[0]["lr"]))

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_pre_hook(load_pre_first, prepend=True)
    handle = opt.register_load_state_dict_post_hook(load_post)
    calls.clear()
    opt.load_state_dict(copy.deepcopy(sd))
    assert calls == [("load_pre_first", opt), ("load_pre", opt), ("load_post", 0.25)]
    assert sd["param_groups"][0]["lr"] == 1e-2  # the caller's dict is not edited
    handle.remove()
    calls.clear()
    opt.load_state_dict(copy.deepcopy(sd))
    assert calls == [("load_pre_first", opt), ("load_pre", opt)]


def test_global_step_hooks_fire_once_per_step_and_see_gao():
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    params = make_params()
    opt = GAO(params, "Adam", lr=1e-2)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))),
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("own pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("own post", o))),
    ]
    try:
        for grads in grad_sequence(SHAPES, steps=2):
            set_grads(params, grads)
            opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("pre", opt), ("own pre", opt), ("own post", opt), ("post", opt)] * 2


def test_the_bases_keyword_arguments_reach_the_base():
    """eps is Adam's; GAO's own floor of the cosine's denominator is cos_eps."""
    opt = GAO(make_params(), "Adam", lr=1e-3, eps=1e-3, cos_eps=1e-12)
    assert opt.base.param_groups[0]["eps"] == 1e-3 and opt.cos_eps == 1e-12
    assert GAO(make_params(), "Adam", lr=1e-3).base.param_groups[0]["eps"] == 1e-8


def test_eps_with_an_optimizer_instance_says_what_to_rename():
    with pytest.raises(TypeError, match=r"eps is the base optimizer's.*cos_eps"):
        GAO(torch.optim.Adam(make_params(), lr=1e-3), eps=1e-12)


def test_an_optimizer_pickled_by_the_previous_release_loads_with_its_floor_as_cos_eps():
    """Written by commit 900ff71 (pickle.dump of a GAO(Adam) with eps=1e-20 after 2 steps)."""
    import pickle

    with open(Path(__file__).parent / "fixtures" / "gao_pickled_900ff71.pkl", "rb") as f:
        opt = pickle.load(f)
    assert opt.cos_eps == 1e-20 and not hasattr(opt, "eps")
    assert opt.base.param_groups[0]["eps"] == 1e-8
    params = opt.param_groups[0]["params"]
    set_grads(params, [torch.ones_like(p) for p in params])
    opt.step()  # and it steps, with its hooks set up
    assert opt.state[params[0]]["step"] == 3


@pytest.mark.parametrize("how", ["params", "instance", "added group"])
def test_a_differentiable_base_is_refused(how):
    params = make_params()
    with pytest.raises(ValueError, match=r"differentiable=True is not supported"):
        if how == "params":
            GAO(params, "Adam", lr=1e-3, differentiable=True)
        elif how == "instance":
            GAO(torch.optim.Adam(params, lr=1e-3, differentiable=True))
        else:
            opt = GAO(params[:2], "Adam", lr=1e-3)
            try:
                opt.add_param_group({"params": params[2:], "differentiable": True})
            finally:
                assert len(opt.param_groups) == 1  # refused: as it was


@pytest.mark.parametrize(
    "call",
    [
        lambda ps: GAO(torch.optim.Adam, params=ps, lr=1e-3),
        lambda ps: GAO(torch.optim.Adam, ps, lr=1e-3),
        lambda ps: GAO("Adam", params=ps, lr=1e-3),
    ],
    ids=["class, params=", "class, params", "name, params="],
)
def test_the_base_given_first_is_a_clear_error(call):
    with pytest.raises(
        TypeError, match=r"got the base optimizer 'Adam' first.*pass the parameters.*first"
    ):
        call(make_params())


SEPARABLE_SHAPES = [(6, 5), (7,), (3, 4)]


def _separable_run(make_opt, poison_steps, steps=60, seed=0):
    """Minimise sum((p - t)^2) over elements that do not interact; at ``poison_steps`` one element
    of tensor 0 gets a NaN gradient and one of tensor 2 an inf one. Returns the parameters, the
    targets and the optimizer."""
    g = torch.Generator().manual_seed(seed)
    params = [
        nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SEPARABLE_SHAPES
    ]
    targets = [torch.randn(s, generator=g, dtype=torch.float64) for s in SEPARABLE_SHAPES]
    opt = make_opt(params)
    for step in range(steps):
        opt.zero_grad()
        sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True)).backward()
        if step in poison_steps:
            params[0].grad[2, 3] = math.nan
            params[2].grad[1, 1] = math.inf
        opt.step()
    return params, targets, opt


@pytest.mark.parametrize("base", ["Adam", "SGD"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_a_non_finite_gradient_element_costs_no_more_than_it_costs_the_base(
    target, granularity, base
):
    """GAO reads a non-finite gradient element as 0 (EMA and cosine) and hands it to the base as
    it is: the base loses that element as it would alone, every other element trains, and the
    EMA and the scales stay finite."""
    kwargs = {"lr": 0.05} if base == "Adam" else {"lr": 0.05, "momentum": 0.5}

    def gao(params):
        return GAO(params, base, **kwargs, beta=0.9, target=target, granularity=granularity)

    def alone(params):
        return getattr(torch.optim, base)(params, **kwargs)

    poisoned = (3,)
    params, targets, opt = _separable_run(gao, poisoned)
    base_params, _, _ = _separable_run(alone, poisoned)
    clean_params, _, _ = _separable_run(gao, ())
    lost = [~torch.isfinite(p) for p in params]
    assert [int(m.sum()) for m in lost] == [int((~torch.isfinite(q)).sum()) for q in base_params]
    assert sum(int(m.sum()) for m in lost) == 2  # the base's own damage: the poisoned elements
    assert all(torch.isfinite(m).all() for m in opt.ema_state.values())
    assert torch.isfinite(opt.last_scales).all()
    for p, t, q, m in zip(params, targets, clean_params, lost, strict=True):
        # every other element trains: as close to its target as in a run without the poison
        assert ((p - t)[~m].abs() <= (q - t)[~m].abs() + 0.05).all()


# --- 5. checkpointing ---------------------------------------------------------------------------
K = 5


def _make_run(seed, target, granularity):
    model = mlp(seed)
    opt = GAO(model.parameters(), "Adam", lr=1e-2, beta=0.9, target=target, granularity=granularity)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * K)
    return model, opt, sched


def _advance(model, opt, sched, steps):
    for step in steps:
        train_step(model, opt, step)
        sched.step()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_resume_is_bit_identical(tmp_path, target, granularity):
    model, opt, sched = _make_run(0, target, granularity)
    _advance(model, opt, sched, range(K))
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path
    )
    _advance(model, opt, sched, range(K, 2 * K))

    model2, opt2, sched2 = _make_run(1, target, granularity)  # different initial weights
    ckpt = torch.load(path, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    _advance(model2, opt2, sched2, range(K, 2 * K))

    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.ema_state[p], opt2.ema_state[q])
        assert opt.state[p].keys() == opt2.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key
    assert torch.equal(opt.last_scales, opt2.last_scales)


def test_state_dict_holds_the_ema_and_round_trips(tmp_path):
    model = mlp()
    opt = GAO(model.parameters(), "Adam", lr=1e-2, beta=0.9)
    for step in range(3):
        train_step(model, opt, step)
    sd = opt.state_dict()
    params = list(model.parameters())
    assert set(sd["state"]) == set(range(len(params)))
    for i, p in enumerate(params):
        assert torch.equal(sd["state"][i]["gao_ema"], opt.ema_state[p])
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(sd["state"][i])
    torch.save(sd, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = GAO(mlp(1).parameters(), "Adam", lr=0.5, beta=0.9)
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["lr"] == 1e-2
    again = fresh.state_dict()
    for i in sd["state"]:
        assert sd["state"][i].keys() == again["state"][i].keys()
        for key, value in sd["state"][i].items():
            assert torch.equal(value, again["state"][i][key]), (i, key)
    # The loaded EMA is a copy: stepping the fresh optimizer leaves the saved one alone.
    saved = loaded["state"][0]["gao_ema"].clone()
    fresh_params = fresh.param_groups[0]["params"]
    set_grads(fresh_params, [torch.ones_like(p) for p in fresh_params])
    fresh.step()
    assert torch.equal(loaded["state"][0]["gao_ema"], saved)


# Written by the optimizer of commit 900ff71 (before issue 23 changed the step): each entry is a
# run saved after FIXTURE_STEPS steps and its parameters, EMAs and scales FIXTURE_STEPS steps
# later. Configs: name -> (base, base kwargs, GAO kwargs); the stacked entry is built below.
FIXTURE = Path(__file__).parent / "fixtures" / "gao_checkpoints.pt"
FIXTURE_STEPS = 4
FIXTURE_CONFIGS = {
    "adam_grad_tensor": ("Adam", {"lr": 1e-2}, {"beta": 0.9}),
    "adamw_update_row": (
        "AdamW",
        {"lr": 1e-2, "weight_decay": 0.1},
        {"beta": 0.8, "target": "update", "granularity": "row"},
    ),
    "sgd_grad_global": (
        "SGD",
        {"lr": 0.1, "momentum": 0.9},
        {"beta": 0.7, "granularity": "global", "min_scale": 0.1},
    ),
}


def _assert_continues_as_saved(opt, params, after):
    for p, expected, ema in zip(params, after["params"], after["emas"], strict=True):
        assert torch.equal(p.detach(), expected)
        assert torch.equal(opt.ema_state[p], ema)
    assert torch.equal(opt.last_scales, after["last_scales"])


@pytest.mark.parametrize("name", list(FIXTURE_CONFIGS))
def test_a_checkpoint_of_the_previous_release_resumes_bit_identically(name):
    saved = torch.load(FIXTURE, weights_only=True)[name]
    base, base_kwargs, kwargs = FIXTURE_CONFIGS[name]
    model = mlp(1)  # other initial weights: everything comes from the checkpoint
    opt = GAO(model.parameters(), base, **base_kwargs, **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * FIXTURE_STEPS)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    for step in range(FIXTURE_STEPS, 2 * FIXTURE_STEPS):
        train_step(model, opt, step)
        sched.step()
    _assert_continues_as_saved(opt, list(model.parameters()), saved["after"])


def test_a_stacked_checkpoint_of_the_previous_release_resumes_bit_identically():
    from gradalign.stacked_adam import StackedAdam

    saved = torch.load(FIXTURE, weights_only=True)["stacked_adam_row"]
    together = [nn.Parameter(p.clone()) for p in saved["params"]]
    base = StackedAdam(together, lr=0.5)  # the checkpoint brings the per-model values
    opt = GAO(base, beta=[0.9, 0.8, 0.7], stack_dims=1, granularity="row")
    opt.load_state_dict(saved["opt"])
    sequences = [
        grad_sequence(SHAPES, steps=2 * FIXTURE_STEPS, seed=20 + k, dtype=torch.float32)
        for k in range(3)
    ]
    for step in range(FIXTURE_STEPS, 2 * FIXTURE_STEPS):
        grads = zip(*(s[step] for s in sequences), strict=True)
        set_grads(together, [torch.stack(gs) for gs in grads])
        opt.step()
    _assert_continues_as_saved(opt, together, saved["after"])


def test_state_dict_has_no_ema_before_the_first_step():
    opt = GAO(make_params(), "Adam", lr=1e-2)
    sd = opt.state_dict()
    assert all("gao_ema" not in entry for entry in sd["state"].values())
    GAO(make_params(), "Adam", lr=1e-2).load_state_dict(sd)


def test_load_casts_a_float64_checkpoint_to_float32_params():
    model = mlp(dtype=torch.float64)
    opt = GAO(model.parameters(), "Adam", lr=1e-2)
    for step in range(2):
        train_step(model, opt, step, dtype=torch.float64)
    model32 = mlp(dtype=torch.float32)
    opt32 = GAO(model32.parameters(), "Adam", lr=1e-2)
    opt32.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), model32.parameters(), strict=True):
        assert opt32.ema_state[q].dtype == torch.float32
        torch.testing.assert_close(opt32.ema_state[q], opt.ema_state[p].float())
        assert opt32.state[q]["exp_avg"].dtype == torch.float32
    train_step(model32, opt32, 2)  # and it steps
    assert all(torch.isfinite(p).all() for p in model32.parameters())


# --- 6. dtypes and devices ----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"]
)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_dtypes_and_devices(target, granularity, dtype, device):
    params = make_params(dtype=dtype, device=device)
    opt = GAO(params, "Adam", lr=1e-2, beta=0.9, target=target, granularity=granularity)
    start = [p.detach().clone() for p in params]
    for grads in grad_sequence(SHAPES, steps=4, dtype=dtype):
        set_grads(params, grads)
        opt.step()
        s = opt.last_scales
        assert s.device.type == device and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    for p in params:
        assert p.dtype == dtype and p.device.type == device and torch.isfinite(p).all()
        ema = opt.ema_state[p]
        assert ema.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        assert ema.shape == p.shape and ema.device == p.device
    assert any(not torch.equal(p, b) for p, b in zip(params, start, strict=True))


def test_bfloat16_ema_keeps_small_increments():
    """With beta=0.999 a bfloat16 EMA would round the (1 - beta) * g increments away."""
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = GAO([p], "SGD", lr=0.0, beta=0.999)
    for _ in range(10):
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()
    expected = 1 - 0.999**10
    torch.testing.assert_close(opt.ema_state[p], torch.full((4,), expected), rtol=1e-5, atol=0)


# --- 7. memory ----------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", TARGETS)
def test_state_is_one_ema_per_parameter_plus_the_base_state(target, granularity):
    model, twin = mlp(), mlp()
    opt = GAO(model.parameters(), "Adam", lr=1e-2, target=target, granularity=granularity)
    plain = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for step in range(3):
        train_step(model, opt, step)
        train_step(twin, plain, step)
    params = list(model.parameters())
    assert len(opt.ema_state) == len(params)
    assert set(opt.ema_state) == set(params)
    for p in params:
        assert opt.ema_state[p].shape == p.shape
    assert len(opt.state) == len(plain.state) == len(params)
    for p, q in zip(params, twin.parameters(), strict=True):  # the EMA lives in the base's state
        assert set(opt.state[p]) == set(plain.state[q]) | {"gao_ema"}
        assert opt.state[p]["gao_ema"] is opt.ema_state[p]
    assert set(opt.state_dict()["state"][0]) == set(plain.state_dict()["state"][0]) | {"gao_ema"}


# --- 8. checkpoints through other tools, other bases, delegation ------------------------------
def _names(model, opt):
    """Parameter id -> name, as torch.distributed.checkpoint keys an optimizer state dict."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def _assert_same_runs(model, opt, model2, opt2):
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.ema_state[p], opt2.ema_state[q])
    assert torch.equal(opt.last_scales, opt2.last_scales)


@pytest.mark.parametrize("target", TARGETS)
def test_distributed_checkpoint_state_dict_round_trip_resumes_bit_identically(tmp_path, target):
    """get/set_optimizer_state_dict key entries by parameter name; dcp.save/dcp.load on top."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, _ = _make_run(0, target, "tensor")
    for step in range(K):
        train_step(model, opt, step)
    model_sd, optim_sd = get_state_dict(model, opt)
    assert set(optim_sd["state"]) == set(_names(model, opt))
    assert all("gao_ema" in entry for entry in optim_sd["state"].values())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path)
    for step in range(K, 2 * K):
        train_step(model, opt, step)

    model2, opt2, _ = _make_run(1, target, "tensor")
    loaded = dict(zip(("model", "optim"), get_state_dict(model2, opt2), strict=True))
    dcp.load(loaded, checkpoint_id=tmp_path)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    for step in range(K, 2 * K):
        train_step(model2, opt2, step)
    _assert_same_runs(model, opt, model2, opt2)


def test_load_matches_entries_through_the_saved_param_group_ids_as_torch_does():
    """Name keys, listed in another order than the groups: each parameter gets the state torch's
    own Adam gives it from the same dict, and its EMA."""
    model = mlp()
    opt = GAO(model.parameters(), "Adam", lr=1e-2)
    for step in range(2):
        train_step(model, opt, step)
    sd = opt.state_dict()
    names = _names(model, opt)
    by_name = {
        "state": {names[i]: sd["state"][i] for i in reversed(range(len(names)))},
        "param_groups": [{**sd["param_groups"][0], "params": names}],
    }
    fresh, plain_model = mlp(1), mlp(1)
    gao = GAO(fresh.parameters(), "Adam", lr=0.5)
    plain = torch.optim.Adam(plain_model.parameters(), lr=0.5)
    gao.load_state_dict(by_name)
    # Plain Adam keeps gao_ema as one more entry of its own (float32 params: the same dtype), so
    # every key, the EMA included, must land on the same parameter in both.
    plain.load_state_dict({**by_name, "state": {k: {**v} for k, v in by_name["state"].items()}})
    triples = zip(fresh.parameters(), plain_model.parameters(), model.parameters(), strict=True)
    for p, q, old in triples:
        assert set(gao.state[p]) == set(plain.state[q])
        for key, value in plain.state[q].items():
            assert torch.equal(gao.state[p][key], value), key
        assert torch.equal(gao.ema_state[p], opt.ema_state[old])
    assert gao.param_groups[0]["lr"] == plain.param_groups[0]["lr"] == 1e-2


def test_a_checkpoint_written_in_the_old_layout_still_loads():
    """Before the EMA moved into the base's state, state_dict() merged each EMA into the base's
    integer-keyed entries; such a file must resume the same run."""
    params = make_params()
    ref_params = clone_params(params)
    ref = ReferenceGAO(torch.optim.Adam(ref_params, lr=1e-2), 0.9, "grad", "tensor", 0.0)
    seq = grad_sequence(SHAPES, steps=4)
    for grads in seq[:2]:
        set_grads(ref_params, grads)
        ref.step()
    old = copy.deepcopy(ref.base.state_dict())  # as read back from a file: no shared tensors
    old["state"] = {
        i: {**entry, "gao_ema": ref.ema[ref_params[i]].clone()} for i, entry in old["state"].items()
    }
    opt = GAO(torch.optim.Adam(params, lr=1e-2), beta=0.9)
    opt.load_state_dict(old)
    for p, q in zip(params, ref_params, strict=True):
        p.data.copy_(q)
    for grads in seq[2:]:
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_params_close(params, ref_params, torch.float64)


@pytest.mark.parametrize("target", TARGETS)
def test_state_written_straight_into_optimizer_state_carries_the_ema(target):
    """What ZeroRedundancyOptimizer.load_state_dict does: optim.state[param] = saved entry."""
    model, opt, _ = _make_run(0, target, "tensor")
    for step in range(K):
        train_step(model, opt, step)
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    for step in range(K, 2 * K):
        train_step(model, opt, step)

    model2, opt2, _ = _make_run(1, target, "tensor")
    model2.load_state_dict(weights)
    for index, p in enumerate(model2.parameters()):
        opt2.state[p] = copy.deepcopy(saved["state"][index])
    for step in range(K, 2 * K):
        train_step(model2, opt2, step)
    _assert_same_runs(model, opt, model2, opt2)


def test_an_ema_alone_in_a_parameters_state_lets_the_base_set_up_its_own():
    """Adam sets up its state when a parameter's entry is empty; an EMA restored before the base
    ever stepped (a checkpoint of GAO(SGD) resumed with Adam) must not hide that."""
    params = make_params()
    ref_params = clone_params(params)
    ref = ReferenceGAO(torch.optim.Adam(ref_params, lr=1e-2), 0.9, "grad", "tensor", 0.0)
    opt = GAO(torch.optim.Adam(params, lr=1e-2), beta=0.9)
    start = grad_sequence(SHAPES, steps=1, seed=7)[0]
    for p, q, m in zip(params, ref_params, start, strict=True):
        opt.state[p]["gao_ema"] = m.clone()
        ref.ema[q] = m.clone()
    for grads in grad_sequence(SHAPES, steps=3):
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_params_close(params, ref_params, torch.float64)
        for p in params:
            assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "gao_ema"}


class NestingLookahead(torch.optim.Optimizer):
    """Lookahead written the way pytorch_optimizer's is: its own ``state`` (the slow weights) and
    a state dict that is not torch's layout, {"lookahead_state": {(group, index): entry},
    "base_optimizer": the inner optimizer's}. Every k steps the weights move halfway back."""

    def __init__(self, optimizer, k=2, alpha=0.5):
        self.optimizer, self.k, self.alpha, self.counter = optimizer, k, alpha, 0
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self.state = defaultdict(dict)
        for p in self._params():
            self.state[p]["slow_params"] = p.detach().clone()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.counter += 1
        if self.counter % self.k == 0:
            for p in self._params():
                slow = self.state[p]["slow_params"]
                p.lerp_(slow, 1.0 - self.alpha)
                slow.copy_(p)
        return loss

    def state_dict(self):
        lookahead = {
            (gi, pi): dict(self.state[p])
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
        }
        return {
            "lookahead_state": lookahead,
            "base_optimizer": self.optimizer.state_dict(),
            "counter": self.counter,
        }

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict["base_optimizer"])
        self.counter = state_dict["counter"]
        restored = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                entry = state_dict["lookahead_state"][(gi, pi)]
                restored[p] = {k: v.to(dtype=p.dtype).clone() for k, v in entry.items()}
        self.state = defaultdict(dict, restored)


@pytest.mark.parametrize("target", TARGETS)
def test_a_base_with_its_own_state_dict_layout_is_nested_whole_and_resumes(target):
    params = make_params()
    ref_params = clone_params(params)
    opt = GAO(NestingLookahead(torch.optim.Adam(params, lr=1e-2)), beta=0.8, target=target)
    ref_base = NestingLookahead(torch.optim.Adam(ref_params, lr=1e-2))
    ref = ReferenceGAO(ref_base, 0.8, target, "tensor", 0.0)
    seq = grad_sequence(SHAPES, steps=6)
    for grads in seq[:3]:
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_params_close(params, ref_params, torch.float64)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd) == {"state", "param_groups", "gao_base"}
    assert set(sd["gao_base"]) == {"lookahead_state", "base_optimizer", "counter"}
    assert all(set(e) == {"slow_params"} for e in sd["gao_base"]["lookahead_state"].values())
    assert all(set(e) == {"gao_ema"} for e in sd["state"].values())
    weights = [p.detach().clone() for p in params]

    resumed = [nn.Parameter(w.clone()) for w in weights]
    opt2 = GAO(NestingLookahead(torch.optim.Adam(resumed, lr=0.5)), beta=0.8, target=target)
    opt2.load_state_dict(sd)
    for grads in seq[3:]:
        for ps in (params, ref_params, resumed):
            set_grads(ps, grads)
        opt.step()
        ref.step()
        opt2.step()
        assert_params_close(params, ref_params, torch.float64)
        assert all(torch.equal(p, q) for p, q in zip(params, resumed, strict=True))
    for p, q in zip(params, resumed, strict=True):
        assert torch.equal(opt.ema_state[p], opt2.ema_state[q])


class TrainEvalSGD(torch.optim.SGD):
    """A schedule-free-style optimizer: ``eval()`` swaps the weights for their running average,
    ``train()`` swaps them back, and ``step()`` refuses to run in eval mode."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.train_mode = False

    @torch.no_grad()
    def step(self, closure=None):
        if not self.train_mode:
            raise RuntimeError("not in train mode")
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                average = self.state[p].setdefault("average", p.detach().clone())
                average.lerp_(p, 0.5)
        return loss

    @torch.no_grad()
    def eval(self):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["train_weights"] = p.detach().clone()
                p.copy_(self.state[p].get("average", p))
        self.train_mode = False

    @torch.no_grad()
    def train(self):
        for group in self.param_groups:
            for p in group["params"]:
                if "train_weights" in self.state[p]:
                    p.copy_(self.state[p].pop("train_weights"))
        self.train_mode = True


def test_the_bases_other_public_methods_and_attributes_are_delegated():
    params = make_params()
    ref_params = clone_params(params)
    opt = GAO(TrainEvalSGD(params, lr=0.1), beta=0.5)
    ref_base = TrainEvalSGD(ref_params, lr=0.1)
    ref = ReferenceGAO(ref_base, 0.5, "grad", "tensor", 0.0)
    idle = make_params()
    set_grads(idle, grad_sequence(SHAPES, 1)[0])
    with pytest.raises(RuntimeError, match="train mode"):
        GAO(TrainEvalSGD(idle, lr=0.1)).step()
    opt.train()
    ref_base.train()
    assert opt.train_mode is True
    for grads in grad_sequence(SHAPES, steps=3):
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
    opt.eval()
    ref_base.eval()
    assert opt.train_mode is False
    assert_params_close(params, ref_params, torch.float64)  # both are the averages now
    for p in params:
        torch.testing.assert_close(p.detach(), opt.state[p]["average"], rtol=0, atol=0)
    opt.train()
    assert not any(torch.equal(p, opt.state[p]["average"]) for p in params)
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        opt.no_such_thing  # noqa: B018
    with pytest.raises(AttributeError, match="_private"):
        opt._private  # noqa: B018  (private names are not delegated)
    assert not hasattr(GAO(make_params(), "Adam", lr=1e-3), "train")  # Adam has no train()


@pytest.mark.parametrize("when", ["constructed", "added"])
def test_fsdp1_flat_shards_are_a_clear_error(when):
    """FSDP1 (FullyShardedDataParallel) marks every parameter it flattens, original ones too
    (use_orig_params=True hands the optimizer 1-D views of a rank's flat shard). Wrapping a model
    needs an accelerator, so the marking is done here by FSDP1's own function."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    params = make_params()
    _set_fsdp_flattened(params[2])
    with pytest.raises(ValueError, match=r"FSDP1.*fully_shard"):
        if when == "constructed":
            GAO(params, "Adam", lr=1e-2)
        else:
            GAO(params[:2], "Adam", lr=1e-2).add_param_group({"params": params[2:]})


# --- 9. torch.compile ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "target", "granularity"),
    [
        ("aot_eager", "grad", "tensor"),
        ("aot_eager", "update", "row"),
        ("inductor", "grad", "tensor"),
    ],
)
def test_a_compiled_step_matches_eager_and_updates_last_scales(backend, target, granularity):
    """Dynamo drops attribute stores on optimizers: last_scales must still change every step.
    The same gradients go to both, so the runs differ only by the steps' own rounding."""
    torch._dynamo.reset()
    params = make_params(dtype=torch.float32)
    twin = clone_params(params)
    kwargs = {"lr": 1e-2, "beta": 0.9, "target": target, "granularity": granularity}
    opt, eager = GAO(params, "Adam", **kwargs), GAO(twin, "Adam", **kwargs)
    compiled_step = torch.compile(opt.step, backend=backend)
    seen = []
    for grads in grad_sequence(SHAPES, steps=6, dtype=torch.float32):
        set_grads(params, grads)
        set_grads(twin, grads)
        compiled_step()
        eager.step()
        torch.testing.assert_close(opt.last_scales, eager.last_scales, rtol=0, atol=1e-6)
        for p, q in zip(params, twin, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
            torch.testing.assert_close(opt.ema_state[p], eager.ema_state[q], rtol=0, atol=1e-6)
        seen.append(opt.last_scales.clone())
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(seen))  # new every step


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_a_compiled_step_reads_a_non_finite_element_as_zero(target):
    """A compiled step cannot read the host to find non-finite gradients: it cleans every
    gradient, and steps as the eager step does, p.grad left as the caller's."""
    torch._dynamo.reset()
    params = make_params(dtype=torch.float32)
    twin = clone_params(params)
    kwargs = {"lr": 1e-2, "beta": 0.9, "target": target}
    opt, eager = GAO(params, "Adam", **kwargs), GAO(twin, "Adam", **kwargs)
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for step, grads in enumerate(grad_sequence(SHAPES, steps=4, dtype=torch.float32)):
        if step == 2:
            grads[0][1, 1], grads[2][0, 1, 0] = math.nan, math.inf
        set_grads(params, grads)
        set_grads(twin, grads)
        own = [p.grad.clone() for p in params]
        compiled_step()
        eager.step()
        for p, g in zip(params, own, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
        for p, q in zip(params, twin, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, equal_nan=True)
            assert torch.isfinite(opt.ema_state[p]).all()
        torch.testing.assert_close(opt.last_scales, eager.last_scales, rtol=0, atol=1e-6)
