"""Every feature of the native kernel (backend="fused") and of the foreach backend, held to the
reference backend (the spec) on inputs that exercise it: ties of round-to-nearest, non-finite
gradients and state, 8-bit tensors of odd block counts with a partial last block, checkpoints
converted between every pair of formats.

Public API only (optimizers, ``opt.state``, state dicts, full-precision params), so these tests
outlive any rewrite of the engine.

What is compared, and how exactly. For one step from the same parameters and state:

- deterministic values are compared bit for bit: fp32 parameters and master weights, bf16
  parameters rounded to nearest (plain, master, the high half of Kahan), fp32 moments, the 8-bit
  block scales (the largest finite magnitude of the block's new values), the step counter;
- values rounded stochastically (SR parameters, the Kahan compensation, bf16 moments, 8-bit codes)
  are compared bit for bit too: every backend draws each element's rounding bits from the same
  per-tensor streams (step, parameter id, element index). With ``SAME_ROUNDING_STREAMS = False``
  the weaker check remains available: each value must be one of the two roundings of the exact fp32
  value (bf16) or within the 8-bit format's stated error of it. The exact fp32 values come from a
  *twin*: the reference backend with fp32 state and master weights, loaded from the same state,
  whose fp32 results are the unrounded ones;
- square roots, divisions and fused multiply-adds are correctly rounded in both the native kernel
  (sqrtf, /, fmaf) and the reference (``adamkit.ieee``, which does not use the host's vector math
  library, whose fp32 square root is 1 ulp off in ~20 % of elements on some CPUs), so every value,
  including those that depend on a square root, is compared bit for bit on any host.
"""

from __future__ import annotations

import io

import pytest
import torch

import adamkit

pytestmark = pytest.mark.usefixtures("one_thread")

# Every backend seeds stochastic rounding per tensor (step, parameter id, element index), so every
# stochastically rounded value of the fused backend (SR parameters, Kahan compensation, bf16
# moments, 8-bit codes) is compared with the reference bit for bit. (False would check it only
# against the exact value's two roundings, as needed while the streams differed.)
SAME_ROUNDING_STREAMS = True

BACKENDS = ["foreach", "fused"]  # each compared with "reference"
LR = 1e-2

# 8-bit tensors: matrices in rows (7 rows of one partial block, 3 rows of a full and a partial
# block), vectors flat in 5 and 7 blocks with a partial last block, and a 0-d scalar: 27 blocks in
# all (min_8bit_size=0 everywhere).
SHAPES = [(), (7, 70), (3, 300), (1100,), (1700,)]

# (id, parameter dtype, options): every way a parameter is stored
PARAMS = [
    ("fp32", torch.float32, {}),
    ("bf16-plain", torch.bfloat16, {"kahan_sum": False}),
    ("bf16-kahan", torch.bfloat16, {"kahan_sum": True}),
    ("bf16-kahan8", torch.bfloat16, {"kahan_sum": "8bit"}),
    ("bf16-master", torch.bfloat16, {"master_weights": True}),
    ("bf16-sr", torch.bfloat16, {"stochastic_rounding": True}),
]
STATES = ["fp32", "bf16", "8bit"]
# (id, optimizer, options): decay modes, maximize, amsgrad, skip_nonfinite
MATH = [
    ("adamw", "AdamW", {"weight_decay": 0.1}),
    ("adam-l2", "Adam", {"weight_decay": 0.1}),
    ("adamw-full", "AdamW", {"decouple_lr": True, "max_lr": 2 * LR, "weight_decay": 0.05}),
    ("maximize-l2", "Adam", {"maximize": True, "weight_decay": 0.1}),
    ("amsgrad-l2", "Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("amsgrad-maximize", "AdamW", {"amsgrad": True, "maximize": True}),
    ("skip", "AdamW", {"skip_nonfinite": True}),
    ("skip-amsgrad-l2", "Adam", {"skip_nonfinite": True, "amsgrad": True, "weight_decay": 0.1}),
]


def rows(table):
    return [pytest.param(*r[1:], id=r[0]) for r in table]


def param_mode(dtype, kw) -> str:
    if dtype == torch.float32:
        return "native"
    if kw.get("master_weights"):
        return "master"
    if kw.get("stochastic_rounding"):
        return "sr"
    if kw.get("kahan_sum") == "8bit":
        return "kahan8"
    return "kahan" if kw.get("kahan_sum", True) else "plain"


# ------------------------------------------------------------------------------------------------
# Building and stepping optimizers through the public API
# ------------------------------------------------------------------------------------------------


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def build(cls, values, backend, sd=None, **kw):
    ps = [v.detach().clone().requires_grad_() for v in values]
    opt = getattr(adamkit, cls)(ps, lr=LR, backend=backend, min_8bit_size=0, **kw)
    if sd is not None:
        opt.load_state_dict(roundtrip(sd))
    return ps, opt


def step(run, grads):
    ps, opt = run
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()


def twin_kw(kw):
    """The reference in fp32 storage: fp32 moments, and an fp32 master copy of bf16 parameters
    (for Kahan state, loaded as p + kahan_comp, the value the Kahan pair stands for)."""
    out = {k: v for k, v in kw.items() if k not in ("kahan_sum", "stochastic_rounding")}
    return {**out, "state_format": "fp32", "master_weights": True}


def values_of(dtype, seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def grads_of(values, seed, nonfinite=False):
    """Gradients spanning 2^-8 to 2^8 in magnitude; with ``nonfinite``, inf, -inf and nan in
    every tensor of more than one element (8-bit: in different blocks)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in values:
        x = torch.randn(v.shape, generator=g) * torch.exp2(torch.randint(-8, 9, v.shape, generator=g).float())
        if nonfinite and x.numel() > 1:
            flat = x.view(-1)
            n = flat.numel()
            flat[0], flat[n // 2], flat[n - 1] = float("inf"), float("-inf"), float("nan")
        out.append(x.to(v.dtype))
    return out


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


def _bits(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1)
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    return x.view(ints[x.dtype]) if x.dtype in ints else x


def assert_bits(actual, expected, what, where=None):
    """Bit-identical (any nan equals any nan), on the elements of ``where`` if given."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    same = _bits(actual) == _bits(expected)
    if actual.is_floating_point():
        same |= actual.detach().reshape(-1).isnan() & expected.detach().reshape(-1).isnan()
    if where is not None:
        same |= ~where.reshape(-1)
    bad = (~same).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} of {same.numel()} elements differ, e.g. [{bad[0].item()}] "
        f"{actual.reshape(-1)[bad[0]].item()!r} != {expected.reshape(-1)[bad[0]].item()!r}"
    )


def sr_neighbours(x: torch.Tensor):
    """The two bf16 values a stochastic rounding of fp32 ``x`` may give (toward and away from 0)."""
    b = x.detach().float().reshape(-1).view(torch.int32)
    lo = b & ~0xFFFF
    hi = torch.where(b == lo, lo, lo + 0x10000)
    return lo.view(torch.float32).to(torch.bfloat16), hi.view(torch.float32).to(torch.bfloat16)


def count_far(stats, key, chose_hi, t, where):
    """Stochastic rounding picks the far neighbour of a value a fraction t of an interval above
    the near one with probability min(t, 1 - t): ``stats[key]`` sums the far picks and their
    expected number (checked by ``assert_dithered``; round-to-nearest never picks the far one)."""
    if stats is None:
        return
    far = torch.where(chose_hi, t < 0.5, t > 0.5) & where
    s = stats.setdefault(key, [0, 0.0])
    s[0] += int(far.sum())
    s[1] += float(torch.where(where, torch.minimum(t, 1 - t), 0.0).sum())


def assert_dithered(stats):
    for key, (far, expected) in stats.items():
        if expected >= 20:  # a count of Weyl-sequence draws: far tighter than +-50 %
            assert 0.5 * expected <= far <= 1.5 * expected, (
                f"{key}: {far} roundings to the far neighbour, {expected:.0f} expected: not stochastic"
            )


def assert_sr(actual, exact, what, where=None, stats=None, key=None):
    """bf16 ``actual`` is one of the two stochastic roundings of fp32 ``exact``."""
    lo, hi = sr_neighbours(exact)
    a = actual.detach().reshape(-1)
    ok = (_bits(a) == _bits(lo)) | (_bits(a) == _bits(hi)) | (a.isnan() & lo.isnan())
    where = torch.ones_like(ok) if where is None else where.reshape(-1)
    ok |= ~where
    bad = (~ok).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} elements are no rounding of the exact value, e.g. "
        f"{a[bad[0]].item()!r} for {exact.reshape(-1)[bad[0]].item()!r}"
    )
    x, xl, xh = exact.detach().reshape(-1).double(), lo.double(), hi.double()
    inexact = where & x.isfinite() & xh.isfinite() & (xl != xh)
    t = torch.where(inexact, (x - xl) / torch.where(inexact, xh - xl, 1.0), 0.0)
    count_far(stats, key, _bits(a) == _bits(hi), t, inexact)


# The 8-bit format (documented in adamkit.storage.quant8): blocks of 256 with scale a, the block's largest
# finite magnitude; m stored as c + 128 with x = a c|c| / 127^2, v as c with x = a (c / 254)^4;
# non-finite values as a marker (m: 0, v: 255) that decodes to nan.
Q8 = {"exp_avg": (2, 127), "exp_avg_sq": (4, 254), "max_exp_avg_sq": (4, 254)}


def blocks_of(x: torch.Tensor) -> torch.Tensor:
    """x's 8-bit blocks: rows of a >= 2-D tensor, each padded to whole blocks; else flat."""
    if x.dim() >= 2:
        r = x.detach().reshape(x.shape[0], -1).double()
        return torch.nn.functional.pad(r, (0, -r.shape[1] % 256)).reshape(-1, 256)
    x = x.detach().reshape(-1).double()
    return torch.nn.functional.pad(x, (0, -x.numel() % 256)).view(-1, 256)


def unblock(xb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values of ``blocks_of(x)``'s layout back to x's elements, in order (padding dropped)."""
    if x.dim() >= 2:
        n = x[0].numel()
        return xb.reshape(x.shape[0], -1)[:, :n].reshape(-1)
    return xb.reshape(-1)[: x.numel()]


def block_scales(x: torch.Tensor) -> torch.Tensor:
    """fp32 scales of fp32 values ``x``: each block's largest finite magnitude."""
    xb = blocks_of(x).float()
    a = torch.where(xb.isfinite(), xb.abs(), 0.0).amax(dim=1)
    return a.view(x.shape[0], -1) if x.dim() >= 2 else a  # rows: (rows, blocks per row)


def decode8(name, codes, scales, n):
    k, q = Q8[name]
    c = codes.reshape(-1, 256).double()
    a = scales.double().view(-1, 1)
    if name == "exp_avg":
        c = c - 128
        x = torch.where(codes.view(-1, 256) == 0, float("nan"), a * c * c.abs() / q**k)
    else:
        x = torch.where(codes.view(-1, 256) == 255, float("nan"), a * c**k / q**k)
    if codes.dim() == 2:  # rows of n / rows elements, each padded to whole blocks
        return x.reshape(codes.shape[0], -1)[:, : n // codes.shape[0]].reshape(-1)
    return x.reshape(-1)[:n]


def error8(name, x):
    """The format's stated bound on |decode(encode(x)) - x| (with fp32 arithmetic's slack)."""
    k, q = Q8[name]
    xb = blocks_of(x)
    a = torch.where(xb.isfinite(), xb.abs(), 0.0).amax(dim=1, keepdim=True)
    c = torch.floor(q * (xb.abs() / torch.where(a > 0, a, 1.0)) ** (1.0 / k))
    return unblock(a * ((c + 1) ** k - c**k) / q**k, x) * (1 + 1e-6) + 1e-30


def assert_8bit(ts, name, exact, what, stats=None):
    """8-bit ``ts[name]`` (codes and scales) encodes fp32 ``exact`` within the format's bound,
    with the scales bit for bit and a marker exactly where ``exact`` is not finite."""
    n = exact.numel()
    assert_bits(ts[name + "_scale"], block_scales(exact), what + " scales")
    got = decode8(name, ts[name], ts[name + "_scale"], n)
    want = exact.detach().reshape(-1).double()
    assert torch.equal(got.isnan(), ~want.isfinite()), what + ": non-finite markers"
    fin = want.isfinite()
    err = (got[fin] - want[fin]).abs()
    over = err > error8(name, exact)[fin]
    assert not over.any(), f"{what}: {int(over.sum())} elements beyond the 8-bit bound, max error {err.max()}"
    # the two codes around each value, in float64
    k, q = Q8[name]
    xb = blocks_of(exact)
    a = torch.where(xb.isfinite(), xb.abs(), 0.0).amax(dim=1, keepdim=True)
    c = torch.floor(q * (xb.abs() / torch.where(a > 0, a, 1.0)) ** (1.0 / k))
    lo, hi = unblock(a * c**k / q**k, exact), unblock(a * (c + 1) ** k / q**k, exact)
    inside = fin & (hi > lo) & (want.abs() < hi)
    t = torch.where(inside, (want.abs() - lo) / torch.where(inside, hi - lo, 1.0), 0.0)
    count_far(stats, name, (got.abs() - hi).abs() < (got.abs() - lo).abs(), t, inside)


def assert_kahan8(p: torch.Tensor, q: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """q is one of the two int8 roundings of (exact - p) / u(p), u(p) = ulp(p)/256 = 2^(E - 142) (E
    the bf16 exponent field), where p is finite and E >= 16 (else q = 0); computed here in float64."""
    e = ((p.view(torch.int16).to(torch.int32) >> 7) & 0xFF).double()
    ok = (e >= 16) & (e < 255) & exact.isfinite()
    t = torch.where(ok, (exact.double() - p.double()) * torch.exp2(142 - e), 0.0)
    qd = q.double()
    near = (qd == torch.floor(t).clamp(-127, 127)) | (qd == torch.ceil(t).clamp(-127, 127))
    assert bool(torch.where(ok, near, qd == 0).all()), f"{what}: not a rounding of the residual"


def compare(backend, dtype, kw, R, W, T, amsgrad):
    """One step's results of the tested backend T against the reference R and its fp32 twin W."""
    mode = param_mode(dtype, kw)
    state = kw.get("state_format") or ("bf16" if dtype == torch.bfloat16 else "fp32")
    exact_rounding = backend != "fused" or SAME_ROUNDING_STREAMS
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    stats = {}  # stochastic rounding of the fused backend: far picks, expected far picks
    for i, (rp, wp, tp) in enumerate(zip(R[0], W[0], T[0])):
        rs, ws, ts = R[1].state[rp], W[1].state[wp], T[1].state[tp]
        assert set(ts) == set(rs), f"param {i}: state keys"
        assert_bits(ts["step"], rs["step"], f"param {i}: step")
        exact_p = ws["master_weight"] if mode != "native" else wp.detach()  # the unrounded result
        # the twin's premise: its fp32 result is the one the reference rounds
        if mode in ("plain", "master", "kahan", "kahan8"):
            assert_bits(rp, exact_p.to(torch.bfloat16), f"param {i}: reference vs twin")
        elif mode == "native":
            assert_bits(rp, exact_p, f"param {i}: reference vs twin")
        # parameters
        if mode == "sr" and not exact_rounding:
            assert_sr(tp, exact_p, f"param {i}", None, stats, "param")
        else:
            assert_bits(tp, rp, f"param {i}")
        if mode == "master":
            assert_bits(ts["master_weight"], rs["master_weight"], f"param {i}: master_weight")
        if mode == "kahan":
            if exact_rounding:
                assert_bits(ts["kahan_comp"], rs["kahan_comp"], f"param {i}: kahan_comp")
            else:  # the remainder exact_p - round(exact_p) is exact in fp32
                rem = exact_p - tp.detach().float()
                assert_sr(ts["kahan_comp"], rem, f"param {i}: kahan_comp", None, stats, "kahan_comp")
        if mode == "kahan8":  # the residual exact_p - p, in int8 units of ulp(p)/256, rounded stochastically
            assert_bits(ts["kahan_comp8"], rs["kahan_comp8"], f"param {i}: kahan_comp8")
            assert_kahan8(rp.detach(), rs["kahan_comp8"], exact_p, f"param {i}: kahan_comp8 (reference)")
        # moments: they do not depend on a square root
        for name in names:
            what = f"param {i}: {name}"
            if state == "fp32" or exact_rounding:
                assert_bits(ts[name], rs[name], what)
                if state == "8bit":
                    assert_bits(ts[name + "_scale"], rs[name + "_scale"], what + " scales")
            if state == "bf16" and not exact_rounding:
                assert_sr(ts[name], ws[name], what, None, stats, name)
            if state == "8bit":
                assert_8bit(ts, name, ws[name], what, None if exact_rounding else stats)
                assert_8bit(rs, name, ws[name], what + " (reference)")
    assert_dithered(stats)


def check_step(cls, dtype, kw, backend, values, sd, grads):
    """One step of the reference, its twin and ``backend`` from the same parameters and state
    dict (None: fresh); compared. Returns the reference's parameters and state dict."""
    amsgrad = kw.get("amsgrad", False)
    if sd is not None:
        amsgrad = sd["param_groups"][0]["amsgrad"]
    R = build(cls, values, "reference", sd, **kw)
    # the twin loads the reference's state as loaded (converted), so both decode the same values
    W = build(cls, values, "reference", R[1].state_dict() if sd is not None else None, **twin_kw(kw))
    T = build(cls, values, backend, sd, **kw)
    for run in (R, W, T):
        step(run, grads)
    compare(backend, dtype, kw, R, W, T, amsgrad)
    return [p.detach().clone() for p in R[0]], R[1].state_dict()


def run_steps(cls, dtype, kw, backend, values, grads_list, sd=None):
    """check_step for each gradient list in turn, every step starting from the reference's
    parameters and state (so the stochastically rounded paths are judged on equal inputs)."""
    for grads in grads_list:
        values, sd = check_step(cls, dtype, kw, backend, values, sd, grads)
    return values, sd


# ------------------------------------------------------------------------------------------------
# Every feature: parameter storage x state format x (decay mode, maximize, amsgrad, skip)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,math_kw", rows(MATH))
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("dtype,param_kw", rows(PARAMS))
def test_step_matches_reference(dtype, param_kw, state, cls, math_kw, backend):
    """Three steps: from fresh state, with inf/-inf/nan gradients, and from the state they left
    (non-finite moments; 8-bit markers)."""
    kw = {**param_kw, **math_kw, "state_format": state}
    values = values_of(dtype, seed=1)
    grads = [grads_of(values, 2), grads_of(values, 3, nonfinite=True), grads_of(values, 4)]
    run_steps(cls, dtype, kw, backend, values, grads)


# ------------------------------------------------------------------------------------------------
# skip_nonfinite: an element with an inf/nan gradient keeps its parameter *and* its moments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("state", ["fp32", "bf16"])  # 8-bit re-encodes a kept value: in the table
@pytest.mark.parametrize("dtype,param_kw", rows(PARAMS))
def test_skip_nonfinite_keeps_every_value_of_the_element(dtype, param_kw, state, amsgrad, backend):
    kw = {**param_kw, "state_format": state, "amsgrad": amsgrad, "skip_nonfinite": True}
    values = values_of(dtype, seed=5)
    run = build("AdamW", values, backend, **kw)
    step(run, grads_of(values, 6))
    ps, opt = run
    before = opt.full_precision_params()
    old = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    grads = grads_of(values, 7, nonfinite=True)
    step(run, grads)
    after = opt.full_precision_params()
    for i, (p, g) in enumerate(zip(ps, grads)):
        bad = ~g.isfinite()
        if not bad.any():
            continue
        assert_bits(after[i][bad], before[i][bad], f"param {i}: full-precision value")
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert_bits(opt.state[p][name][bad], old[i][name][bad], f"param {i}: {name}")
            assert not torch.equal(opt.state[p][name][~bad], old[i][name][~bad]), "the rest steps"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("cls,math_kw", rows(MATH[:4]))
def test_nonfinite_parameter_steps_as_the_reference(cls, math_kw, state, backend):
    """An inf or nan parameter under decoupled (or no) decay adds no 0 * p to its gradient: an
    inf parameter stays inf and its moments stay finite, as in the reference and torch."""
    values = values_of(torch.float32, seed=23)
    for v in values[1:]:
        v.view(-1)[:2] = torch.tensor([float("inf"), float("nan")])
    kw = {**math_kw, "state_format": state}
    run_steps(cls, torch.float32, kw, backend, values, [grads_of(values, 24), grads_of(values, 25)])


@pytest.mark.compiled_kernel
@pytest.mark.parametrize("cls,math_kw", rows(MATH[:2]))
def test_nonfinite_parameter_on_the_compiled_kernel(cls, math_kw):
    """The same on the fused backend's torch.compile kernel (not bit-exact with the reference:
    inductor may round differently), which runs every decay mode through one L2 term too."""
    values = [torch.tensor([float("inf"), float("-inf"), float("nan"), 0.5, -2.0])]
    grads = [torch.tensor([1.0, -1.0, 1.0, 0.25, -3.0])]
    runs = [build(cls, values, b, **math_kw) for b in ("reference", "fused")]
    for r in runs:
        step(r, grads)
    (rp, ro), (tp, to) = [(r[0][0], r[1]) for r in runs]
    torch.testing.assert_close(tp.detach(), rp.detach(), rtol=1e-6, atol=0, equal_nan=True)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(to.state[tp][k], ro.state[rp][k], rtol=1e-6, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# bf16 round-to-nearest: ties to even, in every write path that rounds to nearest
# ------------------------------------------------------------------------------------------------


def tie_inputs():
    """bf16 parameters and gradients whose fp32 step result is known exactly: with betas (0, 0)
    and eps 0 the first step is p - lr * sign(g); lr = 2^-8 is half a bf16 ulp in [1, 2) (every
    result a tie, half of them between an odd and an even neighbour), a quarter ulp in [2, 4) and
    a whole one in [0.5, 1). 1 + 2^-8 must become 1.0."""
    j = torch.arange(128.0)
    mags = torch.cat([1 + j / 128, 2 + j / 64, 0.5 + j / 256])
    p = torch.cat([mags, -mags]).to(torch.bfloat16)
    sign = torch.where(torch.arange(p.numel()) % 3 == 1, 1.0, -1.0)
    return p, sign.to(torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize(
    "mode_kw",
    [{"kahan_sum": False}, {"master_weights": True}, {"kahan_sum": True}],
    ids=["plain", "master", "kahan"],
)
def test_round_to_nearest_sends_ties_to_even(mode_kw, state, amsgrad, backend):
    p0, g = tie_inputs()
    exact = (p0.double() - 2**-8 * g.double()).float()  # exact: 9 significant bits
    want = exact.to(torch.bfloat16)  # torch's conversion: round to nearest, ties to even
    kw = dict(betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, amsgrad=amsgrad, state_format=state, **mode_kw)
    runs = {}
    for b in ("reference", backend):
        ps, opt = build("AdamW", [p0], b, **kw)
        opt.param_groups[0]["lr"] = 2**-8
        step((ps, opt), [g])
        runs[b] = ps[0], opt.state[ps[0]]
    rp, tp = runs["reference"][0], runs[backend][0]
    assert tp[0].item() == 1.0 and p0[0].item() == 1.0 and g[0].item() == -1.0  # the case
    for name, (x, s) in runs.items():
        assert_bits(x, want, f"{name}: parameter")
        if "master_weight" in s:
            assert_bits(s["master_weight"], exact, f"{name}: master_weight")
        if "kahan_comp" in s:  # the remainder (0 or 2^-8) is a bf16 value: no rounding choice
            assert_bits(s["kahan_comp"].float() + x.detach().float(), exact, f"{name}: p + kahan_comp")
    assert_bits(tp, rp, "parameter vs reference")


# ------------------------------------------------------------------------------------------------
# 8-bit: the non-finite marker of m decodes to nan even where v is finite (and the other way)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("which", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("dtype,param_kw", rows(PARAMS[:3]))
def test_8bit_marker_in_one_moment_decodes_to_nan(dtype, param_kw, which, amsgrad, backend):
    """An fp32 state with a nan in one moment only, loaded into 8-bit optimizers: the marker in
    that moment must make the element's update nan, as the reference's decoder does."""
    values = values_of(dtype, seed=8)
    src_ps, src = build("AdamW", values, "reference", amsgrad=amsgrad, state_format="fp32", **param_kw)
    step((src_ps, src), grads_of(values, 9))
    sd = src.state_dict()
    poisoned = []
    for st in sd["state"].values():
        flat = st[which].view(-1)
        idx = [0, flat.numel() // 2, flat.numel() - 1]
        flat[idx] = float("nan")
        poisoned.append(torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, torch.tensor(idx), True))
    kw = {**param_kw, "state_format": "8bit", "amsgrad": amsgrad}
    grads = grads_of(values, 10)
    ref = build("AdamW", values, "reference", sd, **kw)
    run = build("AdamW", values, backend, sd, **kw)
    for i, p in enumerate(run[0]):  # loaded: the marker in one moment, finite values in the other
        st = run[1].state[p]
        n = p.numel()
        m = decode8(which, st[which], st[which + "_scale"], n)
        assert torch.equal(m.isnan(), poisoned[i])
        other = "exp_avg_sq" if which == "exp_avg" else "exp_avg"
        assert decode8(other, st[other], st[other + "_scale"], n).isfinite().all()
    step(ref, grads)
    step(run, grads)
    for i, (rp, tp) in enumerate(zip(ref[0], run[0])):
        assert torch.equal(tp.detach().reshape(-1).isnan(), poisoned[i]), (
            f"param {i}: nan where the marker was"
        )
        assert torch.equal(rp.detach().reshape(-1).isnan(), poisoned[i]), f"param {i}: the reference"


# ------------------------------------------------------------------------------------------------
# Full-precision values: load_full_precision_params writes every copy the parameter has
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("after_step", [False, True], ids=["fresh", "after-step"])
@pytest.mark.parametrize("dtype,param_kw", rows(PARAMS))
def test_load_full_precision_params_sets_every_copy(dtype, param_kw, after_step, backend):
    """Loaded fp32 values land in the parameter (rounded), its master weight (exactly) or its
    Kahan compensation (the remainder), before any step or while the fused layout is live; the
    next step starts from them on every backend. fp32 state: after the same first step, every
    backend holds the same moments, so the loaded optimizers are equal inputs."""
    values = values_of(dtype, seed=11)
    noise = torch.Generator().manual_seed(12)
    full = [v.float() + 1e-3 * torch.randn(v.shape, generator=noise) for v in values]
    kw = {**param_kw, "state_format": "fp32", "amsgrad": True}
    ref = build("AdamW", values, "reference", **kw)
    run = build("AdamW", values, backend, **kw)
    if after_step:
        for r in (ref, run):
            step(r, grads_of(values, 13))
    for r in (ref, run):
        r[1].load_full_precision_params(full)
    ps, opt = run
    mode = param_mode(dtype, param_kw)
    fpp = opt.full_precision_params()
    for i, (p, v) in enumerate(zip(ps, full)):
        assert_bits(p, v.to(dtype), f"param {i}: the parameter is the rounded value")
        st = opt.state[p]
        if mode in ("master", "native"):
            assert_bits(fpp[i], v, f"param {i}: full_precision_params")
        if mode == "master":
            assert_bits(st["master_weight"], v, f"param {i}: master_weight")
        if mode == "kahan":
            assert_bits(st["kahan_comp"], (v - p.detach().float()).to(dtype), f"param {i}: kahan_comp")
        if mode == "kahan8":  # the remainder to the nearest unit u = ulp(p)/256, clamped to +-127 units
            assert_kahan8(p.detach(), st["kahan_comp8"], v, f"param {i}: kahan_comp8")
            u = torch.exp2(((p.detach().view(torch.int16).to(torch.int32) >> 7) & 0xFF).double() - 142)
            err = (fpp[i].double() - v.double()).abs()
            inside = st["kahan_comp8"].abs() < 127  # where the clamp did not cut
            assert bool((err <= torch.where(inside, u / 2, u)).all()), f"param {i}: value"
    W = build("AdamW", [p.detach() for p in ref[0]], "reference", ref[1].state_dict(), **twin_kw(kw))
    grads = grads_of(values, 14)
    for r in (ref, W, run):
        step(r, grads)
    compare(backend, dtype, kw, ref, W, run, amsgrad=True)


# ------------------------------------------------------------------------------------------------
# Checkpoints converted between formats, in every direction, then stepped
# ------------------------------------------------------------------------------------------------

# (id, parameter dtype, options) of the optimizer that saves or loads a state dict
CKPT_FP32 = [(f"fp32-{s}", torch.float32, {"state_format": s}) for s in STATES]
CKPT_BF16 = [
    ("plain-bf16", torch.bfloat16, {"kahan_sum": False, "state_format": "bf16"}),
    ("sr-fp32", torch.bfloat16, {"stochastic_rounding": True, "state_format": "fp32"}),
    ("kahan-fp32", torch.bfloat16, {"kahan_sum": True, "state_format": "fp32"}),
    ("kahan-8bit", torch.bfloat16, {"kahan_sum": True, "state_format": "8bit"}),
    ("kahan8-8bit", torch.bfloat16, {"kahan_sum": "8bit", "state_format": "8bit"}),
    ("master-bf16", torch.bfloat16, {"master_weights": True, "state_format": "bf16"}),
    ("master-8bit", torch.bfloat16, {"master_weights": True, "state_format": "8bit"}),
]
CONVERSIONS = [
    pytest.param(src[1], src[2], dst[2], id=f"{src[0]}-to-{dst[0]}")
    for table in (CKPT_FP32, CKPT_BF16)
    for src in table
    for dst in table
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("dtype,src_kw,dst_kw", CONVERSIONS)
def test_checkpoint_conversion(dtype, src_kw, dst_kw, amsgrad, backend):
    values = values_of(dtype, seed=15)
    src = build("Adam", values, "reference", amsgrad=amsgrad, weight_decay=0.1, **src_kw)
    for seed in (16, 17):
        step(src, grads_of(values, seed))
    sd = src[1].state_dict()
    values = [p.detach().clone() for p in src[0]]
    src_mode, dst_mode = param_mode(dtype, src_kw), param_mode(dtype, dst_kw)
    if src_mode in ("kahan", "kahan8", "master") and dst_mode in ("plain", "sr"):
        with pytest.raises(ValueError, match="kahan_comp|master_weight"):
            build("Adam", values, backend, sd, **dst_kw)
        return
    ps, opt = build("Adam", values, backend, sd, **dst_kw)
    # what the loaded optimizer holds, before any step
    src_full = src[1].full_precision_params()
    for i, (p, sp) in enumerate(zip(ps, src[0])):
        st, ss = opt.state[p], src[1].state[sp]
        if dst_mode == "master" and src_mode != "plain" and src_mode != "sr":
            # the value the source stood for, bit for bit (p + kahan_comp, or its master weight);
            # without either, the master weight is made from p at the first step
            assert_bits(st["master_weight"], src_full[i].float(), f"param {i}: master_weight")
        if dst_mode == "kahan" and src_mode == "kahan":
            assert_bits(st["kahan_comp"], ss["kahan_comp"], f"param {i}: kahan_comp")
        if dst_mode == "kahan" and src_mode in ("master", "kahan8"):  # comp = value - p, rounded to nearest
            want = (src_full[i].float() - p.detach().float()).to(torch.bfloat16)
            assert_bits(st["kahan_comp"], want, f"param {i}: kahan_comp")
        if dst_mode == "kahan8" and src_mode == "kahan8":
            assert_bits(st["kahan_comp8"], ss["kahan_comp8"], f"param {i}: kahan_comp8")
        if dst_mode == "kahan8" and src_mode in ("master", "kahan"):  # to the nearest unit of ulp(p)/256
            t = (src_full[i].double() - p.detach().double()) * torch.exp2(
                142 - ((p.detach().view(torch.int16).to(torch.int32) >> 7) & 0xFF).double()
            )
            want = torch.where(t.isfinite(), torch.round(t).clamp(-127, 127), 0.0).to(torch.int8)
            assert_bits(st["kahan_comp8"], want, f"param {i}: kahan_comp8")
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            same_fmt = src_kw["state_format"] == dst_kw["state_format"]
            if same_fmt:
                assert_bits(st[name], ss[name], f"param {i}: {name} copied")
            elif dst_kw["state_format"] == "fp32":
                src_val = ss[name] if src_kw["state_format"] == "bf16" else None
                if src_val is not None:
                    assert_bits(st[name], src_val.float(), f"param {i}: {name} widened")
                else:  # decoded in fp32 (two roundings of the exact decoded value)
                    got = decode8(name, ss[name], ss[name + "_scale"], p.numel()).view(p.shape)
                    torch.testing.assert_close(st[name].double(), got, rtol=2**-22, atol=0)
            elif dst_kw["state_format"] == "bf16" and src_kw["state_format"] == "fp32":
                assert_bits(st[name], ss[name].to(torch.bfloat16), f"param {i}: {name} rounded")
            elif dst_kw["state_format"] == "bf16":  # from 8-bit: decoded, rounded to nearest
                got = decode8(name, ss[name], ss[name + "_scale"], p.numel()).view(p.shape)
                torch.testing.assert_close(st[name].double(), got, rtol=2**-8, atol=0)
            else:  # into 8-bit: encoded within the format's bound, block scales exact
                assert_8bit(st, name, ss[name].float(), f"param {i}: {name} encoded")
    # and one step from it, on the tested backend as on the reference
    check_step("Adam", dtype, dst_kw, backend, values, sd, grads_of(values, 18))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("dtype,dst_kw", rows(CKPT_FP32 + CKPT_BF16))
def test_torch_checkpoint_into_every_format(dtype, dst_kw, amsgrad, backend):
    """A torch.optim.Adam state dict (moments in the parameters' dtype) loads into every format
    and steps as on the reference."""
    values = values_of(dtype, seed=26)
    ps = [v.clone().requires_grad_() for v in values]
    src = torch.optim.Adam(ps, lr=LR, weight_decay=0.1, amsgrad=amsgrad, foreach=False)
    for seed in (27, 28):
        step((ps, src), grads_of(values, seed))
    values = [p.detach().clone() for p in ps]
    check_step("Adam", dtype, dst_kw, backend, values, src.state_dict(), grads_of(values, 29))


# ------------------------------------------------------------------------------------------------
# Stochastic rounding: unbiased on every backend, element by element
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("state", STATES)
def test_stochastic_rounding_of_parameters_rounds_up_a_quarter_of_quarter_ulps(state, backend):
    """With betas (0, 0) and eps 0 the first step is p - lr * sign(g) exactly; lr = 2^-9 is a
    quarter of a bf16 ulp in [1, 2): every element must round to one of its two neighbours, the
    far one a quarter of the time (the Weyl bits are evenly spread: 4096 elements, +-0.03)."""
    j = torch.arange(4096) % 128
    p0 = (1 + j / 128.0).to(torch.bfloat16)
    g = torch.where(torch.arange(4096) % 2 == 0, -1.0, 1.0).to(torch.bfloat16)
    exact = (p0.double() - 2**-9 * g.double()).float()
    kw = dict(betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, stochastic_rounding=True, state_format=state)
    ps, opt = build("AdamW", [p0], backend, **kw)
    opt.param_groups[0]["lr"] = 2**-9
    step((ps, opt), [g])
    p = ps[0].detach()
    assert_sr(p, exact, "parameter")
    far = (p.float() - exact).abs() > 2**-9
    assert abs(far.float().mean().item() - 0.25) < 0.03
    # in every run of 256 elements too: each element draws its own bits (the same bits for a
    # whole block would round it all one way; 0.12 is 4.4 sigma of 256 independent draws)
    rates = far.view(-1, 256).float().mean(dim=1)
    assert ((rates - 0.25).abs() < 0.12).all(), rates


# ------------------------------------------------------------------------------------------------
# Threads: 8-bit buffers of an odd number of blocks, split on block boundaries
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_two_threads_give_the_bits_of_one_on_odd_block_counts(amsgrad):
    """129 + 129 + 3 = 261 blocks (two with a partial last block): one thread's share ends
    inside a tensor, in the middle of the buffer's blocks."""
    values = values_of(torch.float32, seed=19, shapes=[(33_000,), (32_769,), (700,)])
    kw = dict(state_format="8bit", amsgrad=amsgrad, weight_decay=0.1)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            run = build("AdamW", values, "fused", **kw)
            for seed in (20, 21, 22):
                step(run, grads_of(values, seed))
            out.append(run)
    finally:
        torch.set_num_threads(threads)
    (p1, o1), (p2, o2) = out
    for a, b in zip(p1, p2):
        assert_bits(b, a, "parameter")
        for k, v in o1.state[a].items():
            assert_bits(o2.state[b][k], v, k)
