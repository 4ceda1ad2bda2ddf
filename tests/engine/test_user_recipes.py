"""Recipes users run, each pinning a bug the suite once let through (a hand-made mutation check:
20 realistic bugs put in by hand, 2 not caught): a tensor lr that a scheduler updates in place,
torch's mixed-precision clipping recipe meeting an inf gradient, a checkpoint loaded back into a
live optimizer (a rewind), global-norm clipping over two groups.

Comparisons with torch.optim use bounds from what torch's operations guarantee, not bits: torch's
CPU square root is not correctly rounded on every host (see tests/host_rounding.py)."""

from __future__ import annotations

import pytest
import torch

import adamkit
from conftest import BACKENDS, roundtrip

pytestmark = pytest.mark.usefixtures("one_thread")


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def loss_of(m, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(m(x), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_updated_in_place_by_steplr_matches_torch(backend):
    """torch's schedulers write a tensor lr in place (``lr.fill_``): a cached lr would go stale.
    StepLR halves it every step, so a stale lr is 2x off at once (OneCycleLR, the only schedule
    tested before, also changes the betas and hid it). fp32, 6 steps: within 1e-5 relative of
    torch (each of torch's and adamkit's operations is within an ulp of exact; Adam's update
    divides by sqrt(v), which keeps those ulps from growing much over a few steps)."""
    a, b = model(), model()
    oa = adamkit.AdamW(a.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1, backend=backend)
    ob = torch.optim.AdamW(b.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1, foreach=False)
    sa = torch.optim.lr_scheduler.StepLR(oa, 1, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, 1, gamma=0.5)
    lr = oa.param_groups[0]["lr"]
    for batch in batches(6):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            loss_of(m, batch).backward()
            o.step()
            o.zero_grad()
            s.step()
    assert oa.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-2 / 64)  # updated in place
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_clipping_recipe_skips_an_inf_step_and_changes_nothing(backend):
    """torch's documented recipe: ``scaler.unscale_(opt)``, ``clip_grad_norm_``, ``scaler.step``,
    ``scaler.update``. A step whose gradients hold an inf is skipped (counted), leaves every
    parameter, moment and step counter as it was, and the scaler backs off; the next step runs."""
    m = model()
    opt = adamkit.AdamW(m.parameters(), lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    first, second = batches(2)
    scaler.scale(loss_of(m, first)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = [p.detach().clone() for p in m.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()}
    scale = scaler.get_scale()
    scaler.scale(loss_of(m, second)).backward()
    next(m.parameters()).grad.view(-1)[3] = float("inf")
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert opt.skipped_steps == 1 and scaler.get_scale() < scale
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)
        for k, v in state[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k
    scaler.scale(loss_of(m, second)).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    assert all(float(opt.state[p]["step"]) == 2 for p in m.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, {"state_format": "8bit", "min_8bit_size": 0}], ids=["fp32", "8bit"])
def test_checkpoint_loaded_back_into_the_live_optimizer_rewinds_it(backend, kw):
    """Save at step 2, train on, then load the checkpoint into the same (live) optimizer and the
    model: the run continues exactly as the one that never went past step 2 (the native kernel's
    tables, built on the newer state, must not survive the load)."""
    xs = batches(6)
    m = model()
    opt = adamkit.AdamW(m.parameters(), lr=1e-2, backend=backend, **kw)

    def train(batches):
        for batch in batches:
            loss_of(m, batch).backward()
            opt.step()
            opt.zero_grad()

    train(xs[:2])
    saved = roundtrip({"model": m.state_dict(), "opt": opt.state_dict()})
    train(xs[2:4])
    m.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(xs[2:6])
    ref = model()
    ref_opt = adamkit.AdamW(ref.parameters(), lr=1e-2, backend=backend, **kw)
    for batch in xs:
        loss_of(ref, batch).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for k, v in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_norm_clipping_spans_every_group(backend):
    """``max_grad_norm`` clips by the norm of all the step's gradients, across groups (with their
    own lr and decay), as ``clip_grad_norm_`` over every parameter does: bit for bit against the
    same optimizer without it, after torch's clipping. Per-group norms would clip each group less."""
    a, b = model(), model()

    def groups(m):
        w = [p for p in m.parameters() if p.dim() == 2]
        v = [p for p in m.parameters() if p.dim() < 2]
        return [{"params": w, "weight_decay": 0.1}, {"params": v, "lr": 3e-2, "weight_decay": 0.0}]

    oa = adamkit.Adam(groups(a), lr=1e-2, backend=backend, max_grad_norm=0.1)
    ob = adamkit.Adam(groups(b), lr=1e-2, backend=backend)
    for batch in batches(3):
        for m in (a, b):
            loss_of(m, batch).backward()
        norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
        assert norm > 0.1  # clipping is active
        per_group = [torch.nn.utils.get_total_norm([p.grad for p in g["params"]]) for g in ob.param_groups]
        assert all(n < norm for n in per_group)  # the global norm is not any group's own
        oa.step()
        ob.step()
        assert oa.last_grad_norm == pytest.approx(float(norm), rel=1e-6)
        oa.zero_grad()
        ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
