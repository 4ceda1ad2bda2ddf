r"""CAME: confidence-guided adaptive memory-efficient optimization (Luo et al., "CAME:
Confidence-guided Adaptive Memory Efficient Optimization", ACL 2023, arXiv 2307.02047); the
``came-pytorch`` package's results.

For a parameter of :math:`\ge 2` dimensions (factored over its last two; :math:`\epsilon_1,
\epsilon_2` = ``eps``, :math:`\beta_1, \beta_2, \beta_3` = ``betas``):

.. math::
   \begin{aligned}
     &G = g_t^2 + \epsilon_1,\quad
      r_t = \beta_2 r_{t-1} + (1-\beta_2)\,\mathrm{mean}_{\text{cols}} G,\quad
      c_t = \beta_2 c_{t-1} + (1-\beta_2)\,\mathrm{mean}_{\text{rows}} G \\
     &u_t = g_t \,/\, \sqrt{r_t c_t / \mathrm{mean}(r_t)},\quad
      u_t \leftarrow u_t / \max(1, \mathrm{RMS}(u_t) / d) \\
     &m_t = \beta_1 m_{t-1} + (1-\beta_1) u_t \\
     &U = (u_t - m_t)^2 + \epsilon_2,\quad
      R_t = \beta_3 R_{t-1} + (1-\beta_3)\,\mathrm{mean}_{\text{cols}} U,\quad
      C_t = \beta_3 C_{t-1} + (1-\beta_3)\,\mathrm{mean}_{\text{rows}} U \\
     &\theta_t = \theta_{t-1}(1 - \gamma\lambda) - \gamma\, m_t / \sqrt{R_t C_t / \mathrm{mean}(R_t)}
   \end{aligned}

Vectors and scalars keep a full ``exp_avg_sq`` (4 B/param) and step with :math:`m_t` alone (no
confidence term), as the reference does. State (fp32): ``exp_avg`` (4 B/param), and for matrices
``exp_avg_sq_row``/``exp_avg_res_row`` (``shape[:-1]``) and ``exp_avg_sq_col``/``exp_avg_res_col``
(``shape[:-2] + shape[-1:]``): came-pytorch's keys and shapes. Runs one tensor at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot
from .base import Optimizer
from .options import as_float, check_betas, check_nonneg, refuse_skip_nonfinite


def _row(s: tuple) -> tuple | None:
    return s[:-1] if len(s) >= 2 else None


def _col(s: tuple) -> tuple | None:
    return s[:-2] + s[-1:] if len(s) >= 2 else None


def _vector(s: tuple) -> tuple | None:
    return s if len(s) < 2 else None


SLOTS = (
    Slot("exp_avg", signed=True),
    Slot("exp_avg_sq_row", signed=False, shape=_row, rows=lambda s: True),
    Slot("exp_avg_sq_col", signed=False, shape=_col, rows=lambda s: len(s) >= 3),
    Slot("exp_avg_res_row", signed=False, shape=_row, rows=lambda s: True),
    Slot("exp_avg_res_col", signed=False, shape=_col, rows=lambda s: len(s) >= 3),
    Slot("exp_avg_sq", signed=False, shape=_vector, rows=lambda s: True),
)


class Scalars(NamedTuple):
    grad_sign: Any
    lr: Any
    eps1: Any
    eps2: Any
    clip: Any
    beta1: Any
    beta2: Any
    beta3: Any
    weight_decay: Any


def check(group: dict) -> dict:
    lr = check_nonneg("lr", group["lr"])
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
    e1, e2 = check_nonneg("eps1", eps[0]), check_nonneg("eps2", eps[1])
    clip = as_float("clip_threshold", group["clip_threshold"])
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"Invalid clip_threshold: {clip}; it must be a finite number > 0")
    b1, b2, b3 = check_betas(group["betas"], 3)
    wd = check_nonneg("weight_decay", group["weight_decay"])
    refuse_skip_nonfinite(group, "CAME")
    return dict(lr=lr, eps1=e1, eps2=e2, clip=clip, beta1=b1, beta2=b2, beta3=b3, weight_decay=wd)


def flags(group: dict, hp: dict) -> Flags:
    return Flags("decoupled" if hp["weight_decay"] else "none", maximize=group["maximize"])


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    return Scalars(-1.0 if f.maximize else 1.0, *(hp[k] for k in Scalars._fields[1:]))


def _approx(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(r c / mean(r)) over the last two dimensions (came-pytorch's _approx_sq_grad)."""
    return (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


def came_update(p, g, slots: list, s: Scalars, f: Flags):
    m, row, col, rrow, rcol, v = slots
    sq = g * g + s.eps1
    if row is not None:
        row = row * s.beta2 + sq.mean(dim=-1) * (1 - s.beta2)
        col = col * s.beta2 + sq.mean(dim=-2) * (1 - s.beta2)
        u = _approx(row, col) * g
    else:
        v = v * s.beta2 + sq * (1 - s.beta2)
        u = v.rsqrt() * g
    u = u / torch.clamp(_rms(u) / s.clip, min=1.0)
    m = m * s.beta1 + u * (1 - s.beta1)
    if row is not None:  # confidence: the instability of u around m, factored like v
        res = (u - m) ** 2 + s.eps2
        rrow = rrow * s.beta3 + res.mean(dim=-1) * (1 - s.beta3)
        rcol = rcol * s.beta3 + res.mean(dim=-2) * (1 - s.beta3)
        step = _approx(rrow, rcol) * m
    else:
        step = m
    if f.wd_mode == "decoupled":
        p = p.add(p, alpha=-s.weight_decay * s.lr)
    return p - step * s.lr, [m, row, col, rrow, rcol, v]


CAME_ALG = Algorithm(
    name="CAME",
    slots=SLOTS,
    check=check,
    flags=flags,
    scalars=scalars,
    update=came_update,
    scalar_type=Scalars,
    elementwise=False,
)


class CAME(Optimizer):
    r"""CAME (see the module docstring), came-pytorch's signature.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma` (required by came-pytorch; default here 2e-4, its README's value).
        eps: :math:`(\epsilon_1, \epsilon_2)`, added to :math:`g^2` and to the instability.
            Default (1e-30, 1e-16).
        clip_threshold: :math:`d`, the update's RMS cap. Default 1.
        betas: :math:`(\beta_1, \beta_2, \beta_3)`. Default (0.9, 0.999, 0.9999).
        weight_decay: :math:`\lambda`, decoupled. Default 0.
        {engine_options}
        Here: every backend runs it per tensor; with gradient release each tensor is stepped in its
            own hook, which suits its per-tensor statistics.

    Example:
        >>> opt = adamkit.CAME(model.parameters(), lr=2e-4, weight_decay=1e-2)
    """

    algorithm = CAME_ALG

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 2e-4,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        **engine: Any,
    ):
        super().__init__(
            params,
            dict(
                lr=lr, eps=tuple(eps) if isinstance(eps, list) else eps, clip_threshold=clip_threshold,
                betas=betas, weight_decay=weight_decay,
            ),
            **engine,
        )  # fmt: skip

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "eps", "clip_threshold", "betas", "weight_decay")
