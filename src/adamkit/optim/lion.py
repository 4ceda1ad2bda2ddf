r"""Lion: evolved sign momentum (Chen et al., "Symbolic Discovery of Optimization Algorithms",
NeurIPS 2023, arXiv 2302.06675).

.. math::
   \begin{aligned}
     &c_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
     &\theta_t = \theta_{t-1}(1 - \gamma\lambda) - \gamma\,\mathrm{sign}(c_t) \\
     &m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t
   \end{aligned}

One state slot (m: 4 B/param in fp32, half of Adam's). Every update has magnitude ``lr`` per
element, so Lion wants a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger
(the product lr * wd sets the decay per step), as the paper advises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot, caution, where
from .base import Optimizer
from .options import (
    as_float,
    check_betas,
    check_bools,
    check_max_lr,
    check_nonneg,
    default_max_lr,
    loaded_max_lr,
    switches,
    warn_strong_decay,
)


class Scalars(NamedTuple):
    """Per-step scalars; the native kernel takes them in this order (kernel.c, L_*)."""

    grad_sign: Any  # -1 when maximizing
    decay: Any  # 1 - lr * wd
    lr: Any
    beta1: Any
    one_minus_beta1: Any
    beta2: Any
    one_minus_beta2: Any


def check(group: dict) -> dict:
    lr = check_nonneg("lr", group["lr"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    b1, b2 = check_betas(group["betas"])
    max_lr = check_max_lr(group)
    check_bools(group, ("cautious",))
    mode = "none" if not wd else ("full" if group.get("decouple_lr", False) else "decoupled")
    return dict(lr=lr, weight_decay=wd, beta1=b1, beta2=b2, max_lr=max_lr, wd_mode=mode)


def flags(group: dict, hp: dict) -> Flags:
    return Flags(hp["wd_mode"], group["maximize"], group["skip_nonfinite"], switches(group, "cautious"))


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
    rate = lr / hp["max_lr"] if hp["wd_mode"] == "full" else lr  # fully decoupled: lr / max_lr
    return Scalars(
        -1.0 if f.maximize else 1.0, 1.0 - rate * hp["weight_decay"], lr, b1, 1.0 - b1, b2, 1.0 - b2
    )


def lion_update(p, g, slots: list, s: Scalars, f: Flags):
    """One Lion step on compute-dtype values. Returns (p, [m])."""
    m = slots[0]
    c = m * s.beta1 + g * s.one_minus_beta1  # the interpolation whose sign is the update
    if f.wd_mode in ("decoupled", "full", "runtime"):
        p = p * s.decay
    # sign(nan) is nan, as the native kernel computes it: torch.sign(nan) gives 0 on the CPU, which
    # would freeze an element whose gradient went nan (m stays nan) instead of showing the failure
    p = p - caution(where(c.isnan(), c, c.sign()), g, f) * s.lr
    m = m * s.beta2 + g * s.one_minus_beta2
    return p, [m]


LION = Algorithm(
    name="Lion",
    slots=(Slot("exp_avg", signed=True),),  # m: 4 B/param fp32, 2 bf16, 1 + 2/32 8-bit
    check=check,
    flags=flags,
    scalars=scalars,
    update=lion_update,
    scalar_type=Scalars,
    native="lion",  # its body in kernel.c
    uses_step=False,  # no bias correction: lion-pytorch's state dicts (no "step") load
    no_accumulation=(
        "its update needs both the old momentum and the window's mean gradient (c = beta1 m + "
        "(1 - beta1) g, m <- beta2 m + (1 - beta2) g with different betas), which one folded state "
        "cannot hold without a gradient-sized buffer"
    ),
)


class Lion(Optimizer):
    r"""Lion (see the module docstring for the update).

    Args:
        params: parameters or parameter groups (dicts).
        lr: learning rate :math:`\gamma`. Default 1e-4 (Lion's updates are signs: use 3-10x less
            than AdamW's lr).
        betas: :math:`(\beta_1, \beta_2)`: the interpolation whose sign is the update, and the
            momentum's decay. Default (0.9, 0.99).
        weight_decay: :math:`\lambda`, decoupled: :math:`\theta \leftarrow \theta(1-\gamma\lambda)`.
            Default 0.
        decouple_lr: fully decoupled decay, :math:`\theta \leftarrow \theta(1 -
            \frac{\gamma}{\gamma_{max}}\lambda)`: ``weight_decay`` is the fraction removed per step
            at ``max_lr`` (default: the group's initial lr), as :class:`adamkit.AdamW`'s.
        decoupled_weight_decay: lion-pytorch's spelling of the same: ``True`` divides
            ``weight_decay`` by the constructor's ``lr`` (its ``init_lr``), which is
            ``decouple_lr=True, max_lr=lr``; the results equal lion-pytorch's.
        cautious: the cautious mask on :math:`\mathrm{sign}(c_t)` against :math:`g_t`, equal to
            pytorch_optimizer's ``Lion(cautious=True)`` (see ``adamkit.algorithm.caution``).
        use_triton: lion-pytorch's Triton switch: ``False`` is accepted; ``True`` is refused
            (the step runs adamkit's native fused kernel on CPU tensors and ``torch.compile``
            elsewhere, chosen by ``backend``).
        {engine_options}
        accumulation_steps: refused above 1: Lion's update needs both the old momentum and the
            window's mean gradient (:math:`c = \beta_1 m + (1-\beta_1)\bar g`,
            :math:`m \leftarrow \beta_2 m + (1-\beta_2)\bar g`), which one folded state cannot
            hold without a gradient-sized buffer.

    State per parameter: ``step`` and ``exp_avg`` m (4 B/param fp32, 2 bf16, ~1 8-bit).

    Example:
        >>> opt = adamkit.Lion(model.parameters(), lr=1e-4, weight_decay=0.1)
    """

    algorithm = LION

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        decoupled_weight_decay: bool = False,
        use_triton: bool = False,
        cautious: bool = False,
        **engine: Any,
    ):
        if use_triton:
            raise ValueError(
                "use_triton=True (lion-pytorch's Triton kernel) has no counterpart in adamkit.Lion: "
                "its step runs the native fused kernel on CPU tensors and torch.compile elsewhere "
                "(backend='auto'); drop the argument"
            )
        if decoupled_weight_decay:  # lion-pytorch: wd / init_lr, init_lr the constructor's lr
            decouple_lr = True
            max_lr = as_float("lr", lr) if max_lr is None else max_lr
        hyper = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            cautious=cautious,
        )
        super().__init__(params, hyper, **engine)
        warn_strong_decay(self)

    def _prepare_group(self, group: dict) -> None:
        default_max_lr(group)

    def _loaded_group(self, group: dict) -> None:
        loaded_max_lr(group)
