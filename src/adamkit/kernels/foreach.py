"""The foreach backend: the algorithm's update over lists of tensors, one ``torch._foreach_*``
kernel per operator per batch (:class:`TensorList` maps Python operators onto them); decode and
encode run per tensor (no-ops for fp32 storage)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from .. import ieee
from ..algorithm import Algorithm, Flags
from ..storage.formats import Formats, compute_dtype
from . import native
from .compose import Item, apply_update, decode_all, encode_all, index_and_seeds
from .reference import run_reference


class TensorList:
    """A list of tensors with elementwise arithmetic mapped to ``torch._foreach_*`` kernels.

    Operands may be another TensorList of the same length, a Python number or a 0-D tensor.
    """

    __slots__ = ("ts",)

    def __init__(self, ts: list[torch.Tensor]):
        self.ts = ts

    def __len__(self) -> int:
        return len(self.ts)

    @staticmethod
    def _other(o):
        return o.ts if isinstance(o, TensorList) else o

    def __neg__(self):
        return TensorList(torch._foreach_neg(self.ts))

    def __add__(self, o):
        return TensorList(torch._foreach_add(self.ts, self._other(o)))

    __radd__ = __add__

    def add(self, o, alpha=1.0):
        return TensorList(torch._foreach_add(self.ts, self._other(o), alpha=alpha))

    def __sub__(self, o):
        return TensorList(torch._foreach_sub(self.ts, self._other(o)))

    def __mul__(self, o):
        return TensorList(torch._foreach_mul(self.ts, self._other(o)))

    __rmul__ = __mul__

    def __truediv__(self, o):
        return TensorList(torch._foreach_div(self.ts, self._other(o)))

    def sqrt(self):
        return TensorList(torch._foreach_sqrt(self.ts))

    def abs(self):
        return TensorList(torch._foreach_abs(self.ts))

    def clamp_max(self, o):
        return TensorList(torch._foreach_clamp_max(self.ts, o))

    def clamp_min(self, o):
        return TensorList(torch._foreach_clamp_min(self.ts, o))

    def sign(self):
        return TensorList(torch._foreach_sign(self.ts))

    def lerp(self, end, weight):
        return TensorList(torch._foreach_lerp(self.ts, end.ts, weight))

    def maximum(self, o):
        return TensorList(torch._foreach_maximum(self.ts, o.ts))

    def isfinite(self):
        return TensorList([t.isfinite() for t in self.ts])

    def isnan(self):
        return TensorList([t.isnan() for t in self.ts])

    # Correctly rounded operations (adamkit.ieee): one IEEE instruction per element in the native
    # library where it is loaded (the reference computes the same values in fp64 with torch,
    # ~15 passes), else adamkit.ieee's per-tensor path.
    def _c(self) -> bool:
        # a batch shares device and dtype (run_foreach's buckets): its first tensor tells
        t = self.ts[0]
        return (
            t.dtype == torch.float32
            and t.device.type == "cpu"
            and native.USE_NATIVE
            and not torch.compiler.is_compiling()
            and native.load() is not None
        )

    def sqrt_rn(self):
        if not self._c():
            return ieee.map_tensors(ieee.sqrt_rn, self)
        return TensorList([native.ieee("sqrt", t.contiguous()) for t in self.ts])

    def div_rn(self, o):
        """self / o (a TensorList or a number)."""
        if not self._c():
            return ieee.map_tensors(ieee.div_rn, self, o)
        if isinstance(o, TensorList):
            return TensorList(
                [native.ieee("div", a.contiguous(), b.contiguous()) for a, b in zip(self.ts, o.ts)]
            )
        return TensorList([native.ieee("div_scalar", a.contiguous(), s=float(o)) for a in self.ts])

    def rdiv_rn(self, o):
        """o / self, o a number."""
        if not self._c():
            return ieee.map_tensors(ieee.div_rn, o, self)
        return TensorList([native.ieee("scalar_div", a.contiguous(), s=float(o)) for a in self.ts])

    def fma_rn(self, b, c):
        """self * b + c rounded once (b a TensorList or a number, c a TensorList)."""
        if not self._c():
            return ieee.map_tensors(ieee.fma_rn, self, b, c)
        if isinstance(b, TensorList):
            return TensorList(
                [
                    native.ieee("fma", x.contiguous(), y.contiguous(), z.contiguous())
                    for x, y, z in zip(self.ts, b.ts, c.ts)
                ]
            )
        return TensorList(
            [
                native.ieee("fma_scalar", x.contiguous(), None, z.contiguous(), float(b))
                for x, z in zip(self.ts, c.ts)
            ]
        )

    def choose(self, a, b):
        """``self ? a : b`` elementwise (self holds boolean masks)."""
        a_ts = a.ts if isinstance(a, TensorList) else [a] * len(self.ts)
        b_ts = b.ts if isinstance(b, TensorList) else [b] * len(self.ts)
        return TensorList([torch.where(c, x, y) for c, x, y in zip(self.ts, a_ts, b_ts)])


# foreach works out of place, one temporary list per operator: processing at most this many
# elements at a time keeps those temporaries in cache instead of streaming them through memory.
FOREACH_CHUNK = 1 << 16
FOREACH_BATCH = 1 << 20


def _chunks(it: Item, flags: Flags) -> list[Item]:
    """Views of a large contiguous parameter's tensors, FOREACH_CHUNK elements at a time. Element
    positions (``offset``) are kept, so stochastic rounding draws the same bits as the reference.
    Whole tensors where the update reduces over them (the cautious mask's count)."""
    n = it.t["param"].numel()
    whole = it.fmt.state == "8bit" or flags.on("cautious")
    if n <= FOREACH_CHUNK or whole or not all(v.is_contiguous() for v in it.t.values()):
        return [it]
    flat = {k: v.view(-1) for k, v in it.t.items()}
    return [
        Item({k: v[a : a + FOREACH_CHUNK] for k, v in flat.items()}, it.fmt, it.step, it.uid, it.offset + a)
        for a in range(0, n, FOREACH_CHUNK)
    ]


def _write_back(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy new values into storage, one multi-tensor copy per (device, dtype) pair."""
    by_kind: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for dst, src in pairs:
        d, s = by_kind[(dst.device, dst.dtype, src.dtype)]
        d.append(dst)
        s.append(src)
    for d, s in by_kind.values():
        torch._foreach_copy_(d, s)


def run_foreach(
    alg: Algorithm,
    items: list[Item],
    scalars_of: Callable,
    flags: Flags,
    *,
    streams: int = 0,
    only: tuple[str, ...] | None = None,
) -> None:
    """Batches share device, dtypes, formats and step number, so every scalar is one Python float.
    ``streams`` and ``only`` as for ``run_reference`` (an update that is not the step: its own
    rounding streams, and the tensors it writes).

    Algorithms that are not elementwise (``Algorithm.elementwise=False``: per-tensor norms, row
    means, slots of other shapes) run one tensor at a time through the reference loop: their
    reductions would need one foreach kernel per tensor anyway, and their slots differ in shape
    between parameters, so there is nothing to batch."""
    if not alg.elementwise:
        run_reference(alg, items, scalars_of, flags, streams=streams, only=only)
        return
    whole = [it for it in items if it.spec is not None]  # sharded, reducing over the whole tensor
    if whole:
        run_reference(alg, whole, scalars_of, flags, streams=streams, only=only)
        items = [it for it in items if it.spec is None]
    buckets: dict[tuple, list[Item]] = defaultdict(list)
    for it in items:
        p = it.t["param"]
        key = (p.device, p.dtype, it.fmt, it.step)
        buckets[key].extend(_chunks(it, flags))
    for (_, pdt, fmt, step), its in buckets.items():
        batch, size = [], 0
        for it in its:
            batch.append(it)
            size += it.t["param"].numel()
            if size >= FOREACH_BATCH:
                _batch(alg, batch, fmt, compute_dtype(pdt), scalars_of(step), flags, streams, only)
                batch, size = [], 0
        if batch:
            _batch(alg, batch, fmt, compute_dtype(pdt), scalars_of(step), flags, streams, only)


def _batch(alg: Algorithm, its: list[Item], fmt: Formats, cdt: torch.dtype, s, flags: Flags, streams: int = 0,
           only: tuple[str, ...] | None = None) -> None:  # fmt: skip
    decoded = [decode_all(alg, fmt, it.t, flags, cdt) for it in its]
    p = TensorList([d[0] for d in decoded])
    g = TensorList([d[1] for d in decoded])
    slots = [TensorList([d[2][k] for d in decoded]) for k in range(len(decoded[0][2]))]
    new_p, new_slots = apply_update(alg, p, g, slots, s, flags)
    pairs = []
    for i, it in enumerate(its):
        index, seeds = index_and_seeds(it, streams)
        out = encode_all(alg, fmt, it.t, new_p.ts[i], [x.ts[i] for x in new_slots], flags, index, seeds)
        pairs += [
            (it.t[name], v) for name, v in out.items() if only is None or name.removesuffix("_scale") in only
        ]
    _write_back(pairs)
