"""Optimizer accumulation (accumulation_steps=k with gradient release), judged against a float64
oracle of Adam over the window's micro-batch gradients: m takes their exact mean (as true gradient
accumulation), v the mean of their squares (the stated approximation)."""

import math

import pytest
import torch
from test_release import FORMATS, RELEASE_CASES, loss_of, model

import adamkit

K = 3
LR, WD, B1, B2, EPS = 1e-2, 0.1, 0.9, 0.999, 1e-8


def micro_batches(n, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(5, 6, generator=g).to(dtype) for _ in range(n)]


class Oracle:
    """Adam(W) in float64 with the window's gradients: m from their mean, v from the mean of their
    squares (``true=True``: the square of their mean, as true gradient accumulation)."""

    def __init__(self, params, decoupled, amsgrad=False, maximize=False, true=False):
        self.p = [p.detach() for p in params]  # float64 tensors, stepped in place
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.vmax = [torch.zeros_like(p) for p in self.p]
        self.decoupled, self.amsgrad, self.maximize, self.true = decoupled, amsgrad, maximize, true
        self.t = 0

    def window(self, grads, scale=1.0):
        """``grads``: per micro-batch, a list of per-parameter gradients (None: no gradient)."""
        self.t += 1
        t = self.t
        for i, p in enumerate(self.p):
            gs = [torch.zeros_like(p) if gr[i] is None else gr[i].double() * scale for gr in grads]
            if all(gr[i] is None for gr in grads):
                continue
            if self.maximize:
                gs = [-g for g in gs]
            if not self.decoupled:
                gs = [g + WD * p for g in gs]
            mean = sum(gs) / len(gs)
            sq = mean * mean if self.true else sum(g * g for g in gs) / len(gs)
            self.m[i] = B1 * self.m[i] + (1 - B1) * mean
            self.v[i] = B2 * self.v[i] + (1 - B2) * sq
            vv = self.v[i]
            if self.amsgrad:
                self.vmax[i] = torch.maximum(self.vmax[i], self.v[i])
                vv = self.vmax[i]
            if self.decoupled:
                p.mul_(1 - LR * WD)
            p.sub_(LR / (1 - B1**t) * self.m[i] / (vv.sqrt() / math.sqrt(1 - B2**t) + EPS))


def grads_of(m, x):
    ps = list(m.parameters())
    return [g.detach() for g in torch.autograd.grad(loss_of(m, x), ps)]


CASES = {
    "Adam-l2-amsgrad": dict(cls=adamkit.Adam, decoupled=False, kw=dict(amsgrad=True)),
    "AdamW-maximize": dict(cls=adamkit.AdamW, decoupled=True, kw=dict(maximize=True)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ("reference", "foreach"))
def test_accumulation_equals_float64_oracle(case, backend):
    c = CASES[case]
    a, b = model(torch.float64), model(torch.float64)
    opt = c["cls"](
        a.parameters(),
        lr=LR,
        weight_decay=WD,
        backend=backend,
        gradient_release=True,
        accumulation_steps=K,
        **c["kw"],
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda w: 1.0)  # a framework's scheduler: harmless
    oracle = Oracle(b.parameters(), c["decoupled"], **c["kw"])
    xs = micro_batches(2 * K)
    for w in range(2):
        grads = []
        start = [p.clone() for p in a.parameters()]
        for j in range(K):
            x = xs[w * K + j]
            loss_of(a, x).backward()
            assert all(p.grad is None for p in a.parameters())
            opt.step()  # frameworks call these every micro-batch: they change nothing
            opt.zero_grad()
            grads.append(grads_of(b, x))
            if j < K - 1:  # inside the window: the parameters and step counts do not move
                assert all(torch.equal(p, q) for p, q in zip(a.parameters(), start))
                assert all(float(opt.state[p]["step"]) == w for p in a.parameters())
        if w == 0:  # true gradient accumulation from the same start, for the first window
            true = Oracle(model(torch.float64).parameters(), c["decoupled"], true=True, **c["kw"])
            true.window(grads)
        oracle.window(grads)
        sched.step()
        if w == 0:
            for i, p in enumerate(a.parameters()):
                st = opt.state[p]
                # the linear part is exact: m equals true gradient accumulation's (to fp64 rounding)
                torch.testing.assert_close(st["exp_avg"], true.m[i], rtol=1e-12, atol=1e-15)
                # v: the mean of the squares; it exceeds true accumulation's by (1 - beta2) times the
                # micro-batches' gradient variance
                gs = [gr[i] * (-1.0 if c["kw"].get("maximize") else 1.0) for gr in grads]
                if not c["decoupled"]:
                    gs = [g + WD * q for g, q in zip(gs, [start[i].double()] * K)]
                mean = sum(gs) / K
                var = sum((g - mean) ** 2 for g in gs) / K
                torch.testing.assert_close(
                    st["exp_avg_sq"] - true.v[i], (1 - B2) * var, rtol=1e-9, atol=1e-18
                )
                assert var.max() > 1e-6 * (mean * mean).max()  # the micro-batches do disagree
    for i, p in enumerate(a.parameters()):
        st = opt.state[p]
        assert float(st["step"]) == 2
        torch.testing.assert_close(p, oracle.p[i], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(st["exp_avg"], oracle.m[i], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(st["exp_avg_sq"], oracle.v[i], rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("backend,fmt", RELEASE_CASES)
def test_accumulation_every_format_and_backend(backend, fmt):
    """Every format and backend against the float64 oracle. Bound: the accumulating optimizer's
    error is at most that of the same optimizer stepping once per micro-batch (k=1) against its own
    oracle, times 3 (its extra roundings: the fold's k-1 state encodes), plus 1e-12."""
    dtype, kw = FORMATS[fmt]
    xs = micro_batches(2 * K, dtype)
    errs = []
    for k in (K, 1):
        a, b = model(dtype), model(torch.float64)
        with torch.no_grad():
            for p, q in zip(a.parameters(), b.parameters()):
                q.copy_(p)
        opt = adamkit.Adam(
            a.parameters(),
            lr=LR,
            weight_decay=WD,
            backend=backend,
            gradient_release=True,
            accumulation_steps=k,
            **kw,
        )
        oracle = Oracle(b.parameters(), decoupled=False)
        grads = []
        for x in xs:
            loss_of(a, x).backward()
            opt.step()  # harmless inside a window; with k=1 it ends release's observed first step
            grads.append(grads_of(b, x.double()))
            if len(grads) == k:
                oracle.window(grads)
                grads = []
        errs.append(max(float((p.double() - q).abs().max()) for p, q in zip(a.parameters(), oracle.p)))
        assert all(float(opt.state[p]["step"]) == len(xs) // k for p in a.parameters())
    assert errs[0] <= 3 * errs[1] + 1e-12, errs


def test_parameter_without_gradient_in_the_last_micro_batch_is_stepped_at_the_windows_end():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 2).double(), torch.nn.Linear(4, 2).double()
    head_a, head_b = torch.nn.Linear(2, 1).double(), torch.nn.Linear(2, 1).double()
    b.load_state_dict(a.state_dict())
    head_b.load_state_dict(head_a.state_dict())
    params = [*a.parameters(), *head_a.parameters()]
    opt = adamkit.AdamW(
        params, lr=LR, weight_decay=WD, backend="reference", gradient_release=True, accumulation_steps=K
    )
    oracle = Oracle([*b.parameters(), *head_b.parameters()], decoupled=True)
    xs = micro_batches(K)
    grads = []
    for j, x in enumerate(xs):
        x = x[:, :4]
        use_head = j == 0  # the head has a gradient in the first micro-batch only
        loss_a = (head_a(a(x)) ** 2).sum() if use_head else (a(x) ** 2).sum()
        loss_b = (head_b(b(x)) ** 2).sum() if use_head else (b(x) ** 2).sum()
        loss_a.backward()
        ps_b = [*b.parameters(), *head_b.parameters()]
        gs = torch.autograd.grad(loss_b, ps_b, allow_unused=True)
        grads.append([None if g is None else g.detach() for g in gs])
    oracle.window(grads)
    for p, q in zip(params, oracle.p):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


class _RaiseInBackward(torch.autograd.Function):
    """Identity; its backward raises while ``armed`` (after the layers above it got gradients)."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if _RaiseInBackward.armed:
            raise RuntimeError("out of memory (simulated)")
        return g


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_backward_that_raises_counts_as_a_micro_batch_and_the_window_still_closes(backend):
    """A backward that raises after some hooks folded (an out-of-memory micro-batch caught by the
    training loop): autograd never runs its end callback. Before, the window stayed open for good:
    every later backward folded and none stepped. Now the interrupted pass counts as a micro-batch
    whose missing gradients are zero, and the window closes after k passes in all."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 3).double(), torch.nn.Linear(3, 2).double()
    ref_first, ref_last = torch.nn.Linear(4, 3).double(), torch.nn.Linear(3, 2).double()
    ref_first.load_state_dict(first.state_dict())
    ref_last.load_state_dict(last.state_dict())
    params = [*first.parameters(), *last.parameters()]
    opt = adamkit.AdamW(
        params, lr=LR, weight_decay=WD, backend=backend, gradient_release=True, accumulation_steps=K
    )
    oracle = Oracle([*ref_first.parameters(), *ref_last.parameters()], decoupled=True)
    xs = [x[:, :4] for x in micro_batches(2 * K)]
    ref_params = [*ref_first.parameters(), *ref_last.parameters()]

    def ref_grads(x, interrupted):
        h = ref_first(x)
        loss = (ref_last(torch.tanh(h.detach() if interrupted else h)) ** 2).sum()
        gs = torch.autograd.grad(loss, ref_params, allow_unused=True)
        return [None if g is None else g.detach() for g in gs]

    # window 1: micro-batch 0 raises below the last layer (its hooks fired, the first layer's not)
    _RaiseInBackward.armed = True
    with pytest.raises(RuntimeError, match="simulated"):
        (last(torch.tanh(_RaiseInBackward.apply(first(xs[0])))) ** 2).sum().backward()
    _RaiseInBackward.armed = False
    for p in params:
        p.grad = None  # what a loop that catches the error does (zero_grad)
    grads = [ref_grads(xs[0], interrupted=True)]
    with pytest.warns(UserWarning, match="raised inside an accumulation window"):
        (last(torch.tanh(_RaiseInBackward.apply(first(xs[1])))) ** 2).sum().backward()
    grads.append(ref_grads(xs[1], interrupted=False))
    for x in xs[2:K]:
        (last(torch.tanh(_RaiseInBackward.apply(first(x)))) ** 2).sum().backward()
        grads.append(ref_grads(x, interrupted=False))
    oracle.window(grads)
    for p, q in zip(params, oracle.p):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert all(float(opt.state[p]["step"]) == 1 for p in params)
    # the next window is an ordinary one
    grads = []
    for x in xs[K : 2 * K]:
        (last(torch.tanh(_RaiseInBackward.apply(first(x)))) ** 2).sum().backward()
        grads.append(ref_grads(x, interrupted=False))
    oracle.window(grads)
    for p, q in zip(params, oracle.p):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert all(float(opt.state[p]["step"]) == 2 for p in params)


def test_state_dict_after_a_backward_that_raised_says_so():
    first, last = torch.nn.Linear(4, 3).double(), torch.nn.Linear(3, 2).double()
    opt = adamkit.AdamW(
        [*first.parameters(), *last.parameters()], gradient_release=True, accumulation_steps=K
    )
    _RaiseInBackward.armed = True
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            (last(_RaiseInBackward.apply(first(micro_batches(1)[0][:, :4]))) ** 2).sum().backward()
    finally:
        _RaiseInBackward.armed = False
    with pytest.raises(RuntimeError, match="after a backward pass that raised"):
        opt.state_dict()


def test_release_clipping_with_accumulation_uses_the_previous_windows_rms_norm():
    a, b = model(torch.float64), model(torch.float64)
    opt = adamkit.AdamW(
        a.parameters(),
        lr=LR,
        weight_decay=WD,
        backend="foreach",
        gradient_release=True,
        accumulation_steps=K,
        max_grad_norm=0.5,
    )
    oracle = Oracle(b.parameters(), decoupled=True)
    xs = micro_batches(3 * K)
    scale = 1.0  # the first window is not clipped
    for w in range(3):
        grads = []
        for j in range(K):
            loss_of(a, xs[w * K + j]).backward()
            grads.append(grads_of(b, xs[w * K + j]))
        oracle.window(grads, scale)
        norms = [float(torch.nn.utils.get_total_norm(gr)) for gr in grads]
        rms = math.sqrt(sum(n * n for n in norms) / K)
        assert opt.last_grad_norm == pytest.approx(rms, rel=1e-6)
        scale = min(1.0, 0.5 / (rms + 1e-6))
        assert scale < 1
    for p, q in zip(a.parameters(), oracle.p):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_accumulation_refusals_change_nothing():
    m = model()
    with pytest.raises(ValueError, match="gradient_release=True"):
        adamkit.AdamW(m.parameters(), accumulation_steps=2)
    with pytest.raises(ValueError, match="accumulation_steps"):
        adamkit.AdamW(m.parameters(), gradient_release=True, accumulation_steps=0)
    with pytest.raises(ValueError, match="Lion"):
        adamkit.Lion(m.parameters(), gradient_release=True, accumulation_steps=2)
    with pytest.raises(ValueError, match="beta1 > 0"):
        adamkit.AdamW(m.parameters(), betas=(0.0, 0.99), gradient_release=True, accumulation_steps=2)
    with pytest.raises(ValueError, match="skip_nonfinite"):
        adamkit.AdamW(m.parameters(), skip_nonfinite=True, gradient_release=True, accumulation_steps=2)
    opt = adamkit.AdamW(m.parameters(), gradient_release=True, accumulation_steps=2)
    x = micro_batches(1, torch.float32)[0]
    loss_of(m, x).backward()  # mid-window: state dicts refused
    with pytest.raises(RuntimeError, match="accumulation window"):
        opt.state_dict()
    before = [p.clone() for p in m.parameters()]
    m[0].bias.grad = torch.ones_like(m[0].bias)  # a gradient set by hand cannot join the window
    with pytest.raises(RuntimeError, match="set otherwise"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    m[0].bias.grad = None
    loss_of(m, x).backward()  # the window closes: a state dict can be taken and loaded again
    sd = opt.state_dict()
    assert float(sd["state"][0]["step"]) == 1
    opt.load_state_dict(sd)


def test_train_accumulate_true_and_optimizer_accumulation(tmp_path):
    from adamkit.tools import tasks
    from adamkit.tools.train import TrainConfig, train

    tiny = dict(model=tasks.GPTConfig(context=32, d_model=32, n_layers=1, n_heads=2), batch_size=8)
    config = dict(steps=4, evals=2, progress=False, accumulate=2, **tiny)
    true = train(TrainConfig(**config, grads="fused"))
    folded = train(TrainConfig(**config, grads="release"))
    assert len(true.train_losses) == len(folded.train_losses) == 4
    assert true.train_losses != folded.train_losses  # v differs: the folded moments are not true accumulation
    # the window closes with each step: a checkpoint resumes bit for bit
    path = tmp_path / "run.pt"
    train(TrainConfig(**config, grads="release"), save=path, stop_after=2)
    saved = torch.load(path, weights_only=True)["optimizer"]["state"]
    assert all(float(st["step"]) == 2 for st in saved.values())  # one step per 2 micro-batches
    resumed = train(TrainConfig(progress=False), resume=path)
    assert resumed.train_losses == folded.train_losses


@pytest.mark.parametrize("backend", ("reference", "auto"))
def test_release_per_tensor_clipping_equals_clipping_each_tensor_then_step(backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    a, b = model(dtype), model(dtype)
    kw = dict(lr=LR, weight_decay=WD, backend=backend, max_grad_norm=0.3)
    oa = adamkit.AdamW(a.parameters(), gradient_release=True, release_clipping="per_tensor", **kw)
    ob = adamkit.AdamW(b.parameters(), lr=LR, weight_decay=WD, backend=backend)
    clipped = 0
    for x in micro_batches(3, dtype):
        loss_of(a, x).backward()
        oa.step()
        loss_of(b, x).backward()
        for p in b.parameters():
            clipped += float(torch.nn.utils.clip_grad_norm_([p], 0.3)) > 0.3
        ob.step()
        ob.zero_grad()
    assert clipped >= 3  # clipping was active on some tensors, not on all
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    with pytest.raises(ValueError, match="release_clipping"):
        adamkit.AdamW(a.parameters(), release_clipping="per_tensor")  # no release: it would be ignored


def test_planner_counts_one_gradient_with_release_and_no_buffer_with_optimizer_accumulation():
    from adamkit.tools import plan

    model = plan.load_model("gpt2")
    largest = max(t.numel for t in model.tensors if t.trainable)
    out = plan.plan(model, ["fp32", "fp32-release", "mixed-bf16-accum", "mixed-bf16-release-accum"])
    comps = {r.recipe.name: plan.model_state_bytes(model, r.recipe) for r in out}
    assert comps["fp32"]["grads"] == 4 * model.n_params
    assert comps["fp32-release"]["grads"] == 4 * largest  # one gradient at a time
    assert comps["mixed-bf16-accum"]["grad_accum"] == 4 * model.n_params
    assert comps["mixed-bf16-release-accum"]["grad_accum"] == 0  # folded into the moments
    assert comps["mixed-bf16-release-accum"]["grads"] == 2 * largest
    with pytest.raises(ValueError, match="adam/adamw only"):
        plan.parse_recipe("fp32-lion-release-accum")


def test_race_release_recipe_trains_as_the_ordinary_step():
    from adamkit.tools import race

    result = race.race(
        "gpt",
        ["adamkit-adamw", "adamw-release"],
        quick=True,
        steps=3,
        evals=1,
        untimed_steps=0,
        progress=False,
    )
    a, b = result.runs["adamkit-adamw"], result.runs["adamw-release"]
    assert a.train_losses == b.train_losses and a.curve[-1].val_loss == b.curve[-1].val_loss
    assert b.peak_rss_bytes is not None and "gradient release" in race.RECIPES["adamw-release"].describe()
