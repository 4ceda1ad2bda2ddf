r"""ADOPT: Adam with the update normalized by the *previous* second moment (Taniguchi et al.,
"ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate", NeurIPS 2024).

.. math::
   v_1 = g_1^2,\quad
   m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\mathrm{clip}\big(g_t / \max(\sqrt{v_{t-1}}, \epsilon),
   \ c_t\big),\quad \theta_t = \theta_{t-1} - \gamma m_t,\quad
   v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

with :math:`c_t = t^{1/4}` (the reference's ``clip_lambda``). The first step only sets v (the
parameter moves by its weight decay alone). Weight decay as pytorch_optimizer's ADOPT: L2 (added
to g) or decoupled (:math:`\theta(1-\gamma\lambda)`). Two slots, m and v, as Adam's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..algorithm import Algorithm, Flags, Slot, caution
from ..ieee import div_rn, fma_rn, lerp_rn, sqrt_rn
from .adam import weight_decay
from .base import Optimizer
from .options import as_float, check_betas, check_bools, check_nonneg, switches


class Scalars(NamedTuple):
    """Per step; the native kernel takes them in this order (kernel.c, D_*)."""

    grad_sign: Any
    l2: Any  # coefficient of p added to g (L2)
    decay: Any  # 1 - lr * wd (decoupled)
    one_minus_beta1: Any  # 0 at the first step: m is kept
    beta2: Any  # 1 at the first step with one_minus_beta2 = 1: v = v + g^2
    one_minus_beta2: Any
    eps: Any
    neg_lr: Any  # -lr; 0 at the first step
    clip: Any  # c_t (inf: no clipping)


def check(group: dict) -> dict:
    lr, eps = check_nonneg("lr", group["lr"]), check_nonneg("eps", group["eps"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    b1, b2 = check_betas(group["betas"])
    check_bools(group, ("decouple", "cautious"))
    c = group["clip_exponent"]
    c = None if c is None else as_float("clip_exponent", c)
    mode = "none" if not wd else ("decoupled" if group["decouple"] else "l2")
    return dict(lr=lr, eps=eps, weight_decay=wd, beta1=b1, beta2=b2, clip_exponent=c, wd_mode=mode)


def flags(group: dict, hp: dict) -> Flags:
    return Flags(hp["wd_mode"], group["maximize"], group["skip_nonfinite"], switches(group, "cautious"))


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    lr, wd, b1, b2, first = hp["lr"], hp["weight_decay"], hp["beta1"], hp["beta2"], step == 1
    clip = float("inf") if hp["clip_exponent"] is None else step ** hp["clip_exponent"]
    l2, decay = (wd, 1.0) if hp["wd_mode"] == "l2" else (0.0, 1.0 - lr * wd)
    sign = -1.0 if f.maximize else 1.0
    if first:  # v = 0 + g^2; m and p keep their values (p decays)
        return Scalars(sign, l2, decay, 0.0, 1.0, 1.0, hp["eps"], 0.0, clip)
    return Scalars(sign, l2, decay, 1.0 - b1, b2, 1.0 - b2, hp["eps"], -lr, clip)


def adopt_update(p, g, slots: list, s: Scalars, f: Flags):
    m, v = slots
    p, g = weight_decay(p, g, s, f)
    n = div_rn(g, sqrt_rn(v).clamp_min(s.eps)).clamp_min(-s.clip).clamp_max(s.clip)
    m = lerp_rn(m, n, s.one_minus_beta1)
    return fma_rn(caution(m, n, f), s.neg_lr, p), [m, v * s.beta2 + (g * g) * s.one_minus_beta2]


ADOPT_ALG = Algorithm(
    name="ADOPT",
    slots=(Slot("exp_avg", signed=True), Slot("exp_avg_sq", signed=False)),  # 4 + 4 B/param fp32
    check=check,
    flags=flags,
    scalars=scalars,
    update=adopt_update,
    scalar_type=Scalars,
    native="adopt",
    no_accumulation="its first step only sets v, and m's input is normalized per micro-batch",
)


class ADOPT(Optimizer):
    r"""ADOPT (see the module docstring); pytorch_optimizer's and the paper's defaults.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma`. Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`. Default (0.9, 0.9999).
        eps: :math:`\epsilon`, the floor of :math:`\sqrt{v}`. Default 1e-6.
        weight_decay: :math:`\lambda`. Default 0.
        decouple: decoupled decay (:math:`\theta(1-\gamma\lambda)`) instead of L2. Default False;
            ``weight_decouple`` (pytorch_optimizer's name) is the same.
        clip_exponent: :math:`c_t = t^{e}`; None: no clipping. Default 0.25 (the reference's
            ``clip_lambda``, kept as a number so that state dicts stay plain data).
        cautious: the cautious mask on m against the normalized gradient, equal to
            pytorch_optimizer's ``ADOPT(cautious=True)`` (see ``adamkit.algorithm.caution``).
        {engine_options}
        Here: a non-finite gradient at the first step makes m nan (the first step's update is the
            general one with its weights at 0), unless ``skip_nonfinite``.

    State per parameter: ``step``, ``exp_avg`` m and ``exp_avg_sq`` v (4 B/param each in fp32).
    """

    algorithm = ADOPT_ALG

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, *,
                 decouple: bool = False, weight_decouple: bool | None = None,
                 clip_exponent: float | None = 0.25, cautious: bool = False, **engine: Any):  # fmt: skip
        decouple = decouple if weight_decouple is None else weight_decouple
        hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple)
        super().__init__(params, dict(hyper, clip_exponent=clip_exponent, cautious=cautious), **engine)

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "eps", "weight_decay")
