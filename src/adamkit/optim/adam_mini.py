r"""Adam-mini: one second moment per block (Zhang et al., "Adam-mini: Use Fewer Learning Rates To
Gain More", 2024, arXiv 2406.16793).

Partition (adamkit's, shape-based, no parameter names): a parameter of :math:`\ge 2` dimensions
has one block per output row (``p[i]``: an output neuron of a Linear weight, a token's row of an
embedding, an output channel of a convolution); a vector or scalar (bias, norm weight) is one
block. The paper further splits query/key weights by head; here they are split by row, which is
finer (more learning rates), never coarser.

.. math::
   \begin{aligned}
     &\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
     &m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t \\
     &v_{t,b} = \beta_2 v_{t-1,b} + (1-\beta_2)\,\mathrm{mean}_{i \in b}(g_{t,i}^2)
        \quad\text{(one value per block } b) \\
     &\theta_t = \theta_{t-1} - \gamma\,\frac{m_t / (1-\beta_1^t)}{\sqrt{v_{t,b} / (1-\beta_2^t)} + \epsilon}
   \end{aligned}

State: ``exp_avg`` m (4 B/param fp32), ``exp_avg_sq`` v of shape ``(rows, 1, ...)`` for matrices,
``(1,)``/``()`` for vectors/scalars: a few bytes per row, so about 4 B/param in all (Adam's 8).
The block means are reductions: Adam-mini runs one tensor at a time (reference loop).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot
from .base import Optimizer
from .options import check_betas, check_nonneg, refuse_skip_nonfinite


def block_shape(s: tuple) -> tuple:
    """v's shape for a parameter of shape ``s``: one value per output row, one per vector."""
    return (s[0],) + (1,) * (len(s) - 1) if len(s) >= 2 else (1,) * len(s)


class Scalars(NamedTuple):
    grad_sign: Any
    decay: Any  # 1 - lr * weight_decay
    beta1: Any
    beta2: Any
    eps: Any
    step_size: Any  # lr / (1 - beta1^t)
    bc2_sqrt: Any  # sqrt(1 - beta2^t)


def check(group: dict) -> dict:
    lr = check_nonneg("lr", group["lr"])
    eps = check_nonneg("eps", group["eps"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    b1, b2 = check_betas(group["betas"])
    refuse_skip_nonfinite(group, "AdamMini")
    return dict(lr=lr, eps=eps, weight_decay=wd, beta1=b1, beta2=b2)


def flags(group: dict, hp: dict) -> Flags:
    return Flags("decoupled" if hp["weight_decay"] else "none", maximize=group["maximize"])


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
    return Scalars(
        -1.0 if f.maximize else 1.0, 1.0 - lr * hp["weight_decay"], b1, b2, hp["eps"],
        lr / (1 - b1**step), (1 - b2**step) ** 0.5,
    )  # fmt: skip


def adam_mini_update(p, g, slots: list, s: Scalars, f: Flags):
    m, v = slots
    if f.wd_mode == "decoupled":
        p = p * s.decay
    m = m * s.beta1 + g * (1 - s.beta1)
    g2 = g * g
    mean = g2.reshape(g.shape[0], -1).mean(dim=1).view(v.shape) if g.dim() >= 2 else g2.mean().view(v.shape)
    v = v * s.beta2 + mean * (1 - s.beta2)
    return p - (m / (v.sqrt() / s.bc2_sqrt + s.eps)) * s.step_size, [m, v]


ADAM_MINI = Algorithm(
    name="AdamMini",
    slots=(
        Slot("exp_avg", signed=True),
        Slot("exp_avg_sq", signed=False, shape=block_shape, rows=lambda s: len(s) >= 2),
    ),
    check=check,
    flags=flags,
    scalars=scalars,
    update=adam_mini_update,
    scalar_type=Scalars,
    elementwise=False,
)


class AdamMini(Optimizer):
    r"""Adam-mini (see the module docstring for the partition and the update).

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma`. Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`. Default (0.9, 0.999).
        eps: :math:`\epsilon`. Default 1e-8.
        weight_decay: :math:`\lambda`, decoupled (AdamW's). Default 0.
        {engine_options}
        Here: every backend runs it per tensor; with gradient release each tensor is stepped in its
            own hook, which suits its per-tensor statistics.

    Example:
        >>> opt = adamkit.AdamMini(model.parameters(), lr=1e-3, weight_decay=0.1)
    """

    algorithm = ADAM_MINI

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
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
