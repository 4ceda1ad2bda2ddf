"""The one case table of the engine's tests, and the helpers every parity test shares.

The table: every way a parameter is stored (``PARAMS``) x every state format (``STATES``) x every
elementwise algorithm with its options (``ALGORITHMS``: Adam's decay modes, maximize, amsgrad,
skip_nonfinite; Lion's) x the backends held to the reference (``BACKENDS``). ``table()`` gives the
cases: the whole product on the native kernel, and on foreach (a Python composition of the same
operations as the reference, batched) a pairwise covering: every (algorithm row, storage),
(algorithm row, format) and (storage, format) pair once.

Helpers: building and stepping optimizers through the public API, inputs (values, gradients with
non-finite elements), bit comparisons, the bf16 and 8-bit formats' stated bounds, and one step of
a backend against the reference and its fp32 twin (``check_step``).
"""

from __future__ import annotations

import pytest
import torch

import adamkit
from conftest import roundtrip

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
# (id, optimizer, options): every elementwise algorithm with its options: Adam's decay modes,
# maximize, amsgrad, skip_nonfinite; Lion's decay (and fully decoupled decay), maximize, skip; the
# cautious mask on each
ALGORITHMS = [
    ("adamw", "AdamW", {"weight_decay": 0.1}),
    ("adam-l2", "Adam", {"weight_decay": 0.1}),
    ("adamw-full", "AdamW", {"decouple_lr": True, "max_lr": 2 * LR, "weight_decay": 0.05}),
    ("maximize-l2", "Adam", {"maximize": True, "weight_decay": 0.1}),
    ("amsgrad-l2", "Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("amsgrad-maximize", "AdamW", {"amsgrad": True, "maximize": True}),
    ("skip", "AdamW", {"skip_nonfinite": True}),
    ("skip-amsgrad-l2", "Adam", {"skip_nonfinite": True, "amsgrad": True, "weight_decay": 0.1}),
    ("lion-decay", "Lion", {"weight_decay": 0.5}),
    ("lion-maximize-full", "Lion", {"maximize": True, "betas": (0.8, 0.95), "weight_decay": 5e-4,
                                    "decouple_lr": True, "max_lr": 2 * LR}),
    ("lion-skip", "Lion", {"skip_nonfinite": True, "weight_decay": 0.5}),
    ("adopt-l2", "ADOPT", {"weight_decay": 0.1}),
    ("adopt-decoupled-maximize", "ADOPT", {"decouple": True, "weight_decay": 0.1, "maximize": True}),
    ("adopt-skip-noclip", "ADOPT", {"skip_nonfinite": True, "clip_exponent": None}),
    ("ademamix-warmup", "AdEMAMix", {"weight_decay": 0.1, "t_alpha_beta3": 10}),
    ("ademamix-l2-maximize", "AdEMAMix", {"decouple": False, "weight_decay": 0.1, "maximize": True}),
    ("ademamix-skip", "AdEMAMix", {"skip_nonfinite": True, "alpha": 8.0}),
    # the cautious mask: a counting pass per tensor on the native kernel, whole tensors on foreach
    ("adam-cautious-l2-skip", "Adam", {"cautious": True, "weight_decay": 0.1, "skip_nonfinite": True}),
    ("lion-cautious-maximize", "Lion", {"cautious": True, "maximize": True, "weight_decay": 0.5}),
    ("adopt-cautious", "ADOPT", {"cautious": True, "decouple": True, "weight_decay": 0.1}),
    ("ademamix-cautious", "AdEMAMix", {"cautious": True, "t_alpha_beta3": 10}),
    ("schedule-free", "ScheduleFreeAdamW", {"weight_decay": 0.1, "warmup_steps": 2, "r": 0.5}),
    ("schedule-free-skip-maximize", "ScheduleFreeAdamW", {"skip_nonfinite": True, "maximize": True}),
]  # fmt: skip
ADAM = [r for r in ALGORITHMS if r[1] in ("Adam", "AdamW")]


def table() -> list:
    """(dtype, param options, state format, class, algorithm options, backend) cases: every one on
    the native kernel; on foreach each (algorithm row, storage) pair once with the state format
    cycling, which also meets every (row, format) and (storage, format) pair."""
    out = []
    for a, (aid, cls, akw) in enumerate(ALGORITHMS):
        for p, (pid, dtype, pkw) in enumerate(PARAMS):
            for state in STATES:
                out.append(
                    pytest.param(dtype, pkw, state, cls, akw, "fused", id=f"{pid}-{state}-{aid}-fused")
                )
            state = STATES[(a + p) % len(STATES)]
            out.append(
                pytest.param(dtype, pkw, state, cls, akw, "foreach", id=f"{pid}-{state}-{aid}-foreach")
            )
    return out


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


# The 8-bit format (documented in adamkit.storage.quant8): groups of 32 with a bf16 scale a, the
# group's largest finite magnitude rounded up to bf16; m stored as c + 128 with x = a c|c| / 127^2,
# v as c with x = a (c / 254)^4; non-finite values as a marker (m: 0, v: 255) that decodes to nan.
# (k, Q) of each slot: signed slots (m-like) (2, 127), magnitudes (v-like) (4, 254)
Q8 = {"exp_avg": (2, 127), "exp_avg_slow": (2, 127), "exp_avg_sq": (4, 254), "max_exp_avg_sq": (4, 254)}
G8 = 32  # elements per group


def bf16_up(a: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 >= each non-negative fp32 ``a`` (bf16's largest finite where none is),
    with magnitudes below fp32's smallest normal as 0 (the format stores such groups as zeros)."""
    a = torch.where(a < 2.0**-126, 0.0, a.float())
    b = a.to(torch.bfloat16)  # to nearest
    b = torch.where(b.float() < a, torch.nextafter(b, torch.tensor(float("inf"), dtype=torch.bfloat16)), b)
    return torch.where(b.isinf(), torch.finfo(torch.bfloat16).max, b)


def blocks_of(x: torch.Tensor) -> torch.Tensor:
    """x's 8-bit groups: rows of a >= 2-D tensor, each padded to whole groups; else flat."""
    if x.dim() >= 2:
        r = x.detach().reshape(x.shape[0], -1).double()
        return torch.nn.functional.pad(r, (0, -r.shape[1] % G8)).reshape(-1, G8)
    x = x.detach().reshape(-1).double()
    return torch.nn.functional.pad(x, (0, -x.numel() % G8)).view(-1, G8)


def unblock(xb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values of ``blocks_of(x)``'s layout back to x's elements, in order (padding dropped)."""
    if x.dim() >= 2:
        n = x[0].numel()
        return xb.reshape(x.shape[0], -1)[:, :n].reshape(-1)
    return xb.reshape(-1)[: x.numel()]


def block_scales(x: torch.Tensor) -> torch.Tensor:
    """bf16 scales of fp32 values ``x``: each group's largest finite magnitude, rounded up."""
    xb = blocks_of(x).float()
    a = bf16_up(torch.where(xb.isfinite(), xb.abs(), 0.0).amax(dim=1))
    return a.view(x.shape[0], -1) if x.dim() >= 2 else a  # rows: (rows, groups per row)


def decode8(name, codes, scales, n):
    k, q = Q8[name]
    c = codes.reshape(-1, G8).double()
    a = scales.double().view(-1, 1)
    if k == 2:  # signed
        c = c - 128
        x = torch.where(codes.view(-1, G8) == 0, float("nan"), a * c * c.abs() / q**k)
    else:
        x = torch.where(codes.view(-1, G8) == 255, float("nan"), a * c**k / q**k)
    if codes.dim() == 2:  # rows of n / rows elements, each padded to whole groups
        return x.reshape(codes.shape[0], -1)[:, : n // codes.shape[0]].reshape(-1)
    return x.reshape(-1)[:n]


def error8(name, x):
    """The format's stated bound on |decode(encode(x)) - x| (with fp32 arithmetic's slack); a v
    raised from code 0 to 1 beside a non-zero m (quant8.floor_pairs) stays within it."""
    k, q = Q8[name]
    xb = blocks_of(x)
    a = bf16_up(torch.where(xb.isfinite(), xb.abs(), 0.0).amax(dim=1, keepdim=True)).double()
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
    a = bf16_up(torch.where(xb.isfinite(), xb.abs(), 0.0).amax(dim=1, keepdim=True)).double()
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
    slots = [s for s in T[1].algorithm.slots if s.name in T[1].state[T[0][0]]]  # its slots
    names = [s.name for s in slots]
    # a copy of the weights keeps fp32 in every format (Slot.weights)
    format_of = {s.name: ("fp32" if s.weights else state) for s in slots}
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
            sf = format_of[name]
            if sf == "fp32" or exact_rounding:
                assert_bits(ts[name], rs[name], what)
                if sf == "8bit":
                    assert_bits(ts[name + "_scale"], rs[name + "_scale"], what + " scales")
            if sf == "bf16" and not exact_rounding:
                assert_sr(ts[name], ws[name], what, None, stats, name)
            if sf == "8bit":
                assert_8bit(ts, name, ws[name], what, None if exact_rounding else stats)
                assert_8bit(rs, name, ws[name], what + " (reference)")
    assert_dithered(stats)


def check_step(cls, dtype, kw, backend, values, sd, grads):
    """One step of the reference, its twin and ``backend`` from the same parameters and state
    dict (None: fresh); compared. Returns the reference's parameters and state dict."""
    amsgrad = kw.get("amsgrad", False)
    if sd is not None:
        amsgrad = sd["param_groups"][0].get("amsgrad", False)
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
