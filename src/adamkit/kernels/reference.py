"""The reference backend: the spec. One parameter at a time, out-of-place math on the decoded
values (``compose``), results copied back into storage."""

from __future__ import annotations

from collections.abc import Callable

from ..algorithm import Algorithm, Flags
from ..storage.formats import compute_dtype
from .compose import Item, apply_update, decode_all, encode_all, index_and_seeds, local_shard, whole_dtensor


def run_reference(
    alg: Algorithm,
    items: list[Item],
    scalars_of: Callable,
    flags: Flags,
    *,
    streams: int = 0,
    only: tuple[str, ...] | None = None,
) -> None:
    """The spec: one parameter at a time, out-of-place math, results copied back into storage.

    ``copy_`` writes through any strides, so non-contiguous parameters and gradients whose strides
    differ from the parameter's are updated element by element correctly.

    An update that is not the step (Sophia's ``update_hessian``) names its own rounding streams
    (``streams``: the first stream's number, so its bits are independent of the step's) and the
    slots it writes (``only``: those and their 8-bit scales; the parameter and every other slot
    are left as they are, not re-encoded).
    """
    for it in items:
        cdt = compute_dtype(it.t["param"].dtype)
        p, g, slots = decode_all(alg, it.fmt, it.t, flags, cdt)
        if it.spec is not None:
            sp = it.spec["param"]
            names = [s.name for s in alg.active_slots(flags)]
            specs = [it.spec.get(n) for n in names]
            p, g = whole_dtensor(p, sp), whole_dtensor(g, sp)
            slots = [None if x is None else whole_dtensor(x, s) for x, s in zip(slots, specs)]
        new_p, new_slots = apply_update(alg, p, g, slots, scalars_of(it.step), flags)
        if it.spec is not None:
            new_p = local_shard(new_p, sp)
            new_slots = [None if x is None else local_shard(x, s) for x, s in zip(new_slots, specs)]
        index, seeds = index_and_seeds(it, streams)
        out = encode_all(alg, it.fmt, it.t, new_p, new_slots, flags, index, seeds, it.offset)
        for name, value in out.items():
            if only is None or name.removesuffix("_scale") in only:
                it.t[name].copy_(value)
