"""Adam/AdamW: parity with torch.optim in float64, backend equivalence, properties, state dicts."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adamkit
from conftest import clone_params, config_params, grad_stream, make_params

BACKENDS = ["reference", "foreach", "fused"]
PARITY_TOL = 1e-12  # float64: both implementations round at ~1e-16 per op; 1e-12 leaves 1e4 ulps
# fused vs reference in fp32. The torch.compile kernel may contract a*b+c into one FMA and reorder
# the scalar divisions, a few ulps per operation: over 15 steps with |update| <= lr = 3e-2 that
# bounds the parameter difference by ~15 * 3e-2 * 2^-20 < 1e-6 and the states' relative difference
# by ~1e-6.
FUSED_FP32_TOL = dict(rtol=1e-5, atol=1e-6)
# The native kernel rounds every operation as the reference does; only torch's vectorized square
# root (not always correctly rounded) differs, by 1 ulp. That moves an update (|u| <= 3e-2) by
# <= 4e-9 and can flip the rounding of p by 1 ulp (2^-23 relative) per step: 15 steps stay below
# 15 ulps (2e-6 relative) and 6e-8 absolute. Measured: 4.5e-7 relative.
NATIVE_FP32_TOL = dict(rtol=2e-6, atol=1e-7)


def run(opt, params, grads, sched=None):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if sched is not None:
            sched.step()


def max_diff(a_params, b_params, a_opt, b_opt):
    """Largest absolute difference over parameters and every state tensor (and equal steps)."""
    worst = 0.0
    for p, q in zip(a_params, b_params):
        worst = max(worst, (p - q).abs().max().item() if p.numel() else 0.0)
        sa, sb = a_opt.state[p], b_opt.state[q]
        assert set(sa) == set(sb), (sorted(sa), sorted(sb))
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            if k == "step":
                assert float(sa[k]) == float(sb[k])
            elif sa[k].numel():
                worst = max(worst, (sa[k].double() - sb[k].double()).abs().max().item())
    return worst


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", config_params())
def test_parity_with_torch_float64(name, kw, backend):
    ours = make_params()
    theirs = clone_params(ours)
    grads = grad_stream(ours, 25)
    kw = {"lr": 1e-2, **kw}
    a = getattr(adamkit, name)(ours, backend=backend, **kw)
    b = getattr(torch.optim, name)(theirs, foreach=False, **kw)
    run(a, ours, grads)
    run(b, theirs, grads)
    assert max_diff(ours, theirs, a, b) < PARITY_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_groups_scheduler_tensor_lr(backend):
    """Several groups with different hyperparameters, a tensor lr, and a scheduler changing lr."""
    ours = make_params()
    theirs = clone_params(ours)
    grads = grad_stream(ours, 30)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": torch.tensor(0.02, dtype=torch.float64), "weight_decay": 0.2},
            {"params": ps[2:4], "betas": (0.5, 0.9), "amsgrad": True},
            {"params": ps[4:], "eps": 1e-3, "maximize": True, "weight_decay": 0.0},
        ]

    a = adamkit.AdamW(groups(ours), lr=5e-3, backend=backend)
    b = torch.optim.AdamW(groups(theirs), lr=5e-3, foreach=False)
    sa = torch.optim.lr_scheduler.OneCycleLR(a, max_lr=[0.03, 0.01, 0.02], total_steps=40)
    sb = torch.optim.lr_scheduler.OneCycleLR(b, max_lr=[0.03, 0.01, 0.02], total_steps=40)
    run(a, ours, grads, sa)
    run(b, theirs, grads, sb)
    assert max_diff(ours, theirs, a, b) < PARITY_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_fully_decoupled(backend):
    """decouple_lr: p *= 1 - (lr/max_lr)*wd. At constant lr == max_lr it equals AdamW's decay;
    with lr = max_lr/4 it equals AdamW with weight_decay scaled by 1/max_lr."""
    ours = make_params()
    theirs = clone_params(ours)
    grads = grad_stream(ours, 20)
    a = adamkit.AdamW(ours, lr=0.005, weight_decay=1e-3, decouple_lr=True, max_lr=0.02, backend=backend)
    b = torch.optim.AdamW(theirs, lr=0.005, weight_decay=1e-3 / 0.02, foreach=False)
    run(a, ours, grads)
    run(b, theirs, grads)
    assert max_diff(ours, theirs, a, b) < PARITY_TOL
    # max_lr defaults to the group's initial lr: at constant lr the decay factor is 1 - wd.
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = adamkit.AdamW([p], lr=0.5, weight_decay=0.1, decouple_lr=True, backend=backend)
    assert opt.param_groups[0]["max_lr"] == 0.5
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "backend,kernel,tol",
    [
        # foreach runs the same math with the same operators: bitwise equal
        pytest.param("foreach", None, dict(rtol=0, atol=0), id="foreach"),
        pytest.param("fused", "native", NATIVE_FP32_TOL, id="fused-native"),
        pytest.param(
            "fused", "compiled", FUSED_FP32_TOL, id="fused-compiled", marks=pytest.mark.compiled_kernel
        ),
    ],
)
@pytest.mark.parametrize("name,kw", config_params())
def test_backend_equals_reference_fp32(name, kw, backend, kernel, tol):
    pa = make_params(torch.float32)
    pb = clone_params(pa)
    grads = grad_stream(pa, 15)
    a = getattr(adamkit, name)(pa, backend="reference", **kw)
    b = getattr(adamkit, name)(pb, backend=backend, **kw)
    run(a, pa, grads)
    run(b, pb, grads)
    if kernel is not None:  # the kernel the test names is the one that ran
        tables = [t for plan in b._plans.values() for t in plan.tables]
        assert bool(tables) == (kernel == "native")
    for p, q in zip(pa, pb):
        torch.testing.assert_close(q.detach(), p.detach(), **tol)
        assert set(a.state[p]) == set(b.state[q])
        for k, v in a.state[p].items():
            torch.testing.assert_close(b.state[q][k], v, **tol)


def test_noncontiguous_grad_strides_fp32():
    """A parameter whose gradient has other strides than itself is updated elementwise correctly
    (torch's fused CPU kernel gets this wrong): the result equals, bit for bit, the same run on
    contiguous copies, and torch's for-loop AdamW to fp32 rounding."""
    base = torch.randn(8, 6)
    g = torch.randn(6, 8)  # contiguous gradient
    for backend in BACKENDS:
        pp = base.clone().t().requires_grad_()  # non-contiguous parameter: strides differ from g's
        assert pp.stride() != g.stride()
        cc = base.t().contiguous().requires_grad_()
        qq = base.t().contiguous().requires_grad_()
        a = adamkit.AdamW([pp], lr=0.1, backend=backend)
        c = adamkit.AdamW([cc], lr=0.1, backend="reference")
        b = torch.optim.AdamW([qq], lr=0.1, foreach=False)
        for _ in range(3):
            pp.grad, cc.grad, qq.grad = g.clone(), g.clone(), g.clone()
            a.step()
            c.step()
            b.step()
        # reference and foreach run the same ops: bitwise; fused (native here) within NATIVE_FP32_TOL
        tol = dict(rtol=0, atol=0) if backend != "fused" else NATIVE_FP32_TOL
        torch.testing.assert_close(pp.detach(), cc.detach(), **tol)
        torch.testing.assert_close(a.state[pp]["exp_avg"], c.state[cc]["exp_avg"], **tol)
        torch.testing.assert_close(pp.detach(), qq.detach(), rtol=1e-6, atol=1e-7)


def test_default_hyperparameters_match_torch():
    p = [torch.zeros(1, requires_grad=True)]
    for ours, theirs in ((adamkit.Adam, torch.optim.Adam), (adamkit.AdamW, torch.optim.AdamW)):
        d_ours, d_theirs = ours(p).defaults, theirs(p).defaults
        for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"):
            assert d_ours[k] == d_theirs[k], k


# ------------------------------------------------------------------------------------------------
# Convergence properties
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_quadratic_converges(backend, amsgrad):
    torch.manual_seed(0)
    target = torch.randn(20)
    x = torch.zeros(20, requires_grad=True)
    opt = adamkit.Adam([x], lr=0.05, amsgrad=amsgrad, backend=backend)
    for _ in range(600):
        opt.zero_grad()
        ((x - target) ** 2).sum().backward()
        opt.step()
    assert (x - target).abs().max().item() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_rosenbrock_converges(backend):
    xy = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = adamkit.AdamW([xy], lr=0.02, weight_decay=0.0, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1500, gamma=0.3)

    def closure():
        opt.zero_grad()
        x, y = xy
        loss = (1 - x) ** 2 + 100 * (y - x**2) ** 2
        loss.backward()
        return loss

    for _ in range(4000):
        loss = opt.step(closure)
        sched.step()
    assert loss.item() < 1e-5  # from 12.5 at the start: a million-fold reduction
    torch.testing.assert_close(xy.detach(), torch.tensor([1.0, 1.0], dtype=torch.float64), atol=5e-3, rtol=0)


def test_maximize_ascends():
    x = torch.zeros(3, requires_grad=True)
    opt = adamkit.Adam([x], lr=0.05, maximize=True)
    for _ in range(400):
        opt.zero_grad()
        (-((x - 2.0) ** 2)).sum().backward()
        opt.step()
    assert torch.allclose(x.detach(), torch.full((3,), 2.0), atol=0.05)


# ------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_resume_bit_identical(backend, amsgrad):
    ps = make_params(torch.float32)
    grads = grad_stream(ps, 20)
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, backend=backend)
    # Uninterrupted run.
    full = clone_params(ps)
    opt = adamkit.AdamW(full, **kw)
    run(opt, full, grads)
    # Stopped after 8 steps, saved, rebuilt from scratch, loaded, resumed.
    part = clone_params(ps)
    opt1 = adamkit.AdamW(part, **kw)
    run(opt1, part, grads[:8])
    saved_p = roundtrip([p.detach() for p in part])
    saved_o = roundtrip(opt1.state_dict())
    resumed = clone_params(saved_p)
    opt2 = adamkit.AdamW(resumed, **kw)
    opt2.load_state_dict(saved_o)
    run(opt2, resumed, grads[8:])
    assert max_diff(full, resumed, opt, opt2) == 0.0


@pytest.mark.parametrize("direction", ["torch->adamkit", "adamkit->torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_interchange_with_torch(direction, amsgrad):
    ps = make_params(torch.float32)
    grads = grad_stream(ps, 16)
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    make_first, make_second = (
        (lambda q: torch.optim.AdamW(q, foreach=False, **kw), lambda q: adamkit.AdamW(q, **kw))
        if direction == "torch->adamkit"
        else (lambda q: adamkit.AdamW(q, **kw), lambda q: torch.optim.AdamW(q, foreach=False, **kw))
    )
    # Reference: the first optimizer all the way.
    ref = clone_params(ps)
    ref_opt = make_first(ref)
    run(ref_opt, ref, grads)
    # Switch optimizers half-way through, via a saved state dict.
    sw = clone_params(ps)
    first = make_first(sw)
    run(first, sw, grads[:8])
    second = make_second(sw)
    second.load_state_dict(roundtrip(first.state_dict()))
    run(second, sw, grads[8:])
    for p, q in zip(ref, sw):
        # Same math in another implementation: equal to fp32 rounding, step count preserved.
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(ref, sw):
        assert float(ref_opt.state[p]["step"]) == float(second.state[q]["step"]) == 16.0
        assert set(ref_opt.state[p]) == set(second.state[q])


def test_load_state_dict_fills_our_options_and_keeps_dtype():
    p = torch.randn(4, requires_grad=True)
    t = torch.optim.AdamW([p], lr=0.01)
    p.grad = torch.randn(4)
    t.step()
    ours = adamkit.AdamW([p], lr=0.5, decouple_lr=False, backend="reference")
    ours.load_state_dict(t.state_dict())
    g = ours.param_groups[0]
    assert g["lr"] == 0.01 and g["backend"] == "reference" and g["decouple_lr"] is False
    assert ours.state[p]["exp_avg"].dtype == torch.float32
    assert ours.state[p]["exp_avg"].data_ptr() != t.state[p]["exp_avg"].data_ptr()  # copied


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing changed
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": torch.tensor([1.0, 2.0])}, "lr"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"betas": (1.0, 0.999)}, "beta"),
        ({"betas": (0.9, -0.1)}, "beta"),
        ({"betas": (0.9,)}, "betas"),
        ({"max_lr": 0.0}, "max_lr"),
        ({"max_lr": -1.0, "decouple_lr": True}, "max_lr"),
        ({"backend": "cuda"}, "backend"),
        ({"foreach": True, "fused": True}, "fused"),
        ({"backend": "reference", "fused": True}, "conflicts"),
        ({"capturable": True}, "capturable"),
        ({"differentiable": True}, "differentiable"),
    ],
)
def test_invalid_hyperparameters(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        adamkit.AdamW([torch.zeros(2, requires_grad=True)], **kw)


def test_parameter_given_twice():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="twice"):
        adamkit.Adam([p, p])
    opt = adamkit.Adam([p])
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_bad_param_group_leaves_optimizer_unchanged():
    opt = adamkit.Adam([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -1})
    assert len(opt.param_groups) == 1


def test_integer_and_complex_params_rejected():
    with pytest.raises(TypeError, match="floating point"):
        adamkit.Adam([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match="complex"):
        adamkit.Adam([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])


def snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params
    }


def assert_unchanged(opt, params, snap):
    ps, st_ = snap
    for p, p0 in zip(params, ps):
        assert torch.equal(p.detach(), p0)
        assert {k: v for k, v in opt.state[p].items()}.keys() == st_[id(p)].keys()
        for k, v in opt.state[p].items():
            assert torch.equal(v, st_[id(p)][k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_rejected_before_any_change(backend):
    dense = torch.randn(3, requires_grad=True)
    emb = torch.randn(5, 2, requires_grad=True)
    opt = adamkit.Adam([{"params": [dense]}, {"params": [emb]}], backend=backend)
    dense.grad = torch.ones(3)
    emb.grad = torch.ones(5, 2)
    opt.step()
    snap = snapshot(opt, [dense, emb])
    dense.grad = torch.ones(3)
    emb.grad = torch.ones(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, [dense, emb], snap)


def test_group_lr_made_invalid_later_raises_at_step_unchanged():
    p = torch.randn(3, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    opt = adamkit.AdamW([{"params": [p]}, {"params": [q]}])
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step()
    snap = snapshot(opt, [p, q])
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert_unchanged(opt, [p, q], snap)


def _trained(kind="adamkit", amsgrad=False):
    ps = [torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    opt = (adamkit.AdamW if kind == "adamkit" else torch.optim.AdamW)(ps, amsgrad=amsgrad)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    return ps, opt


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "groups"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "parameters"),
        (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(2, 3)), "shape"),
        (lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3, 2)), "another optimizer"),
        (lambda sd: sd["state"][1].pop("exp_avg_sq"), "exp_avg_sq"),
        (lambda sd: sd["param_groups"][0].update(lr=-3.0), "lr"),
        (lambda sd: sd["param_groups"][0].update(amsgrad=True), "max_exp_avg_sq"),
    ],
)
def test_bad_state_dict_rejected_unchanged(mutate, match):
    ps, opt = _trained()
    src_ps, src = _trained()
    sd = src.state_dict()
    mutate(sd)
    snap = snapshot(opt, ps)
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, ps, snap)
    assert [{k: v for k, v in g.items()} for g in opt.param_groups] == groups_before


def test_state_dict_from_sgd_rejected():
    ps, opt = _trained()
    sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    for p in ps:
        p.grad = torch.ones_like(p)
    sgd.step()
    with pytest.raises(ValueError, match="another kind of optimizer"):
        opt.load_state_dict(sgd.state_dict())


def test_fused_flag_spelled_as_torch():
    # fused=True maps to backend="fused"; foreach=False to the reference loop.
    p = torch.zeros(2, requires_grad=True)
    assert adamkit.AdamW([p], foreach=False).param_groups[0]["backend"] == "reference"
    assert adamkit.AdamW([p], foreach=True).param_groups[0]["backend"] == "foreach"


def test_zero_grad_and_no_grad_params_skipped():
    p = torch.randn(3, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    opt = adamkit.AdamW([p, q])
    p.grad = torch.ones(3)
    q0 = q.detach().clone()
    opt.step()
    assert torch.equal(q.detach(), q0) and len(opt.state[q]) == 0
    opt.zero_grad()
    assert p.grad is None


# ------------------------------------------------------------------------------------------------
# Property-based: random shapes and hyperparameters, reference vs torch (float64)
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    lr=st.floats(1e-5, 1.0, allow_subnormal=False),
    b1=st.floats(0.0, 0.99, allow_subnormal=False),
    b2=st.floats(0.0, 0.9999, allow_subnormal=False),
    eps=st.floats(1e-10, 1e-2, allow_subnormal=False),
    wd=st.floats(0.0, 0.5, allow_subnormal=False),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    decoupled=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_parity(shape, lr, b1, b2, eps, wd, amsgrad, maximize, decoupled, backend, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    q = p.detach().clone().requires_grad_()
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    a = adamkit.Adam([p], decoupled_weight_decay=decoupled, backend=backend, **kw)
    b = torch.optim.Adam([q], decoupled_weight_decay=decoupled, foreach=False, **kw)
    for _ in range(5):
        grad = torch.randn(shape, generator=g, dtype=torch.float64)
        p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    scale = max(1.0, q.detach().abs().max().item() if q.numel() else 1.0)
    assert max_diff([p], [q], a, b) <= PARITY_TOL * scale
    assert all(math.isfinite(v) for v in p.detach().reshape(-1).tolist())
