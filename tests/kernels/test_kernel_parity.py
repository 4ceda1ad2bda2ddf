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

import pytest
import torch

from cases import (
    ADAM,
    BACKENDS,
    LR,
    PARAMS,
    STATES,
    assert_8bit,
    assert_bits,
    assert_kahan8,
    assert_sr,
    build,
    check_step,
    compare,
    decode8,
    grads_of,
    param_mode,
    rows,
    run_steps,
    step,
    table,
    twin_kw,
    values_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------------
# Every feature: parameter storage x state format x (decay mode, maximize, amsgrad, skip)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,param_kw,state,cls,math_kw,backend", table())
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
@pytest.mark.parametrize("cls,math_kw", rows(ADAM[:4]))
def test_nonfinite_parameter_steps_as_the_reference(cls, math_kw, state, backend):
    """An inf or nan parameter under decoupled (or no) decay adds no 0 * p to its gradient: an
    inf parameter stays inf and its moments stay finite, as in the reference and torch."""
    values = values_of(torch.float32, seed=23)
    for v in values[1:]:
        v.view(-1)[:2] = torch.tensor([float("inf"), float("nan")])
    kw = {**math_kw, "state_format": state}
    run_steps(cls, torch.float32, kw, backend, values, [grads_of(values, 24), grads_of(values, 25)])


@pytest.mark.compiled_kernel
@pytest.mark.parametrize("cls,math_kw", rows(ADAM[:2]))
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


@pytest.mark.parametrize("backend", BACKENDS)  # each case checks the reference too
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", ["fp32", "bf16"])
def test_amsgrad_max_keeps_a_nan_where_v_is_finite(state, backend):
    """torch.maximum(max_v, v) is nan where max_v is nan, even where v is finite (a loaded state,
    or a v that recovered): the element's update is nan, as in torch.optim.Adam, not a silent
    reset of the maximum to v."""
    values = values_of(torch.float32, seed=33)
    src = build("AdamW", values, "reference", amsgrad=True, state_format="fp32")
    step(src, grads_of(values, 34))
    sd = src[1].state_dict()
    poisoned = []
    for st in sd["state"].values():
        flat = st["max_exp_avg_sq"].view(-1)
        flat[: min(2, flat.numel())] = float("nan")
        poisoned.append(flat.isnan())
    kw = {"amsgrad": True, "state_format": state}
    ref, run = build("AdamW", values, "reference", sd, **kw), build("AdamW", values, backend, sd, **kw)
    grads = grads_of(values, 35)
    step(ref, grads)
    step(run, grads)
    for i, (rp, tp) in enumerate(zip(ref[0], run[0])):
        assert torch.equal(rp.detach().reshape(-1).isnan(), poisoned[i]), f"param {i}: the reference"
        assert_bits(tp, rp, f"param {i}")
        assert_bits(
            run[1].state[tp]["max_exp_avg_sq"], ref[1].state[rp]["max_exp_avg_sq"], f"param {i}: max v"
        )


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


@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("dtype,src_kw,dst_kw", CONVERSIONS)
def test_checkpoint_conversion(dtype, src_kw, dst_kw, amsgrad):
    """The conversion is the engine's (load_state_dict), the same for every backend; the step from
    it runs on the native kernel (every backend's step from every format: test_step_matches_reference)."""
    backend = "fused"
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


@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("dtype,dst_kw", rows(CKPT_FP32 + CKPT_BF16))
def test_torch_checkpoint_into_every_format(dtype, dst_kw, amsgrad):
    """A torch.optim.Adam state dict (moments in the parameters' dtype) loads into every format
    and steps on the native kernel as on the reference."""
    backend = "fused"
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
