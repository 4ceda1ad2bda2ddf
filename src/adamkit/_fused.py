"""The fused backend: one kernel call per flat buffer.

Two kernels compose the same decode -> math -> encode functions over a bucket's flat buffers:

- the native kernel (``_kernel.c`` via ``_native.py``): fp32 or bf16 parameters (native, plain,
  Kahan, stochastic rounding, master weights) with fp32, bf16 or 8-bit moments. Built with the
  system's C compiler once per machine (about 2 s) and loaded from a cache afterwards (milliseconds);
  8-bit blocks are decoded, updated and re-encoded while in L1, one pass over memory.
- torch.compile's (``_compiled`` below): every format, and the only one for fp16 and fp64. It costs
  seconds per process (dynamo, inductor, its on-disk cache).

Layout. For each parameter group, the parameters that can be flattened (dense, contiguous, plain
``torch.Tensor``/``nn.Parameter``) are sorted into buckets sharing (device, dtype, step number).
Each bucket owns flat buffers, and the parameters and their state become views of them:

=================  ===============================  ============================================
buffer             bytes per parameter (fp32)       what points into it
=================  ===============================  ============================================
``param``          4 (the parameter itself)         ``p.data`` (re-pointed; the model sees it)
``grad``           4 (the gradient itself)          ``p.grad`` (set by a post-accumulate hook)
``exp_avg``        4                                ``state["exp_avg"]``
``exp_avg_sq``     4                                ``state["exp_avg_sq"]``
``max_exp_avg_sq`` 4, amsgrad only                  ``state["max_exp_avg_sq"]``
``steps``          4 per *tensor*                   ``state["step"]`` (0-D views)
=================  ===============================  ============================================

Nothing is duplicated: the flat buffers *are* the parameters, gradients and state.

Gradients. A post-accumulate-grad hook on each flattened parameter moves the gradient autograd
produced into the flat gradient buffer (while it is still hot in cache) and points ``p.grad`` at the
view, so the step reads one flat buffer and copies nothing. Gradients that arrive another way
(assigned by hand, or replaced by other code) are read where they lie by the native kernel,
which takes a list of (start, pointer) stretches for them; ``p.grad`` stays the caller's tensor.
Where that is not possible (the torch.compile kernel, a non-contiguous gradient, one that aliases
a buffer the step writes) they are copied in at the start of the step.

Correctness before speed. Every step checks that each parameter still lives where the layout put it
(``model.to()``, ``p.data = ...`` or ``load_state_dict`` invalidate the layout, which is then rebuilt
from the current values) and that every parameter of a bucket has a gradient (otherwise that bucket
runs per tensor on the views, so parameters without gradients are left untouched, as torch does).
Parameters that cannot be flattened run through the foreach backend on their own tensors.

Hyperparameters are runtime values of both kernels (for torch.compile's, one small tensor), so a
changing lr never recompiles; the weight-decay mode and ``maximize`` are runtime values too (see
``Flags``). torch.compile's kernel is compiled once per (format, amsgrad, skip_nonfinite); dynamic
shapes make it serve every buffer size.
"""

from __future__ import annotations

import functools
import operator
import types
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from . import _native, _quant
from ._backends import MOMENTS, Item, decode_all, encode_all, needs_index, run_foreach, step_seeds
from ._math import Flags, Scalars, adam_update
from ._storage import Formats, compute_dtype

_DATA_PTR = torch.Tensor.data_ptr
_GRAD = operator.attrgetter("grad")

# --------------------------------------------------------------------------------------------------
# Availability: the native kernel needs a C compiler once per machine, torch.compile's CPU backend
# a C++ compiler at run time.
# --------------------------------------------------------------------------------------------------

_unavailable_reason: str | None = None
_warned = False
# The native kernel (_kernel.c) serves every format it implements; tests switch it off to exercise
# the torch.compile kernel, which serves the rest (fp16 parameters or moments, fp64).
USE_NATIVE = True


def compiler_missing_reason() -> str | None:
    """Why the fused backend cannot run here, or None if it can (as far as we know so far).

    Either kernel will do: the native one (a C compiler) serves the common formats, buckets it does
    not serve (fp16, fp64) use torch.compile's where a C++ compiler is found, else foreach."""
    if USE_NATIVE and _native.load() is not None:
        return None
    problem = _inductor_problem()
    if problem is None:
        return None
    native = _native.failure() if USE_NATIVE else "switched off"
    return f"native kernel: {native}; torch.compile kernel: {problem}"


def _inductor_problem() -> str | None:
    return _unavailable_reason or _find_compiler_problem()


@functools.cache
def _find_compiler_problem() -> str | None:
    if _native.find_compiler("CXX", ("g++", "c++", "clang++")) is None:
        return "no C++ compiler found (torch.compile's CPU backend needs g++ or clang++; set CXX)"
    return None


def mark_unavailable(reason: str) -> None:
    global _unavailable_reason
    _unavailable_reason = reason


def warn_fallback_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"adamkit: the fused backend is unavailable ({reason}); backend='auto' uses 'foreach'. "
            "Install a C compiler (gcc) to get the fused kernel.",
            RuntimeWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------


def _kernel_body(t: dict, hp, seeds, *, fmt: Formats, amsgrad: bool, skip_nonfinite: bool):
    cdt = hp.dtype
    s = Scalars(*[hp[i] for i in range(len(Scalars.FIELDS))])
    flags = Flags(wd_mode="runtime", amsgrad=amsgrad, maximize=None, skip_nonfinite=skip_nonfinite)
    p, g, m, v, vmax = decode_all(fmt, t, amsgrad, cdt)
    np_, nm, nv, nvmax = adam_update(p, g, m, v, vmax, s, flags)
    param = t["param"]
    index = torch.arange(param.numel(), device=param.device).view(param.shape) if needs_index(fmt) else None
    new = [np_, nm, nv] + ([nvmax] if amsgrad else [])
    # Writing back inside the compiled function lets inductor emit one loop that loads each input
    # once and stores each output once (fp32: 28 bytes per parameter), nothing materialized between.
    for name, value in encode_all(fmt, t, new, amsgrad, index, seeds).items():
        t[name].copy_(value.view_as(t[name]))


_INDUCTOR_OPTIONS = {
    # inductor would otherwise elide x.to(bf16).to(fp32) pairs, and the Kahan remainder
    # x - round(x) would silently become 0
    "emulate_precision_casts": True,
    # with dynamic shapes (and its on-disk cache) the decision to run the loop on all cores would be
    # made from the size seen at the first compile ever, possibly a tiny test tensor; let OpenMP
    # decide at run time instead
    "cpp.dynamic_threads": True,
}
# 8-bit kernels: every block's new moments feed both its scale (a reduction) and its codes; letting
# inductor recompute them instead of writing them to temporary fp32 buffers removes three of the
# passes over memory it would otherwise make. (The step still reads its inputs twice: once for the
# block scales, once for the update; that and the companding arithmetic bound its speed.)
_INDUCTOR_OPTIONS_8BIT = {
    **_INDUCTOR_OPTIONS,
    "realize_reads_threshold": 1000,
    "realize_cpu_opcount_threshold": 100000,
    "realize_cpu_acc_reads_threshold": 1000,
    "aggressive_fusion": True,
}


@functools.cache
def _compiled(fmt: Formats, amsgrad: bool, skip_nonfinite: bool):
    # Dynamo keeps one cache per code object (with a small limit); a fresh code object per variant,
    # with the variant bound as keyword defaults (not a partial, whose wrapper code would be shared),
    # keeps variants from evicting each other. Dtypes and sizes are guarded within a variant.
    name = f"adamkit_fused_adam_{fmt.param}_{fmt.state}_ams{int(amsgrad)}_skip{int(skip_nonfinite)}"
    code = _kernel_body.__code__.replace(co_name=name)
    fn = types.FunctionType(code, _kernel_body.__globals__, name)
    fn.__kwdefaults__ = {"fmt": fmt, "amsgrad": amsgrad, "skip_nonfinite": skip_nonfinite}
    options = _INDUCTOR_OPTIONS_8BIT if fmt.state == "8bit" else _INDUCTOR_OPTIONS
    return torch.compile(fn, fullgraph=True, dynamic=True, options=options)


def run_kernel(t: dict, hp, seeds, fmt: Formats, flags: Flags) -> None:
    try:
        _compiled(fmt, flags.amsgrad, flags.skip_nonfinite)(t, hp, seeds)
    except Exception as e:  # a missing or broken compiler surfaces here, on first use
        msg = str(e).lower()
        if "compil" in msg or "cpp" in msg or "cxx" in msg:
            mark_unavailable(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------


def flattenable(p: torch.Tensor) -> bool:
    """Plain dense contiguous tensors can live in a flat buffer; subclasses (DTensor, ...) cannot."""
    return (
        type(p) in (torch.Tensor, torch.nn.Parameter)
        and p.layout == torch.strided
        and p.is_contiguous()
        and not p.is_complex()
    )


@dataclass
class Bucket:
    params: list[torch.Tensor]
    fmt: Formats
    uid: int  # seeds stochastic rounding; stable for a given layout
    shapes: list[torch.Size]
    offsets: list[int]
    padded: list[int]  # per-parameter length in the flat buffers (8-bit: a multiple of 256)
    flat: dict[str, torch.Tensor]
    steps: torch.Tensor  # fp32, one per tensor; state["step"] are 0-D views of it
    step: float
    param_ptrs: list[int] = field(default_factory=list)
    grad_views: list[torch.Tensor] = field(default_factory=list)
    grad_ptrs: list[int] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    native: _native.Args | None = None  # the native kernel's pointers into ``flat``, if it serves
    storages: frozenset[int] = frozenset()  # data pointers of the storages behind ``flat``

    def view(self, name: str, i: int) -> torch.Tensor:
        """Parameter i's slice of a flat buffer, in the shape its state entry has."""
        o, n = self.offsets[i], self.shapes[i].numel()
        flat = self.flat[name].view(-1)
        if name.endswith("_scale"):
            return flat[o // _quant.BLOCK : (o + self.padded[i]) // _quant.BLOCK]
        if self.fmt.state == "8bit" and name in MOMENTS:
            return flat[o : o + self.padded[i]]
        return flat[o : o + n].view(self.shapes[i])

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def _grad_hook(bucket: Bucket, i: int):
    # A weak reference: an optimizer that is dropped must not be kept alive (with its buffers) by
    # the hooks it left on the model's parameters; its hooks then do nothing.
    ref = weakref.ref(bucket)

    def hook(p: torch.Tensor) -> None:
        bucket = ref()
        if bucket is None:
            return
        view = bucket.grad_views[i]
        g = p.grad
        if g is not None and g.data_ptr() != bucket.grad_ptrs[i]:
            view.copy_(g)
            p.grad = view

    return hook


def build_buckets(
    params: list[torch.Tensor], state: dict, formats_of, amsgrad: bool, uid0: int
) -> list[Bucket]:
    """Move the given parameters and their (already initialized) state into flat buffers.

    Buffers are zero-filled, so alignment gaps hold zeros that the update keeps at zero."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        st = state[p]
        key = (p.device, p.dtype, formats_of(p), st["exp_avg"].dtype, float(st["step"]))
        groups.setdefault(key, []).append(p)
    buckets = []
    for j, ((device, dtype, fmt, _, step), ps) in enumerate(groups.items()):
        # 8-bit: every tensor starts on a block boundary so blocks never straddle two tensors.
        # Otherwise 16 elements (64 B for fp32): each tensor starts on a cache line / vector boundary.
        align = _quant.BLOCK if fmt.state == "8bit" else 16
        shapes = [p.shape for p in ps]
        offsets, padded, n = [], [], 0
        for p in ps:
            offsets.append(n)
            padded.append(-(-p.numel() // align) * align)
            n += padded[-1]
        n = -(-n // _quant.BLOCK) * _quant.BLOCK  # the native kernel works in whole blocks
        st0 = state[ps[0]]
        names = [k for k in st0 if k != "step"]
        # 8-bit buffers are (blocks, 256) tensors: one iteration space for every tensor lets
        # inductor fuse each block's reductions (the new scales) with its element-wise work, and
        # updating the kernel's inputs in place (not views of them) spares copies back.
        shape = (n // _quant.BLOCK, _quant.BLOCK) if fmt.state == "8bit" else (n,)
        flat = {k: torch.zeros(shape, device=device, dtype=dtype) for k in ("param", "grad")}
        for k in names:
            length = (n // _quant.BLOCK,) if k.endswith("_scale") else shape
            flat[k] = torch.zeros(length, device=device, dtype=st0[k].dtype)
            if fmt.state == "8bit" and k in MOMENTS and _quant.SIGNED[k]:
                flat[k].fill_(128)  # the code of zero for m (alignment gaps included)
        b = Bucket(
            params=ps,
            fmt=fmt,
            uid=uid0 + j,
            shapes=shapes,
            offsets=offsets,
            padded=padded,
            flat=flat,
            steps=torch.full((len(ps),), step, dtype=torch.float32),
            step=step,
        )
        b.storages = frozenset(t.untyped_storage().data_ptr() for t in flat.values())
        if USE_NATIVE and _native.supports(fmt, dtype, device) and _native.load() is not None:
            b.native = _native.make_args(flat, fmt)
        for i, p in enumerate(ps):
            st = state[p]
            b.view("param", i).copy_(p.detach())
            g = p.grad
            gv = b.view("grad", i)
            if g is not None:
                gv.copy_(g)
            for k in names:
                b.view(k, i).copy_(st[k])
                st[k] = b.view(k, i)
            st["step"] = b.steps[i]
            p.data = b.view("param", i)
            if g is not None:
                p.grad = gv
            b.grad_views.append(gv)
            b.grad_ptrs.append(gv.data_ptr())
            b.param_ptrs.append(p.data_ptr())
            if p.requires_grad:
                b.hooks.append(p.register_post_accumulate_grad_hook(_grad_hook(b, i)))
        buckets.append(b)
    return buckets


class GroupLayout:
    """The flat layout of one parameter group; rebuilt whenever it no longer matches reality."""

    def __init__(self, buckets: list[Bucket], loose: list[torch.Tensor], key: tuple[int, ...] | None):
        self.buckets = buckets
        self.loose = loose  # parameters that cannot be flattened: foreach on their own tensors
        self.members = {id(p) for b in buckets for p in b.params}
        # ids of the parameters with gradients when the layout was built, if they were exactly its
        # members: then a step with the same key needs no per-parameter membership checks
        self.key = key

    def params_moved(self) -> bool:
        """True if any parameter no longer lives in its flat buffer (model.to(), p.data = ...)."""
        # map() keeps the per-parameter loop in C: this runs every step, for every parameter
        return any(list(map(_DATA_PTR, b.params)) != b.param_ptrs for b in self.buckets)

    def release(self) -> None:
        for b in self.buckets:
            b.remove_hooks()


def _per_tensor(bucket: Bucket, has_grad: list[bool]) -> list[Item]:
    """The bucket's parameters with a gradient as foreach items on their views."""
    items = []
    for i, p in enumerate(bucket.params):
        if has_grad[i]:
            bucket.steps[i] += 1
            t = {k: bucket.view(k, i) for k in bucket.flat if k not in ("param", "grad")}
            t["param"], t["grad"] = p, p.grad
            items.append(Item(t, bucket.fmt, float(bucket.steps[i]), bucket.uid * 100_003 + i))
    return items


def _readable_in_place(g: torch.Tensor, view: torch.Tensor, bucket: Bucket) -> bool:
    """Whether the kernel can read gradient ``g`` where it lies instead of the flat view: a plain
    dense contiguous tensor like the view, and not memory the step itself writes (a gradient that
    aliases one of this bucket's buffers is copied first, as the per-tensor backends would read
    it before any write)."""
    return (
        type(g) is torch.Tensor
        and g.layout == torch.strided
        and g.dtype == view.dtype
        and g.device == view.device
        and g.shape == view.shape
        and g.is_contiguous()
        and g.untyped_storage().data_ptr() not in bucket.storages
    )


def _grad_segments(bucket: Bucket, foreign: list[tuple[int, torch.Tensor]]) -> tuple[list[int], list[int]]:
    """(starts, pointers) for the native kernel: stretches of the flat buffers in order, each read
    from a gradient held elsewhere or from the flat gradient buffer (alignment gaps included).
    ``foreign`` holds (offset, gradient) in layout order."""
    flat = bucket.flat["grad"]
    base, size, n = flat.data_ptr(), flat.element_size(), flat.numel()
    starts, ptrs, pos = [], [], 0
    for offset, g in foreign:
        if offset > pos:
            starts.append(pos)
            ptrs.append(base + pos * size)
        starts.append(offset)
        ptrs.append(g.data_ptr())
        pos = offset + g.numel()
    if pos < n:
        starts.append(pos)
        ptrs.append(base + pos * size)
    return starts, ptrs


def step_bucket(bucket: Bucket, scalars: Scalars, flags: Flags, has_grad: list[bool] | None) -> list[Item]:
    """One step of a bucket: a fused kernel if every parameter has a gradient (``has_grad`` is
    None), else per tensor on the views (returned as items for the foreach backend)."""
    if has_grad is not None and not all(has_grad):
        # Some parameters have no gradient this step: torch leaves them (and their step) untouched.
        bucket.step = float("nan")  # steps diverged: the next step rebuilds the buckets
        return _per_tensor(bucket, has_grad)
    if bucket.native is None and _inductor_problem() is not None:
        # neither kernel serves this bucket's formats here (fp16/fp64 without a C++ compiler)
        bucket.step += 1
        return _per_tensor(bucket, [True] * len(bucket.params))
    # Gradients not written by our hook (assigned by hand, or replaced by other code): the native
    # kernel reads them where they are; otherwise they are copied in (counted in the step).
    in_place = bucket.native is not None
    copies_dst, copies_src, foreign = [], [], []
    grads = list(map(_GRAD, bucket.params))
    # map() keeps the per-parameter loop in C: in the usual case every gradient is in its view
    if list(map(_DATA_PTR, grads)) != bucket.grad_ptrs:
        for i, (p, g, ptr, view) in enumerate(zip(bucket.params, grads, bucket.grad_ptrs, bucket.grad_views)):
            if g.data_ptr() == ptr:
                continue
            if in_place and _readable_in_place(g, view, bucket):
                if g.numel():
                    foreign.append((bucket.offsets[i], g))
                continue
            copies_dst.append(view)
            copies_src.append(g)
            p.grad = view
    if copies_dst:
        torch._foreach_copy_(copies_dst, copies_src)
    bucket.step += 1
    bucket.steps.fill_(bucket.step)
    if bucket.native is not None:
        seeds = step_seeds(bucket.step, bucket.uid)
        segments = _grad_segments(bucket, foreign) if foreign else None
        _native.step(_native.load(), bucket.native, scalars.as_list(), seeds, flags, segments)
        return []
    # torch.compile's kernel: the scalars as small tensors (their values are not guarded, so
    # changing them never recompiles)
    param = bucket.flat["param"]
    hp = torch.tensor(scalars.as_list(), dtype=compute_dtype(param.dtype), device=param.device)
    seeds = torch.tensor(step_seeds(bucket.step, bucket.uid), dtype=torch.int64, device=param.device)
    run_kernel(bucket.flat, hp, seeds, bucket.fmt, flags)
    return []


def fused_step(
    layouts: dict,
    group_index: int,
    params: list[torch.Tensor],
    state: dict,
    init_state,
    formats_of,
    item_of,
    scalars_of,
    flags: Flags,
) -> None:
    """Step one group with the fused backend; ``params`` are the group's parameters with grads.
    ``item_of(p)`` gives a parameter that cannot be flattened as a foreach item (step advanced)."""
    key = tuple(map(id, params))
    layout: GroupLayout | None = layouts.get(group_index)
    # Fast path: the same parameters have gradients as when the layout was built, none has moved
    # and every bucket's parameters share one step. Otherwise rebuild from the current values.
    if (
        layout is None
        or layout.key != key
        and not all(id(p) in layout.members or not flattenable(p) for p in params)
        or layout.params_moved()
        or any(b.step != b.step for b in layout.buckets)
    ):
        members = [p for p in params if flattenable(p)]
        if layout is not None:  # keep parameters that were flattened before but lack a grad now
            layout.release()
            seen = {id(p) for p in members}
            members += [p for b in layout.buckets for p in b.params if id(p) not in seen and flattenable(p)]
        for p in members:
            init_state(p)
        loose = [p for p in params if not flattenable(p)]
        # The fast path needs every flattened parameter to have a gradient; otherwise no key.
        exact = len(members) + len(loose) == len(params)
        buckets = build_buckets(members, state, formats_of, flags.amsgrad, uid0=1000 * (group_index + 1))
        layout = GroupLayout(buckets, loose, key if exact else None)
        layouts[group_index] = layout

    leftover: list[Item] = []
    if layout.key == key:
        for b in layout.buckets:
            leftover += step_bucket(b, scalars_of(b.step + 1), flags, None)
        loose = layout.loose
    else:
        with_grad = set(key)
        for b in layout.buckets:
            has = [id(p) in with_grad for p in b.params]
            if any(has):
                leftover += step_bucket(b, scalars_of(b.step + 1), flags, has)
        loose = [p for p in params if id(p) not in layout.members]
    leftover += [item_of(p) for p in loose]
    if leftover:
        run_foreach(leftover, scalars_of, flags)
