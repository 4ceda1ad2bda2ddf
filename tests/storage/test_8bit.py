"""8-bit optimizer state: quantization error bounds against float64, exact zeros, non-finite
isolation, the size threshold, state dicts and accuracy against a float64 oracle."""

from __future__ import annotations

import io

import pytest
import torch

import adamkit
from adamkit.storage import quant8 as _quant
from conftest import BACKENDS


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------------
# The format itself
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("spread", [1.0, 1e3, 1e8])
def test_quantization_error_within_the_stated_bound(name, spread):
    """Per element, |decode(encode(x)) - x| <= a((c+1)^k - c^k)/Q^k (module doc of storage.quant8), for
    blocks whose magnitudes span 1x to 1e8x, checked in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256 * 64 + 77, generator=g, dtype=torch.float64)
    x = x * torch.exp(torch.rand(x.shape, generator=g, dtype=torch.float64) * torch.log(torch.tensor(spread)))
    if name == "exp_avg_sq":
        x = x * x
    x = x.float().double()  # the values an fp32 optimizer would hold
    for seed in range(5):
        codes, scales = _quant.encode(name == "exp_avg", x.float(), seed=seed)
        y = _quant.decode(name == "exp_avg", codes, scales, x.shape, torch.float64)
        assert ((y - x).abs() <= _quant.error_bound(name == "exp_avg", x)).all()
    assert codes.dtype == torch.uint8 and codes.numel() == _quant.padded(x.numel())
    assert scales.numel() == _quant.blocks(x.numel())


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
def test_rounding_is_unbiased(name):
    """Averaged over many independent rounding seeds the decoded value converges to x (the bias
    that dithering in the companded domain would leave is ~1/c^2, here ~1e-2 for small codes)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(256 * 8, generator=g) * (1 if name == "exp_avg_sq" else 2) - (
        0 if name == "exp_avg_sq" else 1
    )
    x[::7] *= 1e-3  # small values: few codes, where bias would show
    acc = torch.zeros(x.shape, dtype=torch.float64)
    for seed in range(400):
        from adamkit.storage.formats import mix_seed

        codes, scales = _quant.encode(name == "exp_avg", x, seed=mix_seed(seed))
        acc += _quant.decode(name == "exp_avg", codes, scales, x.shape, torch.float64)
    mean = acc / 400
    # the standard error of a 400-sample mean of a one-code-step rounding is <= step/40
    step = _quant.error_bound(name == "exp_avg", x.double())
    assert ((mean - x.double()).abs() <= step / 10 + 1e-12).float().mean() > 0.99


def test_zero_and_non_finite_codes():
    x = torch.zeros(512)
    x[3], x[300] = float("nan"), float("inf")
    x[4], x[301] = 1.0, -2.0
    for name in ("exp_avg", "exp_avg_sq"):
        v = x.abs() if name == "exp_avg_sq" else x
        codes, scales = _quant.encode(name == "exp_avg", v)
        y = _quant.decode(name == "exp_avg", codes, scales, x.shape, torch.float32)
        assert torch.isnan(y[3]) and torch.isnan(y[300])  # the marker, element-local
        finite = torch.isfinite(v)
        assert torch.equal(y[finite & (v == 0)], torch.zeros(int((finite & (v == 0)).sum())))
        # each group's scale is its largest finite magnitude (both exact in bf16 here)
        want = torch.zeros(512 // _quant.BLOCK)
        want[3 // _quant.BLOCK], want[300 // _quant.BLOCK] = 1.0, 2.0
        assert scales.dtype == torch.bfloat16 and torch.equal(scales.float(), want)
        torch.testing.assert_close(y[4], v[4])  # the group's largest value is exact


# ------------------------------------------------------------------------------------------------
# The optimizer with 8-bit state
# ------------------------------------------------------------------------------------------------


def stream(n, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), [torch.randn(n, generator=g) * 0.1 for _ in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_never_moves(backend):
    p0, grads = stream(4096, 20)
    frozen = torch.arange(4096) % 5 == 0  # every fifth element, inside busy blocks
    p = p0.clone().requires_grad_()
    opt = adamkit.AdamW([p], weight_decay=0.0, state_format="8bit", backend=backend)
    for g in grads:
        p.grad = torch.where(frozen, 0.0, g)
        opt.step()
    assert torch.equal(p.detach()[frozen], p0[frozen])
    assert not torch.equal(p.detach()[~frozen], p0[~frozen])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_gradient_stays_in_its_element(backend, skip):
    p0, grads = stream(4096, 6, seed=2)
    bad = [torch.ones(4096, dtype=torch.bool) for _ in grads]
    runs = {}
    for kind in ("nan", "clean"):
        p = p0.clone().requires_grad_()
        opt = adamkit.AdamW([p], state_format="8bit", backend=backend, skip_nonfinite=skip)
        for t, g in enumerate(grads):
            g = g.clone()
            if t == 3:
                g[10] = float("nan") if kind == "nan" else 0.0
                bad[t][10] = False
            p.grad = g
            opt.step()
        runs[kind] = (p.detach(), opt)
    p_nan, p_clean = runs["nan"][0], runs["clean"][0]
    others = torch.arange(4096) != 10
    # every other element, its block-mates included, is unaffected
    torch.testing.assert_close(p_nan[others], p_clean[others], rtol=0, atol=0)
    if skip:
        assert torch.isfinite(p_nan[10])  # protected: the bad element kept its old value
    else:
        assert torch.isnan(p_nan[10])  # unprotected: only the element itself is lost


def test_skip_nonfinite_keeps_the_element_exactly_fp32():
    p = torch.randn(8, requires_grad=True)
    opt = adamkit.AdamW([p], skip_nonfinite=True, backend="reference")
    p.grad = torch.randn(8)
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    g = torch.randn(8)
    g[2] = float("inf")
    p.grad = g
    opt.step()
    assert p[2].item() == before[0][2].item()
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][k][2].item() == before[1][k][2].item()
    assert p[0].item() != before[0][0].item()


def test_small_tensors_keep_fp32_state_threshold_is_an_argument():
    big, small = torch.randn(5000, requires_grad=True), torch.randn(100, requires_grad=True)
    opt = adamkit.AdamW([big, small], state_format="8bit")
    big.grad, small.grad = torch.randn(5000), torch.randn(100)
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    opt2 = adamkit.AdamW([torch.randn(100, requires_grad=True)], state_format="8bit", min_8bit_size=0)
    q = opt2.param_groups[0]["params"][0]
    q.grad = torch.randn(100)
    opt2.step()
    assert opt2.state[q]["exp_avg"].dtype == torch.uint8
    assert opt2.state[q]["exp_avg"].numel() == _quant.padded(100) == 128


# (id, options, bound on ||p - p64|| / ||p64 - p0|| after 300 steps of a random-gradient stream;
# the 8-bit moments carry ~1-2% rounding noise per step, which the trajectory integrates)
ORACLE = [
    ("adamw", {}, {}, 0.06),
    ("adamw-amsgrad", {"amsgrad": True}, {"amsgrad": True}, 0.06),
    ("adam-l2", {"decoupled_weight_decay": False, "weight_decay": 0.1}, {"weight_decay": 0.1}, 0.06),
    (
        "adamw-full-decay",
        {"decouple_lr": True, "weight_decay": 1e-3, "max_lr": 1e-3},
        {"weight_decay": 1.0},
        0.06,
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,torch_kw,bound", [pytest.param(*r[1:], id=r[0]) for r in ORACLE])
def test_tracks_float64_oracle(kw, torch_kw, bound, backend):
    p0, grads = stream(8192, 300, seed=4)
    ref = p0.double().requires_grad_()
    decoupled = kw.get("decoupled_weight_decay", True)
    topt = (torch.optim.AdamW if decoupled else torch.optim.Adam)([ref], lr=1e-3, **torch_kw)
    p = p0.clone().requires_grad_()
    cls = adamkit.AdamW if decoupled else adamkit.Adam
    opt = cls(
        [p],
        lr=1e-3,
        state_format="8bit",
        backend=backend,
        **{k: v for k, v in kw.items() if k != "decoupled_weight_decay"},
    )
    for g in grads:
        ref.grad, p.grad = g.double(), g.clone()
        topt.step()
        opt.step()
    err = (p.detach().double() - ref.detach()).norm() / (ref.detach() - p0.double()).norm()
    assert err.item() < bound


def test_param_groups_and_bf16_kahan():
    p0, grads = stream(8192, 100, seed=6)
    a = p0[:4096].to(torch.bfloat16).requires_grad_()
    b = p0[4096:].clone().requires_grad_()
    opt = adamkit.AdamW(
        [{"params": [a], "lr": 2e-3}, {"params": [b], "weight_decay": 0.0}], state_format="8bit"
    )
    for g in grads:
        a.grad, b.grad = g[:4096].to(torch.bfloat16), g[4096:].clone()
        opt.step()
    st = opt.state[a]
    assert st["exp_avg"].dtype == torch.uint8 and st["kahan_comp"].dtype == torch.bfloat16
    assert opt.state[b]["exp_avg_sq"].dtype == torch.uint8
    assert (a.detach().float() - p0[:4096]).abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_state_dict_converts_both_ways(backend):
    p0, grads = stream(4096, 10, seed=8)
    p = p0.clone().requires_grad_()
    fp32 = adamkit.AdamW([p], backend=backend)
    for g in grads[:5]:
        p.grad = g.clone()
        fp32.step()
    q = p.detach().clone().requires_grad_()
    eight = adamkit.AdamW([q], state_format="8bit", backend=backend)
    eight.load_state_dict(roundtrip(fp32.state_dict()))
    m8 = _quant.decode(
        True, eight.state[q]["exp_avg"], eight.state[q]["exp_avg_scale"], q.shape, torch.float64
    )
    m32 = fp32.state[p]["exp_avg"].double()
    assert ((m8 - m32).abs() <= _quant.error_bound(True, m32)).all()
    # and back: the 8-bit state decodes into an fp32 optimizer
    r = q.detach().clone().requires_grad_()
    back = adamkit.AdamW([r], backend=backend)
    back.load_state_dict(roundtrip(eight.state_dict()))
    assert back.state[r]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(back.state[r]["exp_avg"].double(), m8, rtol=0, atol=0)
    for g in grads[5:]:
        r.grad = g.clone()
        back.step()  # continues


def test_mismatched_8bit_state_rejected_unchanged():
    p = torch.randn(4096, requires_grad=True)
    opt = adamkit.AdamW([p], state_format="8bit")
    p.grad = torch.randn(4096)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:256].clone()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match="8-bit codes"):
        opt.load_state_dict(sd)
    for k, v in opt.state[p].items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("d", [128, 96])
def test_state_bytes_per_param_on_the_benchmark_model(d):
    """The transformer of the benchmark (norms and biases below min_8bit_size stay fp32), with rows
    of 128 (``adamkit train``'s width) and 96: every 8-bit tensor's m and v take 2 B/param of
    codes and 2 B of scale per group of 32, nothing padded: 2.125 B/param, and the 4 B step."""
    from adamkit.tools.bench import transformer_shapes

    shapes = transformer_shapes(d=d, layers=2, vocab=512, ctx=256)
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = adamkit.AdamW(ps, state_format="8bit", backend="fused")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    eight = [p for p in ps if opt.state[p]["exp_avg"].dtype == torch.uint8]
    assert sum(p.numel() for p in eight) > 0.9 * sum(p.numel() for p in ps)
    for p in eight:
        live = sum(t.nbytes for k, t in opt.state[p].items() if k != "step")
        assert live == 2.125 * p.numel(), p.shape


def _hard_spots() -> torch.Tensor:
    """Gradients whose moments (Adam with betas (0, 0): m = g, v = g * g) fall on the codes' hard
    spots, in groups that each start with 1.0 (group scale 1, so |x| itself is the encoder's r):
    every code's value exactly (m), one ulp either side of it, the middle of every code step,
    r = 0, 1 and tiny r; for v, the square roots of its code values and their fp32 neighbours,
    whose squares land on or within a few ulps of the boundaries."""
    up, down = torch.tensor(2.0), torch.tensor(0.0)
    cm = torch.arange(128, dtype=torch.uint8) + 128  # m codes 0..127 (stored + 128)
    lm = _quant.decode_blocks(True, cm.view(1, -1), torch.ones(1), torch.float32).view(-1)
    cv = torch.arange(255, dtype=torch.uint8)
    lv = _quant.decode_blocks(False, cv.view(1, -1), torch.ones(1), torch.float32).view(-1)
    sv = lv.double().sqrt().float()
    mids_m = ((lm[:-1].double() + lm[1:].double()) / 2).float()
    mids_v = ((lv[:-1].double() + lv[1:].double()) / 2).sqrt().float()
    tiny = torch.tensor([0.0, 1e-30, 1.2e-38, 1e-10, 1e-5, float(lm[1]) / 2, 1.0])
    spots = [lm, torch.nextafter(lm, down), torch.nextafter(lm, up), mids_m]
    spots += [sv, torch.nextafter(sv, down), torch.nextafter(sv, up), mids_v, tiny]
    x = torch.cat(spots).clamp(max=1.0)
    x = x * torch.where(torch.arange(x.numel()) % 2 == 0, 1.0, -1.0)  # both signs of m
    n = _quant.BLOCK - 1
    x = torch.nn.functional.pad(x, (0, -x.numel() % n)).view(-1, n)
    return torch.cat([torch.ones(x.shape[0], 1), x], dim=1).view(-1)


@pytest.mark.parametrize("backend", ["reference", "foreach", "fused"])
def test_code_choice_at_the_code_boundaries(backend):
    """The code each value gets, against the format's definition in float64: with r = |x| / a and
    c = floor(Q r^(1/k)), the stored code is c or c + 1 (rounding up with probability about the
    position of r in its step); a value equal to a code's decoded value gets exactly that code
    (nothing to round); and values in the middle of a step round up about half the time. The
    kernels' codes equal the reference's bit for bit on these spots."""
    g = _hard_spots()
    codes = {}
    for b in dict.fromkeys(["reference", backend]):
        p = torch.zeros(g.numel(), requires_grad=True)
        opt = adamkit.Adam([p], lr=1e-3, betas=(0.0, 0.0), state_format="8bit", min_8bit_size=0, backend=b)
        p.grad = g.clone()
        opt.step()
        codes[b] = {k: opt.state[p][k].view(-1)[: g.numel()] for k in ("exp_avg", "exp_avg_sq")}
        ones = torch.ones(g.numel() // _quant.BLOCK, dtype=torch.bfloat16)
        assert torch.equal(opt.state[p]["exp_avg_scale"], ones)
        assert torch.equal(opt.state[p]["exp_avg_sq_scale"], ones)
    for name, signed, k, q in (("exp_avg", True, 2, 127), ("exp_avg_sq", False, 4, 254)):
        stored = codes[backend][name]
        assert torch.equal(stored, codes["reference"][name])
        r = g.double().abs() if signed else (g * g).double()  # the fp32 moment, exactly
        o = (stored.long() - 128).abs() if signed else stored.long()
        if signed:  # the sign is kept (code 0 is stored as 128)
            assert torch.equal(stored.long() > 128, (g > 0) & (o > 0))
            assert torch.equal(stored.long() < 128, (g < 0) & (o > 0))
        root = r ** (1.0 / k)
        c_lo = torch.floor(q * root * (1 - 1e-12)).long()
        c_hi = torch.floor(q * root * (1 + 1e-12)).long()
        assert ((o >= c_lo) & (o <= c_hi + 1)).all(), name
        # a code's own value: exactly that code
        levels = (
            _quant.decode_blocks(
                signed,
                (torch.arange(q + 1) + (128 if signed else 0)).to(torch.uint8).view(1, -1),
                torch.ones(1),
                torch.float64,
            )
            .view(-1)
            .abs()
        )
        on = torch.isin(r, levels)
        assert on.sum() >= q, name  # every code is hit (m directly, v through squares landing on it)
        assert torch.equal(levels[o[on]], r[on]), name
        # the middle of a step: rounds up with probability about the position in the step
        c = c_lo.clamp(max=q - 1)
        t = (r - (c.double() / q) ** k) / (((c + 1).double() / q) ** k - (c.double() / q) ** k)
        mid = (t > 0.3) & (t < 0.7)
        assert mid.sum() >= 100, name
        assert abs((o[mid] > c[mid]).double().mean() - t[mid].mean()) < 0.1, name


@pytest.fixture
def subnormals_kept():
    """torch's default: subnormal floats are computed, not flushed (the suite flushes them)."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@pytest.mark.parametrize("signed", [True, False])
def test_a_subnormal_group_is_stored_as_zeros_not_nan(signed, subnormals_kept):
    x = torch.zeros(2 * _quant.BLOCK)
    x[0], x[1] = 1e-39, 5e-40  # the first group's largest magnitude is subnormal
    x[32], x[40] = 3.0, 1e-39  # a normal group keeps its subnormal element's order of magnitude
    if signed:
        x[1] = -x[1]
    codes, scales = _quant.encode(signed, x)
    y = _quant.decode(signed, codes, scales, x.shape, torch.float32)
    assert scales[0] == 0 and torch.equal(y[:32], torch.zeros(32))  # was nan for m's zeros
    assert y[32] == 3.0 and torch.isfinite(y).all()


# the compiled kernel traces quant8.encode_blocks, the reference's own code (compiling it for this
# shape without subnormal flushing cost 36 s); the native kernel has its own encode
@pytest.mark.parametrize("backend", ["reference", "foreach", "fused"])
def test_a_long_idle_row_with_decaying_momentum_stays_finite(backend, subnormals_kept):
    """m of a row whose gradients stopped decays by beta1 per step into subnormals; with 8-bit
    state its block must decode to zeros, never nan (a nan m makes the parameter nan)."""
    p = torch.nn.Parameter(torch.zeros(4, 1024))
    opt = adamkit.AdamW([p], lr=1e-3, state_format="8bit", backend=backend)
    p.grad = torch.zeros_like(p)
    p.grad[0, :3] = torch.tensor([1e-37, -4e-38, 2e-38])  # m = 0.1 g: subnormal from the first step
    opt.step()
    for _ in range(3):
        p.grad.zero_()
        opt.step()
    st = opt.state[p]
    m = _quant.decode(True, st["exp_avg"], st["exp_avg_scale"], p.shape, torch.float32)
    assert torch.isfinite(p).all() and torch.isfinite(m).all()
    assert torch.equal(m, torch.zeros_like(m))


# ------------------------------------------------------------------------------------------------
# State dicts of the previous 8-bit format (blocks of 256, fp32 scales)
# ------------------------------------------------------------------------------------------------


def _legacy(signed: bool, x: torch.Tensor, rows: bool):
    """x in the previous format (``quant8.LEGACY_BLOCK``): blocks of 256 with fp32 scales (each
    block's largest magnitude), codes rounded to nearest; rows of a >= 2-D x each padded to whole
    blocks. Returns (codes, scales, the values they decode to, in float64)."""
    r = x.reshape(x.shape[0], -1) if rows else x.reshape(1, -1)
    r = torch.nn.functional.pad(r.double(), (0, -r.shape[1] % 256))
    xb = r.reshape(-1, 256)
    a = xb.abs().amax(dim=1, keepdim=True).float().double()
    q, k = (127, 2) if signed else (254, 4)
    c = torch.round(q * (xb.abs() / torch.where(a > 0, a, 1.0)) ** (1 / k))
    value = (c / q) ** k * a * (torch.sign(xb) if signed else 1)
    stored = (torch.where(xb < 0, 128 - c, 128 + c) if signed else c).to(torch.uint8)
    n = x[0].numel() if rows else x.numel()
    decoded = value.reshape(r.shape)[:, :n].reshape(x.shape)
    if rows:
        return stored.reshape(r.shape), a.float().reshape(r.shape[0], -1), decoded
    return stored.reshape(-1), a.float().reshape(-1), decoded


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_previous_8bit_state_dicts_load_through_fp32(backend):
    """A state dict of the previous format loads into the 8-bit state of groups of 32 (each value
    within the new format's stated bound of what the old codes held) and into fp32 state (those
    values, to fp32 decoding's rounding), and training continues."""
    g = torch.Generator().manual_seed(11)
    shapes = [(4, 300), (5000,)]  # rows of two legacy blocks (padded), a flat tensor of 20
    ps = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    fp32 = adamkit.AdamW(ps, backend=backend)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        fp32.step()
    sd = roundtrip(fp32.state_dict())
    held = {}
    for i, p in enumerate(ps):
        st = sd["state"][i]
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, scales, value = _legacy(signed, st[name], rows=p.dim() >= 2)
            st[name], st[name + "_scale"], held[i, name] = codes, scales, value
        st["param_shape"] = torch.tensor(p.shape)
    for state_format in ("8bit", "fp32"):
        qs = [p.detach().clone().requires_grad_() for p in ps]
        opt = adamkit.AdamW(qs, state_format=state_format, backend=backend, min_8bit_size=0)
        opt.load_state_dict(roundtrip(sd))
        for i, q in enumerate(qs):
            st = opt.state[q]
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                want = held[i, name]
                if state_format == "fp32":
                    # decoded in fp32 (quant8.decode_blocks): at most four roundings of 2^-24
                    # each (the constant 1/Q^k, a times it, c^4 for v, the product)
                    torch.testing.assert_close(st[name].double(), want, rtol=4 * 2.0**-24, atol=0)
                    continue
                assert st[name + "_scale"].dtype == torch.bfloat16
                got = _quant.decode(
                    signed, st[name], st[name + "_scale"], q.shape, torch.float64, q.dim() >= 2
                )
                bound = _quant.error_bound(signed, want.float(), rows=q.dim() >= 2).view(q.shape)
                assert ((got - want).abs() <= bound).all(), name
        for q in qs:
            q.grad = torch.randn(q.shape, generator=g)
        opt.step()
        assert all(torch.isfinite(q).all() for q in qs)
