"""Schedule-Free AdamW: the schedulefree package's AdamWScheduleFree in float64 across train/eval
switches, state dicts both ways, the mode switch on low-precision parameters, and the refusals."""

from __future__ import annotations

import pytest
import torch

import adamkit
from conftest import roundtrip

schedulefree = pytest.importorskip("schedulefree")

SHAPES = [(13, 7), (9,), ()]
KW = dict(lr=0.02, weight_decay=0.1, warmup_steps=3, r=0.5, weight_lr_power=2.0, betas=(0.9, 0.99))


def values(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def grads(ps, gen):
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]


def package(ps, **kw):
    opt = schedulefree.AdamWScheduleFree(ps, foreach=False, **{**KW, **kw})
    opt.train()
    return opt


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_close(ours, theirs, what, tol=1e-12):
    for i, (p, q) in enumerate(zip(ours[0], theirs[0])):
        assert rel(p.detach(), q.detach()) < tol, f"{what}: param {i}"
        for key in ("z", "exp_avg_sq"):
            assert rel(ours[1].state[p][key], theirs[1].state[q][key]) < tol, f"{what}: {key} {i}"


def feed(runs, gen):
    gs = grads(runs[0][0], gen)
    for ps, opt in runs:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "foreach", "auto"])
def test_train_eval_switches_match_the_package_float64(backend):
    """Steps, eval() (parameters hold x), evaluation, train() (back to y), more steps: every
    parameter, z and v within 1e-12 of the package, in both modes."""
    v = values(0)
    ours = [x.clone().requires_grad_() for x in v]
    theirs = [x.clone().requires_grad_() for x in v]
    a = ours, adamkit.ScheduleFreeAdamW(ours, backend=backend, **KW)
    b = theirs, package(theirs)
    a[1].train()  # the package's documented first call: a no-op here (a new optimizer trains)
    gen = torch.Generator().manual_seed(1)
    for t in range(12):
        feed([a, b], gen)
        if t % 4 == 3:
            a[1].eval()
            b[1].eval()
            assert not a[1].train_mode
            assert_close(a, b, f"eval mode after step {t + 1}")
            a[1].eval()  # a no-op in its own mode
            assert_close(a, b, "eval twice")
            a[1].train()
            b[1].train()
        assert_close(a, b, f"step {t + 1}")
    for group, theirs_group in zip(a[1].param_groups, b[1].param_groups):
        for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
            assert group[key] == pytest.approx(theirs_group[key], rel=1e-15), key


def test_state_dicts_move_between_the_package_and_adamkit():
    """The package's state dict (no per-parameter step; k, weight_sum, lr_max in the groups) loads
    and the run goes on as the package's; adamkit's loads into the package alike."""
    v = values(2)
    gen = torch.Generator().manual_seed(3)
    theirs = [x.clone().requires_grad_() for x in v]
    b = theirs, package(theirs)
    for _ in range(4):
        feed([b], gen)
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    a = ours, adamkit.ScheduleFreeAdamW(ours, **KW)
    a[1].load_state_dict(roundtrip(b[1].state_dict()))
    assert a[1].param_groups[0]["k"] == 4
    for _ in range(3):
        feed([a, b], gen)
    assert_close(a, b, "package -> adamkit")
    # and back: adamkit's state dict into a new package optimizer
    back = [p.detach().clone().requires_grad_() for p in ours]
    c = back, schedulefree.AdamWScheduleFree(back, foreach=False, **KW)
    c[1].load_state_dict(roundtrip(a[1].state_dict()))
    for _ in range(2):
        feed([a, c], gen)
    assert_close(a, c, "adamkit -> package")


def test_step_in_eval_mode_raises_and_changes_nothing():
    v = values(4, torch.float32)
    ps = [x.clone().requires_grad_() for x in v]
    opt = adamkit.ScheduleFreeAdamW(ps, **KW)
    gen = torch.Generator().manual_seed(5)
    feed([(ps, opt)], gen)
    opt.eval()
    before = [p.detach().clone() for p in ps]
    state = [{k: t.clone() for k, t in opt.state[p].items()} for p in ps]
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    for p, g in zip(ps, grads(ps, gen)):
        p.grad = g
    with pytest.raises(ValueError, match=r"eval mode.*optimizer\.train\(\)"):
        opt.step()
    for p, b, st in zip(ps, before, state):
        assert torch.equal(p.detach(), b)
        assert all(torch.equal(opt.state[p][k], t) for k, t in st.items())
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == group
    opt.train()
    opt.step()  # now it steps
    assert opt.param_groups[0]["k"] == 2


# (options, how far the stored value may be from the exact one, in bf16 ulps of it): a master copy
# holds the fp32 result (only the fp32 term of the bound), a Kahan pair (bf16 or int8 compensation,
# rounded stochastically) within a compensation ulp, about 1/256 of p's (bounded by 1/128 here),
# stochastic rounding alone within one ulp
@pytest.mark.parametrize(
    "fmt,ulps",
    [
        ({"kahan_sum": True}, 1 / 128),
        ({"kahan_sum": "8bit", "state_format": "8bit", "min_8bit_size": 0}, 1 / 128),
        ({"master_weights": True, "state_format": "bf16"}, 0.0),
        ({"stochastic_rounding": True, "kahan_sum": False}, 1.0),
    ],
    ids=["kahan", "kahan8-8bit", "master-bf16", "sr"],
)
def test_mode_switch_on_low_precision_parameters(fmt, ulps):
    """eval() moves the full-precision value (Kahan pair, master copy) to lerp(y, z, 1 - 1/beta1)
    within the storage's own rounding, leaves v's bits alone, and train() brings y back."""
    v = values(6, torch.bfloat16)
    ps = [x.clone().requires_grad_() for x in v]
    opt = adamkit.ScheduleFreeAdamW(ps, **KW, **fmt)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        feed([(ps, opt)], gen)
    y = [x.float().clone() for x in opt.full_precision_params()]  # may be the master copies themselves
    vs = [{k: t.clone() for k, t in opt.state[p].items() if k.startswith("exp_avg_sq")} for p in ps]
    z = [opt.state[p]["z"].clone() for p in ps]
    assert all(t.dtype == torch.float32 for t in z)  # a copy of the weights keeps fp32
    b1 = KW["betas"][0]
    opt.eval()
    x = [x.float() for x in opt.full_precision_params()]
    for i, p in enumerate(ps):
        want = torch.lerp(y[i].double(), z[i].double(), 1 - 1 / b1)
        ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(2.0**-126)
        tol = ulps * ulp + 4 * torch.finfo(torch.float32).eps * want.abs()
        assert bool(((x[i].double() - want).abs() <= tol).all()), f"param {i}"
        assert torch.equal(opt.state[p]["z"], z[i])
        for k, t in vs[i].items():
            assert torch.equal(opt.state[p][k], t), k
    opt.train()
    back = [x.float() for x in opt.full_precision_params()]
    for i in range(len(ps)):
        ulp = torch.finfo(torch.bfloat16).eps * y[i].abs().clamp_min(2.0**-126)
        assert bool(((back[i] - y[i]).abs() <= 2 * ulp).all()), f"param {i} back to y"


def test_skipped_steps_do_not_advance_the_schedule():
    """A step skipped for a non-finite gradient (skip_nonfinite_steps) changes nothing, k included."""
    ps = [x.clone().requires_grad_() for x in values(8, torch.float32)]
    opt = adamkit.ScheduleFreeAdamW(ps, skip_nonfinite_steps=True, **KW)
    gen = torch.Generator().manual_seed(9)
    feed([(ps, opt)], gen)
    group = dict(opt.param_groups[0])
    gs = grads(ps, gen)
    gs[0][0, 0] = float("nan")
    for p, g in zip(ps, gs):
        p.grad = g
    opt.step()
    assert opt.skipped_steps == 1
    assert {k: opt.param_groups[0][k] for k in ("k", "weight_sum", "lr_max")} == {
        k: group[k] for k in ("k", "weight_sum", "lr_max")
    }


def test_refusals():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="beta1 > 0"):
        adamkit.ScheduleFreeAdamW([p], betas=(0.0, 0.99))
    with pytest.raises(ValueError, match="no cautious form"):
        adamkit.ScheduleFreeAdamW([p], cautious=True)
    with pytest.raises(ValueError, match="accumulation"):
        adamkit.ScheduleFreeAdamW([p], gradient_release=True, accumulation_steps=2)


@pytest.mark.parametrize("saved_in", ["train", "eval"])
def test_checkpoint_mode_travels_with_the_state_dict(saved_in):
    """The mode is the groups' train_mode: a checkpoint of model and optimizer saved together
    (train mode: the parameters hold y; eval mode: x) loads into an optimizer in either mode and
    agrees with the loaded parameters; a run resumed from it continues as the original does (from
    eval mode, after train())."""
    v = values(10, torch.float32)
    gen = torch.Generator().manual_seed(11)
    ps = [x.clone().requires_grad_() for x in v]
    a = ps, adamkit.ScheduleFreeAdamW(ps, **KW)
    for _ in range(3):
        feed([a], gen)
    if saved_in == "eval":
        a[1].eval()
    model = [p.detach().clone() for p in ps]
    sd = roundtrip(a[1].state_dict())
    qs = [m.clone().requires_grad_() for m in model]
    b = qs, adamkit.ScheduleFreeAdamW(qs, **KW)
    b[1].eval() if saved_in == "train" else b[1].train()  # the other mode before loading
    b[1].load_state_dict(sd)
    assert b[1].train_mode == (saved_in == "train")
    if saved_in == "eval":
        with pytest.raises(ValueError, match="eval mode"):
            feed([b], torch.Generator().manual_seed(12))
        a[1].train()
        b[1].train()
    for _ in range(2):
        feed([a, b], gen)
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())


def test_gradient_release_in_eval_mode_raises_in_backward_and_changes_nothing():
    """With gradient_release=True the hooks step inside backward: in eval mode the first hook
    refuses (backward raises) and no parameter or state changes."""
    ps = [x.clone().requires_grad_() for x in values(13, torch.float32)]
    opt = adamkit.ScheduleFreeAdamW(ps, gradient_release=True, **KW)
    gen = torch.Generator().manual_seed(14)
    sum((p * g).sum() for p, g in zip(ps, grads(ps, gen))).backward()
    opt.step()
    opt.eval()
    before = [p.detach().clone() for p in ps]
    state = [{k: t.clone() for k, t in opt.state[p].items()} for p in ps]
    with pytest.raises(ValueError, match="eval mode"):
        sum((p * g).sum() for p, g in zip(ps, grads(ps, gen))).backward()
    for p, b, st in zip(ps, before, state):
        assert torch.equal(p.detach(), b)
        assert all(torch.equal(opt.state[p][k], t) for k, t in st.items())
