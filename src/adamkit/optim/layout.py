"""Where and how each state tensor lies: its placement beside a DTensor parameter (FSDP2), which
slots are 8-bit and in rows, and the conversions between a Kahan remainder or master copy and the
value it stands for. Shared by lazy state creation, format conversion and checkpoint loading."""

from __future__ import annotations

import math

import torch

from .. import dist
from ..storage import quant8
from ..storage.formats import kahan8_correction, kahan8_value

# the buffers of a low-precision parameter: kahan_comp 2 B/param, kahan_comp8 1, master_weight 4
AUX_KEYS = ("kahan_comp", "kahan_comp8", "master_weight")


def aux_value(p: torch.Tensor, key: str, aux: torch.Tensor) -> torch.Tensor:
    """The fp32 value a low-precision parameter ``p`` holds with its buffer ``key``. ``p`` may have
    been cast to fp32 since (``model.to``): its value is still the bf16 one the units derive from."""
    if key == "kahan_comp8":
        return kahan8_value(p.detach().to(torch.bfloat16), aux)
    if key == "kahan_comp":
        return p.detach().float() + aux.float()
    return aux.float()  # master_weight


def aux_from_value(p: torch.Tensor, key: str, v: torch.Tensor) -> torch.Tensor:
    """The buffer ``key`` that, with ``p`` as it is, holds fp32 value ``v`` as closely as it can: the
    remainder v - p in p's dtype (kahan_comp), in int8 units of ulp(p)/256 rounded to nearest
    (kahan_comp8; within +-127 units), or v itself (master_weight)."""
    v = v.to(torch.float32)
    if key == "kahan_comp8":
        return kahan8_correction(p.detach(), v)
    if key == "kahan_comp":
        return (v - p.detach().float()).to(p.dtype)
    return v.clone()


def slot_spec(slot, p: torch.Tensor) -> tuple:
    """(mesh, placements, global shape, stride) of a DTensor parameter's slot: a slot that follows
    the parameter's rows (``Slot.follows_rows``) is placed like it, others are replicated on the
    mesh dimensions where the parameter is sharded (every rank keeps them whole)."""
    from torch.distributed.tensor import Replicate  # DTensors exist: so does the module

    shape = slot.shape_for(p.shape)
    rows = slot.follows_rows(p.shape)
    placements = tuple(pl if rows or not pl.is_shard() else Replicate() for pl in p.placements)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return p.device_mesh, placements, torch.Size(shape), stride


def slot_format(fmt_state: str, slot, p: torch.Tensor) -> str:
    """One slot's storage format: the parameter's, except that under state_format='8bit' a slot of
    its own shape of a sharded DTensor parameter (Adafactor's and CAME's factored statistics,
    Adam-mini's v) keeps fp32: its own flat 8-bit groups would be cut by the shards, and such
    statistics are rows plus columns, a few bytes per row. Parameter-shaped slots keep 8-bit rows.
    A copy of the weights (``Slot.weights``: Schedule-Free's z) keeps fp32 in every format (fp64
    for fp64 parameters)."""
    if fmt_state == "8bit" and slot.shape is not None and dist.is_sharded(p):
        return "fp32"
    if slot.weights:  # the parameter's full precision
        return "fp64" if p.dtype == torch.float64 else "fp32"
    return fmt_state


def placed_like(t: torch.Tensor, p: torch.Tensor, slot=None) -> torch.Tensor:
    """A loaded state tensor with its parameter's placement. The kernels read the local shards of a
    parameter and its state together, so state saved without sharding (a full checkpoint) or with
    another placement would be read with the wrong length; a full tensor is cut locally (no
    communication), a DTensor of another placement is gathered first (a collective: every rank
    loads). Plain tensors for plain parameters pass through unchanged. ``slot``: a slot of another
    shape than the parameter, placed by ``slot_spec``."""
    if slot is not None and slot.shape is not None and dist.is_dtensor(p):
        mesh, placements, _, _ = slot_spec(slot, p)
        if dist.is_dtensor(t):
            if t.device_mesh == mesh and tuple(t.placements) == placements:
                return t
            t = t.full_tensor()
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t, mesh, placements, src_data_rank=None)
    t_dt, p_dt = dist.is_dtensor(t), dist.is_dtensor(p)
    if not t_dt and not p_dt:
        return t
    if t_dt and p_dt and t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements):
        return t
    if t_dt:
        t = t.full_tensor()
    if p_dt:
        from torch.distributed.tensor import distribute_tensor  # DTensors exist: so does the module

        t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
    return t


def quantizable(p: torch.Tensor, min_8bit_size: int) -> bool:
    """Whether ``p``'s moments are stored in 8 bit under state_format='8bit' (``quant8.layout``,
    from its global shape: a DTensor's ``shape`` is global)."""
    return quant8.layout(p.shape, min_8bit_size, sharded=dist.is_dtensor(p)) is not None


def rows_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Local 8-bit codes or scales of a DTensor parameter as a DTensor placed like it (rows split
    along dim 0 exactly as the parameter's rows); plain tensors pass through."""
    if not dist.is_dtensor(p) or t.dim() != 2:
        return t
    from torch.distributed.tensor import DTensor  # DTensors exist: so does the module

    shape = (p.shape[0], t.shape[1])
    return DTensor.from_local(
        t, p.device_mesh, p.placements, run_check=False, shape=shape, stride=(t.shape[1], 1)
    )


def like_param(x: torch.Tensor, p: torch.Tensor, slot) -> torch.Tensor:
    """A decoded local value of a parameter-shaped slot with its parameter's placement."""
    if not dist.is_dtensor(p) or slot.shape is not None or dist.is_dtensor(x):
        return x
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        x, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def floor8(slots, state: dict, p: torch.Tensor) -> None:
    """After codes of ``p`` were encoded from values (a load, a format conversion; the step's own
    encode does it in ``compose.encode_all``): no v code of 0 beside an m code that is not
    (``quant8.floor_pairs``), on the local codes in place."""
    quant8.floor_pairs({k: dist.local(v) for k, v in state.items()}, slots, dist.local(p).shape)


def encode8(slot, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values (``p``'s local elements, or a slot of its own shape) -> (codes, scales) in the
    slot's layout (rows for parameter-shaped slots of >= 2-D parameters, else flat), rounded with
    the elements' global positions, so a conversion gives the same codes at every world size."""
    rows = slot.shape is None and p.dim() >= 2
    if not rows:
        codes, scales = quant8.encode(slot.signed, x)
        return codes.view(-1), scales
    index = torch.arange(x.numel(), device=x.device).view(x.shape) + dist.global_offset(p)
    codes, scales = quant8.encode(slot.signed, x, index, rows=True)
    return rows_like(codes, p), rows_like(scales, p)
