r"""Adafactor: factored second moments (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with
Sublinear Memory Cost", ICML 2018, arXiv 1804.04235), with ``torch.optim.Adafactor``'s signature and
results, plus an optional first moment (``beta1``; transformers' Adafactor has one too, which
averages the update after scaling it).

For a parameter of :math:`\ge 2` dimensions (factored over its last two, of sizes R x C):

.. math::
   \begin{aligned}
     &\hat\beta_{2,t} = 1 - t^{c} \quad (c = \text{beta2\_decay} \le 0),\quad
       \rho_t = \min(\gamma, 1/\sqrt t),\quad
       \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t \\
     &\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
     &r_t = \hat\beta_{2,t} r_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{\text{cols}}(g_t^2),\quad
      c_t = \hat\beta_{2,t} c_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{\text{rows}}(g_t^2) \\
     &\hat v_t = r_t c_t / \max(\mathrm{mean}(r_t), \epsilon_1) \quad
       (\text{vectors: } \hat v_t = \hat\beta_{2,t} \hat v_{t-1} + (1-\hat\beta_{2,t}) g_t^2) \\
     &u_t = g_t / \sqrt{\max(\hat v_t, \epsilon_1^2)},\quad
      u_t \leftarrow u_t / \max(1, \mathrm{RMS}(u_t) / d) \\
     &\text{beta1 given: } m_t = \beta_1 m_{t-1} + (1-\beta_1) u_t,\; u_t \leftarrow m_t \\
     &\theta_t = \theta_{t-1} - \alpha_t u_t
   \end{aligned}

State (fp32 parameters): ``row_var`` (R values, torch's shape ``(..., R, 1)``) and ``col_var``
(``(..., 1, C)``) for matrices, ``variance`` (4 B/param) for vectors and scalars, ``exp_avg``
(4 B/param) only with ``beta1``; ``step`` a 0-D tensor. Keys and shapes are torch's, so state dicts
move between ``torch.optim.Adafactor`` and this class. Not elementwise: it runs one tensor at a
time (reference loop) on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot
from .base import Optimizer
from .options import as_float, check_nonneg, refuse_skip_nonfinite


def _row_shape(s: tuple) -> tuple | None:
    return s[:-1] + (1,) if len(s) >= 2 else None


def _col_shape(s: tuple) -> tuple | None:
    return s[:-2] + (1,) + s[-1:] if len(s) >= 2 else None


def _full_if_vector(s: tuple) -> tuple | None:
    return s if len(s) < 2 else None


SLOTS = (
    Slot("row_var", signed=False, shape=_row_shape, rows=lambda s: True),  # R values per matrix
    Slot("col_var", signed=False, shape=_col_shape, rows=lambda s: len(s) >= 3),  # C values per matrix
    Slot("variance", signed=False, shape=_full_if_vector, rows=lambda s: True),  # vectors: 4 B/param
    Slot("exp_avg", signed=True, option="beta1"),  # beta1 only: 4 B/param
)


class Scalars(NamedTuple):
    grad_sign: Any
    lr: Any
    one_minus_beta2_t: Any  # t ** beta2_decay
    rho: Any  # min(lr, 1 / sqrt(t))
    eps1: Any  # < 0: the compute dtype's machine epsilon (torch's eps1=None)
    eps2: Any
    d: Any
    decay: Any  # 1 - lr * weight_decay
    beta1: Any


def check(group: dict) -> dict:
    lr = check_nonneg("lr", group["lr"])
    decay_rate = as_float("beta2_decay", group["beta2_decay"])
    if not decay_rate <= 0.0:
        raise ValueError(f"beta2_decay should be <= 0 but is: {decay_rate}")
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
    eps1 = None if eps[0] is None else check_nonneg("eps1", eps[0])
    eps2 = check_nonneg("eps2", eps[1])
    d = as_float("d", group["d"])
    if not (math.isfinite(d) and d >= 1.0):
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
    wd = check_nonneg("weight_decay", group["weight_decay"])
    beta1 = group.get("beta1")
    if beta1 is not None:
        beta1 = as_float("beta1", beta1)
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1}; it must be None or in [0, 1)")
    refuse_skip_nonfinite(group, "Adafactor")
    return dict(lr=lr, beta2_decay=decay_rate, eps1=eps1, eps2=eps2, d=d, weight_decay=wd, beta1=beta1)


def flags(group: dict, hp: dict) -> Flags:
    return Flags(
        "decoupled" if hp["weight_decay"] else "none",
        maximize=group["maximize"],
        options=("beta1",) if hp["beta1"] else (),
    )


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    lr = hp["lr"]
    return Scalars(
        -1.0 if f.maximize else 1.0,
        lr,
        step ** hp["beta2_decay"],
        min(lr, 1.0 / step**0.5),
        -1.0 if hp["eps1"] is None else hp["eps1"],
        hp["eps2"],
        hp["d"],
        1.0 - lr * hp["weight_decay"],
        hp["beta1"] or 0.0,
    )


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


def adafactor_update(p, g, slots: list, s: Scalars, f: Flags):
    """One Adafactor step on one tensor (compute dtype), torch.optim.Adafactor's operations."""
    row, col, var = slots[0], slots[1], slots[2]
    eps1 = s.eps1 if s.eps1 >= 0 else torch.finfo(p.dtype).eps
    alpha = torch.clamp(_rms(p), min=s.eps2) * s.rho  # from the parameter before decay
    if f.wd_mode == "decoupled":
        p = p * s.decay
    if row is not None:  # factored over the last two dimensions
        row = row.lerp(
            torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / g.size(-1), s.one_minus_beta2_t
        )
        col = col.lerp(
            torch.linalg.vector_norm(g, dim=-2, keepdim=True).square() / g.size(-2), s.one_minus_beta2_t
        )
        v_hat = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    else:
        var = var.lerp(g * g, s.one_minus_beta2_t)
        v_hat = var
    u = v_hat.clamp(min=eps1 * eps1).rsqrt() * g
    u = u / torch.clamp(_rms(u) / s.d, min=1.0)  # clip the update's RMS to d
    new = [row, col, var]
    if "beta1" in f.options:
        m = slots[3].lerp(u, 1.0 - s.beta1)
        u = m
        new.append(m)
    return p - u * alpha, new


ADAFACTOR = Algorithm(
    name="Adafactor",
    slots=SLOTS,
    check=check,
    flags=flags,
    scalars=scalars,
    update=adafactor_update,
    scalar_type=Scalars,
    elementwise=False,
)


def _transformers_names(lr, d, beta2_decay, relative_step, scale_parameter, warmup_init, clip, decay):
    """transformers' Adafactor spellings: accepted where they name this class's behaviour, refused
    with the nearest equivalent where they do not. Returns (lr, d, beta2_decay)."""
    if relative_step is not True:
        raise ValueError(
            "relative_step=False (transformers: a constant step lr) has no switch here: the step is "
            "min(lr, 1/sqrt(t)) as in torch.optim.Adafactor, which equals lr only for the first 1/lr^2 "
            "steps (1e6 at lr=1e-3); drop the argument to accept that, or use adamkit.AdamW"
        )
    if scale_parameter is not True:
        raise ValueError(
            "scale_parameter=False has no equivalent: the step is always scaled by max(eps2, RMS(p)) "
            "(transformers' scale_parameter=True, torch.optim.Adafactor's only behaviour)"
        )
    if warmup_init is not False:
        raise ValueError(
            "warmup_init=True has no switch here: warm up with an lr scheduler instead (the step is "
            "min(lr, 1/sqrt(t)) times the parameter scale, so a linear warmup of lr from 1e-6 per step "
            "gives transformers' warmup)"
        )
    if lr is None:  # transformers' relative step alone: min(1e-2, 1/sqrt(t))
        lr = 1e-2
    for name, ours, theirs, default in (("d", d, clip, 1.0), ("beta2_decay", beta2_decay, decay, -0.8)):
        if theirs is not None and ours != default and ours != theirs:
            raise ValueError(f"{name}={ours} and its transformers spelling ({theirs}) disagree; pass one")
    d = d if clip is None else clip
    beta2_decay = beta2_decay if decay is None else decay
    return lr, d, beta2_decay


class Adafactor(Optimizer):
    r"""Adafactor (see the module docstring), ``torch.optim.Adafactor``'s signature and results.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma`, the relative step cap: the step is :math:`\min(\gamma, 1/\sqrt t)` times the
            parameter's RMS (at least ``eps2``). Default 1e-2.
        beta2_decay: :math:`c`: :math:`\hat\beta_{2,t} = 1 - t^c`. Default -0.8.
        eps: :math:`(\epsilon_1, \epsilon_2)`: floor of the second moment (None: the compute dtype's
            machine epsilon; torch uses the parameter dtype's, which differs for bf16 parameters)
            and of the parameter RMS. Default (None, 1e-3).
        d: clipping threshold of the update's RMS. Default 1.
        weight_decay: :math:`\lambda`, decoupled: :math:`\theta(1 - \gamma\lambda)`. Default 0.
        beta1: optional first moment of the clipped update, before it is scaled by
            :math:`\alpha_t` (+4 B/param). transformers' Adafactor averages the update *after*
            scaling it (:math:`m_t = \beta_1 m_{t-1} + (1-\beta_1)\alpha_t u_t`): the two agree
            only while :math:`\alpha_t` is constant. Default None.
        relative_step, scale_parameter, warmup_init, clip_threshold, decay_rate: transformers'
            spellings. ``lr=None`` with ``relative_step=True`` (its default) is ``lr=1e-2`` (the step
            min(1e-2, 1/sqrt(t))); ``scale_parameter=True`` and ``warmup_init=False`` are this
            class's behaviour; ``clip_threshold`` is ``d``, ``decay_rate`` is ``beta2_decay``. The
            other values raise with the nearest equivalent. (transformers' weight decay is scaled by
            its computed step, this class's by ``lr``, as torch's; its ``eps[0]`` is added to
            :math:`g^2`, this class's is a floor.)
        {engine_options}
        Here: every backend runs it per tensor; with gradient release each tensor is stepped in its
            own hook, which suits its per-tensor statistics.
        ``skip_nonfinite`` is not supported (its statistics mix elements).

    Example:
        >>> opt = adamkit.Adafactor(model.parameters(), lr=1e-2)
    """

    algorithm = ADAFACTOR

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor | None = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        beta1: float | None = None,
        foreach: bool | None = None,
        maximize: bool = False,
        relative_step: bool = True,
        scale_parameter: bool = True,
        warmup_init: bool = False,
        clip_threshold: float | None = None,
        decay_rate: float | None = None,
        **engine: Any,
    ):
        lr, d, beta2_decay = _transformers_names(
            lr, d, beta2_decay, relative_step, scale_parameter, warmup_init, clip_threshold, decay_rate
        )
        super().__init__(
            params,
            dict(
                lr=lr,
                beta2_decay=beta2_decay,
                eps=tuple(eps) if isinstance(eps, list) else eps,
                d=d,
                weight_decay=weight_decay,
                beta1=beta1,
            ),
            foreach=foreach,  # torch.optim.Adafactor's own keywords; engine options here
            maximize=maximize,
            **engine,
        )

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "beta2_decay", "eps", "d", "weight_decay")
