r"""Adam and AdamW: drop-in replacements for ``torch.optim.Adam`` / ``torch.optim.AdamW``.

References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    Reddi et al., "On the Convergence of Adam and Beyond" (AMSGrad), ICLR 2018.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..algorithm import Accumulation, Algorithm, Flags, Slot, caution
from ..ieee import div_rn, fma_rn, lerp_rn, sqrt_rn
from .base import Optimizer
from .options import (
    check_betas,
    check_bools,
    check_max_lr,
    check_nonneg,
    default_max_lr,
    loaded_max_lr,
    switches,
    warn_strong_decay,
)

# --------------------------------------------------------------------------------------------------
# Weight-decay modes. The names follow the formulas, not the papers' marketing:
#   "l2":        g <- g + wd * p                        (Adam's coupled L2 penalty)
#   "decoupled": p <- p * (1 - lr * wd)                 (AdamW, Loshchilov & Hutter)
#   "full":      p <- p * (1 - (lr / max_lr) * wd)      (fully decoupled: decay independent of lr)
# "none" is used when wd == 0 so that no backend multiplies by 1 or adds 0 * p (which would turn an
# inf parameter into nan, unlike torch). "runtime" (the compiled kernel) applies both the L2 term
# (skipped where l2 = 0) and the decay multiplier (1 where not decoupled) with values from the
# scalars, so one compiled kernel serves every mode.
# --------------------------------------------------------------------------------------------------

SLOTS = (
    Slot("exp_avg", signed=True),  # m: 4 B/param fp32, 2 bf16, 1 + 2/32 8-bit
    Slot("exp_avg_sq", signed=False),  # v: the same
    Slot("max_exp_avg_sq", signed=False, option="amsgrad"),  # max v (AMSGrad only): the same
)


class Scalars(NamedTuple):
    """Per-step scalars, computed on the host in float64 from the group and the step count; the
    native kernel takes them in this order (kernel.c, A_*)."""

    grad_sign: Any  # -1 when maximizing (used where Flags.maximize is None)
    l2: Any  # coefficient of p added to g ("l2" mode)
    decay: Any  # multiplier of p ("decoupled"/"full" modes)
    one_minus_beta1: Any
    beta2: Any
    one_minus_beta2: Any
    eps: Any
    step_size: Any  # lr / (1 - beta1^t)
    bc2_sqrt: Any  # sqrt(1 - beta2^t)


def check(group: dict) -> dict:
    """Validate one group's hyperparameters; returns them as floats. Raises, never mutates."""
    lr = check_nonneg("lr", group["lr"])
    eps = check_nonneg("eps", group["eps"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    b1, b2 = check_betas(group["betas"])
    check_bools(group, ("amsgrad", "decoupled_weight_decay", "cautious"))
    max_lr = check_max_lr(group)
    if wd == 0:
        wd_mode = "none"
    elif group.get("decouple_lr", False):
        wd_mode = "full"
    elif group.get("decoupled_weight_decay", False):
        wd_mode = "decoupled"
    else:
        wd_mode = "l2"
    return dict(
        lr=lr,
        eps=eps,
        weight_decay=wd,
        beta1=b1,
        beta2=b2,
        max_lr=max_lr,
        wd_mode=wd_mode,
        cautious=group.get("cautious", False),
    )


def flags(group: dict, hp: dict) -> Flags:
    return Flags(
        hp["wd_mode"], group["maximize"], group["skip_nonfinite"], switches(group, "amsgrad", "cautious")
    )


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    """Scalars of step number ``step`` (1-based)."""
    lr, wd, mode = hp["lr"], hp["weight_decay"], hp["wd_mode"]
    if mode == "decoupled":
        decay = 1.0 - lr * wd
    elif mode == "full":
        decay = 1.0 - (lr / hp["max_lr"]) * wd
    else:
        decay = 1.0
    return Scalars(
        grad_sign=-1.0 if f.maximize else 1.0,
        l2=wd if mode == "l2" else 0.0,
        decay=decay,
        one_minus_beta1=1.0 - hp["beta1"],
        beta2=hp["beta2"],
        one_minus_beta2=1.0 - hp["beta2"],
        eps=hp["eps"],
        step_size=lr / (1.0 - hp["beta1"] ** step),
        bc2_sqrt=math.sqrt(1.0 - hp["beta2"] ** step),
    )


def weight_decay(p, g, s, f: Flags):
    """Adam's three decay modes, shared by the algorithms whose scalars carry ``l2`` and ``decay``
    (ADOPT, AdEMAMix): L2 as torch adds it (grad.add(p, alpha=wd): one rounding), decoupled on p.
    Returns (p, g)."""
    if f.wd_mode == "l2":
        g = fma_rn(p, s.l2, g)
    elif f.wd_mode == "runtime":  # the compiled kernel: no 0 * p (an inf p would give nan)
        g = torch.where(s.l2 != 0, fma_rn(p, s.l2, g), g)
    if f.wd_mode in ("decoupled", "full", "runtime"):
        p = p * s.decay
    return p, g


def adam_update(p, g, slots: list, s: Scalars, f: Flags):
    """One Adam(W) step on compute-dtype values, in named stages. Returns (p, [m, v(, max v)])."""
    m, v = slots[0], slots[1]
    # Operations rounded once (fma, lerp, sqrt, division) take adamkit.ieee's correctly rounded
    # forms: torch's CPU square root differs between hosts, and this is the spec the native kernel
    # is held to bit for bit.
    p, g = weight_decay(p, g, s, f)
    # moments: exponential moving averages of g and g^2 (torch's lerp / mul+addcmul order)
    m = lerp_rn(m, g, s.one_minus_beta1)
    v = v * s.beta2 + (g * g) * s.one_minus_beta2
    # precondition: bias-corrected v (the m correction is folded into step_size); AMSGrad's max
    vv = v
    if f.on("amsgrad"):
        vmax = slots[2].maximum(v)
        vv = vmax
    denom = div_rn(sqrt_rn(vv), s.bc2_sqrt) + s.eps
    # apply
    p = p - div_rn(caution(m, g, f), denom) * s.step_size
    return p, ([m, v, vmax] if f.on("amsgrad") else [m, v])


def check_accumulation(hp: dict) -> None:
    if hp["cautious"]:
        raise ValueError(
            "accumulation_steps > 1 does not support cautious=True: the mask compares the update "
            "with the window's mean gradient, which the folded state does not keep; use "
            "gradient_release=False and ordinary gradient accumulation"
        )
    if hp["beta1"] == 0 or hp["beta2"] == 0:
        raise ValueError(
            f"accumulation_steps > 1 needs beta1 > 0 and beta2 > 0 (got betas=({hp['beta1']}, "
            f"{hp['beta2']})): the folded moments are stored divided by the betas (see Adam's "
            "accumulation_steps); use gradient_release=False and ordinary gradient accumulation"
        )


def fold(p, g, slots: list, hp: dict, f: Flags, k: int) -> list:
    r"""Fold one micro-batch's gradient (not the window's last) into m and v.

    The slots hold :math:`m_0 + \frac{1-\beta_1}{\beta_1 k}\sum_j g_j` and
    :math:`v_0 + \frac{1-\beta_2}{\beta_2 k}\sum_j g_j^2`: the last micro-batch's ordinary update
    (scalars from :func:`last`) multiplies them by the betas and adds its own share, so nothing
    but the betas' division is extra work. The L2 term is folded with every micro-batch (p does not
    change inside the window); AMSGrad's maximum is taken once, at the last."""
    if f.wd_mode == "l2":
        g = g.add(p, alpha=hp["weight_decay"])
    b1, b2 = hp["beta1"], hp["beta2"]
    m = slots[0] + g * ((1.0 - b1) / (b1 * k))
    v = slots[1] + (g * g) * ((1.0 - b2) / (b2 * k))
    return [m, v, None] if f.on("amsgrad") else [m, v]


def last(s: Scalars, k: int) -> Scalars:
    """The window's last micro-batch: g/k (and the L2 term /k) enters m with weight 1 - beta1, as
    the ordinary update does; g^2 enters v with (1 - beta2) * k so that it counts (1 - beta2) g^2 / k."""
    return s._replace(grad_sign=s.grad_sign / k, l2=s.l2 / k, one_minus_beta2=s.one_minus_beta2 * k)


def torch_fused(items: list, hp: dict, f: Flags) -> list:
    """Step the items torch's own fused CPU kernel serves (``torch._fused_adam(w)_``, on the tensors
    where they lie): fp32/fp64/bf16/fp16 parameters in their own precision (no Kahan, SR or master
    buffer) with state in their dtype, no skip_nonfinite. Used only where the native kernel is
    unavailable, so that the fallback never loses to the optimizer the user switched from.
    Returns the items it did not serve. Its rounding order is torch's, not the reference's."""
    if (
        f.skip_nonfinite or f.maximize is None or f.on("cautious")
    ):  # None: a gradient multiplier (clipping, loss scale)
        return items
    served, rest = {}, []
    for it in items:
        p = it.t["param"]
        ok = (
            it.fmt.param in ("native", "plain")
            and it.fmt.state != "8bit"
            and it.t["exp_avg"].dtype == p.dtype
            and type(p) in (torch.Tensor, torch.nn.Parameter)
            and p.is_contiguous()
        )
        if ok:
            served.setdefault((p.device, p.dtype, it.step), []).append(it)
        else:
            rest.append(it)
    lr, wd = hp["lr"], hp["weight_decay"]
    if hp["wd_mode"] == "full":
        wd = wd / hp["max_lr"]  # torch decays by lr * wd: the same 1 - (lr / max_lr) * wd
    fn = torch._fused_adam_ if hp["wd_mode"] in ("l2", "none") else torch._fused_adamw_
    for (_, _, step), its in served.items():
        # torch's kernel reads p.grad element by element in p's layout: other strides are copied
        grads = [
            it.t["grad"] if it.t["grad"].stride() == it.t["param"].stride() else it.t["grad"].contiguous()
            for it in its
        ]
        counter = torch.tensor(float(step))
        fn(
            [it.t["param"] for it in its],
            grads,
            [it.t["exp_avg"] for it in its],
            [it.t["exp_avg_sq"] for it in its],
            [it.t["max_exp_avg_sq"] for it in its] if f.on("amsgrad") else [],
            [counter] * len(its),
            lr=lr,
            beta1=hp["beta1"],
            beta2=hp["beta2"],
            weight_decay=wd,
            eps=hp["eps"],
            amsgrad=f.on("amsgrad"),
            maximize=bool(f.maximize),
        )
    return rest


ADAM = Algorithm(
    name="Adam",
    slots=SLOTS,
    check=check,
    flags=flags,
    scalars=scalars,
    update=adam_update,
    scalar_type=Scalars,
    native="adam",  # its body in kernel.c
    torch_fused=torch_fused,
    accumulation=Accumulation(check=check_accumulation, fold=fold, last=last),
)


class Adam(Optimizer):
    r"""Adam, with L2 (coupled), decoupled or fully decoupled weight decay and AMSGrad.

    .. math::
       \begin{aligned}
         &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)},
            \theta_0, \text{amsgrad}, \text{maximize}, \gamma_{max} \text{ (max\_lr)} \\
         &m_0 \leftarrow 0,\; v_0 \leftarrow 0,\; \hat v^{max}_0 \leftarrow 0 \\
         &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
         &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \quad (-\nabla \text{ if maximize}) \\
         &\quad \textit{decay:} \begin{cases}
              g_t \leftarrow g_t + \lambda\theta_{t-1} & \text{L2 (Adam default)} \\
              \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda) & \text{decoupled (AdamW)} \\
              \theta_{t-1} \leftarrow \theta_{t-1}(1 - \tfrac{\gamma}{\gamma_{max}}\lambda)
                 & \text{fully decoupled (decouple\_lr)}
            \end{cases} \\
         &\quad \textit{moments:}\; m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
              v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
         &\quad \textit{amsgrad:}\; v_t \leftarrow \hat v^{max}_t \leftarrow \max(\hat v^{max}_{t-1}, v_t) \\
         &\quad \textit{bias correction:}\; \hat m_t = m_t / (1-\beta_1^t),\quad
              \hat v_t = v_t / (1-\beta_2^t) \\
         &\quad \textit{precondition, apply:}\;
              \theta_t \leftarrow \theta_{t-1} - \gamma\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)
       \end{aligned}

    The fully decoupled decay :math:`\theta(1 - \frac{\gamma}{\gamma_{max}}\lambda)` makes the decay
    per step independent of the learning rate's scale (Loshchilov & Hutter's own formulation): with a
    schedule it follows the schedule's shape, and ``weight_decay`` is the fraction removed per step at
    peak lr (so 1e-4, not 1e-2, is a typical value).

    Args:
        params: parameters or parameter groups (dicts), as for any ``torch.optim.Optimizer``.
        lr: learning rate :math:`\gamma` (float or 1-element tensor). Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps: :math:`\epsilon` added to :math:`\sqrt{\hat v}`. Default 1e-8.
        weight_decay: :math:`\lambda`. Default 0 (Adam), 1e-2 (AdamW).
        amsgrad: use the running maximum of :math:`v` (AMSGrad).
        cautious: the cautious mask on :math:`\hat m_t` (compared with :math:`g_t`, the L2 term
            included), rescaled by :math:`n / (\text{kept} + 1)` per tensor (see
            ``adamkit.algorithm.caution``). Default False.
        decoupled_weight_decay: decay the weights, not the gradient (AdamW). Adam only.
        decouple_lr: fully decoupled decay, :math:`\theta(1 - \frac{\gamma}{\gamma_{max}}\lambda)`.
        max_lr: :math:`\gamma_{max}`; defaults to the group's initial lr.
        {engine_options}

    Optimizer accumulation (``accumulation_steps=k``): with :math:`\bar g = \frac1k\sum_j g_j`
    (L2 term included), :math:`m = \beta_1 m + (1-\beta_1)\bar g` exactly (m is linear in g), while
    :math:`v = \beta_2 v + (1-\beta_2)\frac1k\sum_j g_j^2`: the mean of the squares, not the square
    of the mean that true gradient accumulation gives. It is larger by the micro-batches' gradient
    variance, so steps are smaller where micro-batches disagree (v is then an estimate of E[g^2]
    over micro-batches, as Adam's v is over steps). Needs ``beta1, beta2 > 0``.

    State per parameter (bytes per parameter for fp32 parameters): ``step`` (a 0-D fp32 tensor),
    ``exp_avg`` m (4 B), ``exp_avg_sq`` v (4 B), ``max_exp_avg_sq`` (4 B, amsgrad only); 8-bit
    moments add ``<name>_scale`` (2 B per group of 32); their state dicts record ``param_shape``
    (checked on load). With the default options keys, shapes and dtypes equal torch's, so state
    dicts move between torch and adamkit both ways.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = adamkit.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()
    """

    algorithm = ADAM

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        cautious: bool = False,
        decoupled_weight_decay: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        **engine: Any,
    ):
        hyper = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, cautious=cautious
        )
        decoupled = decoupled_weight_decay or decouple_lr
        super().__init__(
            params,
            dict(hyper, decoupled_weight_decay=decoupled, decouple_lr=decouple_lr, max_lr=max_lr),
            **engine,
        )
        warn_strong_decay(self)

    def _prepare_group(self, group: dict) -> None:
        if group.get("decouple_lr"):
            group["decoupled_weight_decay"] = True
        default_max_lr(group)

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "eps", "weight_decay")

    def _loaded_group(self, group: dict) -> None:
        if isinstance(self, AdamW):
            group["decoupled_weight_decay"] = True
        loaded_max_lr(group)


class AdamW(Adam):
    r"""AdamW: :class:`Adam` with decoupled weight decay, :math:`\theta \leftarrow \theta(1-\gamma\lambda)`.

    Same arguments as :class:`Adam` except ``decoupled_weight_decay`` (always on) and the default
    ``weight_decay=1e-2`` (torch's). With ``decouple_lr=True`` the decay is fully decoupled:
    :math:`\theta \leftarrow \theta(1 - \frac{\gamma}{\gamma_{max}}\lambda)`.

    Args (the engine's, as every adamkit optimizer's):
        {engine_options}

    Example:
        >>> opt = adamkit.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **kwargs: Any,
    ):
        if "decoupled_weight_decay" in kwargs:
            raise TypeError("AdamW always decouples weight decay; use adamkit.Adam for L2 decay")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, **kwargs)
