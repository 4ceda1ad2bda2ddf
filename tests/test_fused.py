"""The fused backend: flat layout, zero-copy gradients, no recompiles, correctness when the layout
no longer matches reality, and the compiler fallback."""

from __future__ import annotations

import pytest
import torch

import adamkit
from adamkit import _fused, _native
from conftest import clone_params, grad_stream, make_params

# these tests run on the native kernel (fp32): see test_adam.NATIVE_FP32_TOL
TOL = dict(rtol=2e-6, atol=1e-7)


def pair(params, **kw):
    ref_params = clone_params(params)
    return (
        adamkit.AdamW(params, backend="fused", **kw),
        adamkit.AdamW(ref_params, backend="reference", **kw),
        ref_params,
    )


def step_both(a, b, pa, pb, gs):
    """One step of two optimizers on the same gradients (copies: each backend owns its grads)."""
    for p, q, g in zip(pa, pb, gs):
        p.grad, q.grad = g.clone(), g.clone()
    a.step()
    b.step()


def assert_same(fused, ref, fps, rps):
    for p, q in zip(fps, rps):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL)
        for k, v in ref.state[q].items():
            torch.testing.assert_close(fused.state[p][k], v, **TOL)


def test_parameters_and_state_are_views_of_flat_buffers():
    ps = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = adamkit.AdamW(ps, backend="fused")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    (bucket,) = opt._layouts[0].buckets
    for _i, p in enumerate(ps):
        for name, t in (("param", p), ("grad", p.grad), ("exp_avg", opt.state[p]["exp_avg"])):
            assert t.untyped_storage().data_ptr() == bucket.flat[name].untyped_storage().data_ptr(), name
    # each tensor starts on a 16-element (64-byte) boundary, the buffer holds whole blocks of 256;
    # the gaps stay zero
    assert bucket.flat["param"].numel() == 256 and bucket.offsets == [0, 16]
    assert not bucket.flat["param"][12:16].any() and not bucket.flat["exp_avg"][21:].any()


def test_backward_writes_gradients_into_the_flat_buffer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    ref_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    ref_model.load_state_dict(model.state_dict())
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, backend="fused")
    ref = adamkit.AdamW(ref_model.parameters(), lr=1e-2, backend="reference")
    x = torch.randn(32, 8)
    for step in range(6):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad(set_to_none=step % 2 == 0)  # both zero_grad flavours
            m(x).square().mean().backward()
            o.step()
        if step >= 1:  # after the first step the hooks route gradients into the flat buffer
            (bucket,) = opt._layouts[0].buckets
            for i, p in enumerate(model.parameters()):
                assert p.grad.data_ptr() == bucket.grad_ptrs[i]
    assert_same(opt, ref, list(model.parameters()), list(ref_model.parameters()))


@pytest.mark.compiled_kernel  # the native kernel has nothing to recompile
def test_lr_schedule_never_recompiles():
    ps = make_params(torch.float32)
    grads = grad_stream(ps, 12)
    opt = adamkit.AdamW(ps, lr=1e-2, backend="fused")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for p, g in zip(ps, grads[0]):
        p.grad = g
    opt.step()  # compiles (or loads) the kernel
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, gs in enumerate(grads[1:]):
            for p, g in zip(ps, gs):
                p.grad = g
            # change every runtime hyperparameter, not only lr
            opt.param_groups[0]["weight_decay"] = 0.01 * (i % 3)
            opt.param_groups[0]["maximize"] = i % 2 == 1
            opt.param_groups[0]["betas"] = (0.9 - 0.01 * i, 0.999)
            opt.step()
            sched.step()


def test_native_fp32_step_rounds_as_the_reference_bit_for_bit():
    """The native kernel rounds every operation as the reference does; its division by
    sqrt(bias_correction2) is a multiply with an exact correction. The one difference allowed is
    torch's vectorized square root, which is not always correctly rounded: elements where it is
    not are left out. Parameters start each step at 0 with no decay, so a parameter after the step
    *is* its update, and a rounding difference anywhere in the update shows in its bits."""
    n = 1 << 16
    gen = torch.Generator().manual_seed(5)
    p, q = torch.zeros(n, requires_grad=True), torch.zeros(n, requires_grad=True)
    fused = adamkit.AdamW([p], lr=1e-3, weight_decay=0.0, backend="fused")
    ref = adamkit.AdamW([q], lr=1e-3, weight_decay=0.0, backend="reference")
    for _ in range(12):  # 12 steps: 12 bias corrections
        g = torch.randn(n, generator=gen) * torch.exp(4 * torch.randn(n, generator=gen))
        step_both(fused, ref, [p], [q], [g])
        assert fused._layouts[0].buckets[0].native is not None
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fused.state[p][k], ref.state[q][k]), k
        v = ref.state[q]["exp_avg_sq"]
        # float64's square root rounded to float32 is the correctly rounded float32 one
        exact = torch.sqrt(v) == torch.sqrt(v.double()).float()
        assert exact.float().mean() > 0.5
        assert torch.equal(p.detach()[exact], q.detach()[exact])
        with torch.no_grad():
            p.zero_()
            q.zero_()


@pytest.mark.compiled_kernel
@pytest.mark.parametrize(
    "kw,zero_grads",
    [
        pytest.param({"kahan_sum": True}, True, id="bf16-kahan"),
        pytest.param({"stochastic_rounding": True}, True, id="bf16-sr"),
        pytest.param({"state_format": "bf16"}, False, id="bf16-state"),
        pytest.param({"state_format": "8bit", "min_8bit_size": 0}, False, id="8bit"),
    ],
)
def test_native_and_compiled_kernels_draw_the_same_rounding_bits(monkeypatch, kw, zero_grads):
    """Both fused kernels take each element's rounding bits from its flat-buffer position and the
    bucket's seeds (the per-tensor backends use their own positions and seeds). Where both
    compute the same fp32 values they must round them identically: bf16 parameters under zero
    gradients (the step is p * (1 - lr*wd) alone, no square root), and bf16 moments (which do not
    depend on the square root, the one operation the kernels may round differently). 8-bit:
    inductor's lerp can leave m one ulp away from the native kernel's (block scales within 2 ulps,
    measured 1), and codes come from square roots of the moments; an ulp moves a code only where
    it crosses a code boundary or flips its rounding decision (measured: 1 code in 2304), and a
    moved code stays moved. Wrong rounding bits move half of the codes (measured 53 %)."""
    bf16 = "state_format" not in kw
    gen = torch.Generator().manual_seed(2)
    shapes = [(300, 7), (4000,)]
    p0 = [torch.randn(s, generator=gen) for s in shapes]
    opts = []
    for native in (True, False):
        monkeypatch.setattr(_fused, "USE_NATIVE", native)
        ps = [(p.bfloat16() if bf16 else p.clone()).requires_grad_() for p in p0]
        opt = adamkit.AdamW(ps, lr=0.05, weight_decay=0.3, backend="fused", **kw)
        gen.manual_seed(3)
        for _ in range(4):
            for p in ps:
                p.grad = torch.zeros_like(p) if zero_grads else torch.randn(p.shape, generator=gen)
            opt.step()
        assert all((b.native is not None) == native for b in opt._layouts[0].buckets)
        opts.append((ps, opt))
    (pn, on), (pc, oc) = opts
    keys = ["exp_avg", "exp_avg_sq"] if not bf16 else ["kahan_comp"] if "kahan_sum" in kw else []
    for a, b, start in zip(pn, pc, p0):
        if bf16:
            assert not torch.equal(a.detach(), start.bfloat16())  # the steps moved them
            assert torch.equal(a, b)
        for k in keys:
            if kw.get("state_format") == "8bit":
                scale = k + "_scale"
                torch.testing.assert_close(on.state[a][scale], oc.state[b][scale], rtol=2.5e-7, atol=0)
                assert (on.state[a][k] != oc.state[b][k]).float().mean() < 0.01, k
            else:
                assert torch.equal(on.state[a][k], oc.state[b][k]), k


def test_params_without_grad_are_untouched_and_match_reference():
    ps = make_params(torch.float32)
    fused, ref, rps = pair(ps, lr=1e-2, weight_decay=0.1)
    grads = grad_stream(ps, 8)
    for t, gs in enumerate(grads):
        for i, (p, q, g) in enumerate(zip(ps, rps, gs)):
            keep = t < 2 or t > 5 or i % 2 == 0  # odd parameters have no gradient for 4 steps
            p.grad = g.clone() if keep else None
            q.grad = g.clone() if keep else None
        fused.step()
        ref.step()
    assert_same(fused, ref, ps, rps)
    assert [float(fused.state[p]["step"]) for p in ps] == [float(ref.state[q]["step"]) for q in rps]


def test_layout_invalidated_by_model_to_and_data_assignment():
    ps = [torch.randn(6, 4, requires_grad=True), torch.randn(3, requires_grad=True)]
    fused, ref, rps = pair(ps, lr=1e-2)
    grads = grad_stream(ps, 6)
    for t, gs in enumerate(grads):
        if t == 2:  # what model.to(dtype/device) does: new storage behind the same Parameter
            for p, q in zip(ps, rps):
                new = p.detach() * 0.5
                p.data = new
                q.data = q.detach() * 0.5
        step_both(fused, ref, ps, rps, gs)
    assert_same(fused, ref, ps, rps)


def test_unflattenable_parameters_run_per_tensor():
    base = torch.randn(5, 7)
    ps = [base.t().requires_grad_(), torch.randn(4, requires_grad=True)]  # first: non-contiguous
    assert not ps[0].is_contiguous()
    fused, ref, rps = pair(ps, lr=1e-2)
    for gs in grad_stream(ps, 4):
        step_both(fused, ref, ps, rps, gs)
    assert_same(fused, ref, ps, rps)
    assert not ps[0].is_contiguous()  # the user's layout is kept
    assert _fused.flattenable(ps[1]) and not _fused.flattenable(ps[0])


def test_auto_falls_back_to_foreach_with_one_warning(monkeypatch):
    monkeypatch.setattr(_fused, "compiler_missing_reason", lambda: "no C++ compiler found")
    monkeypatch.setattr(_fused, "_warned", False)
    p = torch.randn(3, requires_grad=True)
    opt = adamkit.AdamW([p])
    p.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="fused backend is unavailable"):
        opt.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once only
    assert opt._layouts == {}
    with pytest.raises(RuntimeError, match="backend='fused' is unavailable"):
        adamkit.AdamW([torch.zeros(1, requires_grad=True)], backend="fused")


def test_fused_state_dict_roundtrip_into_other_backends():
    ps = make_params(torch.float32)
    fused, ref, rps = pair(ps, lr=1e-2, amsgrad=True)
    grads = grad_stream(ps, 6)
    for gs in grads[:3]:
        step_both(fused, ref, ps, rps, gs)
    sd = fused.state_dict()
    # a fresh foreach optimizer continues from the fused one's state
    cont = clone_params(ps)
    other = adamkit.AdamW(cont, lr=1e-2, amsgrad=True, backend="foreach")
    other.load_state_dict(sd)
    for gs in grads[3:]:
        step_both(other, ref, cont, rps, gs)
    assert_same(other, ref, cont, rps)


def test_dropped_optimizer_is_released_and_its_hooks_do_nothing():
    import gc
    import weakref

    model = torch.nn.Linear(4, 3)
    opt = adamkit.AdamW(model.parameters(), backend="fused")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    bucket = weakref.ref(opt._layouts[0].buckets[0])
    del opt
    gc.collect()
    assert bucket() is None  # the hooks left on the parameters do not keep it alive
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()  # the stale hooks run and do nothing
    assert all(p.grad is not None for p in model.parameters())
    new = adamkit.AdamW(model.parameters(), backend="fused")
    new.step()


def test_native_kernel_is_built_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMKIT_CACHE_DIR", str(tmp_path))
    assert _native.load.__wrapped__() is not None
    (built,) = tmp_path.glob("adamkit_kernel_*.so")
    stamp = built.stat().st_mtime_ns
    assert _native.load.__wrapped__() is not None  # loaded from the cache, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [built.name] and built.stat().st_mtime_ns == stamp


def test_native_kernel_off_without_c_compiler(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(_native, "_failure", None)
    assert _native.load.__wrapped__() is None
    assert "no C compiler" in _native.failure()


@pytest.mark.parametrize("pool", ["openmp", "pthreads"])
@pytest.mark.parametrize("kw", [{}, {"state_format": "8bit"}, {"amsgrad": True, "state_format": "8bit"}])
def test_native_kernel_splits_buffers_between_threads(monkeypatch, kw, pool):
    """Buffers above 64K elements are split between threads on block boundaries (torch's OpenMP
    pool, or threads started per call); the result is the same as one thread's."""
    if pool == "pthreads":
        monkeypatch.setattr(_native, "openmp_parallel", lambda: None)
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(3)
    shapes = [(300, 257), (70_001,), (5,)]
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ps = [torch.randn(s, generator=torch.Generator().manual_seed(0)).requires_grad_() for s in shapes]
            opt = adamkit.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="fused", **kw)
            g.manual_seed(3)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            assert all(b.native is not None for b in opt._layouts[0].buckets)
            runs.append((ps, opt))
    finally:
        torch.set_num_threads(threads)
    (p1, o1), (p2, o2) = runs
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
        for k, v in o1.state[a].items():
            assert torch.equal(v, o2.state[b][k]), k


def test_assigned_gradients_copied_only_where_they_cannot_be_read_in_place():
    """Gradients assigned by hand are read in place (no copy; p.grad stays the user's tensor),
    except those the kernel cannot read where they lie, which are copied in: non-contiguous ones,
    and one that aliases a buffer the step writes (here another parameter of the bucket), which
    the reference reads before any write. Results equal the reference's."""
    shapes = [(33, 7), (300,), (6, 5), (6, 5), (1000,)]
    gen = torch.Generator().manual_seed(7)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    fused, ref, rps = pair(ps, lr=1e-2, weight_decay=0.1)
    for t in range(4):
        gs = [torch.randn(s, generator=gen) for s in shapes]
        gs[2] = gs[2].t().contiguous().t()  # non-contiguous: copied
        for p, q, g in zip(ps, rps, gs):
            p.grad, q.grad = g.clone(), g.clone()
        if t >= 1:  # the bucket exists: parameter 3's gradient is parameter 0's first 30 values,
            # which the kernel updates before it reaches parameter 3
            ps[3].grad = ps[0].detach().view(-1)[:30].view(6, 5)
            rps[3].grad = rps[0].detach().view(-1)[:30].view(6, 5).clone()
        own = [p.grad for p in ps]
        if t >= 1:
            (bucket,) = fused._layouts[0].buckets
            for i in (0, 1, 4):  # the flat copies of gradients read in place: must not be read
                bucket.view("grad", i).fill_(float("nan"))
        fused.step()
        ref.step()
        assert_same(fused, ref, ps, rps)
        if t >= 1:
            assert ps[0].grad is own[0] and ps[1].grad is own[1] and ps[4].grad is own[4]  # read in place
            assert ps[2].grad is not own[2] and ps[3].grad is not own[3]  # copied into the flat buffer
            assert ps[2].grad.data_ptr() == bucket.grad_ptrs[2]


@pytest.mark.parametrize(
    "dtype,kw",
    [
        pytest.param(torch.float32, {}, id="fp32"),
        pytest.param(torch.float32, {"state_format": "bf16", "amsgrad": True}, id="bf16-state"),
        pytest.param(torch.float32, {"state_format": "8bit", "min_8bit_size": 0}, id="8bit"),
        pytest.param(
            torch.bfloat16,
            {"kahan_sum": True, "state_format": "8bit", "min_8bit_size": 0},
            id="bf16-kahan-8bit",
        ),
        pytest.param(torch.bfloat16, {"stochastic_rounding": True}, id="bf16-sr"),
        pytest.param(torch.bfloat16, {"master_weights": True}, id="bf16-master"),
    ],
)
def test_gradients_read_in_place_give_the_bits_of_flat_ones(dtype, kw):
    """Every format of the native kernel: a step from gradients assigned by hand (read where they
    lie, blocks of 256 that straddle tensors gathered from several) is bit for bit the step from
    the same gradients written into the flat buffer by backward(). Sizes are not multiples of 16
    or 256, and the largest tensors are split between two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(9)
        shapes = [(33, 7), (300,), (300, 257), (1000,)]
        p0 = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        assigned = [p.clone().requires_grad_() for p in p0]
        hooked = [p.clone().requires_grad_() for p in p0]
        oa = adamkit.AdamW(assigned, lr=1e-2, weight_decay=0.1, backend="fused", **kw)
        oh = adamkit.AdamW(hooked, lr=1e-2, weight_decay=0.1, backend="fused", **kw)
        for t in range(4):
            gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            for p, g in zip(assigned, gs):
                p.grad = g
            oh.zero_grad()
            sum((p * g).sum() for p, g in zip(hooked, gs)).backward()  # d/dp = g exactly
            if t >= 1:  # the flat buffer's copies of the assigned gradients must not be read
                (bucket,) = oa._layouts[0].buckets
                for i in range(len(shapes)):
                    bucket.view("grad", i).fill_(float("nan"))
            oa.step()
            oh.step()
            if t >= 1:  # (the first step builds the layout, moving the gradients into it)
                assert all(p.grad is g for p, g in zip(assigned, gs))  # read in place, not copied
                (bucket,) = oh._layouts[0].buckets
                assert all(p.grad.data_ptr() == ptr for p, ptr in zip(hooked, bucket.grad_ptrs))
            for a, h in zip(assigned, hooked):
                assert torch.equal(a, h)
                for k, v in oh.state[h].items():
                    assert torch.equal(oa.state[a][k], v), k
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("pool", ["openmp", "pthreads"])
def test_native_threads_run_in_the_callers_denormal_mode(monkeypatch, pool):
    """Both thread sources (torch's OpenMP pool, or threads started per call) compute in the
    caller's floating-point mode: with torch.set_flush_denormal(True) an update that lands below
    the smallest normal float gives 0 in every thread's share, and without it a denormal."""
    if pool == "pthreads":
        monkeypatch.setattr(_native, "openmp_parallel", lambda: None)
    elif _native.openmp_parallel() is None:
        pytest.skip("torch does not use an OpenMP runtime here")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for flush in (True, False):
            torch.set_flush_denormal(flush)
            p = torch.full((100_000,), 2e-38, requires_grad=True)  # normal; 2 threads' worth
            opt = adamkit.AdamW([p], lr=0.5, weight_decay=0.9, backend="fused")
            p.grad = torch.zeros_like(p)  # the update is p * (1 - 0.45) alone: 1.1e-38, denormal
            opt.step()
            (bucket,) = opt._layouts[0].buckets
            assert (bucket.native.omp_parallel is not None) == (pool == "openmp")
            bits = p.detach().view(torch.int32)  # compared as integers: torch's own float ops
            if flush:  # may treat denormals as zero in some threads
                assert (bits == 0).all()
            else:  # positive denormals: exponent bits zero, mantissa not
                assert ((bits > 0) & (bits < 0x00800000)).all()
    finally:
        torch.set_flush_denormal(True)  # the suite's mode (conftest)
        torch.set_num_threads(threads)


def test_formats_without_a_kernel_here_run_per_tensor(monkeypatch):
    """With the native kernel but no C++ compiler, fp16 buckets (which only torch.compile's kernel
    serves) step per tensor, like the reference, and everything else stays on the native kernel."""
    monkeypatch.setattr(_fused, "_find_compiler_problem", lambda: "no C++ compiler found")
    half = [torch.randn(40, 3).half().requires_grad_(), torch.randn(7).half().requires_grad_()]
    full = [torch.randn(9, 2, requires_grad=True)]
    ps = half + full
    fused, ref, rps = pair(ps, lr=1e-2, weight_decay=0.1)
    for gs in grad_stream(ps, 4):
        step_both(fused, ref, ps, rps, gs)
    for p, q in zip(half, rps):  # per tensor (foreach) runs the reference's operators: bitwise
        assert torch.equal(p, q)
        for k, v in ref.state[q].items():
            assert torch.equal(fused.state[p][k], v), k
    assert_same(fused, ref, full, rps[len(half) :])
    natives = {b.fmt.param: b.native is not None for b in fused._layouts[0].buckets}
    assert natives == {"kahan": False, "native": True}


def test_native_kernel_unwritable_cache_falls_back_to_a_temporary_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("ADAMKIT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(_native.tempfile, "gettempdir", lambda: str(tmp_path))
    assert _native.load.__wrapped__() is not None
    assert list(tmp_path.glob("adamkit-*/adamkit_kernel_*.so"))


def test_unflattenable_parameters_round_as_the_per_tensor_backends():
    """A parameter the fused backend cannot flatten runs per tensor with the same identity (the
    seed of its stochastic rounding) as under foreach, so both give the same bits."""
    base = torch.randn(64, 33).bfloat16()
    runs = []
    for backend in ("fused", "foreach"):
        ps = [torch.randn(300).bfloat16().requires_grad_(), base.clone().t().requires_grad_()]  # 2nd: loose
        opt = adamkit.AdamW(ps, lr=1e-3, stochastic_rounding=True, backend=backend)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            opt.step()
        runs.append(ps[1].detach().clone())
    assert torch.equal(runs[0], runs[1])
