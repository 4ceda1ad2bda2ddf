r"""AdEMAMix: Adam with a second, slow momentum (Pagliardini et al., "The AdEMAMix Optimizer:
Better, Faster, Older", ICLR 2025).

.. math::
   m_1 \leftarrow \beta_1 m_1 + (1-\beta_1) g,\quad
   m_2 \leftarrow \beta_3(t) m_2 + (1-\beta_3(t)) g,\quad
   v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
   \theta \leftarrow \theta - \gamma\Big(\frac{m_1/(1-\beta_1^t) + \alpha(t) m_2}
   {\sqrt{v/(1-\beta_2^t)} + \epsilon} + \lambda\theta\Big)

with the warmups of ``t_alpha_beta3`` (T): :math:`\alpha(t) = \min(t\alpha/T, \alpha)` and
:math:`\beta_3(t) = \min\big(\exp\frac{\ln\beta_1 \ln\beta_3}{(1-t/T)\ln\beta_3 + (t/T)\ln\beta_1},
\beta_3\big)`. Decay decoupled as in the paper (``decouple=False``: L2, pytorch_optimizer's default).
Three slots: m1, v and the slow m2 (12 B/param in fp32; ~3.05 in 8 bit).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ..algorithm import Algorithm, Flags, Slot, caution
from ..ieee import div_rn, fma_rn, lerp_rn, sqrt_rn
from .adam import weight_decay
from .base import Optimizer
from .options import as_float, check_bools, check_nonneg, switches


class Scalars(NamedTuple):
    """Per step; the native kernel takes them in this order (kernel.c, E_*)."""

    grad_sign: Any
    l2: Any
    decay: Any  # 1 - lr * wd
    one_minus_beta1: Any
    beta2: Any
    one_minus_beta2: Any
    one_minus_beta3: Any  # 1 - beta3(t)
    eps: Any
    bc1: Any  # 1 - beta1^t
    bc2_sqrt: Any  # sqrt(1 - beta2^t)
    alpha: Any  # alpha(t)
    lr: Any


def check(group: dict) -> dict:
    lr, eps = check_nonneg("lr", group["lr"]), check_nonneg("eps", group["eps"])
    wd, alpha = check_nonneg("weight_decay", group["weight_decay"]), check_nonneg("alpha", group["alpha"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise ValueError(f"Invalid betas: {betas!r}; AdEMAMix takes (beta1, beta2, beta3)")
    b1, b2, b3 = (as_float("betas", b) for b in betas)
    if not all(0.0 <= b < 1.0 for b in (b1, b2, b3)):
        raise ValueError(f"Invalid betas: {betas!r}; each must be in [0, 1)")
    t = group["t_alpha_beta3"]
    t = None if t is None else check_nonneg("t_alpha_beta3", t)
    if t and not (b1 > 0 and b3 > 0):
        raise ValueError(
            f"t_alpha_beta3 warms beta3 up from beta1 in log space: beta1 and beta3 must be > 0, "
            f"got {betas!r}"
        )
    check_bools(group, ("decouple", "cautious"))
    mode = "none" if not wd else ("decoupled" if group["decouple"] else "l2")
    return dict(lr=lr, eps=eps, weight_decay=wd, alpha=alpha, beta1=b1, beta2=b2, beta3=b3, t=t, wd_mode=mode)


def flags(group: dict, hp: dict) -> Flags:
    return Flags(hp["wd_mode"], group["maximize"], group["skip_nonfinite"], switches(group, "cautious"))


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    lr, wd, b1, b2, b3, T = (hp[k] for k in ("lr", "weight_decay", "beta1", "beta2", "beta3", "t"))
    alpha = hp["alpha"] if not T else min(step * hp["alpha"] / T, hp["alpha"])
    if T:  # the slow momentum's half-life grows from beta1's to beta3's
        lb1, lb3 = math.log(b1), math.log(b3)
        b3 = min(math.exp(lb1 * lb3 / ((1.0 - step / T) * lb3 + (step / T) * lb1)), b3)
    l2, decay = (wd, 1.0) if hp["wd_mode"] == "l2" else (0.0, 1.0 - lr * wd)
    return Scalars(-1.0 if f.maximize else 1.0, l2, decay, 1.0 - b1, b2, 1.0 - b2, 1.0 - b3, hp["eps"],
                   1.0 - b1**step, math.sqrt(1.0 - b2**step), alpha, lr)  # fmt: skip


def ademamix_update(p, g, slots: list, s: Scalars, f: Flags):
    m1, v, m2 = slots
    p, g = weight_decay(p, g, s, f)
    m1, m2 = lerp_rn(m1, g, s.one_minus_beta1), lerp_rn(m2, g, s.one_minus_beta3)
    v = v * s.beta2 + (g * g) * s.one_minus_beta2
    u = fma_rn(m2, s.alpha, div_rn(caution(m1, g, f), s.bc1))  # m1 / (1 - beta1^t) + alpha m2
    return p - div_rn(u, div_rn(sqrt_rn(v), s.bc2_sqrt) + s.eps) * s.lr, [m1, v, m2]


ADEMAMIX = Algorithm(
    name="AdEMAMix",
    slots=(
        Slot("exp_avg", signed=True),  # m1: 4 B/param fp32, 2 bf16, 1 + 2/32 8-bit
        Slot("exp_avg_sq", signed=False),  # v: the same
        Slot("exp_avg_slow", signed=True),  # m2, the slow momentum: the same
    ),
    check=check,
    flags=flags,
    scalars=scalars,
    update=ademamix_update,
    scalar_type=Scalars,
    native="ademamix",
    no_accumulation="its folded slow momentum would need the window's own beta3 schedule",
)


class AdEMAMix(Optimizer):
    r"""AdEMAMix (see the module docstring); pytorch_optimizer's signature and defaults, the paper's
    decoupled decay.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma`. Default 1e-3.
        betas: :math:`(\beta_1, \beta_2, \beta_3)`. Default (0.9, 0.999, 0.9999).
        weight_decay: :math:`\lambda`. Default 0.
        alpha: the slow momentum's weight :math:`\alpha`. Default 5.
        t_alpha_beta3: T, the warmup of :math:`\alpha` and :math:`\beta_3`; None: none. Default None.
        eps: :math:`\epsilon`. Default 1e-8.
        decouple: decoupled decay (default True, the paper's); ``weight_decouple`` is the same.
        cautious: the cautious mask on the fast momentum m1 against g, equal to pytorch_optimizer's
            ``AdEMAMix(cautious=True)`` (see ``adamkit.algorithm.caution``).
        {engine_options}

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_slow`` (4 B/param each in fp32).
    """

    algorithm = ADEMAMIX

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), weight_decay=0.0, alpha=5.0,
                 t_alpha_beta3=None, eps=1e-8, *, decouple: bool = True, weight_decouple: bool | None = None,
                 cautious: bool = False, **engine: Any):  # fmt: skip
        decouple = decouple if weight_decouple is None else weight_decouple
        hyper = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, alpha=alpha, eps=eps)
        super().__init__(
            params, dict(hyper, t_alpha_beta3=t_alpha_beta3, decouple=decouple, cautious=cautious), **engine
        )

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "weight_decay", "alpha", "eps")
