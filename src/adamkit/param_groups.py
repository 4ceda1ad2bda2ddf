"""Parameter groups without weight decay for biases and normalization gains.

Decaying a bias or a LayerNorm/RMSNorm gain toward zero only fights the layer's own scale and
offset; GPT-2, nanoGPT, timm and optimi all leave them undecayed. The rule used here is theirs:
every parameter with fewer than two dimensions (biases, norm gains, scalars) and every parameter
whose name ends in ``.bias`` goes to a group with ``weight_decay=0``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, skip: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Two parameter groups for any optimizer: ``weight_decay`` on matrices, 0 on the rest.

    Args:
        model: the module whose trainable parameters are grouped (frozen ones are left out; a
            parameter shared between modules appears once).
        weight_decay: the decay of the first group.
        skip: more parameters to leave undecayed, by name as ``model.named_parameters()`` gives
            it (``"pos.weight"``) or by the name of a module that holds them (``"pos"``, ``"blocks.0"``),
            e.g. embeddings.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]``,
        without a group that would be empty.

    Example:
        >>> opt = adamkit.AdamW(param_groups_weight_decay(model, 0.1, skip=["tok"]), lr=3e-4)
    """
    skip = tuple(skip)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skipped = any(name == s or name.startswith(s + ".") for s in skip)
        (no_decay if p.dim() < 2 or name.endswith(".bias") or skipped else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
