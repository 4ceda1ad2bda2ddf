r"""Muon: momentum orthogonalized by Newton-Schulz, for the 2-D weights of hidden layers (K. Jordan
et al., "Muon: An optimizer for hidden layers in neural networks", 2024; J. Liu et al., "Muon is
Scalable for LLM Training", arXiv 2502.16982), with an AdamW fallback for everything else, as
modern recipes use it. ``torch.optim.Muon``'s results on the matrices it covers.

Each parameter group is one or the other (``use_muon``):

.. math::
   \begin{aligned}
     &\textit{Muon groups (2-D parameters):}\\
     &\quad B_t = \mu B_{t-1} + (1-\mu) g_t,\qquad
       \tilde B_t = \begin{cases} (1-\mu) g_t + \mu B_t & \text{nesterov} \\
                                  B_t & \text{otherwise}\end{cases}\\
     &\quad O_t = \mathrm{NS}^{(a,b,c)}_k(\tilde B_t):\;
       X_0 = \tilde B_t / \max(\|\tilde B_t\|_F, \varepsilon),\;
       X_{j+1} = a X_j + (b A_j + c A_j^2) X_j,\; A_j = X_j X_j^\top
       \quad(\text{in bf16, on the wide orientation}) \\
     &\quad \theta_t = \theta_{t-1}(1 - \gamma\lambda) - \gamma' O_t,\qquad
       \gamma' = \gamma\sqrt{\max(1, A/B)} \;(\text{"original"}) \text{ or } 0.2\,\gamma\sqrt{\max(A, B)}
       \;(\text{"match\_rms\_adamw"}) \\
     &\textit{AdamW groups (the rest):}\quad \theta_t = \theta_{t-1}(1-\gamma\lambda)
       - \gamma \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}
       \quad (m, v: \text{Adam's moments, } \beta = \text{adamw\_betas}, \epsilon = \text{adamw\_eps})
   \end{aligned}

(:math:`B` is torch's ``lerp`` form of the momentum, as ``torch.optim.Muon`` computes it.) The
Newton-Schulz iteration runs in bf16, as in torch and the authors' code: it is an approximate
orthogonalization by design (singular values land in about (0.5, 1.5)), so fp32 or fp64 parameters
get the same bf16 directions torch's do.

Which parameters take which rule: a group given with ``use_muon`` keeps it (``True`` requires 2-D
parameters); a group given without it is split in two by the constructor: its 2-D parameters
(Muon) and the others (AdamW, at ``adamw_lr`` if given). Embeddings and output heads are 2-D but
are usually trained with AdamW: put them in a group with ``use_muon=False``.

State: Muon groups ``momentum_buffer`` B (4 B/param fp32); AdamW groups ``exp_avg`` m and
``exp_avg_sq`` v (8 B/param); ``step`` a 0-D tensor. Orthogonalization is a matrix operation: Muon
runs one tensor at a time (reference loop) on every backend. On sharded DTensor parameters (FSDP2)
each matrix's update is gathered and orthogonalized whole on every rank, which keeps its rows (a
shard's orthogonalization is not the matrix's): equal to one process bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot
from .base import Optimizer
from .options import as_float, check_betas, check_nonneg, refuse_skip_nonfinite

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch's (Keller Jordan's) quintic
ADJUST_LR = (None, "original", "match_rms_adamw")

SLOTS = (
    Slot("momentum_buffer", signed=True, option="use_muon"),  # Muon groups: 4 B/param (fp32)
    Slot("exp_avg", signed=True, option="use_adamw"),  # AdamW groups: 4 B/param
    Slot("exp_avg_sq", signed=False, option="use_adamw"),  # AdamW groups: 4 B/param
)


class Scalars(NamedTuple):
    grad_sign: Any
    lr: Any
    decay: Any  # 1 - lr * weight_decay
    momentum: Any
    match_rms: Any  # 1: Moonshot's lr adjustment, 0: the original one
    ns_a: Any
    ns_b: Any
    ns_c: Any
    ns_eps: Any
    ns_steps: Any
    beta1: Any
    beta2: Any
    eps: Any
    step_size: Any  # lr / (1 - beta1^t)
    bc2_sqrt: Any  # sqrt(1 - beta2^t)


def check(group: dict) -> dict:
    lr = check_nonneg("lr", group["lr"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    mu = as_float("momentum", group["momentum"])
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"Invalid momentum: {mu}; it must be in [0, 1)")
    if not isinstance(group["nesterov"], bool):
        raise TypeError(f"nesterov must be a bool, got {group['nesterov']!r}")
    coeffs = group["ns_coefficients"]
    if not isinstance(coeffs, (tuple, list)) or len(coeffs) != 3:
        raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {coeffs!r}")
    a, b, c = (as_float(f"ns_coefficients[{i}]", x) for i, x in enumerate(coeffs))
    ns_eps = check_nonneg("eps", group["eps"])
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
        raise ValueError(f"Invalid ns_steps: {steps!r}; it must be an int in [1, 100)")
    if group["adjust_lr_fn"] not in ADJUST_LR:
        raise ValueError(f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r}; choose one of {ADJUST_LR}")
    b1, b2 = check_betas(group["adamw_betas"])
    eps = check_nonneg("adamw_eps", group["adamw_eps"])
    use_muon = group["use_muon"]
    if not isinstance(use_muon, bool):
        raise TypeError(f"use_muon must be a bool, got {use_muon!r}")
    if group.get("use_adamw", not use_muon) == use_muon:
        raise ValueError(
            "use_muon cannot change on an existing group (its state is Muon's or AdamW's); build "
            "the optimizer with the groups you want"
        )
    for p in group.get("params", ()) if use_muon else ():
        if p.dim() != 2:
            raise ValueError(
                f"a use_muon=True group holds a parameter of shape {tuple(p.shape)}: Muon "
                "orthogonalizes matrices, so it takes 2-D parameters only; put the others in a "
                "group with use_muon=False (AdamW)"
            )
    refuse_skip_nonfinite(group, "Muon")
    return dict(
        lr=lr, weight_decay=wd, momentum=mu, ns=(a, b, c), ns_eps=ns_eps, ns_steps=steps,
        match_rms=group["adjust_lr_fn"] == "match_rms_adamw", beta1=b1, beta2=b2, eps=eps,
    )  # fmt: skip


def flags(group: dict, hp: dict) -> Flags:
    options = ("use_muon", "nesterov") if group["nesterov"] else ("use_muon",)
    return Flags(
        "decoupled" if hp["weight_decay"] else "none",
        maximize=group["maximize"],
        options=options if group["use_muon"] else ("use_adamw",),
    )


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
    return Scalars(
        -1.0 if f.maximize else 1.0, lr, 1.0 - lr * hp["weight_decay"], hp["momentum"],
        1.0 if hp["match_rms"] else 0.0, *hp["ns"], hp["ns_eps"], hp["ns_steps"],
        b1, b2, hp["eps"], lr / (1 - b1**step), (1 - b2**step) ** 0.5,
    )  # fmt: skip


def newton_schulz(x: torch.Tensor, s: Scalars) -> torch.Tensor:
    """The quintic Newton-Schulz iteration in bf16 (torch.optim.Muon's operations).

    A sharded DTensor (FSDP2) is gathered whole and every rank iterates on the whole matrix, then
    keeps its own rows: sharded bf16 matmuls would sum in another order than one process, and bf16
    rounds those differences to ~1e-3 within a few steps; this way the result is the same at every
    world size, bit for bit, for one all-gather of the update per matrix."""
    if hasattr(x, "full_tensor") and any(pl.is_shard() for pl in x.placements):
        from torch.distributed.tensor import distribute_tensor

        whole = newton_schulz(x.full_tensor(), s)
        return distribute_tensor(whole, x.device_mesh, x.placements, src_data_rank=None)
    o = x.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        o = o.T
    o = o / o.norm().clamp(min=s.ns_eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(int(s.ns_steps)):
        gram = o @ o.T
        o = torch.addmm(o, torch.addmm(gram, gram, gram, beta=s.ns_b, alpha=s.ns_c), o, beta=s.ns_a)
    return o.T if tall else o


def muon_update(p, g, slots: list, s: Scalars, f: Flags):
    if "use_muon" in f.options:
        buf = slots[0].lerp(g, 1 - s.momentum)
        u = g.lerp(buf, s.momentum) if "nesterov" in f.options else buf
        rows, cols = p.shape
        scale = 0.2 * math.sqrt(max(rows, cols)) if s.match_rms else math.sqrt(max(1.0, rows / cols))
        if f.wd_mode == "decoupled":
            p = p * s.decay
        return p - newton_schulz(u, s).to(p.dtype) * (s.lr * scale), [buf]
    m, v = slots
    if f.wd_mode == "decoupled":
        p = p * s.decay
    m = m.lerp(g, 1 - s.beta1)
    v = v * s.beta2 + (g * g) * (1 - s.beta2)
    return p - (m / (v.sqrt() / s.bc2_sqrt + s.eps)) * s.step_size, [m, v]


MUON = Algorithm(
    name="Muon",
    slots=SLOTS,
    check=check,
    flags=flags,
    scalars=scalars,
    update=muon_update,
    scalar_type=Scalars,
    elementwise=False,
)


def _split(params: Iterable, adamw_lr: float | None) -> list[dict]:
    """Groups without ``use_muon``: their 2-D parameters (Muon) and the rest (AdamW)."""
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        if not isinstance(group, dict) or "use_muon" in group:
            out.append(group)
            continue
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        matrix = [p for p in ps if (p[1] if isinstance(p, tuple) else p).dim() == 2]
        rest = [p for p in ps if (p[1] if isinstance(p, tuple) else p).dim() != 2]
        if matrix:
            out.append({**group, "params": matrix, "use_muon": True})
        if rest:
            extra = {} if adamw_lr is None else {"lr": adamw_lr}
            out.append({**group, "params": rest, "use_muon": False, **extra})
    return out


class Muon(Optimizer):
    r"""Muon with an AdamW fallback (see the module docstring).

    Args:
        params: parameters or parameter groups; a group without ``use_muon`` is split into its 2-D
            parameters (Muon) and the others (AdamW).
        lr: :math:`\gamma`. Default 1e-3 (torch's; Keller Jordan's recipe uses 0.02 with
            ``"original"``; with ``"match_rms_adamw"`` AdamW's lr carries over).
        weight_decay: :math:`\lambda`, decoupled. Default 0.1.
        momentum: :math:`\mu`. Default 0.95.
        nesterov: Nesterov momentum. Default True.
        ns_coefficients: :math:`(a, b, c)`. Default (3.4445, -4.7750, 2.0315).
        eps: :math:`\varepsilon`, the floor of the Frobenius norm. Default 1e-7.
        ns_steps: :math:`k`, Newton-Schulz iterations. Default 5.
        adjust_lr_fn: ``None``/``"original"`` or ``"match_rms_adamw"``. Default None.
        adamw_lr: the lr of the AdamW part of groups split by the constructor (None: ``lr``).
        adamw_betas, adamw_eps: the AdamW groups' :math:`(\beta_1, \beta_2)` and :math:`\epsilon`.
            Default (0.9, 0.95), 1e-8.
        {engine_options}
        Here: every backend runs it per tensor; ``skip_nonfinite`` is not supported: the
            orthogonalization mixes elements.

    Example:
        >>> hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n]
        >>> other = [p for n, p in model.named_parameters() if p.dim() != 2 or "emb" in n]
        >>> opt = adamkit.Muon([{"params": hidden, "use_muon": True},
        ...                     {"params": other, "use_muon": False, "lr": 3e-3}], lr=0.02)
    """

    algorithm = MUON

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        **engine: Any,
    ):
        coeffs = tuple(ns_coefficients) if isinstance(ns_coefficients, list) else ns_coefficients
        if adamw_lr is not None:
            check_nonneg("adamw_lr", adamw_lr)
        super().__init__(
            _split(params, adamw_lr),
            dict(
                lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                ns_coefficients=coeffs,
                eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, adamw_betas=adamw_betas,
                adamw_eps=adamw_eps, use_muon=True,
            ),
            **engine,
        )  # fmt: skip

    def _prepare_group(self, group: dict) -> None:
        # the AdamW slots' switch (Slot.option): the opposite of use_muon, fixed with the group
        if isinstance(group.get("use_muon"), bool):
            group.setdefault("use_adamw", not group["use_muon"])
        if isinstance(group.get("adamw_betas"), list):
            group["adamw_betas"] = tuple(group["adamw_betas"])

    def _loaded_group(self, group: dict) -> None:
        group["use_adamw"] = not group["use_muon"]

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "weight_decay", "momentum", "use_muon", "adamw_betas")

    def _from_torch_group(self, saved: dict, group: dict) -> dict:
        # torch.optim.Muon: every group is Muon (2-D parameters only); it has no use_muon switch
        # and no AdamW betas (unused by a Muon group: the live group's are kept)
        if "use_muon" in saved or not {"ns_coefficients", "ns_steps", "momentum"} <= saved.keys():
            return saved
        if not group["use_muon"]:
            raise ValueError(
                "a torch.optim.Muon group (Muon state) loads into a use_muon=True group, not into an "
                "AdamW fallback group (use_muon=False); build this optimizer with the same groups"
            )
        return {**saved, "use_muon": True, "adamw_betas": group["adamw_betas"]}

    def _step_saved(self, group: dict) -> bool:
        # Muon's update has no bias correction: torch.optim.Muon keeps no step count, and a state
        # loaded from it counts on from 0 (the count only seeds the rounding of bf16/8-bit state)
        return not group["use_muon"]
