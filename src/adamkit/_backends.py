"""How the composed update runs: reference (per tensor) and foreach (multi-tensor).

Composition: ``decode`` (storage -> compute dtype), the math of ``_math.py``, ``encode`` (compute
dtype -> storage). ``decode_all``/``encode_all`` are the one place that composes them; the fused
backend (``_fused.py``) calls the same two functions inside its compiled kernel.

Both runners share one signature, ``run(items, scalars_of, flags)``, where ``items`` are
:class:`Item` (one parameter with its gradient and stored state; step counters already incremented)
and ``scalars_of(step)`` gives the :class:`~adamkit._math.Scalars` of a step number.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _quant
from ._math import Flags, Scalars, TensorList, adam_update
from ._storage import (
    Formats,
    compute_dtype,
    decode_param,
    decode_state,
    encode_param,
    encode_state,
    mix_seed,
    param_aux_key,
)

BACKENDS = ("auto", "reference", "foreach", "fused")
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class Item:
    """One parameter's share of a step: what a backend reads and writes for it.

    ``t`` maps names to stored tensors: ``param``, ``grad``, each moment (``exp_avg``, ...), their
    8-bit scales (``exp_avg_scale``, ...) and the parameter's ``kahan_comp``/``master_weight``.
    """

    t: dict[str, torch.Tensor]
    fmt: Formats
    step: float  # the step number of this update (1-based)
    uid: int  # a stable id of the parameter in its optimizer: seeds stochastic rounding
    offset: int = 0  # position of t's first element in its parameter (a chunk of a large tensor)


def moment_names(amsgrad: bool) -> tuple[str, ...]:
    return MOMENTS if amsgrad else MOMENTS[:2]


def decode_all(fmt: Formats, t: dict, amsgrad: bool, cdt: torch.dtype):
    """Stored tensors -> compute-dtype (p, g, m, v, vmax)."""
    p = t["param"]
    aux = param_aux_key(fmt.param)
    out = [decode_param(fmt.param, p, t.get(aux), cdt), t["grad"].to(cdt)]
    for name in moment_names(amsgrad):
        if fmt.state == "8bit":
            out.append(_quant.decode(name, t[name], t[name + "_scale"], p.shape, cdt))
        else:
            out.append(decode_state(fmt.state, t[name], cdt))
    if not amsgrad:
        out.append(None)
    return out


def encode_all(fmt: Formats, t: dict, new, amsgrad: bool, index, seeds):
    """Compute-dtype (p, m, v, vmax) -> {name: new stored value} for every tensor that changes.

    ``index`` is each element's position (for stochastic rounding), ``seeds`` four independent
    32-bit seeds (the parameter, then each moment) of this tensor or bucket and step.
    """
    p, *moments = new
    out: dict[str, torch.Tensor] = {}
    out["param"], aux = encode_param(fmt.param, p, t["param"].dtype, index, seeds[0])
    if aux is not None:
        out[param_aux_key(fmt.param)] = aux
    for k, (name, x) in enumerate(zip(moment_names(amsgrad), moments)):
        if fmt.state == "8bit":
            # the fused kernel passes (blocks, 256) values with their flat indices; per tensor,
            # encode pads to whole blocks and numbers the padded elements itself
            blocked = x.dim() == 2 and x.shape[1] == _quant.BLOCK
            idx = index if blocked and index is not None and index.shape == x.shape else None
            codes, out[name + "_scale"] = _quant.encode(name, x, idx, seeds[k + 1])
            out[name] = codes.view(t[name].shape)
        else:
            out[name] = encode_state(fmt.state, x, index, seeds[k + 1])
    return out


def step_seeds(step: float, uid: int) -> list[int]:
    """Seeds of the four rounding streams of one tensor (or bucket) at one step."""
    return [mix_seed(step, uid, k) for k in range(4)]


def needs_index(fmt: Formats) -> bool:
    return fmt.param in ("sr", "kahan") or fmt.state in ("bf16", "8bit")


def _index_and_seed(it: Item):
    if not needs_index(it.fmt):
        return None, step_seeds(it.step, it.uid)
    p = it.t["param"]
    index = torch.arange(it.offset, it.offset + p.numel(), device=p.device).view(p.shape)
    return index, step_seeds(it.step, it.uid)


def _write_back(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy new values into storage, one multi-tensor copy per (device, dtype) pair."""
    by_kind: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for dst, src in pairs:
        d, s = by_kind[(dst.device, dst.dtype, src.dtype)]
        d.append(dst)
        s.append(src)
    for d, s in by_kind.values():
        torch._foreach_copy_(d, s)


def run_reference(items: list[Item], scalars_of: Callable[[float], Scalars], flags: Flags) -> None:
    """The spec: one parameter at a time, out-of-place math, results copied back into storage.

    ``copy_`` writes through any strides, so non-contiguous parameters and gradients whose strides
    differ from the parameter's are updated element by element correctly.
    """
    for it in items:
        cdt = compute_dtype(it.t["param"].dtype)
        p, g, m, v, vmax = decode_all(it.fmt, it.t, flags.amsgrad, cdt)
        new = adam_update(p, g, m, v, vmax, scalars_of(it.step), flags)
        index, seeds = _index_and_seed(it)
        out = encode_all(it.fmt, it.t, [new[0], *new[1 : 3 + flags.amsgrad]], flags.amsgrad, index, seeds)
        for name, value in out.items():
            it.t[name].copy_(value)


# foreach works out of place, one temporary list per operator: processing at most this many
# elements at a time keeps those temporaries in cache instead of streaming them through memory.
FOREACH_CHUNK = 1 << 16
FOREACH_BATCH = 1 << 20


def _chunks(it: Item) -> list[Item]:
    """Views of a large contiguous parameter's tensors, FOREACH_CHUNK elements at a time. Element
    positions (``offset``) are kept, so stochastic rounding draws the same bits as the reference."""
    n = it.t["param"].numel()
    if n <= FOREACH_CHUNK or it.fmt.state == "8bit" or not all(v.is_contiguous() for v in it.t.values()):
        return [it]
    flat = {k: v.view(-1) for k, v in it.t.items()}
    return [
        Item({k: v[a : a + FOREACH_CHUNK] for k, v in flat.items()}, it.fmt, it.step, it.uid, a)
        for a in range(0, n, FOREACH_CHUNK)
    ]


def run_foreach(items: list[Item], scalars_of: Callable[[float], Scalars], flags: Flags) -> None:
    """The same math over lists: one ``torch._foreach_*`` kernel per operator per batch; decode
    and encode run per tensor (they are no-ops for fp32 storage).

    Batches share device, dtypes, formats and step number, so every scalar is one Python float.
    """
    buckets: dict[tuple, list[Item]] = defaultdict(list)
    for it in items:
        key = (it.t["param"].device, it.t["param"].dtype, it.t["exp_avg"].dtype, it.fmt, it.step)
        buckets[key].extend(_chunks(it))
    for (_, pdt, _, fmt, step), its in buckets.items():
        batch, size = [], 0
        for it in its:
            batch.append(it)
            size += it.t["param"].numel()
            if size >= FOREACH_BATCH:
                _foreach_batch(batch, fmt, compute_dtype(pdt), scalars_of(step), flags)
                batch, size = [], 0
        if batch:
            _foreach_batch(batch, fmt, compute_dtype(pdt), scalars_of(step), flags)


def _foreach_batch(its: list[Item], fmt: Formats, cdt: torch.dtype, s: Scalars, flags: Flags) -> None:
    cols = list(zip(*(decode_all(fmt, it.t, flags.amsgrad, cdt) for it in its)))
    vals = [TensorList(list(c)) if c[0] is not None else None for c in cols]
    p, m, v, vmax = adam_update(*vals, s, flags)
    news = [p.ts, m.ts, v.ts] + ([vmax.ts] if flags.amsgrad else [])
    pairs = []
    for i, it in enumerate(its):
        index, seeds = _index_and_seed(it)
        out = encode_all(fmt, it.t, [n[i] for n in news], flags.amsgrad, index, seeds)
        pairs += [(it.t[name], value) for name, value in out.items()]
    _write_back(pairs)


RUNNERS = {"reference": run_reference, "foreach": run_foreach}
