r"""StableAdamW: AdamW with AdaFactor's update clipping per tensor (Wortsman et al., "Stable and
low-precision training for large-scale vision-language models", NeurIPS 2023), as optimi's
``StableAdamW`` computes it (the optimizer ModernBERT trained with).

.. math::
   \hat\beta_i = \frac{\beta_i^t - \beta_i}{\beta_i^t - 1},\quad
   m \leftarrow \hat\beta_1 m + (1-\hat\beta_1) g,\quad
   v \leftarrow \hat\beta_2 v + (1-\hat\beta_2) g^2,\quad
   \gamma_t = \frac{\gamma}{\max\big(1, \sqrt{\mathrm{mean}(g^2 / \max(v, \epsilon^2))}\big)}

then :math:`\theta \leftarrow \theta(1 - \gamma_t\lambda) - \gamma_t m / (\sqrt v + \epsilon)`
(``decouple_lr``: :math:`1 - \frac{\gamma_t}{\gamma_{max}}\lambda`). The debiased betas keep m and
v bias-corrected as they are stored. The RMS is a reduction over each tensor (over the whole
tensor under FSDP2), so the step runs one tensor at a time on every backend.

Low precision: adamkit's Kahan summation carries the whole update, the weight decay included,
through the compensation; optimi multiplies a bf16 parameter by the decay factor directly (rounded
to bf16 at every step) and compensates only the Adam term, so a decay smaller than half a bf16 ulp
of the weight is lost there and kept here (the Kahan recipes' float64 checks hold adamkit to it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot, caution
from .base import Optimizer
from .options import (
    check_betas,
    check_bools,
    check_max_lr,
    check_nonneg,
    default_max_lr,
    loaded_max_lr,
    refuse_skip_nonfinite,
    switches,
)


class Scalars(NamedTuple):
    grad_sign: Any
    beta1_comp: Any  # 1 - beta1_hat
    beta2_hat: Any
    beta2_comp: Any
    eps: Any
    eps_sq: Any
    lr: Any
    decay_rate: Any  # wd (decoupled) or wd / max_lr (fully decoupled): the decay is lr_t * this


def check(group: dict) -> dict:
    lr, eps = check_nonneg("lr", group["lr"]), check_nonneg("eps", group["eps"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    b1, b2 = check_betas(group["betas"])
    refuse_skip_nonfinite(group, "StableAdamW")
    check_bools(group, ("cautious",))
    max_lr = check_max_lr(group)
    full = bool(group.get("decouple_lr", False))
    return dict(lr=lr, eps=eps, beta1=b1, beta2=b2, decay_rate=wd / max_lr if full else wd)


def flags(group: dict, hp: dict) -> Flags:
    return Flags(
        "decoupled" if hp["decay_rate"] else "none", group["maximize"], options=switches(group, "cautious")
    )


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    def hat(b):  # beta * (1 - beta^(t-1)) / (1 - beta^t), optimi's debias_beta
        return (b**step - b) / (b**step - 1)

    b1, b2 = hat(hp["beta1"]), hat(hp["beta2"])
    eps = hp["eps"]
    return Scalars(
        -1.0 if f.maximize else 1.0, 1 - b1, b2, 1 - b2, eps, eps * eps, hp["lr"], hp["decay_rate"]
    )


def stable_adamw_update(p, g, slots: list, s: Scalars, f: Flags):
    m = slots[0].lerp(g, s.beta1_comp)
    v = slots[1] * s.beta2_hat + (g * g) * s.beta2_comp
    rms = (g * g / torch.clamp_min(v, s.eps_sq)).mean().sqrt()  # the whole tensor's (DTensor: global)
    lr = s.lr / torch.clamp_min(rms, 1.0)
    if f.wd_mode == "decoupled":
        p = p * (1 - lr * s.decay_rate)
    return p - lr * caution(m, g, f) / (v.sqrt() + s.eps), [m, v]


STABLE_ADAMW = Algorithm(
    name="StableAdamW",
    slots=(Slot("exp_avg", signed=True), Slot("exp_avg_sq", signed=False)),  # 4 + 4 B/param fp32
    check=check,
    flags=flags,
    scalars=scalars,
    update=stable_adamw_update,
    scalar_type=Scalars,
    elementwise=False,  # the per-tensor RMS
    no_accumulation="its update is clipped by each micro-batch's own RMS",
)


class StableAdamW(Optimizer):
    r"""StableAdamW (see the module docstring); optimi's signature and defaults.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma`. Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`. Default (0.9, 0.99).
        weight_decay: :math:`\lambda`, decoupled, scaled by the clipped lr. Default 1e-2.
        eps: :math:`\epsilon`. Default 1e-6.
        decouple_lr: fully decoupled decay, :math:`1 - \frac{\gamma_t}{\gamma_{max}}\lambda`.
        max_lr: :math:`\gamma_{max}`; defaults to the group's initial lr.
        cautious: the cautious mask on m against g, before the RMS clipping (which reads g and v
            only); see ``adamkit.algorithm.caution``. Default False.
        {engine_options}
        Here: every backend runs it per tensor (its RMS is a reduction); ``skip_nonfinite`` is refused.

    State per parameter: ``step``, ``exp_avg`` m and ``exp_avg_sq`` v (bias-corrected as stored).
    """

    algorithm = STABLE_ADAMW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, *,
                 decouple_lr: bool = False, max_lr: float | None = None, cautious: bool = False,
                 **engine: Any):  # fmt: skip
        hyper = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
        super().__init__(
            params, dict(hyper, decouple_lr=decouple_lr, max_lr=max_lr, cautious=cautious), **engine
        )

    def _prepare_group(self, group: dict) -> None:
        default_max_lr(group)

    def _loaded_group(self, group: dict) -> None:
        loaded_max_lr(group)

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "weight_decay", "eps")
