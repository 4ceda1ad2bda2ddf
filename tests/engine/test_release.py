"""Gradient release, fused clipping (max_grad_norm), whole-step non-finite skip, GradScaler."""

import copy

import pytest
import torch

import adamkit

ALGS = {
    "Adam": lambda ps, **kw: adamkit.Adam(ps, lr=1e-2, weight_decay=0.1, **kw),
    "AdamW": lambda ps, **kw: adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "Lion": lambda ps, **kw: adamkit.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
}
BACKENDS = ("reference", "foreach", "auto")


def model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 6, generator=g).to(dtype) for _ in range(n)]


def loss_of(m, x):
    return (m(x).float() ** 2).sum()


def flat_state(opt):
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_equals_clip_grad_norm_then_step(alg, backend):
    a, b = model(), model()
    oa = ALGS[alg](a.parameters(), backend=backend, max_grad_norm=0.5)
    ob = ALGS[alg](b.parameters(), backend=backend)
    for x in batches(3):
        for m in (a, b):
            loss_of(m, x).backward()
        norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        assert norm > 0.5  # clipping is active
        oa.step()
        ob.step()
        assert oa.last_grad_norm == pytest.approx(float(norm), rel=1e-6)
        for o in (oa, ob):
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    for sa, sb in zip(flat_state(oa), flat_state(ob)):
        torch.testing.assert_close(sa, sb, rtol=0, atol=0)


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nonfinite_steps_changes_nothing(alg, backend):
    m = model()
    opt = ALGS[alg](m.parameters(), backend=backend, skip_nonfinite_steps=True)
    xs = batches(2)
    loss_of(m, xs[0]).backward()
    opt.step()
    opt.zero_grad()
    before = copy.deepcopy((list(m.parameters()), opt.state_dict()))
    loss_of(m, xs[1]).backward()
    m[0].weight.grad[1, 2] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for p, q in zip(m.parameters(), before[0]):
        assert torch.equal(p, q)
    after = opt.state_dict()["state"]
    for k, st in before[1]["state"].items():
        for name, v in st.items():
            assert torch.equal(after[k][name], v), name
    m[0].weight.grad[1, 2] = 0.0
    opt.step()  # a finite step goes through
    assert opt.skipped_steps == 1 and float(opt.state[m[0].weight]["step"]) == 2


@pytest.mark.parametrize("alg", ALGS)
def test_grad_scaler_unscale_folded_and_found_inf_skips(alg):
    a, b = model(), model()
    oa, ob = ALGS[alg](a.parameters(), backend="reference"), ALGS[alg](b.parameters(), backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = batches(1)[0]
    scaler.scale(loss_of(a, x)).backward()
    loss_of(b, x).backward()
    scaler.step(oa)  # unscale folded into the step: the gradients keep their scaled values
    scaler.update()
    assert a[0].weight.grad.abs().max() > 100 * b[0].weight.grad.abs().max()
    ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    # an inf: the scaler skips the step and lowers its scale
    oa.zero_grad()
    scaler.scale(loss_of(a, x)).backward()
    a[2].bias.grad[0] = float("inf")
    before = [p.clone() for p in a.parameters()]
    scaler.step(oa)
    scaler.update()
    assert oa.skipped_steps == 1 and scaler.get_scale() < 1024.0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert float(oa.state[a[0].weight]["step"]) == 1


FORMATS = {
    "fp64": (torch.float64, {}),
    "fp64-bf16-state": (torch.float64, {"state_format": "bf16"}),
    "fp64-8bit": (torch.float64, {"state_format": "8bit", "min_8bit_size": 0}),
    "fp32": (torch.float32, {}),
    "bf16-kahan": (torch.bfloat16, {}),
    "bf16-kahan8-8bit": (torch.bfloat16, {"kahan_sum": "8bit", "state_format": "8bit", "min_8bit_size": 0}),
    "bf16-sr": (torch.bfloat16, {"stochastic_rounding": True, "kahan_sum": False}),
    "bf16-master": (torch.bfloat16, {"master_weights": True, "kahan_sum": False}),
}


# fp64 under auto would run torch.compile (seconds per variant): covered by reference/foreach
RELEASE_CASES = [
    (backend, fmt)
    for backend in BACKENDS
    for fmt in FORMATS
    if not (backend == "auto" and fmt.startswith("fp64"))
]


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("backend,fmt", RELEASE_CASES)
def test_gradient_release_equals_ordinary_step(alg, backend, fmt):
    dtype, kw = FORMATS[fmt]
    a, b = model(dtype), model(dtype)
    oa = ALGS[alg](a.parameters(), backend=backend, gradient_release=True, **kw)
    ob = ALGS[alg](b.parameters(), backend=backend, **kw)
    sa = torch.optim.lr_scheduler.StepLR(oa, 1, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, 1, gamma=0.5)
    for t, x in enumerate(batches(3, dtype)):
        loss_of(a, x).backward()
        if t == 0:  # the first backward is observed: its gradients wait for step() (release_check)
            assert all(p.grad is not None for p in a.parameters())
        else:
            assert all(p.grad is None for p in a.parameters())  # stepped and freed in backward
        oa.step()  # callable: after the first step, does nothing to released parameters
        assert all(p.grad is None for p in a.parameters())
        oa.zero_grad()
        loss_of(b, x).backward()
        ob.step()
        ob.zero_grad()
        sa.step()
        sb.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    da, db = oa.state_dict(), ob.state_dict()
    assert da["param_groups"] == db["param_groups"]
    assert da["state"].keys() == db["state"].keys()
    for k in da["state"]:
        assert da["state"][k].keys() == db["state"][k].keys()
        for name in da["state"][k]:
            torch.testing.assert_close(da["state"][k][name], db["state"][k][name], rtol=0, atol=0)


def test_release_clipping_uses_the_previous_steps_global_norm():
    a, b = model(), model()
    oa = adamkit.AdamW(a.parameters(), lr=1e-2, gradient_release=True, max_grad_norm=0.5)
    ob = adamkit.AdamW(b.parameters(), lr=1e-2)
    coef = 1.0  # the first step is not clipped
    for x in batches(3):
        loss_of(a, x).backward()
        oa.step()
        loss_of(b, x).backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in b.parameters()])
        for p in b.parameters():
            p.grad.mul_(coef)
        ob.step()
        ob.zero_grad()
        assert oa.last_grad_norm == pytest.approx(float(norm), rel=1e-6)
        coef = float(torch.clamp(0.5 / (norm + 1e-6), max=1.0))
        assert coef < 1
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_release_refusals():
    m = model()
    with pytest.raises(ValueError, match="skip_nonfinite_steps"):
        adamkit.AdamW(m.parameters(), gradient_release=True, skip_nonfinite_steps=True)
    with pytest.raises(ValueError, match="max_grad_norm"):
        adamkit.AdamW(m.parameters(), max_grad_norm=0)
    opt = adamkit.AdamW(m.parameters(), gradient_release=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(m, batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


# ------------------------------------------------------------------------------------------------
# Habits gradient release cannot honour: refused before anything is stepped (release_check)
# ------------------------------------------------------------------------------------------------


def assert_untouched(m, opt, before):
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)
    assert all("step" not in opt.state.get(p, {}) for p in m.parameters())


def test_release_refuses_user_clipping_before_stepping():
    """clip_grad_norm_ after a released backward saw no gradients (returned 0) and clipped nothing;
    now the first step() finds the gradients changed and refuses, naming max_grad_norm."""
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = adamkit.AdamW(m.parameters(), lr=1e-2, gradient_release=True)
    loss_of(m, batches(1)[0]).backward()
    norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
    assert float(norm) > 0  # the user's clipping saw the gradients
    with pytest.raises(RuntimeError, match="max_grad_norm="):
        opt.step()
    assert_untouched(m, opt, before)


def test_release_refuses_several_backwards_per_step():
    """A "k backwards, then step()" loop (transformers' Trainer with gradient accumulation)
    stepped k times; now the second backward raises, naming accumulation_steps."""
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = adamkit.AdamW(m.parameters(), lr=1e-2, gradient_release=True)
    x, y = batches(2)
    loss_of(m, x).backward()
    with pytest.raises(RuntimeError, match="accumulation_steps=k"):
        loss_of(m, y).backward()
    assert_untouched(m, opt, before)


def test_release_refuses_gradscaler_before_stepping():
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = adamkit.AdamW(m.parameters(), lr=1e-2, gradient_release=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(m, batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match="nothing was stepped"):
        scaler.step(opt)
    assert_untouched(m, opt, before)


def test_release_check_off_and_step_less_loops():
    """With release_check=False the first backward steps in its hooks (a loop that never calls
    step()); with the check, such a loop calls step() once, after its first backward."""
    xs = batches(3)
    runs = []
    for check in (False, True):
        m = model()
        opt = adamkit.AdamW(m.parameters(), lr=1e-2, gradient_release=True, release_check=check)
        for t, x in enumerate(xs):
            loss_of(m, x).backward()
            assert all(p.grad is None for p in m.parameters()) or (check and t == 0)
            if check and t == 0:
                opt.step()
        runs.append([p.detach().clone() for p in m.parameters()])
        assert all(float(opt.state[p]["step"]) == 3 for p in m.parameters())
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_remove_gradient_release():
    """A public way to stop release: the hooks go, gradients stay until step(), as without it;
    the run equals one that never released."""
    a, b = model(), model()
    oa = adamkit.AdamW(a.parameters(), lr=1e-2, gradient_release=True)
    ob = adamkit.AdamW(b.parameters(), lr=1e-2)
    for t, x in enumerate(batches(4)):
        if t == 2:
            oa.remove_gradient_release()
            assert not any(p._post_accumulate_grad_hooks for p in a.parameters())
        for m, o in ((a, oa), (b, ob)):
            loss_of(m, x).backward()
            if t >= 2:
                assert all(p.grad is not None for p in m.parameters())
            o.step()
            o.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
