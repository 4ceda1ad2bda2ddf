"""The compiled kernel: the algorithm's update through ``torch.compile`` (Inductor), one call per
tensor on the tensor where it lies. It serves what the native kernel does not (fp16 parameters or
state, fp64) and, through Inductor's other backends, other devices.

The scalars are a small tensor (its values are not guarded, so a changing lr never recompiles),
the weight-decay mode and ``maximize`` are run-time values too (``Flags(wd_mode="runtime",
maximize=None)``), and shapes are dynamic: one compile per (algorithm, formats, slot options)
serves every tensor. Compiling costs seconds per process (dynamo, inductor, its on-disk cache) and
needs a C++ compiler on the CPU.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch

from ..algorithm import Algorithm, Flags
from ..storage.formats import Formats, compute_dtype
from .compose import Item, apply_update, decode_all, encode_all, needs_index, step_seeds
from .native import find_compiler

_unavailable_reason: str | None = None


def problem() -> str | None:
    """Why the compiled kernel cannot run on the CPU here, or None (as far as we know so far)."""
    return _unavailable_reason or _find_compiler_problem()


@functools.cache
def _find_compiler_problem() -> str | None:
    if find_compiler("CXX", ("g++", "c++", "clang++")) is None:
        return "no C++ compiler found (torch.compile's CPU backend needs g++ or clang++; set CXX)"
    return None


def _kernel_body(t: dict, hp, seeds, offset, *, alg: Algorithm, fmt: Formats, flags: Flags):
    s = alg.scalar_type(*[hp[i] for i in range(len(alg.scalar_type._fields))])
    p, g, slots = decode_all(alg, fmt, t, flags, hp.dtype)
    new_p, new_slots = apply_update(alg, p, g, slots, s, flags)
    param = t["param"]
    index = None
    if needs_index(fmt):  # positions in the whole parameter (Item.offset), the rounding bits' index
        index = (torch.arange(param.numel(), device=param.device) + offset).view(param.shape)
    # Writing back inside the compiled function lets inductor emit one loop that loads each input
    # once and stores each output once, nothing materialized between.
    for name, value in encode_all(alg, fmt, t, new_p, new_slots, flags, index, seeds).items():
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


@functools.cache
def _compiled(alg: Algorithm, fmt: Formats, flags: Flags):
    # Dynamo keeps one cache per code object (with a small limit); a fresh code object per variant,
    # with the variant bound as keyword defaults (not a partial, whose wrapper code would be shared),
    # keeps variants from evicting each other. Dtypes and sizes are guarded within a variant.
    options = "_".join((*flags.options, f"skip{int(flags.skip_nonfinite)}"))
    name = f"adamkit_{alg.name.lower()}_{fmt.param}_{fmt.state}_{options}"
    code = _kernel_body.__code__.replace(co_name=name)
    fn = types.FunctionType(code, _kernel_body.__globals__, name)
    fn.__kwdefaults__ = {"alg": alg, "fmt": fmt, "flags": flags}
    return torch.compile(fn, fullgraph=True, dynamic=True, options=_INDUCTOR_OPTIONS)


def runtime_flags(flags: Flags) -> Flags:
    return flags._replace(wd_mode="runtime", maximize=None)


def run_compiled(alg: Algorithm, items: list[Item], scalars_of: Callable, flags: Flags) -> None:
    """One compiled call per item (contiguous tensors; the caller sends the others to foreach).

    A broken compiler surfaces on the first call, before anything is written: the reason is kept
    (``problem()``) and the error raised, so the caller can fall back with nothing changed."""
    global _unavailable_reason
    rflags = runtime_flags(flags)
    for it in items:
        param = it.t["param"]
        if param.numel() == 0:
            continue  # an empty local shard (FSDP2): nothing to step
        cdt = compute_dtype(param.dtype)
        hp = torch.tensor([float(x) for x in scalars_of(it.step)], dtype=cdt, device=param.device)
        seeds = torch.tensor(step_seeds(it.step, it.uid), dtype=torch.int64, device=param.device)
        offset = torch.tensor([it.offset], dtype=torch.int64, device=param.device)
        # 1-D views: one compiled graph for every rank (and inductor drops in-place writes to 0-D
        # inputs); detached, so that a parameter (requires_grad) and a DTensor's local shard (not)
        # share one graph
        t = {k: v.detach().view(-1) for k, v in it.t.items()}
        rows = [v.shape[0] for k, v in it.t.items() if k.endswith("_scale") and v.dim() == 2]
        if rows:  # 8-bit rows (quant8): (rows, L) values beside (rows, padded L) codes
            if rows[0] == 0:
                continue  # no rows here: nothing to step
            t = {
                k: v if v.dtype == torch.uint8 or k.endswith("_scale") else v.detach().view(rows[0], -1)
                for k, v in it.t.items()
            }
        try:
            # dynamo specializes sizes 0 and 1 (of a view and of its base): FSDP2's shards of one
            # row or one element each add a graph to a variant, more than its default limit of 8
            with torch._dynamo.config.patch(recompile_limit=64):
                _compiled(alg, it.fmt, rflags)(t, hp, seeds, offset)
        except Exception as e:  # a missing or broken compiler surfaces here, on first use
            cause = compiler_failure(e)
            if cause is not None:
                _unavailable_reason = (
                    f"torch.compile failed: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}"
                )
            raise


def compiler_failure(e: BaseException) -> BaseException | None:
    """The exception in ``e``'s chain that says the C++ compiler is missing or failed, or None.

    Recognised by type, not by words in a message: Inductor's ``InvalidCxxCompiler`` (none found)
    and ``CppCompileError`` (it failed), or the OS failing to run it (``FileNotFoundError``,
    ``PermissionError``, ``subprocess.CalledProcessError``), reached through dynamo's
    ``BackendCompilerFailed.inner_exception`` and ``__cause__``/``__context__``."""
    import subprocess

    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    kinds = (
        InvalidCxxCompiler,
        CppCompileError,
        FileNotFoundError,
        PermissionError,
        subprocess.CalledProcessError,
    )
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kinds):
            return x
        todo += [getattr(x, "inner_exception", None), x.__cause__, x.__context__]
    return None
