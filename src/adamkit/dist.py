"""DTensor helpers: what the engine needs to know about a tensor that torch.distributed shards
(FSDP2's parameters and the optimizer state placed like them). The kernels work on each rank's
local shard; these say which shard that is and where its elements sit in the whole tensor."""

from __future__ import annotations

import math


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def is_sharded(t) -> bool:
    """Whether a DTensor is split between ranks (a Shard placement on a mesh dimension of more than
    one rank); the answer is the same on every rank, whatever its local shard holds."""
    if not is_dtensor(t):
        return False
    mesh = t.device_mesh
    return any(pl.is_shard() and mesh.size(i) > 1 for i, pl in enumerate(t.placements))


def rows_whole(t) -> bool:
    """Whether each rank holds whole rows (dim-0 slices) of DTensor ``t``, contiguous in the whole
    tensor: every placement is Shard(0) or Replicate (FSDP2's and DDP-like placements)."""
    return all(pl.is_replicate() or (type(pl).__name__ == "Shard" and pl.dim == 0) for pl in t.placements)


def global_offset(t) -> int:
    """The position in the whole tensor (row-major) of the first element of ``t``'s local shard:
    0 for a plain tensor. Rounding bits are drawn from (step, tensor id, this + local index), so
    they do not depend on how the tensor is split between ranks. For placements whose local
    elements are not one contiguous range of the whole tensor (sharded along another dim) it is 0:
    there, rounding follows the local shard."""
    if not is_dtensor(t) or t.dim() == 0 or not rows_whole(t):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[0]) * math.prod(t.shape[1:])


def local(t):
    """The tensor the kernel reads: a DTensor's local shard, else the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t
