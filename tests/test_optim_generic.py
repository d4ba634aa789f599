"""PyTorch's generic optimizer checks, run on GAO.

PyTorch checks each of its optimizers with the same generic tests (``TestOptimRenewed`` in its
``test/test_optim.py``, which is not in the wheel) over ``OptimizerInfo`` entries: an optimizer,
its sample constructor arguments, its error inputs, schedulers to run it with. That machinery ships
in the wheel (``torch.testing._internal.common_optimizers``). Here GAO around Adam, AdamW and SGD
is registered as such entries (each base's own sample inputs, with GAO's options spread over them)
and the generic behaviours are run on the CPU, written against that machinery: the loss goes the
right way (with schedulers, param groups, a tensor lr, low precision), steps without gradients or
with zero ones change nothing, complex parameters step as their real views, the base's foreach
and fused paths match its for-loop, state dicts round-trip (deterministic, older flags, named
parameters, weights_only, non-tensor steps), every hook runs in torch's order, deepcopy and pickle
keep an optimizer, bad inputs raise the base's errors and GAO's own; and, beyond PyTorch's list,
param groups added later, closures, ``zero_grad(set_to_none=...)`` and ``p.grad`` left as the
caller's.

Cases that do not apply to GAO, or not on a CPU-only machine, are listed in ``NOT_APPLICABLE`` with
the reason, and appear as skipped cases carrying it.
"""

import copy
import functools
import pickle
import tempfile

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD, Adam, AdamW
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

from gradalign import GradientAlignmentOptimizer as GAO
from gradalign.optim.reference import ReferenceGAO

DEVICE = "cpu"
# GAO's options, spread over each base's sample inputs: all of them with the base's defaults, one
# each (in turn) with the base's other inputs.
GAO_OPTIONS = [
    ({}, "GAO defaults"),
    ({"target": "update"}, "target=update"),
    ({"granularity": "global"}, "granularity=global"),
    ({"granularity": "row", "min_scale": 0.1}, "granularity=row, min_scale=0.1"),
    ({"beta": 0.5, "cos_eps": 1e-12}, "beta=0.5, cos_eps=1e-12"),
]
NOT_APPLICABLE = {
    "test_rosenbrock_sparse": "GAO refuses sparse gradients (a cosine over a sparse gradient's "
    "stored values is not the tensor's); test_sparse_gradients_are_refused checks the refusal",
    "differentiable=True inputs (TestDifferentiableOptimizer)": "GAO refuses differentiable=True "
    "at construction (its step runs without autograd); test_errors checks the refusal",
    "test_second_order_optims_return_consistent_types": "for closure-driven bases (LBFGS): GAO "
    "evaluates the closure once itself, so such bases are not supported",
    "test_forloop_goes_right_direction_multigpu": "needs two GPUs",
    "test_mixed_device_dtype": "needs two GPUs",
    "test_set_default_dtype_works_with_foreach": "CUDA only",
    "test_foreach_large_tensor": "CUDA only (a 2**32-element tensor)",
    "test_peak_memory_foreach": "CUDA only (reads the CUDA allocator's peak)",
    "test_fused_large_tensor": "a 2**32-element tensor, 64 GB",
    "test_fused_does_not_step_if_foundinf": "CUDA only; GradScaler hands a fused optimizer its "
    "scale through private attributes that GAO does not expose, so it unscales the gradients "
    "and skips inf steps itself (test_optim.py's GradScaler tests)",
    "test_cpu_load_state_dict": "moves a CPU checkpoint onto an accelerator",
    "test_state_dict_with_cuda_params": "CUDA only",
    "test_fused_cpu_matches_cuda": "CUDA only",
    "test_defaults_changed_to_foreach": "CUDA only (and it mocks the base's own module)",
    "test_complex with granularity=row": "a 1-d complex tensor gets one scale, its real view (a "
    "matrix) one per row: test_complex checks those inputs against the reference instead",
    "test_add_param_group_later's comparison with an optimizer of the late group's own, under "
    "granularity=global": "one cosine spans every group by definition; those inputs check that "
    "the late group trains and shares the one scale",
    "test_complex_2d with granularity tensor or row": "splitting a tensor into its real and "
    "imaginary parts changes per-tensor and per-row cosines; only granularity=global is "
    "invariant to the split, and test_complex_2d runs those inputs",
}


def _torch_info(base: type) -> OptimizerInfo:
    return next(info for info in optim_db if info.optim_cls is base)


def _gao_inputs(base: type, device, dtype=None) -> list[OptimizerInput]:
    base_inputs = _torch_info(base).optim_inputs_func(device, dtype)
    inputs = [
        OptimizerInput(None, {**base_inputs[0].kwargs, **gao}, f"{base_inputs[0].desc}, {desc}")
        for gao, desc in GAO_OPTIONS
    ]
    for i, base_input in enumerate(base_inputs[1:], 1):
        gao, desc = GAO_OPTIONS[i % len(GAO_OPTIONS)]
        inputs.append(
            OptimizerInput(None, {**base_input.kwargs, **gao}, f"{base_input.desc}, {desc}")
        )
    return inputs


STEP_ERROR = OptimizerErrorEnum.STEP_ERROR


def _gao_error_inputs(base: type, device, dtype) -> list[ErrorOptimizerInput]:
    """The base's own error inputs (its errors must reach the caller through GAO), and GAO's."""
    param = Parameter(torch.randn(2, 2, device=device, dtype=dtype))
    sparse = Parameter(torch.randn(3, 2, device=device, dtype=dtype))
    sparse.grad = torch.randn(3, 2, device=device, dtype=dtype).to_sparse()

    def gao_error(
        kwargs, error_type, regex, params=(param,), on=OptimizerErrorEnum.CONSTRUCTION_ERROR
    ):
        return ErrorOptimizerInput(
            OptimizerInput(list(params), kwargs, regex),
            error_on=on,
            error_type=error_type,
            error_regex=regex,
        )

    return _torch_info(base).optim_error_inputs_func(device, dtype) + [
        gao_error({"beta": 1.0}, ValueError, r"beta=1.0 is outside the allowed range"),
        gao_error({"target": "weights"}, ValueError, r"target='weights' is not one of"),
        gao_error({"granularity": "layer"}, ValueError, r"granularity='layer' is not one of"),
        gao_error({"min_scale": 1.5}, ValueError, r"min_scale=1.5 is outside"),
        gao_error({"cos_eps": 0.0}, ValueError, r"cos_eps=0.0 must be > 0"),
        gao_error({"stack_dims": -1}, ValueError, r"stack_dims=-1 is not an integer >= 0"),
        gao_error({"beta": [0.9, 0.8]}, ValueError, r"beta has 2 values: one per model"),
        gao_error({"differentiable": True}, ValueError, r"differentiable=True is not supported"),
        gao_error({}, RuntimeError, r"does not support sparse gradients", [sparse], STEP_ERROR),
    ]


def _gao_info(base: type) -> OptimizerInfo:
    def build(params, **kwargs):
        return GAO(params, base, **kwargs)

    build.__name__ = f"GAO({base.__name__})"
    torch_info = _torch_info(base)
    return OptimizerInfo(
        build,
        optim_inputs_func=functools.partial(_gao_inputs, base),
        optim_error_inputs_func=functools.partial(_gao_error_inputs, base),
        scheduler_inputs=torch_info.scheduler_inputs,
        # foreach and fused are the base's arguments, passed through; differentiable is refused
        supported_impls=("foreach", "fused"),
        not_og_supported_flags=torch_info.not_og_supported_flags,
        supports_fused_on=("cpu",),
        supports_complex=True,
    )


INFOS = [_gao_info(base) for base in (Adam, AdamW, SGD)]
by_info = pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)


def _all_inputs(info, dtype=torch.float32, skip=()):
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, dtype, info, skip=skip)


def _weight_and_bias(dtype=torch.float32, contiguous=True, seed=0):
    torch.manual_seed(seed)
    if contiguous:
        return Parameter(torch.randn(10, 5, dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    weight = Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0])
    return weight, Parameter(torch.randn(10, 2, dtype=dtype)[..., 0])


def _quadratic(weight, bias, inputs):
    return (weight.mv(inputs) + bias).pow(2).sum()


def _closure(optimizer, weight, bias, inputs):
    optimizer.zero_grad()
    loss = _quadratic(weight, bias, inputs)
    loss.backward()
    return loss


def _step_in_lockstep(run, twin, inputs, steps):
    """Step two (optimizer, weight, bias) runs on the same quadratic; they must stay equal."""
    for _ in range(steps):
        for optimizer, weight, bias in (run, twin):
            _closure(optimizer, weight, bias, inputs)
            optimizer.step()
        torch.testing.assert_close(run[1], twin[1])
        torch.testing.assert_close(run[2], twin[2])


def _check_direction(optimizer, closure, kwargs, steps=20, schedulers=()):
    initial = closure().item()
    for _ in range(steps):
        loss = closure()
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step(loss.item()) if isinstance(
                scheduler, ReduceLROnPlateau
            ) else scheduler.step()
    final = closure().item()
    assert final > initial if kwargs.get("maximize", False) else final < initial, kwargs


# --- not applicable -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=pytest.mark.skip(reason=why))
        for case, why in NOT_APPLICABLE.items()
    ],
)
def test_not_applicable(case):
    """Each entry of NOT_APPLICABLE, reported as a skipped case with its reason."""


# --- the entries and errors -----------------------------------------------------------------------
@by_info
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info):
    for optim_input in info.optim_inputs_func(device=DEVICE):
        assert not {"foreach", "fused", "differentiable"} & set(optim_input.kwargs)


@by_info
def test_errors(info):
    for error_input in info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        catch = pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with catch(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **kwargs)
        else:
            optimizer = info.optim_cls(params, **kwargs)
            with catch(error_input.error_type, match=error_input.error_regex):
                optimizer.step()


# --- the loss goes the right way ------------------------------------------------------------------
@by_info
@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forloop_goes_right_direction(info, contiguous, with_lrsched):
    schedulers_constructors = info.scheduler_inputs if with_lrsched else [()]
    for schedulers_constructor in schedulers_constructors:
        for optim_input in info.optim_inputs_func(device=DEVICE):
            kwargs = {**optim_input.kwargs, "foreach": False}
            weight, bias = _weight_and_bias(contiguous=contiguous)
            inputs = torch.randn(5)
            optimizer = info.optim_cls([weight, bias], **kwargs)
            schedulers = [make(optimizer) for make in schedulers_constructor]
            closure = functools.partial(_closure, optimizer, weight, bias, inputs)
            _check_direction(optimizer, closure, kwargs, schedulers=schedulers)


@by_info
def test_param_group_with_lrscheduler_goes_right_direction(info):
    for schedulers_constructor in info.scheduler_inputs:
        weight, bias = _weight_and_bias()
        inputs = torch.randn(5)
        optimizer = info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [make(optimizer) for make in schedulers_constructor]
        closure = functools.partial(_closure, optimizer, weight, bias, inputs)
        _check_direction(optimizer, closure, {}, schedulers=schedulers)


@by_info
def test_tensor_lr(info):
    """A tensor lr reaches the base and steps as the float does."""
    for optim_input in _all_inputs(info):
        weight, bias = _weight_and_bias()
        weight_c, bias_c = (Parameter(t.detach().clone()) for t in (weight, bias))
        inputs = torch.randn(5)
        kwargs = {**optim_input.kwargs, "lr": 1e-3}
        optimizer = info.optim_cls([weight, bias], **kwargs)
        try:
            optimizer_c = info.optim_cls([weight_c, bias_c], **{**kwargs, "lr": torch.tensor(1e-3)})
        except ValueError as e:  # the base's own refusal (foreach without capturable)
            assert "lr as a Tensor is not supported" in str(e)
            continue
        _step_in_lockstep((optimizer, weight, bias), (optimizer_c, weight_c, bias_c), inputs, 5)


@by_info
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_goes_right_direction_in_other_dtypes(info, dtype):
    """torch's float16 inputs give Adam eps=0.1: it must reach Adam (GAO's own is cos_eps)."""
    for optim_input in info.optim_inputs_func(device=DEVICE, dtype=dtype):
        weight, bias = _weight_and_bias(dtype=dtype)
        inputs = torch.randn(5, dtype=dtype)
        optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(_closure, optimizer, weight, bias, inputs)
        _check_direction(optimizer, closure, optim_input.kwargs)
        assert all(torch.isfinite(p).all() for p in (weight, bias))
        assert all(
            m.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            for m in optimizer.ema_state.values()
        )


@by_info
def test_param_groups_weight_decay(info):
    for optim_input in _all_inputs(info):
        weight, bias = _weight_and_bias()
        inputs = torch.randn(5)
        optimizer = info.optim_cls(
            [
                {"params": [weight], **optim_input.kwargs},
                {"params": [bias], **optim_input.kwargs, "weight_decay": 0.0},
            ]
        )
        closure = functools.partial(_closure, optimizer, weight, bias, inputs)
        _check_direction(optimizer, closure, optim_input.kwargs)


@by_info
def test_param_groups_lr(info):
    """A group with lr ~ 0 beside one that trains: its parameter does not move."""
    for optim_input in _all_inputs(info):
        kwargs = {**optim_input.kwargs, "lr": optim_input.kwargs.get("lr") or 1e-3}
        weight, bias = _weight_and_bias()
        irrelevant = Parameter(torch.randn(2))
        before = irrelevant.detach().clone()
        inputs = torch.randn(5)
        optimizer = info.optim_cls(
            [{"params": [weight, bias], **kwargs}, {"params": [irrelevant]}], lr=1e-28
        )

        def closure(
            optimizer=optimizer, weight=weight, bias=bias, inputs=inputs, irrelevant=irrelevant
        ):
            loss = _closure(optimizer, weight, bias, inputs)
            irrelevant.grad = torch.rand_like(irrelevant)
            return loss

        _check_direction(optimizer, closure, kwargs)
        torch.testing.assert_close(irrelevant.detach(), before)


# --- steps that must change nothing ---------------------------------------------------------------
@by_info
def test_step_is_noop_when_params_have_no_grad(info):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.detach().clone() for p in params]
    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert all(torch.equal(p, q) for p, q in zip(params, old, strict=True))


@by_info
def test_step_is_noop_for_zero_grads(info):
    param = torch.randn(5, 1, requires_grad=True)
    old = param.detach().clone()
    for optim_input in _all_inputs(info):
        kwargs = dict(optim_input.kwargs)
        if kwargs.get("weight_decay", 0) != 0:
            continue  # weight decay moves parameters whatever their gradient
        if info.name == "GAO(AdamW)":
            kwargs["lr"] = 1e-5  # AdamW decays by lr * 0.01 whatever the gradient
        optimizer = info.optim_cls([param], **kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step(lambda: torch.tensor([1.0]))
        torch.testing.assert_close(param.detach(), old)


# --- complex parameters ---------------------------------------------------------------------------
@by_info
def test_complex(info):
    """Complex parameters (with a real one among them) step as their real views would."""
    for optim_input in _all_inputs(info, dtype=torch.complex64, skip=("fused",)):
        kwargs = optim_input.kwargs
        torch.manual_seed(0)
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
            for p in complex_params
        ]
        complex_optimizer = info.optim_cls(complex_params, **kwargs)
        by_rows = kwargs.get("granularity") == "row"
        if by_rows:  # see NOT_APPLICABLE: the reference on the complex tensors themselves
            base = _torch_info_of(info)
            base_kwargs = {k: v for k, v in kwargs.items() if k not in GAO_KEYS}
            twins = [p.detach().clone().requires_grad_() for p in complex_params]
            gao_kwargs = {k: v for k, v in kwargs.items() if k in GAO_KEYS}
            real_optimizer = ReferenceGAO(base(twins, **base_kwargs), **gao_kwargs)
            real_params = twins
        else:
            real_optimizer = info.optim_cls(real_params, **kwargs)
        for _ in range(3):
            for c, r in zip(complex_params, real_params, strict=True):
                grad = torch.randn(torch.view_as_real(c).shape if c.is_complex() else c.shape)
                c.grad = torch.view_as_complex(grad.clone()) if c.is_complex() else grad.clone()
                r.grad = c.grad.clone() if by_rows else grad.clone()
            complex_optimizer.step()
            real_optimizer.step()
            for c, r in zip(complex_params, real_params, strict=True):
                expected = r if by_rows or not c.is_complex() else torch.view_as_complex(r)
                torch.testing.assert_close(c, expected, msg=optim_input.desc)


GAO_KEYS = {"beta", "target", "granularity", "min_scale", "cos_eps"}


def _torch_info_of(info):
    return {"GAO(Adam)": Adam, "GAO(AdamW)": AdamW, "GAO(SGD)": SGD}[info.name]


@by_info
def test_complex_2d(info):
    """A complex tensor steps as its real and imaginary parts as two real tensors would, under
    granularity=global (one cosine over all of them: see NOT_APPLICABLE for the others)."""
    for optim_input in _all_inputs(info, dtype=torch.complex64, skip=("fused",)):
        if optim_input.kwargs.get("granularity") != "global":
            continue
        torch.manual_seed(2024)
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real = a1.real.detach().clone().requires_grad_()
        a1_imag = a1.imag.detach().clone().requires_grad_()
        optim1 = info.optim_cls([a1], **optim_input.kwargs)
        optim2 = info.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
        for _ in range(3):
            optim1.zero_grad()
            optim2.zero_grad()
            _rosenbrock(a1).abs().backward()
            _rosenbrock(torch.complex(a1_real, a1_imag)).abs().backward()
            torch.testing.assert_close(a1.grad.real, a1_real.grad)
            torch.testing.assert_close(a1.grad.imag, a1_imag.grad)
            optim1.step()
            optim2.step()
            torch.testing.assert_close(a1.real, a1_real)
            torch.testing.assert_close(a1.imag, a1_imag)


def _rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@by_info
def test_sparse_gradients_are_refused(info):
    """In place of test_rosenbrock_sparse (see NOT_APPLICABLE): one clear error, nothing moved."""
    for optim_input in info.optim_inputs_func(device=DEVICE):
        param = Parameter(torch.tensor([1.5, 1.5]))
        optimizer = info.optim_cls([param], **optim_input.kwargs)
        indices, values = torch.tensor([[0, 0]]), torch.tensor([1.0, 2.0])
        param.grad = torch.sparse_coo_tensor(indices, values, (2,), check_invariants=True)
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            optimizer.step()
        assert torch.equal(param.detach(), torch.tensor([1.5, 1.5]))
        assert not optimizer.ema_state


# --- the base's implementations -------------------------------------------------------------------
def _assert_same_runs(info, kwargs, flag, dtype, **tolerance):
    """torch's _test_derived_optimizers: the same small model (a 0-d parameter last) trained with
    ``flag`` off and on, 7 steps in lockstep, with a step without gradients (step 2) and a layer
    frozen for two steps; after each step parameters and state must agree, and the second run
    continues from the first's values (so that rounding does not add up over the steps)."""
    runs = []
    for value in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        ).to(dtype)
        zero_d = torch.rand((), dtype=dtype, requires_grad=True)
        zero_d.grad = torch.rand_like(zero_d)
        params = [*model.parameters(), zero_d]
        runs.append((model, params, info.optim_cls(params, **{**kwargs, flag: value})))
    inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    for i in range(7):
        for model, _, optimizer in runs:
            optimizer.zero_grad()
            model[2].requires_grad_(i not in (3, 4))
            if i != 2:
                model(inputs).sum().backward()
            optimizer.step()
        (_, params, optimizer), (_, params_c, optimizer_c) = runs
        for p, q in zip(params, params_c, strict=True):
            torch.testing.assert_close(p, q, **tolerance, msg=lambda m: f"{kwargs}: {m}")
            with torch.no_grad():
                q.copy_(p)
            for key, value in optimizer.state[p].items():
                torch.testing.assert_close(value, optimizer_c.state[q][key], **tolerance)
                optimizer_c.state[q][key].copy_(value)


@by_info
def test_foreach_matches_forloop(info):
    """foreach is the base's argument: GAO over either of the base's paths is the same run."""
    for optim_input in info.optim_inputs_func(device=DEVICE, dtype=torch.float64):
        _assert_same_runs(info, optim_input.kwargs, "foreach", torch.float64)


@by_info
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str
)
def test_fused_matches_forloop(info, dtype):
    # torch's own fused-vs-forloop tolerances, but one float16 rounding more: target=update
    # rounds the parameter again when it scales the base's change (about one float16 ulp)
    tolerance = {
        torch.float16: {"atol": 1e-3, "rtol": 1e-3},
        torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    }.get(dtype, {})
    for optim_input in info.optim_inputs_func(device=DEVICE, dtype=dtype):
        _assert_same_runs(info, optim_input.kwargs, "fused", dtype, **tolerance)


@by_info
def test_fused_error_on_params_on_meta(info):
    with torch.device("meta"):
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1)
        )
    optimizer = info.optim_cls(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating"):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.to_empty(device=DEVICE)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- state dicts ----------------------------------------------------------------------------------
def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _primed(info, kwargs, named=False, steps=10):
    weight, bias = _weight_and_bias()
    inputs = torch.randn(3)
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    optimizer = info.optim_cls(_named([weight, bias], named), **kwargs)
    closure = functools.partial(_closure, optimizer, weight, bias, inputs)
    for _ in range(steps):
        closure()
        optimizer.step()
    return optimizer, (weight, bias, inputs)


def _without_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@by_info
@pytest.mark.parametrize("named_1", [True, False])
@pytest.mark.parametrize("named_0", [True, False])
def test_state_dict_deterministic(info, named_0, named_1):
    for optim_input in _all_inputs(info):
        optimizer, (weight, bias, inputs) = _primed(info, optim_input.kwargs, named_0)
        weight_c, bias_c = (Parameter(t.detach().clone()) for t in (weight, bias))
        optimizer_c = info.optim_cls(_named([weight_c, bias_c], named_1), **optim_input.kwargs)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        _step_in_lockstep((optimizer, weight, bias), (optimizer_c, weight_c, bias_c), inputs, 10)
        _assert_same_tree(
            _without_names(optimizer.state_dict()), _without_names(optimizer_c.state_dict())
        )
        optimizer_c.param_groups.extend(optimizer_c.param_groups)  # parameters listed twice
        assert (
            _without_names(optimizer.state_dict())["param_groups"][-1]
            == _without_names(optimizer_c.state_dict())["param_groups"][-1]
        )


def _conv_run(info, kwargs, named=False):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
    inputs = torch.rand(1, 4, 16, 16)
    optimizer = info.optim_cls(model.named_parameters() if named else model.parameters(), **kwargs)

    def step():
        optimizer.zero_grad()
        model(inputs).sum().backward()
        optimizer.step()

    for _ in range(3):
        step()
    return model, optimizer, step


@by_info
def test_can_load_older_state_dict(info):
    for optim_input in _all_inputs(info):
        _, optimizer, step = _conv_run(info, optim_input.kwargs)
        old = copy.deepcopy(optimizer.state_dict())
        for group in old["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        optimizer.load_state_dict(old)
        step()


@by_info
@pytest.mark.parametrize("named_1", [True, False])
@pytest.mark.parametrize("named_0", [True, False])
def test_can_load_from_to_named_state_dict(info, named_0, named_1):
    for optim_input in _all_inputs(info):
        model, optimizer, _ = _conv_run(info, optim_input.kwargs, named_0)
        state_dict = copy.deepcopy(optimizer.state_dict())
        params = model.named_parameters() if named_1 else model.parameters()
        optimizer_2 = info.optim_cls(params, **optim_input.kwargs)
        optimizer_2.load_state_dict(state_dict)
        optimizer_2.zero_grad()
        model(torch.rand(1, 4, 16, 16)).sum().backward()
        optimizer_2.step()
        if named_0 or named_1:
            names = optimizer_2.state_dict()["param_groups"][0]["param_names"]
            assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]


@by_info
@pytest.mark.parametrize("named", [True, False])
def test_save_load_equality_with_weights_only(info, named):
    for optim_input in _all_inputs(info):
        optimizer, _ = _primed(info, optim_input.kwargs, named, steps=3)
        state_dict = optimizer.state_dict()
        assert any("gao_ema" in entry for entry in state_dict["state"].values())
        with tempfile.TemporaryFile() as f:
            torch.save(state_dict, f)
            f.seek(0)
            _assert_same_tree(torch.load(f), state_dict)
            f.seek(0)
            _assert_same_tree(torch.load(f, weights_only=True), state_dict)


def _assert_same_tree(actual, expected):
    """Nested dicts and lists equal, tensors equal in value, dtype and device."""
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_same_tree(actual[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same_tree(a, e)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    else:
        assert actual == expected


@by_info
def test_load_nontensor_step(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for entry in state_dict["state"].values():
            if torch.is_tensor(entry.get("step")):
                entry["step"] = entry["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()


# --- hooks ----------------------------------------------------------------------------------------
def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    state_dict = copy.deepcopy(state_dict)  # a hook may hand back a new dict
    state_dict["param_groups"][0]["lr"] = 0.003
    return state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def _fresh(info, optim_input):
    return info.optim_cls([torch.rand(2, 3, requires_grad=True)], **optim_input.kwargs)


@by_info
def test_state_dict_pre_hook(info):
    for optim_input in _all_inputs(info):
        optimizer = _fresh(info, optim_input)
        optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optimizer.state_dict()["state"]["test"] == 1


@by_info
def test_state_dict_post_hook(info):
    for optim_input in _all_inputs(info):
        optimizer = _fresh(info, optim_input)
        optimizer.register_state_dict_post_hook(_state_dict_post_hook)
        assert optimizer.state_dict()["ran_state_dict_pre_hook"] is False


@by_info
def test_state_dict_pre_post_hook(info):
    for optim_input in _all_inputs(info):
        optimizer = _fresh(info, optim_input)
        optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
        optimizer.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optimizer.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]


@by_info
def test_load_state_dict_pre_hook_and_prepend(info):
    for optim_input in _all_inputs(info):
        optimizer = _fresh(info, optim_input)
        state_dict = optimizer.state_dict()
        optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002
        optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002  # the prepended hook ran first


@by_info
def test_load_state_dict_post_hook(info):
    for optim_input in _all_inputs(info):
        optimizer = _fresh(info, optim_input)
        optimizer.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert not optimizer.state["ran_load_state_dict_pre_hook2"]  # lr may be a tensor
        assert optimizer.state["ran_load_state_dict_post_hook"]


@by_info
def test_load_state_dict_pre_post_hook(info):
    for optim_input in _all_inputs(info):
        optimizer = _fresh(info, optim_input)
        optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optimizer.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert optimizer.state["ran_load_state_dict_pre_hook2"]
        assert optimizer.state["ran_load_state_dict_post_hook"]


@by_info
@pytest.mark.parametrize("kind", ["pre", "post"])
def test_step_hook(info, kind):
    params = [torch.tensor([1.0, 1.0])]
    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        calls = []
        register = getattr(optimizer, f"register_step_{kind}_hook")
        handle = register(lambda opt, args, kwargs, calls=calls: calls.append(opt))
        optimizer.step()
        optimizer.step()
        handle.remove()
        optimizer.step()
        assert calls == [optimizer, optimizer]


@by_info
def test_step_all_hooks(info):
    """Global and per-optimizer hooks, in torch's order, once per step of each optimizer."""
    params = [torch.tensor([1.0, 1.0])]
    for optim_input in _all_inputs(info):
        optimizer, other = info.optim_cls(params, **optim_input.kwargs), SGD(params)
        data = []
        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k, data=data: data.append(0)),
            register_optimizer_step_post_hook(lambda o, a, k, data=data: data.append(5)),
        ]
        for opt in (optimizer, other):
            handles.append(opt.register_step_pre_hook(lambda o, a, k, data=data: data.append(1)))
            handles.append(opt.register_step_post_hook(lambda o, a, k, data=data: data.append(2)))
        try:
            optimizer.step()
            assert data == [0, 1, 2, 5]
            other.step()
            optimizer.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        other.step()
        assert data == [0, 1, 2, 5] * 3


# --- copies, printing, state ----------------------------------------------------------------------
def _stepped(info, optim_input, steps=3):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    optimizer = info.optim_cls(params, **optim_input.kwargs)
    for _ in range(steps):
        optimizer.step()
    return optimizer


@by_info
def test_deepcopy_copies_all_public_attrs(info):
    for optim_input in _all_inputs(info):
        optimizer = _stepped(info, optim_input)

        def public(obj):
            return {k for k in obj.__dict__ if not k.startswith("_")}

        assert public(optimizer) == public(copy.deepcopy(optimizer))


@by_info
def test_pickle_round_trip(info):
    """A pickled optimizer (its base, state and EMAs) continues as the original does."""
    for optim_input in _all_inputs(info):
        optimizer = _stepped(info, optim_input)
        optimizer.register_step_post_hook(lambda o, a, k: None)  # torch drops hooks: so does GAO
        clone = pickle.loads(pickle.dumps(optimizer))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        clone_params = [p for g in clone.param_groups for p in g["params"]]
        for p, q in zip(params, clone_params, strict=True):
            q.grad = p.grad.clone()
        optimizer.step()
        clone.step()
        for p, q in zip(params, clone_params, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
            torch.testing.assert_close(optimizer.ema_state[p], clone.ema_state[q], rtol=0, atol=0)


@by_info
def test_optimizer_can_be_printed(info):
    for optim_input in _all_inputs(info):
        text = repr(_fresh(info, optim_input))
        assert text.startswith("GradientAlignmentOptimizer(") and info.name[4:-1] in text


@by_info
def test_non_empty_state(info):
    for optim_input in info.optim_inputs_func(device=DEVICE):
        model = torch.nn.Linear(5, 5)
        optimizer = info.optim_cls(model.parameters(), **optim_input.kwargs)
        optimizer.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
        optimizer.step()
        assert all(len(entry) > 0 for entry in optimizer.state.values())
        assert all("gao_ema" in entry for entry in optimizer.state.values())


# --- beyond PyTorch's list ------------------------------------------------------------------------
@by_info
def test_grads_are_the_callers_after_the_step(info):
    """No torch optimizer changes p.grad: the same tensors, with the same values, after the step."""
    for optim_input in _all_inputs(info):
        optimizer, (weight, bias, inputs) = _primed(info, optim_input.kwargs, steps=2)
        _closure(optimizer, weight, bias, inputs)
        grads = [weight.grad, bias.grad]
        values = [g.clone() for g in grads]
        optimizer.step()
        assert weight.grad is grads[0] and bias.grad is grads[1]
        assert all(torch.equal(g, v) for g, v in zip(grads, values, strict=True))


@by_info
def test_add_param_group_later(info):
    """A group added after some steps steps as it would in an optimizer of its own; under
    granularity=global (one cosine over every group: see NOT_APPLICABLE) it trains and shares
    the one scale."""
    for optim_input in _all_inputs(info):
        optimizer, (weight, bias, inputs) = _primed(info, optim_input.kwargs, steps=3)
        late = Parameter(torch.randn(4, 3))
        alone = Parameter(late.detach().clone())
        optimizer.add_param_group({"params": [late], "lr": 0.05})
        own = info.optim_cls([{"params": [alone], "lr": 0.05}], **optim_input.kwargs)
        shared = optim_input.kwargs.get("granularity") == "global"
        for _ in range(3):
            _closure(optimizer, weight, bias, inputs)
            late.grad = torch.randn(4, 3)
            alone.grad = late.grad.clone()
            before = late.detach().clone()
            optimizer.step()
            own.step()
            if shared:
                assert not torch.equal(late, before)
                assert (optimizer.last_scales == optimizer.last_scales[0]).all()
            else:
                torch.testing.assert_close(
                    late, alone, msg=lambda m, d=optim_input.desc: f"{d}: {m}"
                )
        assert optimizer.last_scales.shape == (3,) and torch.isfinite(optimizer.last_scales).all()


@by_info
def test_step_with_and_without_closure(info):
    """step(closure) evaluates the closure once (with gradients enabled) and returns its loss:
    the same run as computing the gradients first and calling step()."""
    for optim_input in _all_inputs(info):
        runs = [_primed(info, optim_input.kwargs, steps=1) for _ in range(2)]
        (optimizer, (weight, bias, inputs)), (optimizer_c, (weight_c, bias_c, _)) = runs
        with torch.no_grad():
            weight_c.copy_(weight)
            bias_c.copy_(bias)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        calls = []

        def closure(weight=weight, bias=bias, inputs=inputs, optimizer=optimizer, calls=calls):
            calls.append(torch.is_grad_enabled())
            return _closure(optimizer, weight, bias, inputs)

        with torch.no_grad():
            loss = optimizer.step(closure)
        expected = _closure(optimizer_c, weight_c, bias_c, inputs)
        assert optimizer_c.step() is None
        assert calls == [True] and torch.equal(loss, expected)
        torch.testing.assert_close(weight, weight_c, rtol=0, atol=0)


@by_info
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(info, set_to_none):
    for optim_input in _all_inputs(info):
        optimizer, (weight, bias, inputs) = _primed(info, optim_input.kwargs, steps=1)
        _closure(optimizer, weight, bias, inputs)
        grads = [weight.grad, bias.grad]
        optimizer.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert weight.grad is None and bias.grad is None
        else:
            assert [weight.grad, bias.grad] == grads and not any(g.any() for g in grads)
