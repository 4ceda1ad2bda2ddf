"""State the user replaces, clears or loads in place is what the next step uses, on every backend
and format, as torch.optim does: a momentum reset (``opt.state[p]["exp_avg"] = zeros``), layer
surgery (``del opt.state[p]``), re-initialising (``opt.state.clear()``), an in-place checkpoint
load (``dcp.load(sd := opt.state_dict())``). The native kernel keeps pointers to state tensors;
before these tests it went on stepping the old, hidden buffers."""

from __future__ import annotations

import pytest
import torch

import adamkit
from conftest import BACKENDS

pytestmark = pytest.mark.usefixtures("one_thread")

# (id, parameter dtype, options): each storage kind the kernel keeps tables of
FORMATS = [
    pytest.param(torch.float32, {}, id="fp32"),
    pytest.param(torch.float32, {"state_format": "bf16"}, id="bf16-state"),
    pytest.param(torch.float32, {"state_format": "8bit", "min_8bit_size": 0}, id="8bit-state"),
    pytest.param(torch.bfloat16, {}, id="bf16-kahan"),
    pytest.param(torch.bfloat16, {"master_weights": True}, id="bf16-master"),
]


def params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [(6, 300), (40,), (300,)]]


def grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]


def run(ps, opt, seeds):
    for s in seeds:
        for p, g in zip(ps, grads(ps, s)):
            p.grad = g
        opt.step()


def make(dtype, kw, backend, **extra):
    ps = params(dtype)
    return ps, adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend, **kw, **extra)


def state_of(opt, ps):
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]


def assert_same(a, b):
    for sa, sb in zip(a, b):
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,kw", FORMATS)
def test_replaced_state_tensor_is_the_one_stepped(dtype, kw, backend):
    """A slot replaced by a new tensor of zeros (a full-precision one: into 8-bit state it is
    encoded) is the one the next step updates: the run equals the same backend's run that zeroed
    the old tensor in place (which every backend always honoured: the kernel reads that memory)."""
    replaced, in_place = make(dtype, kw, backend), make(dtype, kw, backend)
    for ps, opt in (replaced, in_place):
        run(ps, opt, [1, 2])
    ps, opt = replaced
    fresh = torch.zeros(ps[0].shape, dtype=torch.float32 if "state_format" in kw else ps[0].dtype)
    mine = fresh.bfloat16() if kw.get("state_format") == "bf16" else fresh
    opt.state[ps[0]]["exp_avg"] = mine
    qs, other = in_place
    st = other.state[qs[0]]
    if kw.get("state_format") == "8bit":  # the codes of zeros: 128 (signed), scales 0
        st["exp_avg"].fill_(128)
        st["exp_avg_scale"].zero_()
    else:
        st["exp_avg"].zero_()
    for ps_, opt_ in (replaced, in_place):
        run(ps_, opt_, [3])
    if kw.get("state_format") != "8bit":
        assert opt.state[ps[0]]["exp_avg"] is mine and mine.abs().sum() > 0  # the user's tensor
    assert_same(state_of(opt, ps), state_of(other, qs))
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_fp32_moment_matches_torch(backend):
    """The momentum reset of a torch.optim.AdamW user, on an fp32 run: adamkit updates the new
    tensor in place, as torch does (values within torch's own rounding)."""
    ps, opt = make(torch.float32, {}, backend)
    tps = [p.detach().clone().requires_grad_() for p in ps]
    topt = torch.optim.AdamW(tps, lr=1e-2, weight_decay=0.1)
    for q, o in ((ps, opt), (tps, topt)):
        run(q, o, [1, 2])
    mine, theirs = torch.zeros_like(ps[0]), torch.zeros_like(tps[0])
    opt.state[ps[0]]["exp_avg"], topt.state[tps[0]]["exp_avg"] = mine, theirs
    for q, o in ((ps, opt), (tps, topt)):
        run(q, o, [3])
    assert opt.state[ps[0]]["exp_avg"] is mine
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)
    for a, b in zip(ps, tps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,kw", FORMATS)
@pytest.mark.parametrize("how", ["clear", "del", "reassign"])
def test_cleared_state_starts_fresh(dtype, kw, backend, how):
    """After ``opt.state.clear()`` (or ``del opt.state[p]`` for every p, or ``opt.state = {}``)
    the next step starts from fresh state (step 1), exactly as a new optimizer from the same
    parameters, and the state dict shows that state, not the dropped one."""
    ps, opt = make(dtype, kw, backend)
    run(ps, opt, [1, 2])
    if how == "clear":
        opt.state.clear()
    elif how == "del":
        for p in ps:
            del opt.state[p]
    else:
        from collections import defaultdict

        opt.state = defaultdict(dict)
    assert opt.state_dict()["state"] == {}
    now = [p.detach().clone().requires_grad_() for p in ps]
    twin = adamkit.AdamW(now, lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    run(ps, opt, [3])
    run(now, twin, [3])
    for a, b in zip(ps, now):
        assert torch.equal(a, b)
    assert_same(state_of(opt, ps), state_of(twin, now))
    assert all(float(opt.state_dict()["state"][i]["step"]) == 1 for i in range(len(ps)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,kw", FORMATS)
def test_in_place_checkpoint_load_restores_steps_and_moments(dtype, kw, backend):
    """``sd = opt.state_dict()`` holds the live tensors (torch's behaviour), so a checkpoint read
    into them in place (DCP's pattern) rewinds the optimizer: step counters included, so bias
    correction continues from the checkpoint's step."""
    ps, opt = make(dtype, kw, backend)
    run(ps, opt, [1, 2])
    saved_p = [p.detach().clone() for p in ps]
    saved = {k: {n: v.clone() for n, v in st.items()} for k, st in opt.state_dict()["state"].items()}
    run(ps, opt, [3, 4])
    sd = opt.state_dict()
    for k, st in sd["state"].items():  # what dcp.load(sd) does: copy into the tensors it was given
        for n, v in st.items():
            if n != "param_shape":
                v.copy_(saved[k][n])
    with torch.no_grad():
        for p, v in zip(ps, saved_p):
            p.copy_(v)
    run(ps, opt, [3, 4])
    ref_ps, ref = make(dtype, kw, backend)
    run(ref_ps, ref, [1, 2, 3, 4])
    for a, b in zip(ps, ref_ps):
        assert torch.equal(a, b)
    assert_same(state_of(opt, ps), state_of(ref, ref_ps))
