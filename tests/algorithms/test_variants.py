"""The memory-lean variants (Adafactor, CAME, Adam-mini, LAMB, Sophia-G): each against its reference
package or an independent float64 oracle, then one table of optimizers through one set of generic
tests (state dicts, resume, dtypes, lr changes, bad input, storage formats, backends, planner)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import adamkit
from adamkit.tools.plan import adamkit_state_bytes
from cases import assert_bits, roundtrip

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(6, 4), (2, 3, 5), (7,), ()]  # matrices (factored), a 3-D tensor, a vector, a scalar


def values(seed, dtype=torch.float64, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def grads_for(ps, gen):
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in ps]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300)).item()


# ------------------------------------------------------------------------------------------------
# (a) Reference packages and float64 oracles
# ------------------------------------------------------------------------------------------------


def lockstep(ours, theirs, steps, seed, keys, between=None, step_kw=None):
    """Same gradients into both optimizers; parameters and the named state within 1e-9 relative."""
    gen = torch.Generator().manual_seed(seed)
    a_ps = [p for g in ours.param_groups for p in g["params"]]
    b_ps = [p for g in theirs.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in a_ps]
    for t in range(steps):
        for opt in (ours, theirs):
            for group in opt.param_groups:  # a schedule: lr read every step
                group["lr"] = group["lr"] * 0.9
        for p, q, g in zip(a_ps, b_ps, grads_for(a_ps, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(**(step_kw or {}))
        theirs.step(**(step_kw or {}))
        if between is not None and t % 2 == 0:
            for p, q, g in zip(a_ps, b_ps, grads_for(a_ps, gen)):
                p.grad, q.grad = g.clone(), g.clone()
            between(ours)
            between(theirs)
        for i, (p, q) in enumerate(zip(a_ps, b_ps)):
            assert rel_err(p.detach(), q.detach()) < 1e-9, (t, i)
            for k in keys:
                if k in theirs.state[q]:
                    assert k in ours.state[p], (k, i)
                    x, y = ours.state[p][k], theirs.state[q][k]
                    assert x.shape == y.shape and x.dtype == y.dtype, k
                    assert rel_err(x, y) < 1e-9, (t, i, k)
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(a_ps, start))  # it stepped


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.2, "maximize": True, "d": 1.5, "beta2_decay": -0.6}])
def test_adafactor_matches_torch_float64(kw, backend):
    v = values(0)
    ours = adamkit.Adafactor([x.clone().requires_grad_() for x in v], lr=0.05, backend=backend, **kw)
    theirs = torch.optim.Adafactor([x.clone().requires_grad_() for x in v], lr=0.05, **kw)
    lockstep(ours, theirs, 6, 1, ("row_var", "col_var", "variance", "step"))
    # torch's state dict loads into adamkit's and the other way round (same keys and shapes)
    ours.load_state_dict(roundtrip(theirs.state_dict()))
    theirs.load_state_dict(roundtrip(ours.state_dict()))
    lockstep(ours, theirs, 2, 2, ("row_var", "col_var", "variance"))


def adafactor_m_oracle(p, g, st, t, lr, beta1, eps1, eps2=1e-3, d=1.0, c=-0.8):
    """Adafactor with a first moment, per element in Python floats for a 2-D p (list of rows)."""
    R, C = len(p), len(p[0])
    b2 = t**c
    rho = min(lr, 1 / math.sqrt(t))
    rms_p = math.sqrt(sum(x * x for row in p for x in row) / (R * C))
    alpha = max(eps2, rms_p) * rho
    st["r"] = [(1 - b2) * r + b2 * sum(x * x for x in g[i]) / C for i, r in enumerate(st["r"])]
    st["c"] = [(1 - b2) * c_ + b2 * sum(g[i][j] ** 2 for i in range(R)) / R for j, c_ in enumerate(st["c"])]
    mean_r = max(sum(st["r"]) / R, eps1)
    u = [
        [g[i][j] / math.sqrt(max(st["r"][i] * st["c"][j] / mean_r, eps1 * eps1)) for j in range(C)]
        for i in range(R)
    ]
    clip = max(1.0, math.sqrt(sum(x * x for row in u for x in row) / (R * C)) / d)
    st["m"] = [[beta1 * st["m"][i][j] + (1 - beta1) * u[i][j] / clip for j in range(C)] for i in range(R)]
    return [[p[i][j] - alpha * st["m"][i][j] for j in range(C)] for i in range(R)]


def test_adafactor_first_moment_matches_its_equations():
    (v,) = values(3, shapes=[(4, 3)])
    p = v.clone().requires_grad_()
    opt = adamkit.Adafactor([p], lr=0.05, beta1=0.9)
    ref = v.tolist()
    st = {"r": [0.0] * 4, "c": [0.0] * 3, "m": [[0.0] * 3 for _ in range(4)]}
    gen = torch.Generator().manual_seed(4)
    for t in range(1, 6):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        p.grad = g
        opt.step()
        ref = adafactor_m_oracle(ref, g.tolist(), st, t, 0.05, 0.9, torch.finfo(torch.float64).eps)
        torch.testing.assert_close(p.detach(), torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=0)
        torch.testing.assert_close(
            opt.state[p]["exp_avg"], torch.tensor(st["m"], dtype=torch.float64), rtol=1e-9, atol=1e-15
        )


def test_stable_adamw_kahan_keeps_the_decay_optimi_rounds_away():
    """bf16 weights at 1.0, zero gradients (no Adam term), decay lr * wd = 1e-4 per step: a step's
    decay is below half a bf16 ulp. optimi multiplies the bf16 parameter by (1 - lr wd) outside its
    Kahan compensation, so every step rounds back to 1.0; adamkit carries the whole update through
    the compensation, so the weight's value follows (1 - 1e-4)^t as in float64."""
    optimi = pytest.importorskip("optimi")
    ours_p = torch.ones(256, dtype=torch.bfloat16, requires_grad=True)
    theirs_p = torch.ones(256, dtype=torch.bfloat16, requires_grad=True)
    ours = adamkit.StableAdamW([ours_p], lr=1e-3, weight_decay=0.1)
    theirs = optimi.StableAdamW(
        [theirs_p], lr=1e-3, weight_decay=0.1, kahan_sum=True, foreach=False, triton=False
    )
    for _ in range(100):
        for q in (ours_p, theirs_p):
            q.grad = torch.zeros_like(q)
        ours.step()
        theirs.step()
    assert bool((theirs_p.detach() == 1.0).all())  # the decay was lost at every step
    full = ours.full_precision_params()[0]
    torch.testing.assert_close(full, torch.full((256,), (1 - 1e-4) ** 100), rtol=2e-4, atol=0)


@pytest.mark.parametrize("backend", ["reference", "foreach", "fused"])
@pytest.mark.parametrize("T", [None, 3], ids=["no-warmup", "warmup"])
def test_ademamix_matches_its_papers_equations(T, backend):
    """AdEMAMix (Pagliardini et al., Algorithm 1, with the alpha and beta3 schedules of its
    Appendix), in Python floats per element; fp32 parameters here, within a few fp32 ulps."""
    lr, (b1, b2, b3), alpha, eps, wd = 0.02, (0.9, 0.99, 0.999), 5.0, 1e-8, 0.1
    gen = torch.Generator().manual_seed(41)
    p0 = torch.randn(300, generator=gen)
    p = p0.clone().requires_grad_()
    opt = adamkit.AdEMAMix([p], lr=lr, betas=(b1, b2, b3), alpha=alpha, t_alpha_beta3=T, eps=eps,
                           weight_decay=wd, backend=backend)  # fmt: skip
    x, m1, m2, v = p0.double().tolist(), [0.0] * 300, [0.0] * 300, [0.0] * 300
    for t in range(1, 6):
        g = torch.randn(300, generator=gen).tolist()
        p.grad = torch.tensor(g)
        opt.step()
        a_t, b3_t = alpha, b3
        if T:
            a_t = min(t * alpha / T, alpha)
            lb1, lb3 = math.log(b1), math.log(b3)
            b3_t = min(math.exp(lb1 * lb3 / ((1 - t / T) * lb3 + (t / T) * lb1)), b3)
        for i in range(300):
            m1[i] = b1 * m1[i] + (1 - b1) * g[i]
            m2[i] = b3_t * m2[i] + (1 - b3_t) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            den = math.sqrt(v[i] / (1 - b2**t)) + eps
            x[i] -= lr * ((m1[i] / (1 - b1**t) + a_t * m2[i]) / den + wd * x[i])
        torch.testing.assert_close(
            p.detach().double(), torch.tensor(x, dtype=torch.float64), rtol=1e-5, atol=1e-6
        )
        want = torch.tensor(m2, dtype=torch.float64)
        torch.testing.assert_close(opt.state[p]["exp_avg_slow"].double(), want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "foreach", "fused"])
@pytest.mark.parametrize("clip", [0.25, None], ids=["clip", "noclip"])
def test_adopt_matches_its_papers_equations(clip, backend):
    """ADOPT (Taniguchi et al. 2024, Algorithm 2 with the reference's clip c_t = t^(1/4)), in Python
    floats per element: the first step only sets v = g^2; then m is fed g / max(sqrt(v_prev), eps),
    clipped, and v is updated after the parameter. fp32 here (the fused backend runs the native
    kernel): within a few fp32 ulps of the float64 equations."""
    lr, (b1, b2), eps, wd = 0.02, (0.9, 0.99), 1e-6, 0.1
    gen = torch.Generator().manual_seed(40)
    p0 = torch.randn(257, generator=gen)
    p = p0.clone().requires_grad_()
    opt = adamkit.ADOPT([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, decouple=True,
                        clip_exponent=clip, backend=backend)  # fmt: skip
    x, m, v, clipped = p0.double().tolist(), [0.0] * 257, [0.0] * 257, 0
    for t in range(1, 6):
        g = (torch.randn(257, generator=gen) * 3).tolist()
        p.grad = torch.tensor(g)
        opt.step()
        c = math.inf if clip is None else t**clip
        for i in range(257):
            x[i] *= 1 - lr * wd
            if t > 1:
                raw = g[i] / max(math.sqrt(v[i]), eps)
                clipped += abs(raw) > c
                n = max(-c, min(c, raw))
                m[i] = b1 * m[i] + (1 - b1) * n
                x[i] -= lr * m[i]
            v[i] = g[i] * g[i] if t == 1 else b2 * v[i] + (1 - b2) * g[i] * g[i]
        torch.testing.assert_close(
            p.detach().double(), torch.tensor(x, dtype=torch.float64), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            opt.state[p]["exp_avg_sq"].double(), torch.tensor(v, dtype=torch.float64), rtol=1e-5, atol=0
        )
    assert (clipped > 0) == (clip is not None)  # the clip bound was met (|g| / sqrt(v) > t^(1/4))


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_came_matches_came_pytorch_float64(backend):
    came_pytorch = pytest.importorskip("came_pytorch")
    v = values(5)
    ours = adamkit.CAME([x.clone().requires_grad_() for x in v], lr=0.03, weight_decay=0.1, backend=backend)
    theirs = came_pytorch.CAME([x.clone().requires_grad_() for x in v], lr=0.03, weight_decay=0.1)
    keys = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col", "exp_avg_sq")
    lockstep(ours, theirs, 6, 6, keys)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_sophia_matches_sophia_opt_float64(backend):
    sophia_opt = pytest.importorskip("sophia_opt")
    v = values(7)
    ours = adamkit.SophiaG(
        [x.clone().requires_grad_() for x in v], lr=0.03, rho=0.05, weight_decay=0.1, backend=backend
    )
    theirs = sophia_opt.SophiaG([x.clone().requires_grad_() for x in v], lr=0.03, rho=0.05, weight_decay=0.1)
    lockstep(
        ours, theirs, 6, 8, ("exp_avg", "hessian"), between=lambda o: o.update_hessian(), step_kw={"bs": 7}
    )


def test_sophia_update_hessian_leaves_params_and_momentum():
    (v,) = values(9, shapes=[(5,)])
    p = v.clone().requires_grad_()
    opt = adamkit.SophiaG([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.ones(5, dtype=torch.float64)
    opt.update_hessian()  # before any step: state is created, step stays 0
    assert float(opt.state[p]["step"]) == 0 and torch.equal(p.detach(), v)
    torch.testing.assert_close(
        opt.state[p]["hessian"], torch.full((5,), 0.01, dtype=torch.float64), rtol=0, atol=1e-15
    )
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="bs"):
        opt.step(bs=0)
    assert float(opt.state[p]["step"]) == 0 and torch.equal(p.detach(), v)


@pytest.mark.parametrize("backend", ["reference", "foreach", "auto"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_matches_its_equation_float64(wd, backend):
    """m, v Adam moments; r = m_hat / (sqrt(v_hat) + eps) + wd p; p -= lr * phi * r with
    phi = ||p|| / ||r||, 1 where either is 0 (a zero parameter: phi = 1)."""
    v = values(10)
    v[2] = torch.zeros(7, dtype=torch.float64)  # ||p|| = 0 at the first step
    ps = [x.clone().requires_grad_() for x in v]
    lr, (b1, b2), eps = 0.02, (0.8, 0.95), 1e-6
    opt = adamkit.Lamb(ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, backend=backend)
    ref = [x.reshape(-1).tolist() for x in v]
    m = [[0.0] * x.numel() for x in v]
    s = [[0.0] * x.numel() for x in v]
    gen = torch.Generator().manual_seed(11)
    for t in range(1, 5):
        gs = grads_for(ps, gen)
        if t == 1:
            gs[3] = torch.zeros((), dtype=torch.float64)  # ||r|| = 0
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        for i, g in enumerate(gs):
            g = g.reshape(-1).tolist()
            m[i] = [b1 * a + (1 - b1) * x for a, x in zip(m[i], g)]
            s[i] = [b2 * a + (1 - b2) * x * x for a, x in zip(s[i], g)]
            r = [
                (a / (1 - b1**t)) / (math.sqrt(c / (1 - b2**t)) + eps) + wd * w
                for a, c, w in zip(m[i], s[i], ref[i])
            ]
            pn, rn = math.sqrt(sum(w * w for w in ref[i])), math.sqrt(sum(x * x for x in r))
            phi = pn / rn if pn > 0 and rn > 0 else 1.0
            ref[i] = [w - lr * phi * x for w, x in zip(ref[i], r)]
        for i, p in enumerate(ps):
            want = torch.tensor(ref[i], dtype=torch.float64).view(p.shape)
            torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-15)
    assert not torch.equal(ps[2].detach(), v[2])  # phi = 1 moved the zero parameter


@pytest.mark.parametrize("backend", ["reference", "foreach", "auto"])
def test_adam_mini_matches_its_equations_float64(backend):
    """One v per output row (p[i]) for >= 2-D, one per tensor for vectors and scalars."""
    v = values(12)
    ps = [x.clone().requires_grad_() for x in v]
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.99), 1e-8, 0.1
    opt = adamkit.AdamMini(ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, backend=backend)
    blocks = [x.shape[0] if x.dim() >= 2 else 1 for x in v]
    ref = [x.reshape(b, -1).tolist() for x, b in zip(v, blocks)]
    m = [[[0.0] * len(row) for row in r] for r in ref]
    vv = [[0.0] * b for b in blocks]
    gen = torch.Generator().manual_seed(13)
    for t in range(1, 5):
        gs = grads_for(ps, gen)
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        for i, (g, b) in enumerate(zip(gs, blocks)):
            g = g.reshape(b, -1).tolist()
            for k in range(b):
                vv[i][k] = b2 * vv[i][k] + (1 - b2) * sum(x * x for x in g[k]) / len(g[k])
                denom = math.sqrt(vv[i][k] / (1 - b2**t)) + eps
                for j, x in enumerate(g[k]):
                    m[i][k][j] = b1 * m[i][k][j] + (1 - b1) * x
                    ref[i][k][j] = ref[i][k][j] * (1 - lr * wd) - lr * (m[i][k][j] / (1 - b1**t)) / denom
        for i, p in enumerate(ps):
            torch.testing.assert_close(
                p.detach(), torch.tensor(ref[i], dtype=torch.float64).view(p.shape), rtol=1e-9, atol=1e-15
            )
            st = opt.state[p]["exp_avg_sq"]
            assert st.numel() == blocks[i]
            torch.testing.assert_close(
                st.reshape(-1), torch.tensor(vv[i], dtype=torch.float64), rtol=1e-9, atol=0
            )


@pytest.mark.parametrize("backend", ["reference", "foreach", "auto"])
@pytest.mark.parametrize("kw", [{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "momentum": 0.9}])
def test_muon_matches_torch_float64(kw, backend):
    """Tall and wide matrices against torch.optim.Muon (its bf16 Newton-Schulz included); the
    constructor's split sends the 3-D tensor and the vector to AdamW (torch.optim.AdamW)."""
    v = values(30, shapes=[(12, 5), (4, 9), (2, 3, 4), (6,)])
    ours = adamkit.Muon(
        [x.clone().requires_grad_() for x in v],
        lr=0.02,
        weight_decay=0.1,
        adamw_lr=0.003,
        backend=backend,
        **kw,
    )
    assert [(g["use_muon"], len(g["params"])) for g in ours.param_groups] == [(True, 2), (False, 2)]
    theirs = [x.clone().requires_grad_() for x in v]
    muon = torch.optim.Muon(theirs[:2], lr=0.02, weight_decay=0.1, **kw)
    adamw = torch.optim.AdamW(theirs[2:], lr=0.003, betas=(0.9, 0.95), weight_decay=0.1)
    lockstep(ours, Both(muon, adamw), 5, 31, ("momentum_buffer", "exp_avg", "exp_avg_sq"))


def test_muon_loads_torch_optim_muon_state_dicts_and_continues_as_torch():
    """torch.optim.Muon keeps no step count (no bias correction) and no use_muon switch: its
    state dict loads into adamkit.Muon's Muon group, and both go on alike (float64). An AdamW
    fallback group cannot take it: refused, nothing changed."""
    v = values(31, shapes=[(12, 5), (4, 9)])
    theirs = [x.clone().requires_grad_() for x in v]
    muon = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for q, g in zip(theirs, grads_for(theirs, gen)):
            q.grad = g
        muon.step()
    sd = roundtrip(muon.state_dict())
    ours = adamkit.Muon([q.detach().clone().requires_grad_() for q in theirs], lr=0.5, weight_decay=0.0)
    ours.load_state_dict(sd)
    group = ours.param_groups[0]
    assert group["use_muon"] and group["lr"] == 0.02 and group["weight_decay"] == 0.1
    assert all(float(ours.state[p]["step"]) == 0 for p in group["params"])
    lockstep(ours, muon, 3, 32, ("momentum_buffer",))
    fallback = adamkit.Muon([{"params": [x.clone().requires_grad_() for x in v], "use_muon": False}])
    before = fallback.state_dict()
    with pytest.raises(ValueError, match="loads into a use_muon=True group"):
        fallback.load_state_dict(sd)
    assert fallback.state_dict() == before


def test_muon_refusals_change_nothing():
    m, vec = torch.zeros(4, 3, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="2-D parameters only"):
        adamkit.Muon([{"params": [m, vec], "use_muon": True}])
    with pytest.raises(ValueError, match="ns_steps"):
        adamkit.Muon([m], ns_steps=0)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        adamkit.Muon([m], adjust_lr_fn="other")
    opt = adamkit.Muon([m, vec], lr=0.02)
    with pytest.raises(ValueError, match="2-D parameters only"):
        opt.add_param_group({"params": [torch.zeros(2, 2, 2, requires_grad=True)]})  # use_muon: True
    assert len(opt.param_groups) == 2
    m.grad, vec.grad = torch.ones(4, 3), torch.ones(3)
    opt.step()
    before = roundtrip((m.detach().clone(), opt.state_dict()))
    opt.param_groups[1]["use_muon"] = True
    with pytest.raises(ValueError, match="use_muon cannot change"):
        opt.step()
    opt.param_groups[1]["use_muon"] = False
    assert torch.equal(m.detach(), before[0]) and float(opt.state[m]["step"]) == 1


# ------------------------------------------------------------------------------------------------
# (b) One table of optimizers, generic tests
# ------------------------------------------------------------------------------------------------

# (id, class, options, planner name, what to call between steps). Every optimizer of adamkit is a
# row: adding one is adding a row here (and its float64 oracle to ORACLES).
HESSIAN = lambda opt: opt.update_hessian()  # noqa: E731
TABLE = [
    ("adam", adamkit.Adam, {"lr": 0.01, "weight_decay": 0.1}, "adam", None),
    ("adamw", adamkit.AdamW, {"lr": 0.01, "weight_decay": 0.1}, "adamw", None),
    ("lion", adamkit.Lion, {"lr": 0.001, "weight_decay": 0.1}, "lion", None),
    ("adafactor", adamkit.Adafactor, {"lr": 0.05, "weight_decay": 0.1}, "adafactor", None),
    ("adafactor-m", adamkit.Adafactor, {"lr": 0.05, "beta1": 0.9}, "adafactor-m", None),
    ("came", adamkit.CAME, {"lr": 0.01, "weight_decay": 0.1}, "came", None),
    ("adam-mini", adamkit.AdamMini, {"lr": 0.01, "weight_decay": 0.1}, "adam-mini", None),
    ("lamb", adamkit.Lamb, {"lr": 0.01, "weight_decay": 0.1}, "lamb", None),
    ("sophia", adamkit.SophiaG, {"lr": 0.01, "rho": 0.05}, "sophia", HESSIAN),
    # GSHAPES' matrix takes Muon, the others the AdamW fallback (a group of their own)
    ("muon", adamkit.Muon, {"lr": 0.02, "weight_decay": 0.1, "adamw_lr": 3e-3}, "muon", None),
    # pytorch_optimizer's spelling of decoupled decay (adamkit's own: decouple=True)
    ("adopt", adamkit.ADOPT, {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True}, "adopt", None),
    ("ademamix", adamkit.AdEMAMix, {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True,
                                    "t_alpha_beta3": 4}, "ademamix", None),
    ("stable-adamw", adamkit.StableAdamW, {"lr": 0.01, "weight_decay": 0.1}, "stable-adamw", None),
    # the cautious mask (pytorch_optimizer's normalization) on every elementwise algorithm
    ("adamw-cautious", adamkit.AdamW, {"lr": 0.01, "weight_decay": 0.1, "cautious": True}, "adamw", None),
    ("lion-cautious", adamkit.Lion, {"lr": 0.001, "weight_decay": 0.1, "cautious": True}, "lion", None),
    ("adopt-cautious", adamkit.ADOPT, {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True,
                                       "cautious": True}, "adopt", None),
    ("ademamix-cautious", adamkit.AdEMAMix, {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True,
                                             "t_alpha_beta3": 4, "cautious": True}, "ademamix", None),
    ("stable-adamw-cautious", adamkit.StableAdamW, {"lr": 0.01, "weight_decay": 0.1, "cautious": True},
     "stable-adamw", None),
    ("schedule-free", adamkit.ScheduleFreeAdamW, {"lr": 0.01, "weight_decay": 0.1, "warmup_steps": 3,
                                                  "r": 0.5}, "schedule-free", None),
]  # fmt: skip
ROWS = [pytest.param(*row, id=row[0]) for row in TABLE]
# (id, parameter dtype, options): storage formats and precision options
FORMATS = [
    pytest.param(torch.float32, {}, id="fp32"),
    pytest.param(torch.float32, {"state_format": "bf16"}, id="bf16-state"),
    pytest.param(torch.float32, {"state_format": "8bit", "min_8bit_size": 0}, id="8bit-state"),
    pytest.param(torch.bfloat16, {"kahan_sum": True}, id="bf16-kahan"),
    pytest.param(torch.bfloat16, {"stochastic_rounding": True, "kahan_sum": False}, id="bf16-sr"),
    pytest.param(torch.bfloat16, {"master_weights": True, "kahan_sum": False}, id="bf16-master"),
    pytest.param(
        torch.bfloat16,
        {"kahan_sum": "8bit", "state_format": "8bit", "min_8bit_size": 0},
        id="bf16-kahan8-8bit",
    ),
]
# the parameter buffer each precision option keeps: (key, dtype)
AUX = {"kahan_sum": ("kahan_comp", torch.bfloat16), "master_weights": ("master_weight", torch.float32)}
GSHAPES = [(16, 80), (4, 3, 25), (9,)]  # 8-bit: rows of 80 and 75 (narrower stay fp32)


def make(cls, kw, dtype, fmt, backend="foreach", seed=0):
    ps = [v.requires_grad_() for v in values(seed, dtype, GSHAPES)]
    return ps, cls(ps, backend=backend, **kw, **fmt)


def drive(ps, opt, between, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, g in zip(ps, grads_for(ps, gen)):
            p.grad = g
        opt.step()
        if between is not None:
            between(opt)


def assert_same(a, b, what, compare=assert_bits):
    (ps, opt), (qs, qopt) = a, b
    for i, (p, q) in enumerate(zip(ps, qs)):
        compare(p.detach(), q.detach(), f"{what}: param {i}")
        assert set(opt.state[p]) == set(qopt.state[q]), f"{what}: param {i}: keys"
        for k in opt.state[p]:
            compare(opt.state[p][k], qopt.state[q][k], f"{what}: param {i}: {k}")


# The largest difference allowed between the native kernel and the reference where square roots
# enter (Adam's v): the kernel's sqrtf is correctly rounded, torch's vectorized sqrt is not always
# (test_kernel_parity checks each step bit for bit where torch's is, to an fp32 ulp elsewhere). Over
# a few steps that ulp may move an fp32 value by a few ulps (2^-21 relative), a bf16 value rounded
# from it to its other neighbour (2^-7 relative), an 8-bit code or an int8 Kahan correction (in
# units of ulp(p)/256, far coarser than an fp32 ulp of p + correction) by one.
NEAR = {torch.float32: 2.0**-21, torch.bfloat16: 2.0**-7, torch.float64: 0.0}


def assert_near_bits(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.dtype in (torch.uint8, torch.int8):
        assert (actual.int() - expected.int()).abs().max().item() <= 1, what
        return
    rel = NEAR[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * 1e-30, equal_nan=True, msg=what)


@pytest.mark.parametrize("dtype,fmt", FORMATS)
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_state_dict_roundtrip_resumes_bit_identical(name, cls, kw, plan_name, between, dtype, fmt):
    a = make(cls, kw, dtype, fmt)
    drive(*a, between, 3, 1)
    sd = roundtrip(a[1].state_dict())  # torch.save / torch.load(weights_only=True)
    b = make(cls, kw, dtype, fmt)
    with torch.no_grad():
        for p, q in zip(a[0], b[0]):
            q.copy_(p)
    b[1].load_state_dict(sd)
    assert_same(b, a, "loaded")
    drive(*a, between, 2, 2)
    drive(*b, between, 2, 2)
    assert_same(b, a, "resumed")


@pytest.mark.parametrize("dtype,fmt", FORMATS)
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_foreach_and_auto_equal_reference(name, cls, kw, plan_name, between, dtype, fmt):
    ref = make(cls, kw, dtype, fmt, backend="reference")
    drive(*ref, between, 3, 3)
    # Sophia's auto compiles (its own test below); the native kernel's algorithms also run "fused"
    backends = ["foreach"] if cls is adamkit.SophiaG else ["foreach", "auto"]
    if cls.algorithm.native is not None:
        backends.append("fused")
    for backend in backends:
        run = make(cls, kw, dtype, fmt, backend=backend)
        drive(*run, between, 3, 3)
        sqrt_native = backend != "foreach" and cls.algorithm.native is not None and name != "lion"
        assert_same(run, ref, backend, assert_near_bits if sqrt_native else assert_bits)


@pytest.mark.parametrize("dtype,fmt", FORMATS)
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_dtypes_kept_and_state_formats(name, cls, kw, plan_name, between, dtype, fmt):
    ps, opt = make(cls, kw, dtype, fmt)
    before = [p.detach().clone() for p in ps]
    drive(ps, opt, between, 2, 4)
    sf = fmt.get("state_format")
    want = {None: dtype, "bf16": torch.bfloat16, "8bit": torch.uint8}[sf]
    for p, p0 in zip(ps, before):
        assert p.dtype == dtype and not torch.equal(p.detach(), p0)
        st = opt.state[p]
        assert st["step"].dtype == torch.float32 and float(st["step"]) == 2
        slots = [s for s in opt.algorithm.slots if s.name in st]
        assert slots
        for s in slots:
            if s.weights:  # a copy of the weights (Schedule-Free's z): fp32 in every format
                assert st[s.name].dtype == torch.float32 and s.name + "_scale" not in st, s.name
                continue
            assert st[s.name].dtype == want, s.name
            if sf == "8bit":
                assert st[s.name + "_scale"].dtype == torch.bfloat16
        kept = [AUX[k] for k in AUX if fmt.get(k)]
        if fmt.get("kahan_sum") == "8bit":  # int8 compensation (1 B/param) in place of bf16's 2 B/param
            kept = [("kahan_comp8", torch.int8) if k == "kahan_comp" else (k, d) for k, d in kept]
        assert {k for k in st if k in ("kahan_comp", "kahan_comp8", "master_weight")} == {k for k, _ in kept}
        for key, aux_dtype in kept:
            assert st[key].dtype == aux_dtype and st[key].shape == p.shape


@pytest.mark.parametrize("dtype,fmt", [f for f in FORMATS[1:] if f.id != "bf16-sr"])
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_low_precision_tracks_fp32(name, cls, kw, plan_name, between, dtype, fmt):
    """bf16/8-bit state and bf16 + Kahan/master parameters move the weights as the fp32 run does:
    the distance between the two runs stays below 10% of the distance travelled."""
    run = make(cls, kw, dtype, fmt)
    ref_ps = [p.detach().float().requires_grad_() for p in run[0]]  # the same (rounded) start
    ref = ref_ps, cls(ref_ps, backend="foreach", **kw)
    start = [p.detach().float().clone() for p in ref[0]]
    drive(*ref, between, 5, 5)
    drive(*run, between, 5, 5)
    full = run[1].full_precision_params()
    for p, q, s in zip(ref[0], full, start):
        moved = (p.detach() - s).norm()
        assert moved > 0
        assert (q.float() - p.detach()).norm() < 0.1 * moved


@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_stochastic_rounding_is_unbiased(name, cls, kw, plan_name, between):
    """bf16 parameters with stochastic rounding keep no buffer: each step adds a zero-mean error of
    up to a bf16 ulp per weight. With updates below half an ulp (lr / 60), round to nearest would
    lose them (the error's component along the fp32 run's travel: -31% to -99% here); stochastic
    rounding keeps them on average: that component stays within 25% (measured within 10%)."""
    kw = {**kw, "lr": kw["lr"] / 60}
    shapes = [(64, 32), (4, 16, 8), (300,)]  # 2860 weights: the SR noise averages out
    ps = [v.requires_grad_() for v in values(0, torch.bfloat16, shapes)]
    run = ps, cls(ps, backend="foreach", stochastic_rounding=True, kahan_sum=False, **kw)
    ref_ps = [p.detach().float().requires_grad_() for p in ps]  # the same (rounded) start
    ref = ref_ps, cls(ref_ps, backend="foreach", **kw)
    start = [p.detach().clone() for p in ref_ps]
    drive(*ref, between, 10, 5)
    drive(*run, between, 10, 5)
    moved = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(ref_ps, start)]).double()
    err = torch.cat([(q.double() - p.detach().double()).reshape(-1) for p, q in zip(ref_ps, ps)])
    assert moved.norm() > 0
    assert abs(torch.dot(err, moved) / moved.square().sum()) < 0.25


@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_lr_change_takes_effect_and_lr_zero_freezes(name, cls, kw, plan_name, between):
    """A changed lr (float or 0-D tensor) is read at the next step: lr = 0 leaves parameters as they
    are (Schedule-Free: z, the sequence the gradients move; its y still averages toward z, with
    the weight of the largest lr so far, as the package's does); a run whose lr changes equals a
    run resumed from its state with that lr."""
    ps, opt = make(cls, kw, torch.float32, {})
    drive(ps, opt, between, 2, 6)
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = torch.tensor(0.0)

    def moved_by_lr():
        if cls is adamkit.ScheduleFreeAdamW:
            return [opt.state[p]["z"].clone() for p in ps]
        return [p.detach().clone() for p in ps]

    frozen = moved_by_lr()
    drive(ps, opt, None, 1, 7)
    for now, f in zip(moved_by_lr(), frozen):
        assert torch.equal(now, f)
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr / 3
    other = make(cls, {**kw, "lr": kw["lr"] / 3}, torch.float32, {})
    with torch.no_grad():
        for p, q in zip(ps, other[0]):
            q.copy_(p)
    other[1].load_state_dict(roundtrip(opt.state_dict()))
    drive(ps, opt, between, 2, 8)
    drive(*other, between, 2, 8)
    assert_same(other, (ps, opt), "lr changed")
    assert not torch.equal(moved_by_lr()[0], frozen[0])


BAD = [
    ("lr", -1.0),
    ("lr", float("nan")),
    ("weight_decay", -0.1),
    ("maximize", "yes"),
    ("skip_nonfinite", True),
]


@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_bad_input_rejected_before_any_change(name, cls, kw, plan_name, between):
    for key, value in BAD:
        if key == "skip_nonfinite" and cls.algorithm.elementwise:
            continue  # elementwise algorithms support it (per element)
        with pytest.raises((ValueError, TypeError)):
            cls([torch.zeros(3, requires_grad=True)], **{**kw, key: value})
    with pytest.raises(TypeError, match="unexpected"):
        cls([torch.zeros(3, requires_grad=True)], **kw, no_such_option=1)
    ps, opt = make(cls, kw, torch.float32, {})
    drive(ps, opt, between, 1, 9)
    for key, value in BAD:
        if key == "skip_nonfinite" and cls.algorithm.elementwise:
            continue
        before = [p.detach().clone() for p in ps]
        state = roundtrip(opt.state_dict())["state"]
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        for p in ps:
            p.grad = torch.ones_like(p)
        with pytest.raises((ValueError, TypeError)):
            opt.step()
        opt.param_groups[0][key] = old
        for i, p in enumerate(ps):
            assert torch.equal(p.detach(), before[i]), key
            for k, t in opt.state[p].items():
                assert torch.equal(t, state[i][k]), (key, k)
    # a state dict whose slot has another shape (another model) is refused, nothing changes
    sd = roundtrip(opt.state_dict())
    slot = next(s for s in opt.algorithm.slots if s.name in sd["state"][0])
    sd["state"][0][slot.name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("dtype,fmt", FORMATS)
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_planner_state_bytes_exact(name, cls, kw, plan_name, between, dtype, fmt):
    shapes = [(64, 32), (3, 16, 8), (100,), ()]
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    opt = cls(ps, backend="foreach", **kw, **fmt)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    live = sum(t.nbytes for p in ps for t in opt.state[p].values())
    planned = adamkit_state_bytes(
        shapes, optimizer=plan_name, state_format=fmt.get("state_format"), param_dtype=dtype,
        kahan="8bit" if fmt.get("kahan_sum") == "8bit" else bool(fmt.get("kahan_sum")),
        master=bool(fmt.get("master_weights")),
        min_8bit_size=fmt.get("min_8bit_size", 4096),
    )  # fmt: skip
    assert sum(planned.values()) == live


@pytest.mark.slow  # a race of the variants
def test_quick_race_rows_run():
    """Each variant's race row trains (a few steps of the quick GPT) at its stated lr."""
    from adamkit.tools import race

    names = ["adafactor", "came", "adam-mini", "lamb", "muon"]
    result = race.race(
        "gpt", names, quick=True, steps=6, evals=1, untimed_steps=0, progress=False, log=lambda *a: None
    )
    assert set(result.runs) == set(names), (result.failed, result.skipped)
    for name in names:
        run = result.runs[name]
        assert math.isfinite(run.val_loss) and run.val_loss < run.initial_val_loss, name


def test_muon_recipe_groups():
    """The muon recipe: Muon on the hidden matrices only; embeddings, the head and vectors AdamW."""
    from adamkit.tools import registry, tasks

    model = tasks.GPT(tasks.GPTConfig(context=8, d_model=16, n_layers=1, n_heads=2, tie_weights=False))
    opt = registry.build_optimizer(model, "muon")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"])
    assert muon == sorted(n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks."))
    lrs = {g["lr"] for g in opt.param_groups if not g["use_muon"]}
    assert lrs == {registry.MUON_ADAMW_LR} and opt.param_groups[0]["lr"] == registry.TRAINABLE["muon"].lr


@pytest.mark.compiled_kernel
@pytest.mark.parametrize("dtype,fmt", [FORMATS[0], FORMATS[3]])
def test_sophia_compiled_kernel_equals_reference_and_lr_never_recompiles(dtype, fmt):
    """Sophia-G is elementwise: backend "fused" runs it on the torch.compile kernel (it has no C
    body). Bit for bit the reference's; an lr schedule, weight decay and bs changes never recompile."""
    kw = {"lr": 0.01, "rho": 0.05, "weight_decay": 0.1}
    ref = make(adamkit.SophiaG, kw, dtype, fmt, backend="reference")
    run = make(adamkit.SophiaG, kw, dtype, fmt, backend="fused")
    drive(*ref, HESSIAN, 1, 14)
    drive(*run, HESSIAN, 1, 14)  # compiles (or loads) the kernel
    assert_same(run, ref, "step 1")
    gen = torch.Generator().manual_seed(15)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(3):
            gs = grads_for(ref[0], gen)
            for ps, opt in (ref, run):
                opt.param_groups[0]["lr"] = 0.01 / (t + 2)
                opt.param_groups[0]["weight_decay"] = 0.05 * t
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                opt.step(bs=3 + t)
            assert_same(run, ref, f"step {t + 2}")


# ------------------------------------------------------------------------------------------------
# (c) Every row against its float64 oracle, gradient release, lr changes under torch.compile
# ------------------------------------------------------------------------------------------------


class Equations(torch.optim.Optimizer):
    """A float64 oracle written from a paper's equations, one tensor at a time (no adamkit code):
    ``update(p, g, state, group, t)`` changes ``p`` and ``state`` in place."""

    def __init__(self, params, update, **hp):
        super().__init__(params, hp)
        self.update = update

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                st["step"] = st.get("step", 0) + 1
                self.update(p, p.grad, st, group, st["step"])


def lamb_equations(p, g, st, h, t):
    """You et al. 2019: r = m_hat / (sqrt(v_hat) + eps) + wd p; p -= lr * ||p|| / ||r|| * r."""
    (b1, b2), lr = h["betas"], h["lr"]
    m = st.setdefault("exp_avg", torch.zeros_like(p)).mul_(b1).add_(g, alpha=1 - b1)
    v = st.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(b2).addcmul_(g, g, value=1 - b2)
    r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + h["eps"]) + h["weight_decay"] * p
    pn, rn = p.norm(), r.norm()
    p.sub_(r * (lr * (pn / rn if pn > 0 and rn > 0 else 1.0)))


def adam_mini_equations(p, g, st, h, t):
    """Zhang et al. 2024: v per block (a row of a matrix, a whole vector): the mean of g^2 there."""
    (b1, b2), lr = h["betas"], h["lr"]
    rows = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(1, -1)
    m = st.setdefault("exp_avg", torch.zeros_like(p)).mul_(b1).add_(g, alpha=1 - b1)
    v = st.setdefault("exp_avg_sq", torch.zeros(rows.shape[0], dtype=p.dtype))
    v.mul_(b2).add_(rows.square().mean(dim=1), alpha=1 - b2)
    denom = (v / (1 - b2**t)).sqrt() + h["eps"]
    p.mul_(1 - lr * h["weight_decay"])
    p.sub_(((m / (1 - b1**t)).reshape(rows.shape) / denom[:, None]).reshape(p.shape), alpha=lr)


def cautious_mask(u, g):
    """Liang et al. 2024, normalized as pytorch_optimizer's apply_cautious: n / (kept + 1)."""
    keep = (u * g > 0).to(u.dtype)
    return keep * (keep.numel() / (keep.sum().item() + 1))


def adamw_cautious_equations(p, g, st, h, t):
    """AdamW with the cautious mask on m (compared with g), the decay left unmasked."""
    (b1, b2), lr = h["betas"], h["lr"]
    m = st.setdefault("exp_avg", torch.zeros_like(p)).mul_(b1).add_(g, alpha=1 - b1)
    v = st.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(b2).addcmul_(g, g, value=1 - b2)
    p.mul_(1 - lr * h["weight_decay"])
    p.sub_(lr * (m * cautious_mask(m, g) / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + h["eps"]))


def stable_adamw_cautious_equations(p, g, st, h, t):
    """optimi's StableAdamW (debiased betas, the RMS-clipped lr scaling the decay too) with the
    cautious mask on m, the RMS taken from g and v alone."""
    (b1, b2), lr, eps = h["betas"], h["lr"], h["eps"]
    c1, c2 = ((b**t - b) / (b**t - 1) for b in (b1, b2))
    m = st.setdefault("exp_avg", torch.zeros_like(p)).mul_(c1).add_(g, alpha=1 - c1)
    v = st.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(c2).addcmul_(g, g, value=1 - c2)
    lr_t = lr / max(1.0, (g * g / v.clamp(min=eps * eps)).mean().sqrt().item())
    p.mul_(1 - lr_t * h["weight_decay"])
    p.sub_(lr_t * m * cautious_mask(m, g) / (v.sqrt() + eps))


def adafactor_m_equations(p, g, st, h, t):
    """torch.optim.Adafactor's update (Shazeer & Stern 2018) fed to a first moment (beta1), as
    transformers' Adafactor: m = beta1 m + (1 - beta1) u, p -= alpha m."""
    lr, b1, eps1, eps2 = h["lr"], h["beta1"], torch.finfo(p.dtype).eps, 1e-3
    b2 = 1 - t**-0.8
    alpha = max(eps2, (p.square().mean().sqrt().item())) * min(lr, t**-0.5)
    if p.dim() >= 2:
        r = st.setdefault("row", torch.zeros(p.shape[:-1] + (1,), dtype=p.dtype))
        c = st.setdefault("col", torch.zeros(p.shape[:-2] + (1,) + p.shape[-1:], dtype=p.dtype))
        r.mul_(b2).add_(g.square().mean(dim=-1, keepdim=True), alpha=1 - b2)
        c.mul_(b2).add_(g.square().mean(dim=-2, keepdim=True), alpha=1 - b2)
        v = r * c / r.mean(dim=-2, keepdim=True).clamp(min=eps1)
    else:
        v = st.setdefault("variance", torch.zeros_like(p)).mul_(b2).add_(g.square(), alpha=1 - b2)
    u = g / v.clamp(min=eps1 * eps1).sqrt()
    u = u / max(1.0, u.square().mean().sqrt().item())
    m = st.setdefault("exp_avg", torch.zeros_like(p)).mul_(b1).add_(u, alpha=1 - b1)
    p.sub_(m, alpha=alpha)


def _package(module: str, cls: str):
    def build(ps, kw):
        return getattr(pytest.importorskip(module), cls)(ps, **kw)

    return build


class Both:
    """Two reference optimizers as one (torch.optim.Muon for matrices, AdamW for the rest)."""

    def __init__(self, *opts):
        self.opts = opts
        self.param_groups = [g for o in opts for g in o.param_groups]

    @property
    def state(self):
        return {p: st for o in self.opts for p, st in o.state.items()}

    def step(self):
        for o in self.opts:
            o.step()


def schedule_free_package(ps, kw):
    """schedulefree.AdamWScheduleFree, per tensor (its foreach path divides the gradients in place
    alike), put in train mode as its documentation asks."""
    opt = pytest.importorskip("schedulefree").AdamWScheduleFree(ps, foreach=False, **kw)
    opt.train()
    return opt


def muon_and_adamw(ps, kw):
    """torch.optim.Muon on the 2-D parameters, torch.optim.AdamW (adamw_lr, betas (0.9, 0.95)) on
    the others: the recipe adamkit.Muon implements."""
    muon = torch.optim.Muon([p for p in ps if p.dim() == 2], lr=kw["lr"], weight_decay=kw["weight_decay"])
    rest = [p for p in ps if p.dim() != 2]
    adamw = torch.optim.AdamW(rest, lr=kw["adamw_lr"], betas=(0.9, 0.95), weight_decay=kw["weight_decay"])
    return Both(muon, adamw)


# row id -> (builds the float64 oracle over params from the row's options, the state keys compared)
ORACLES = {
    "adam": (_package("torch.optim", "Adam"), ("exp_avg", "exp_avg_sq")),
    "adamw": (_package("torch.optim", "AdamW"), ("exp_avg", "exp_avg_sq")),
    "lion": (_package("lion_pytorch", "Lion"), ("exp_avg",)),
    "adafactor": (_package("torch.optim", "Adafactor"), ("row_var", "col_var", "variance")),
    "adafactor-m": (lambda ps, kw: Equations(ps, adafactor_m_equations, **kw), ()),
    "came": (_package("came_pytorch", "CAME"), ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col")),
    "adam-mini": (
        lambda ps, kw: Equations(ps, adam_mini_equations, betas=(0.9, 0.999), eps=1e-8, **kw),
        ("exp_avg",),
    ),
    "lamb": (lambda ps, kw: Equations(ps, lamb_equations, betas=(0.9, 0.999), eps=1e-6, **kw), ()),
    "sophia": (_package("sophia_opt", "SophiaG"), ("exp_avg", "hessian")),
    "muon": (muon_and_adamw, ("momentum_buffer", "exp_avg", "exp_avg_sq")),
    "adopt": (_package("pytorch_optimizer", "ADOPT"), ("exp_avg", "exp_avg_sq")),
    "ademamix": (_package("pytorch_optimizer", "AdEMAMix"), ("exp_avg", "exp_avg_sq", "exp_avg_slow")),
    "stable-adamw": (_package("optimi", "StableAdamW"), ("exp_avg", "exp_avg_sq")),
    "schedule-free": (schedule_free_package, ("z", "exp_avg_sq")),
    "adamw-cautious": (
        lambda ps, kw: Equations(ps, adamw_cautious_equations, betas=(0.9, 0.999), eps=1e-8, **kw),
        ("exp_avg", "exp_avg_sq"),
    ),
    "lion-cautious": (_package("pytorch_optimizer", "Lion"), ("exp_avg",)),
    "adopt-cautious": (_package("pytorch_optimizer", "ADOPT"), ("exp_avg", "exp_avg_sq")),
    "ademamix-cautious": (
        _package("pytorch_optimizer", "AdEMAMix"),
        ("exp_avg", "exp_avg_sq", "exp_avg_slow"),
    ),
    "stable-adamw-cautious": (
        lambda ps, kw: Equations(ps, stable_adamw_cautious_equations, betas=(0.9, 0.99), eps=1e-6, **kw),
        ("exp_avg", "exp_avg_sq"),
    ),
}


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_float64_oracle(name, cls, kw, plan_name, between, backend):
    """Every row, in float64 with an lr schedule, within 1e-9 relative of its reference package or
    of its paper's equations (parameters and the state both keep)."""
    oracle, keys = ORACLES[name]
    v = values(20, shapes=GSHAPES)
    ours = cls([x.clone().requires_grad_() for x in v], backend=backend, **kw)
    theirs = oracle([x.clone().requires_grad_() for x in v], kw)
    lockstep(ours, theirs, 5, 21, keys, between=between)


def release_drive(ps, opt, between, steps, seed):
    """As ``drive``, through backward: sum(p * g) gives each parameter the gradient g."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        gs = grads_for(ps, gen)
        sum((p * g).sum() for p, g in zip(ps, gs)).backward()
        # stepped and freed inside backward; the first backward's wait for step() (release_check)
        assert all((p.grad is None) == (t > 0) for p in ps)
        opt.step()  # callable: after the first, nothing left to step
        if between is not None:
            between(opt)


RELEASE_FORMATS = [pytest.param(torch.float64, {}, id="fp64"), *FORMATS]


@pytest.mark.parametrize("dtype,fmt", RELEASE_FORMATS)
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_gradient_release_equals_ordinary_step(name, cls, kw, plan_name, between, dtype, fmt):
    """With gradient_release=True each parameter is stepped in its hook during backward: the same
    bits as step() after backward, for every format, on the default backend (the native kernel's
    one-row path for Adam/AdamW/Lion; foreach for float64, which auto would compile). Sophia-G
    refuses it: its sampled-label backward must not step."""
    backend = "foreach" if dtype == torch.float64 else "auto"
    if cls is adamkit.SophiaG:
        with pytest.raises(ValueError, match="update_hessian"):
            make(cls, {**kw, "gradient_release": True}, dtype, fmt, backend=backend)
        return
    ordinary = make(cls, kw, dtype, fmt, backend=backend)
    released = make(cls, {**kw, "gradient_release": True}, dtype, fmt, backend=backend)
    drive(*ordinary, between, 3, 22)
    release_drive(*released, between, 3, 22)
    assert_same(released, ordinary, "released")


@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_max_grad_norm_and_skip_nonfinite_steps(name, cls, kw, plan_name, between):
    """max_grad_norm equals torch's clip_grad_norm_ before the step (the coefficient folded into
    the kernel, the gradients left as they are); skip_nonfinite_steps leaves everything unchanged
    on a step with a nan gradient, and steps the next one."""
    clipped = make(cls, {**kw, "max_grad_norm": 2.0}, torch.float32, {}, backend="reference")
    by_hand = make(cls, kw, torch.float32, {}, backend="reference")
    gen = torch.Generator().manual_seed(24)
    for _ in range(2):
        gs = grads_for(clipped[0], gen)
        for ps, _opt in (clipped, by_hand):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(by_hand[0], 2.0)
        assert norm > 2.0 and not torch.equal(by_hand[0][0].grad, gs[0])  # clipping is active
        clipped[1].step()
        by_hand[1].step()
        assert torch.equal(clipped[0][0].grad, gs[0])  # the user's gradients are not rewritten
        assert clipped[1].last_grad_norm == pytest.approx(float(norm), rel=1e-6)
        if between is not None:  # update_hessian() reads p.grad: the same (unclipped) for both
            hs = grads_for(clipped[0], gen)
            for ps, opt in (clipped, by_hand):
                for p, h in zip(ps, hs):
                    p.grad = h.clone()
                between(opt)
    for p, q in zip(clipped[0], by_hand[0]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)

    ps, opt = make(cls, {**kw, "skip_nonfinite_steps": True}, torch.float32, {})
    drive(ps, opt, between, 1, 25)
    before = roundtrip((ps, opt.state_dict()))
    for p, g in zip(ps, grads_for(ps, gen)):
        p.grad = g
    ps[1].grad[0, 1, 2] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    after = opt.state_dict()["state"]
    for i, p in enumerate(ps):
        assert torch.equal(p.detach(), before[0][i].detach())
        for k, t in before[1]["state"][i].items():
            assert torch.equal(after[i][k], t), k
    ps[1].grad[0, 1, 2] = 0.0
    opt.step()
    assert opt.skipped_steps == 1 and float(opt.state[ps[0]]["step"]) == 2


@pytest.mark.parametrize("lr_type", [float, torch.tensor])
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_lr_schedule_never_recompiles_a_compiled_train_step(name, cls, kw, plan_name, between, lr_type):
    """A train step under torch.compile whose lr changes every step (a float or a 0-D tensor, as
    schedulers write them) compiles once: the optimizer's step runs outside the graph, on kernels
    that take lr as a runtime scalar. Same bits as the eager run."""
    backend = "foreach" if cls is adamkit.SophiaG else "auto"  # Sophia's compiled kernel: below
    eager = make(cls, kw, torch.float32, {}, backend=backend)
    compiled = make(cls, kw, torch.float32, {}, backend=backend)

    def train_step(ps, opt, gs):
        loss = sum((p * g).sum() for p, g in zip(ps, gs))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step_fn = torch.compile(train_step, backend="eager")
    gen = torch.Generator().manual_seed(26)
    for t in range(4):
        gs = [g.float() for g in grads_for(eager[0], gen)]
        for _ps, opt in (eager, compiled):
            opt.param_groups[0]["lr"] = lr_type(kw["lr"] / (t + 1))
        train_step(*eager, gs)
        if t == 0:
            step_fn(*compiled, gs)  # compiles
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                step_fn(*compiled, gs)
        if between is not None:
            for ps, opt in (eager, compiled):
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                between(opt)
                opt.zero_grad()
        assert_same(compiled, eager, f"step {t + 1}")


@pytest.mark.slow  # a whole training run
def test_train_adam_mini_with_fused_clipping_and_release():
    """`adamkit train --optimizer adam-mini --grads fused|release` trains: fused clipping is
    the same run as torch's clip_grad_norm_ (the coefficient folded into the step); release steps
    inside backward (clipped by the previous step's norm) and still learns."""
    from adamkit.tools.train import TrainConfig, train

    tiny = adamkit.tools.tasks.GPTConfig(context=16, d_model=16, n_layers=1, n_heads=2)
    runs = {
        grads: train(TrainConfig(steps=12, model=tiny, batch_size=8, evals=1, progress=False,
                                 optimizer="adam-mini", grads=grads))
        for grads in ("clip_grad_norm", "fused", "release")
    }  # fmt: skip
    assert runs["fused"].val_loss == pytest.approx(runs["clip_grad_norm"].val_loss, rel=1e-5)
    for result in runs.values():
        assert math.isfinite(result.val_loss) and result.val_loss < result.initial_val_loss


@pytest.mark.parametrize("state", ["fp32", "bf16", "8bit"])
def test_plan_muon_recipe_equals_live_state(state):
    """`adamkit plan` recipe `fp32-<state>-muon` counts adamkit.Muon's live state to the byte:
    momentum on matrices, AdamW's m and v on the rest (the constructor's split)."""
    from adamkit.tools.plan import ModelSpec, TensorSpec, model_state_bytes, parse_recipe

    shapes = [(64, 80), (8000, 2), (100,), (3, 16, 8)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = adamkit.Muon(ps, state_format=state, backend="foreach")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    live = sum(t.nbytes for p in ps for t in opt.state[p].values())
    model = ModelSpec("m", tuple(TensorSpec(f"p{i}", s) for i, s in enumerate(shapes)))
    recipe = parse_recipe(
        {"fp32": "fp32-muon", "bf16": "fp32-bf16state-muon", "8bit": "fp32-8bit-muon"}[state]
    )
    planned = model_state_bytes(model, recipe)
    assert sum(v for k, v in planned.items() if k not in ("params", "grads")) == live


# ------------------------------------------------------------------------------------------------
# One engine-option path: every optimizer takes the same options, and named parameters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_named_parameters_step_as_plain_ones(name, cls, kw, plan_name, between):
    """``model.named_parameters()`` (torch.optim's and every other class's input; Muon raised
    AttributeError on its tuples): the same steps as plain parameters, names in the state dict."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    twin = copy.deepcopy(model)
    named = cls(model.named_parameters(), **kw)
    plain = cls(twin.parameters(), **kw)
    x = torch.randn(4, 5, dtype=torch.float64)
    for m, opt in ((model, named), (twin, plain)):
        for _ in range(2):
            m(x).square().sum().backward()
            opt.step()
            if between is not None:
                between(opt)
            opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    names = [n for g in named.state_dict()["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_engine_options_apply_or_are_refused_with_the_reason(name, cls, kw, plan_name, between):
    """Adafactor, CAME, Adam-mini, LAMB, Sophia-G and Muon raised a bare TypeError for
    release_clipping= and accumulation_steps=; every class now takes the engine's options."""
    ps = [torch.randn(6, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    if cls is adamkit.SophiaG:  # refuses gradient release itself, with its reason
        with pytest.raises(ValueError, match="update_hessian"):
            cls(ps, **kw, gradient_release=True, max_grad_norm=1.0, release_clipping="per_tensor")
    else:
        opt = cls(ps, **kw, gradient_release=True, max_grad_norm=1.0, release_clipping="per_tensor")
        assert opt.release_clipping == "per_tensor"
        opt.remove_gradient_release()
    if cls not in (adamkit.Adam, adamkit.AdamW):
        with pytest.raises(ValueError, match="accumulation_steps > 1 is not supported|gradient_release"):
            cls(ps, **kw, gradient_release=cls is not adamkit.SophiaG, accumulation_steps=2)
    with pytest.raises(ValueError, match="release_clipping applies to gradient_release=True"):
        cls(ps, **kw, release_clipping="per_tensor")
    with pytest.raises(TypeError, match="release_check must be a bool"):
        cls(ps, **kw, release_check="yes")
    with pytest.raises(TypeError, match="unexpected keyword"):
        cls(ps, **kw, no_such_option=1)


@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_every_optimizer_documents_every_engine_option_once(name, cls, kw, plan_name, between):
    """The engine's options are documented once (optim/options.py) and every class's help shows
    them all: each of ENGINE_DEFAULTS and OPTIMIZER_OPTIONS is named as an argument."""
    from adamkit.optim.options import ENGINE_DEFAULTS, OPTIMIZER_OPTIONS

    doc = cls.__doc__
    assert "{engine_options}" not in doc
    for option in (*ENGINE_DEFAULTS, *OPTIMIZER_OPTIONS):
        assert f"\n        {option}:" in doc or f" {option}:" in doc or f"{option}," in doc, option


# ------------------------------------------------------------------------------------------------
# Peers' option names
# ------------------------------------------------------------------------------------------------


def test_lion_pytorch_decoupled_weight_decay_and_use_triton():
    """lion-pytorch's decoupled_weight_decay=True (wd / the constructor's lr) is decouple_lr=True
    with max_lr=lr: equal to lion-pytorch in float64 under a schedule; use_triton=True is refused
    with the equivalent, use_triton=False accepted."""
    from lion_pytorch import Lion as TheirLion

    v = values(31, shapes=GSHAPES)
    ours = adamkit.Lion(
        [x.clone().requires_grad_() for x in v], lr=1e-3, weight_decay=1e-4, decoupled_weight_decay=True,
        use_triton=False, backend="reference",
    )  # fmt: skip
    theirs = TheirLion(
        [x.clone().requires_grad_() for x in v], lr=1e-3, weight_decay=1e-4, decoupled_weight_decay=True
    )
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.3) for o in (ours, theirs)]
    gen = torch.Generator().manual_seed(32)
    a_ps, b_ps = ours.param_groups[0]["params"], theirs.param_groups[0]["params"]
    for _ in range(6):
        for p, q, g in zip(a_ps, b_ps, grads_for(a_ps, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for s in scheds:
            s.step()
    for p, q in zip(a_ps, b_ps):
        assert rel_err(p.detach(), q.detach()) < 1e-12
    assert ours.param_groups[0]["decouple_lr"] and ours.param_groups[0]["max_lr"] == 1e-3
    with pytest.raises(ValueError, match="use_triton=True"):
        adamkit.Lion([torch.zeros(3, requires_grad=True)], use_triton=True)


def test_lion_fully_decoupled_decay():
    """decouple_lr on Lion: p *= 1 - (lr / max_lr) * wd, independent of lr at max_lr."""
    p = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = adamkit.Lion([p], lr=1e-2, weight_decay=1e-4, decouple_lr=True, max_lr=2e-2, backend="reference")
    p.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 1 - 0.5 * 1e-4, dtype=torch.float64))


def test_transformers_adafactor_names():
    """transformers' Adafactor spellings: accepted where they name this class's behaviour (its
    default call, lr=None with relative_step=True, equals lr=1e-2), refused with the nearest
    equivalent where they do not."""
    v = values(33, shapes=GSHAPES)
    a = adamkit.Adafactor(
        [x.clone().requires_grad_() for x in v], lr=None, relative_step=True, scale_parameter=True,
        warmup_init=False, clip_threshold=1.0, decay_rate=-0.8, backend="reference",
    )  # fmt: skip
    b = adamkit.Adafactor([x.clone().requires_grad_() for x in v], lr=1e-2, backend="reference")
    drive(a.param_groups[0]["params"], a, None, 3, 34)
    drive(b.param_groups[0]["params"], b, None, 3, 34)
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert torch.equal(p, q)
    ps = [torch.zeros(3, 3, requires_grad=True)]
    for kw, match in [
        ({"relative_step": False}, "relative_step=False"),
        ({"scale_parameter": False}, "scale_parameter=False has no equivalent"),
        ({"warmup_init": True}, "lr scheduler"),
        ({"d": 2.0, "clip_threshold": 3.0}, "disagree"),
    ]:
        with pytest.raises(ValueError, match=match):
            adamkit.Adafactor(ps, **kw)
