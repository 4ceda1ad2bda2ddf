r"""LAMB: layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes", ICLR 2020, arXiv 1904.00962).

.. math::
   \begin{aligned}
     &m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
     &r_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon} + \lambda\theta_{t-1} \\
     &\phi_t = \begin{cases} \|\theta_{t-1}\|_2 / \|r_t\|_2 & \text{both norms} > 0 \\
                             1 & \text{otherwise} \end{cases} \quad\text{(per tensor)} \\
     &\theta_t = \theta_{t-1} - \gamma\,\phi_t\, r_t
   \end{aligned}

State: ``exp_avg`` m and ``exp_avg_sq`` v, 4 B/param each in fp32 (Adam's). The trust ratio is a
per-tensor reduction: LAMB runs one tensor at a time (reference loop) on every backend; its norms
are the norms of the rows' norms, so that FSDP2 shards (whole rows) give the bits of one process at
every world size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot
from .base import Optimizer
from .options import check_betas, check_nonneg, refuse_skip_nonfinite


class Scalars(NamedTuple):
    grad_sign: Any
    lr: Any
    beta1: Any
    beta2: Any
    eps: Any
    weight_decay: Any
    bc1: Any  # 1 - beta1^t
    bc2: Any  # 1 - beta2^t


def check(group: dict) -> dict:
    lr = check_nonneg("lr", group["lr"])
    eps = check_nonneg("eps", group["eps"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    b1, b2 = check_betas(group["betas"])
    refuse_skip_nonfinite(group, "Lamb")
    return dict(lr=lr, eps=eps, weight_decay=wd, beta1=b1, beta2=b2)


def flags(group: dict, hp: dict) -> Flags:
    return Flags("l2" if hp["weight_decay"] else "none", maximize=group["maximize"])


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    b1, b2 = hp["beta1"], hp["beta2"]
    return Scalars(
        -1.0 if f.maximize else 1.0,
        hp["lr"],
        b1,
        b2,
        hp["eps"],
        hp["weight_decay"],
        1 - b1**step,
        1 - b2**step,
    )


def _norm(x):
    """||x||_2 reduced in an order that does not depend on how x is sharded: the norm of each row
    (rows are whole on every rank under FSDP2), then the norm of the rows' norms, over the whole
    tensor (one pass over x; a vector is its own rows). On a sharded DTensor the rows' norms (R
    floats) are gathered, so every world size computes the bits of one process (an all-reduce of
    partial norms would add the ranks' parts in another order)."""
    rows = torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x
    if hasattr(rows, "full_tensor"):  # a DTensor: Replicate keeps the rows' order on every rank
        from torch.distributed.tensor import Replicate

        rows = rows.redistribute(rows.device_mesh, [Replicate()] * rows.device_mesh.ndim)
    return torch.linalg.vector_norm(rows)


def lamb_update(p, g, slots: list, s: Scalars, f: Flags):
    m = slots[0] * s.beta1 + g * (1 - s.beta1)
    v = slots[1] * s.beta2 + (g * g) * (1 - s.beta2)
    r = (m / s.bc1) / ((v / s.bc2).sqrt() + s.eps)
    if f.wd_mode == "l2":
        r = r + p * s.weight_decay
    p_norm, r_norm = _norm(p), _norm(r)
    trust = torch.where((p_norm > 0) & (r_norm > 0), p_norm / r_norm, torch.ones_like(p_norm))
    return p - r * (trust * s.lr), [m, v]


LAMB = Algorithm(
    name="Lamb",
    slots=(Slot("exp_avg", signed=True), Slot("exp_avg_sq", signed=False)),
    check=check,
    flags=flags,
    scalars=scalars,
    update=lamb_update,
    scalar_type=Scalars,
    elementwise=False,
)


class Lamb(Optimizer):
    r"""LAMB (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma`. Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`. Default (0.9, 0.999).
        eps: :math:`\epsilon`. Default 1e-6.
        weight_decay: :math:`\lambda`, added to the direction :math:`r_t` (so it is scaled by the
            trust ratio too). Default 0.
        {engine_options}
        Here: every backend runs it per tensor; with gradient release each tensor is stepped in its
            own hook, which suits its per-tensor statistics.

    Example:
        >>> opt = adamkit.Lamb(model.parameters(), lr=1e-3, weight_decay=0.01)
    """

    algorithm = LAMB

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        **engine: Any,
    ):
        super().__init__(
            params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
            **engine,
        )

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "eps", "weight_decay")
