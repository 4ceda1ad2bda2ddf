r"""Sophia-G: a clipped diagonal-Hessian preconditioner (Liu et al., "Sophia: A Scalable
Stochastic Second-order Optimizer for Language Model Pre-training", ICLR 2024, arXiv 2305.14342);
the ``sophia-opt`` package's (the authors' code) results and protocol.

.. math::
   \begin{aligned}
     &\textit{every step:}\quad \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda),\quad
       m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t \\
     &\qquad \theta_t = \theta_{t-1} - \gamma\,\mathrm{sign}(m_t)\,
        \min\!\Big(1, \frac{|m_t|}{\rho\, b\, h_t + 10^{-15}}\Big) \\
     &\textit{every k steps (update\_hessian):}\quad h_t = \beta_2 h_{t-k} + (1-\beta_2)\,\hat g^2
   \end{aligned}

:math:`b` is ``step(bs=...)``, the number of tokens (or examples) in the batch. The Gauss-Newton-
Bartlett estimate :math:`\hat g` is the gradient of the loss on labels *sampled from the model's own
output* (not the data's): after that backward, call ``update_hessian()``, which reads ``p.grad``.
The authors call it every k = 10 steps: it costs one extra forward+backward per k steps (~10% more
compute at k = 10) and no memory beyond ``hessian``. Elementwise, so it runs on every per-tensor
backend (foreach included); it has no native C body (backend auto/fused uses the compiled kernel).

State: ``exp_avg`` m and ``hessian`` h, 4 B/param each in fp32 (Adam's 8), ``step`` 0-D.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from ..algorithm import Algorithm, Flags, Slot
from ..kernels.reference import run_reference
from .base import Optimizer
from .options import as_float, check_betas, check_nonneg


class Scalars(NamedTuple):
    grad_sign: Any
    decay: Any  # 1 - lr * weight_decay
    lr: Any
    beta1: Any
    one_minus_beta1: Any
    rho_bs: Any  # rho * bs
    beta2: Any
    one_minus_beta2: Any


def check(group: dict) -> dict:
    lr = check_nonneg("lr", group["lr"])
    b1, b2 = check_betas(group["betas"])
    rho = check_nonneg("rho", group["rho"])
    wd = check_nonneg("weight_decay", group["weight_decay"])
    bs = as_float("bs", group.get("bs", 5120))
    if not bs > 0 or bs == float("inf"):
        raise ValueError(f"Invalid bs: {bs}; it must be a finite number > 0")
    return dict(lr=lr, beta1=b1, beta2=b2, rho=rho, weight_decay=wd, bs=bs)


def flags(group: dict, hp: dict) -> Flags:
    return Flags("decoupled" if hp["weight_decay"] else "none", group["maximize"], group["skip_nonfinite"])


def scalars(hp: dict, step: float, f: Flags) -> Scalars:
    lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
    return Scalars(
        -1.0 if f.maximize else 1.0, 1.0 - lr * hp["weight_decay"], lr, b1, 1.0 - b1, hp["rho"] * hp["bs"],
        b2, 1.0 - b2,
    )  # fmt: skip


def sophia_update(p, g, slots: list, s: Scalars, f: Flags):
    m, h = slots
    if f.wd_mode in ("decoupled", "runtime"):
        p = p * s.decay
    m = m * s.beta1 + g * s.one_minus_beta1
    ratio = (m.abs() / (h * s.rho_bs + 1e-15)).clamp_max(1.0)
    return p - (m.sign() * ratio) * s.lr, [m, h]


def hessian_update(p, g, slots: list, s: Scalars, f: Flags):
    """update_hessian(): the EMA of g^2 (g: the sampled-label gradient); m and p are not changed."""
    m, h = slots
    return p, [m, h * s.beta2 + (g * g) * s.one_minus_beta2]


SOPHIA = Algorithm(
    name="SophiaG",
    slots=(Slot("exp_avg", signed=True), Slot("hessian", signed=False)),
    check=check,
    flags=flags,
    scalars=scalars,
    update=sophia_update,
    scalar_type=Scalars,
)
_HESSIAN = dataclasses.replace(SOPHIA, update=hessian_update)  # update_hessian()'s update


class SophiaG(Optimizer):
    r"""Sophia-G (see the module docstring for the update and how often to call ``update_hessian``).

    Args:
        params: parameters or parameter groups.
        lr: :math:`\gamma`. Default 1e-4.
        betas: :math:`(\beta_1, \beta_2)`: momentum, and the Hessian EMA's decay. Default (0.965, 0.99).
        rho: :math:`\rho`, the clipping scale. Default 0.04.
        weight_decay: :math:`\lambda`, decoupled. Default 0.1.
        {engine_options}
        Here: clipping and the whole-step skip act on ``step()``, not on ``update_hessian()``,
            which reads the sampled-label gradient as it is. ``gradient_release`` is refused:
            release would step the parameters inside the sampled-label backward too, and ``bs``
            arrives with ``step()``, after the backward.

    Example:
        >>> opt = adamkit.SophiaG(model.parameters(), lr=2e-4, rho=0.05)
        >>> loss.backward(); opt.step(bs=tokens_per_batch); opt.zero_grad()
        >>> if it % 10 == 9:  # sampled labels: y ~ softmax(logits)
        ...     sampled_loss.backward(); opt.update_hessian(); opt.zero_grad()
    """

    algorithm = SOPHIA

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        **engine: Any,
    ):
        if engine.get("gradient_release", False) is not False:
            # The hooks would step every parameter inside each backward: the sampled-label backward
            # that update_hessian() reads would move the weights too, and step(bs=...) would come
            # after the step it sizes.
            raise ValueError(
                "gradient_release=True is not supported by adamkit.SophiaG: its sampled-label "
                "backward (for update_hessian()) must not step the parameters, and step(bs=...) "
                "must be known before the step; use gradient_release=False"
            )
        super().__init__(
            params,
            dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=5120),
            **engine,
        )

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "rho", "weight_decay")

    def step(self, closure=None, bs: float = 5120):
        """One step; ``bs`` is :math:`b`, the batch's size in tokens (examples). Raises before any
        change if it is not a finite number > 0."""
        bs = as_float("bs", bs)
        if not (0 < bs < float("inf")):
            raise ValueError(f"Invalid bs: {bs}; it must be a finite number > 0")
        for group in self.param_groups:
            group["bs"] = bs
        return super().step(closure)

    @torch.no_grad()
    def update_hessian(self) -> None:
        r""":math:`h \leftarrow \beta_2 h + (1-\beta_2) g^2` from every ``p.grad`` (the sampled-label
        gradient), in each parameter's state format. Parameters, m and the step count are unchanged."""
        base = 1
        for index, group in enumerate(self.param_groups):
            hp = self._hyper(index, group)
            f = self.algorithm.flags(group, hp)._replace(skip_nonfinite=False)
            items = [
                self._item(p, group, base + i) for i, p in enumerate(group["params"]) if p.grad is not None
            ]
            # the shared per-tensor runner, writing h only, with rounding streams of its own
            run_reference(
                _HESSIAN, items, functools.partial(scalars, hp, f=f), f, streams=100, only=("hessian",)
            )
            base += len(group["params"])
