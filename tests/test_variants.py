"""The memory-lean variants (Adafactor, CAME, Adam-mini, LAMB, Sophia-G): each against its reference
package or an independent float64 oracle, then one table of optimizers through one set of generic
tests (state dicts, resume, dtypes, lr changes, bad input, storage formats, backends, planner)."""

from __future__ import annotations

import math

import pytest
import torch

import adamkit
from adamkit.tools.plan import adamkit_state_bytes
from test_kernel_parity import assert_bits, roundtrip

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
    for t in range(steps):
        for opt in (ours, theirs):
            opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * 0.9  # a schedule: lr read every step
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
    assert not torch.equal(a_ps[0].detach(), values(0)[0]) or True


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


# ------------------------------------------------------------------------------------------------
# (b) One table of optimizers, generic tests
# ------------------------------------------------------------------------------------------------

# (id, class, options, planner name, what to call between steps)
HESSIAN = lambda opt: opt.update_hessian()  # noqa: E731
TABLE = [
    ("adafactor", adamkit.Adafactor, {"lr": 0.05, "weight_decay": 0.1}, "adafactor", None),
    ("adafactor-m", adamkit.Adafactor, {"lr": 0.05, "beta1": 0.9}, "adafactor-m", None),
    ("came", adamkit.CAME, {"lr": 0.01, "weight_decay": 0.1}, "came", None),
    ("adam-mini", adamkit.AdamMini, {"lr": 0.01, "weight_decay": 0.1}, "adam-mini", None),
    ("lamb", adamkit.Lamb, {"lr": 0.01, "weight_decay": 0.1}, "lamb", None),
    ("sophia", adamkit.SophiaG, {"lr": 0.01, "rho": 0.05}, "sophia", HESSIAN),
]
ROWS = [pytest.param(*row, id=row[0]) for row in TABLE]
# (id, parameter dtype, options): storage formats and precision options
FORMATS = [
    pytest.param(torch.float32, {}, id="fp32"),
    pytest.param(torch.float32, {"state_format": "bf16"}, id="bf16-state"),
    pytest.param(torch.float32, {"state_format": "8bit", "min_8bit_size": 0}, id="8bit-state"),
    pytest.param(torch.bfloat16, {"kahan_sum": True}, id="bf16-kahan"),
    pytest.param(
        torch.bfloat16,
        {"kahan_sum": "8bit", "state_format": "8bit", "min_8bit_size": 0},
        id="bf16-kahan8-8bit",
    ),
]
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


def assert_same(a, b, what):
    (ps, opt), (qs, qopt) = a, b
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert_bits(p.detach(), q.detach(), f"{what}: param {i}")
        assert set(opt.state[p]) == set(qopt.state[q]), f"{what}: param {i}: keys"
        for k in opt.state[p]:
            assert_bits(opt.state[p][k], qopt.state[q][k], f"{what}: param {i}: {k}")


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
    backends = ["foreach"] if cls is adamkit.SophiaG else ["foreach", "auto"]  # Sophia's auto compiles
    for backend in backends:
        run = make(cls, kw, dtype, fmt, backend=backend)
        drive(*run, between, 3, 3)
        assert_same(run, ref, backend)


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
            assert st[s.name].dtype == want, s.name
            if sf == "8bit":
                assert st[s.name + "_scale"].dtype == torch.float32
        if dtype == torch.bfloat16:  # Kahan: bf16 (2 B/param) or int8 (kahan_sum="8bit", 1 B/param)
            key, kdt = (
                ("kahan_comp8", torch.int8) if fmt["kahan_sum"] == "8bit" else ("kahan_comp", torch.bfloat16)
            )
            assert st[key].dtype == kdt and st[key].shape == p.shape


@pytest.mark.parametrize("dtype,fmt", FORMATS[1:])
@pytest.mark.parametrize("name,cls,kw,plan_name,between", ROWS)
def test_low_precision_tracks_fp32(name, cls, kw, plan_name, between, dtype, fmt):
    """bf16/8-bit state and bf16 + Kahan parameters move the weights as the fp32 run does: the
    distance between the two runs stays below 10% of the distance travelled."""
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
def test_lr_change_takes_effect_and_lr_zero_freezes(name, cls, kw, plan_name, between):
    """A changed lr (float or 0-D tensor) is read at the next step: lr = 0 leaves parameters as they
    are; a run whose lr changes equals a run resumed from its state with that lr."""
    ps, opt = make(cls, kw, torch.float32, {})
    drive(ps, opt, between, 2, 6)
    opt.param_groups[0]["lr"] = torch.tensor(0.0)
    frozen = [p.detach().clone() for p in ps]
    drive(ps, opt, None, 1, 7)
    for p, f in zip(ps, frozen):
        assert torch.equal(p.detach(), f)
    opt.param_groups[0]["lr"] = kw["lr"] / 3
    other = make(cls, {**kw, "lr": kw["lr"] / 3}, torch.float32, {})
    with torch.no_grad():
        for p, q in zip(ps, other[0]):
            q.copy_(p)
    other[1].load_state_dict(roundtrip(opt.state_dict()))
    drive(ps, opt, between, 2, 8)
    drive(*other, between, 2, 8)
    assert_same(other, (ps, opt), "lr changed")
    assert not torch.equal(ps[0].detach(), frozen[0])


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
        if key == "skip_nonfinite" and cls is adamkit.SophiaG:
            continue  # elementwise: Sophia supports it
        with pytest.raises((ValueError, TypeError)):
            cls([torch.zeros(3, requires_grad=True)], **{**kw, key: value})
    with pytest.raises(TypeError, match="unexpected"):
        cls([torch.zeros(3, requires_grad=True)], **kw, no_such_option=1)
    ps, opt = make(cls, kw, torch.float32, {})
    drive(ps, opt, between, 1, 9)
    for key, value in BAD:
        if key == "skip_nonfinite" and cls is adamkit.SophiaG:
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
        kahan=fmt.get("kahan_sum", False), min_8bit_size=fmt.get("min_8bit_size", 4096),
    )  # fmt: skip
    assert sum(planned.values()) == live


def test_quick_race_rows_run():
    """Each variant's race row trains (a few steps of the quick GPT) at its stated lr."""
    from adamkit.tools import race

    names = ["adafactor", "came", "adam-mini", "lamb"]
    result = race.race(
        "gpt", names, quick=True, steps=6, evals=1, untimed_steps=0, progress=False, log=lambda *a: None
    )
    assert set(result.runs) == set(names), (result.failed, result.skipped)
    for name in names:
        run = result.runs[name]
        assert math.isfinite(run.val_loss) and run.val_loss < run.initial_val_loss, name


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
