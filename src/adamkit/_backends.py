"""How the composed update runs: reference (per tensor), foreach (multi-tensor) and the dispatcher.

All backends share one signature, ``run(items, scalars_of, flags)``, where ``items`` is a list of
:class:`Item` (one parameter with its gradient and state) whose step counters have already been
incremented, and ``scalars_of(step)`` gives the :class:`~adamkit._math.Scalars` of a step number.
The fused backend lives in ``_fused.py`` and keeps flat buffers of its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._math import Flags, Scalars, TensorList, adam_update

BACKENDS = ("auto", "reference", "foreach", "fused")


@dataclass
class Item:
    """One parameter's share of a step: everything a backend reads or writes for it."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None
    step: float  # the step number of this update (1-based)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math runs in fp32, or fp64 for fp64 parameters (so fp64 runs match torch to ~1e-12)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_reference(items: list[Item], scalars_of: Callable[[float], Scalars], flags: Flags) -> None:
    """The spec: one parameter at a time, out-of-place math, results copied back into storage.

    ``copy_`` writes through any strides, so non-contiguous parameters and gradients whose strides
    differ from the parameter's are updated element by element correctly.
    """
    for it in items:
        cdt = compute_dtype(it.param.dtype)
        vmax = it.max_exp_avg_sq.to(cdt) if flags.amsgrad else None
        p, m, v, vmax = adam_update(
            it.param.to(cdt),
            it.grad.to(cdt),
            it.exp_avg.to(cdt),
            it.exp_avg_sq.to(cdt),
            vmax,
            scalars_of(it.step),
            flags,
        )
        it.param.copy_(p)
        it.exp_avg.copy_(m)
        it.exp_avg_sq.copy_(v)
        if flags.amsgrad:
            it.max_exp_avg_sq.copy_(vmax)  # type: ignore[union-attr]


def run_foreach(items: list[Item], scalars_of: Callable[[float], Scalars], flags: Flags) -> None:
    """The same math over lists: one ``torch._foreach_*`` kernel per operator per bucket.

    Buckets share device, dtypes and step number, so every scalar is one Python float.
    """
    buckets: dict[tuple, list[Item]] = defaultdict(list)
    for it in items:
        key = (it.param.device, it.param.dtype, it.grad.dtype, it.exp_avg.dtype, it.step)
        buckets[key].append(it)
    for (_, pdt, _, _, step), its in buckets.items():
        cdt = compute_dtype(pdt)

        def lst(ts: list[torch.Tensor], cdt: torch.dtype = cdt) -> TensorList:
            return TensorList([t.to(cdt) for t in ts])

        vmax = lst([it.max_exp_avg_sq for it in its]) if flags.amsgrad else None  # type: ignore[misc]
        p, m, v, vmax = adam_update(
            lst([it.param for it in its]),
            lst([it.grad for it in its]),
            lst([it.exp_avg for it in its]),
            lst([it.exp_avg_sq for it in its]),
            vmax,
            scalars_of(step),
            flags,
        )
        torch._foreach_copy_([it.param for it in its], p.ts)
        torch._foreach_copy_([it.exp_avg for it in its], m.ts)
        torch._foreach_copy_([it.exp_avg_sq for it in its], v.ts)
        if flags.amsgrad:
            torch._foreach_copy_([it.max_exp_avg_sq for it in its], vmax.ts)  # type: ignore[misc]


RUNNERS = {"reference": run_reference, "foreach": run_foreach}
