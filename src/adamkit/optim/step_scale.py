"""The step's gradient multiplier: the global norm ``clip_grad_norm_`` computes, and its clipping
coefficient (folded into the scalar every kernel multiplies the gradient by)."""

from __future__ import annotations

from collections import defaultdict

import torch

from .. import dist


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads``, computed as ``torch.nn.utils.clip_grad_norm_`` computes it
    (a foreach norm per device and dtype, then the norm of the norms), in fp32 (fp64 if any gradient
    is fp64) so that bf16/fp16 gradients, loss-scaled ones included, do not overflow their dtype."""
    out_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_kind[(g.device, g.dtype)].append(g)
    norms = []
    for (_, dtype), gs in by_kind.items():
        want = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        norms.extend(torch._foreach_norm(gs, 2.0, dtype=want))
    device = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device, out_dtype) for n in norms]), 2.0)
    if dist.is_dtensor(total):  # FSDP2: the norms of the local shards, reduced
        total = total.full_tensor()
    return total


def clip_coef(max_norm: float, norm: torch.Tensor) -> float:
    """``min(1, max_norm / (norm + 1e-6))`` as clip_grad_norm_ computes it (in the norm's dtype)."""
    return float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
