"""How every backend composes a step: ``decode`` (storage -> compute dtype), the algorithm's update
(``apply_update``: the engine's part around it), ``encode`` (compute dtype -> storage).
``decode_all`` and ``encode_all`` are the one place that composes them; the reference and foreach
backends and the compiled kernel call them, and the native kernel does the same in C.

Every runner shares one signature, ``run(alg, items, scalars_of, flags)``, where ``items`` are
:class:`Item` (one parameter with its gradient and stored state; step counters already
incremented) and ``scalars_of(step)`` gives the algorithm's scalars for a step number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..algorithm import Algorithm, Flags, where
from ..storage import quant8
from ..storage.formats import (
    Formats,
    decode_param,
    decode_state,
    encode_param,
    encode_state,
    mix_seed,
    param_aux_key,
)


@dataclass
class Item:
    """One parameter's share of a step: what a backend reads and writes for it.

    ``t`` maps names to stored tensors: ``param``, ``grad``, each state slot, the 8-bit scales
    (``<slot>_scale``) and the parameter's ``kahan_comp``/``kahan_comp8``/``master_weight``. They
    are the tensors where they lie (for a DTensor parameter: its local shard and its state's local shards).
    """

    t: dict[str, torch.Tensor]
    fmt: Formats
    step: float  # the step number of this update (1-based)
    uid: int  # a stable id of the parameter in its optimizer: seeds its rounding streams
    # position of t's first element in its whole parameter (a DTensor's local shard, a chunk of a
    # large tensor): element i is rounded with the bits of position offset + i
    offset: int = 0
    # a sharded DTensor parameter whose algorithm reduces over the tensor (LAMB's norms, Muon's
    # orthogonalization, Adafactor's means): {"param" or a slot name: (mesh, placements, shape,
    # stride)}. Its update then runs on DTensors made of the decoded local shards, so each
    # reduction covers the whole tensor (torch.distributed's own collectives); decoding and
    # encoding stay local.
    spec: dict | None = None


def decode_all(alg: Algorithm, fmt: Formats, t: dict, flags: Flags, cdt: torch.dtype):
    """Stored tensors -> compute-dtype (p, g, [slot values])."""
    p = t["param"]
    aux = param_aux_key(fmt.param)
    slots = []
    for slot in alg.active_slots(flags):
        shape = slot.shape_for(p.shape)
        if shape is None:  # not kept for a parameter of this shape (Slot.shape)
            slots.append(None)
        elif fmt.state == "8bit" and t[slot.name].dtype == torch.uint8:  # else fp32 (slot_format)
            name = slot.name
            codes = t[name]  # 2-D: rows (quant8), 1-D: flat
            slots.append(quant8.decode(slot.signed, codes, t[name + "_scale"], shape, cdt, codes.dim() == 2))
        else:
            slots.append(decode_state(fmt.state, t[slot.name], cdt))
    return decode_param(fmt.param, p, t.get(aux), cdt), t["grad"].to(cdt), slots


def encode_all(alg: Algorithm, fmt: Formats, t: dict, p, slots, flags: Flags, index, seeds, offset: int = 0):
    """Compute-dtype (p, slots) -> {name: new stored value} for every tensor that changes.

    ``index`` is each element's position (for stochastic rounding), ``seeds`` one independent
    32-bit seed per stream (the parameter, then each slot) of this tensor and step; ``offset`` the
    position of ``p``'s first element in its whole parameter (``Item.offset``), from which a slot
    of its own shape that follows the rows numbers its elements.
    """
    out: dict[str, torch.Tensor] = {}
    out["param"], aux = encode_param(fmt.param, p, t["param"].dtype, index, seeds[0])
    if aux is not None:
        out[param_aux_key(fmt.param)] = aux
    for k, (slot, x) in enumerate(zip(alg.active_slots(flags), slots)):
        name = slot.name
        if x is None:  # not kept for this parameter's shape
            continue
        idx = index
        if index is not None and slot.shape is not None:
            # a slot of its own shape (Slot.shape) numbers its own elements for stochastic rounding,
            # even where its shape happens to be the parameter's local one (a whole-tensor slot of
            # a one-element shard); one that follows the parameter's rows (a shard of them under
            # FSDP2) starts at its first row's position, so the rounding does not depend on the
            # world size
            start = 0
            if offset and slot.follows_rows(p.shape) and p.numel() and x.dim() >= 1:
                start = offset // (p.numel() // p.shape[0]) * (x.numel() // x.shape[0])
            idx = torch.arange(start, start + x.numel(), device=x.device).view(x.shape)
        sf = fmt.state
        if slot.weights:  # a copy of the weights: the parameter's full precision (slot_format)
            sf = "fp64" if t["param"].dtype == torch.float64 else "fp32"
        if sf == "8bit" and t[name].dtype != torch.uint8:
            # a sharded parameter's statistics of their own shape keep fp32 (optim.layout.slot_format)
            out[name] = encode_state("fp32", x, idx, seeds[k + 1])
        elif sf == "8bit" and t[name].dim() == 2:
            # rows (quant8): x has the parameter's (local) shape, idx its elements' positions;
            # each row's padding continues its row's numbering
            codes, scales = quant8.encode(slot.signed, x, idx, seeds[k + 1], rows=True)
            out[name], out[name + "_scale"] = codes, scales.view(t[name + "_scale"].shape)
        elif sf == "8bit":
            # the compiled kernel passes (groups, 32) values with their indices; per tensor,
            # encode pads to whole blocks and numbers the padded elements itself
            blocked = x.dim() == 2 and x.shape[1] == quant8.BLOCK
            idx = idx if blocked and idx is not None and idx.shape == x.shape else None
            codes, out[name + "_scale"] = quant8.encode(slot.signed, x, idx, seeds[k + 1])
            out[name] = codes.view(t[name].shape)
        else:
            out[name] = encode_state(sf, x, idx, seeds[k + 1])
    if fmt.state == "8bit":  # no small v rounded to zero beside a non-zero m (quant8)
        quant8.floor_pairs(out, alg.active_slots(flags), t["param"].shape)
    return out


def step_seeds(step: float, uid: int, n: int = 4, first: int = 0) -> list[int]:
    """Seeds of the rounding streams ``first``.. of one tensor at one step (the native kernel
    derives the same ones in C: ``mix_seed`` there)."""
    return [mix_seed(step, uid, first + k) for k in range(n)]


def needs_index(fmt: Formats) -> bool:
    return fmt.param in ("sr", "kahan", "kahan8") or fmt.state in ("bf16", "8bit")


# streams per tensor on the per-tensor backends: the parameter and up to 7 slots (CAME has 6); the
# first 4 are the native kernel's and the compiled kernel's (same values: mix_seed(step, uid, k))
N_STREAMS = 8


def index_and_seeds(it: Item, first: int = 0):
    """Each element's position in its whole parameter (where rounding needs it) and the tensor's
    stream seeds (from stream ``first``)."""
    seeds = step_seeds(it.step, it.uid, N_STREAMS, first)
    if not needs_index(it.fmt):
        return None, seeds
    p = it.t["param"]
    return torch.arange(it.offset, it.offset + p.numel(), device=p.device).view(p.shape), seeds


def whole_dtensor(x, spec):
    """A decoded local shard (None: an absent slot) as the DTensor it is a shard of."""
    if x is None:
        return None
    from torch.distributed.tensor import DTensor  # a spec exists only where DTensors do

    mesh, placements, shape, stride = spec
    return DTensor.from_local(x, mesh, placements, run_check=False, shape=shape, stride=stride)


def local_shard(x, spec):
    """An update's result back to this rank's shard in its stored placement (a reduction's partial
    sums are all-reduced here, a result on a replicated slot is whole on every rank)."""
    if not hasattr(x, "device_mesh"):
        return x
    return x.redistribute(spec[0], spec[1]).to_local()


def apply_update(alg: Algorithm, p, g, slots: list, s: Any, f: Flags):
    """The engine's part of every update, around the algorithm's: with ``skip_nonfinite`` an element
    whose gradient is inf/nan keeps its old parameter and state (the rest of its tensor and block
    step normally); ``maximize`` flips the gradient's sign. Returns (p, slots)."""
    if f.skip_nonfinite:
        ok = g.isfinite()
        np_, ns = apply_update(alg, p, where(ok, g, 0.0), slots, s, f._replace(skip_nonfinite=False))
        return where(ok, np_, p), [where(ok, n, o) for n, o in zip(ns, slots)]
    if f.maximize is None:
        g = g * s.grad_sign
    elif f.maximize:
        g = -g
    return alg.update(p, g, slots, s, f)
