"""The Adam update rule, written once.

Every backend runs these functions: the reference backend on one tensor at a time, the foreach
backend on :class:`TensorList` values (Python operators mapped to ``torch._foreach_*`` kernels), and
the fused backend inside one ``torch.compile``d function over flat buffers, where the scalars are
0-D tensors so that a changing learning rate never recompiles.

The math always runs in at least fp32: storage formats decode to the compute dtype before the
update and encode after it (see ``_storage.py``). Nothing here knows how values are stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# --------------------------------------------------------------------------------------------------
# Weight-decay modes. The names follow the formulas, not the papers' marketing:
#   "l2":        g <- g + wd * p                        (Adam's coupled L2 penalty)
#   "decoupled": p <- p * (1 - lr * wd)                 (AdamW, Loshchilov & Hutter)
#   "full":      p <- p * (1 - (lr / max_lr) * wd)      (fully decoupled: decay independent of lr)
# "none" is used when wd == 0 so that no backend multiplies by 1 or adds 0 * p (which would turn an
# inf parameter into nan, unlike torch).
# "runtime" applies both the L2 term and the decay multiplier with values taken from Scalars (l2 = 0
# or decay = 1 make them exact no-ops for finite values): the fused backend uses it so that one
# compiled kernel serves every mode and switching modes never recompiles.
# --------------------------------------------------------------------------------------------------
WD_MODES = ("none", "l2", "decoupled", "full", "runtime")


class Flags(NamedTuple):
    """Choices fixed per call. The fused backend compiles one kernel per distinct Flags, so it
    passes ``wd_mode="runtime"`` and ``maximize=None`` (sign taken from ``Scalars.grad_sign``)."""

    wd_mode: str
    amsgrad: bool
    maximize: bool | None
    skip_nonfinite: bool = False  # elements with a non-finite gradient keep every old value


@dataclass
class Scalars:
    """Per-step scalars, computed on the host in float64 from the group and the step count.

    Attributes are Python floats for the reference/foreach backends and 0-D tensors for fused.
    """

    l2: Any  # coefficient of p added to g ("l2" mode)
    decay: Any  # multiplier of p ("decoupled"/"full" modes)
    one_minus_beta1: Any
    beta2: Any
    one_minus_beta2: Any
    eps: Any
    step_size: Any  # lr / (1 - beta1^t)
    bc2_sqrt: Any  # sqrt(1 - beta2^t)
    grad_sign: Any = 1.0  # -1 when maximizing (used only with Flags.maximize=None)

    FIELDS = (
        "l2",
        "decay",
        "one_minus_beta1",
        "beta2",
        "one_minus_beta2",
        "eps",
        "step_size",
        "bc2_sqrt",
        "grad_sign",
    )

    def as_list(self) -> list[float]:
        return [float(getattr(self, f)) for f in self.FIELDS]


def adam_scalars(
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    wd_mode: str,
    max_lr: float | None,
    step: float,
    maximize: bool = False,
) -> Scalars:
    """Scalars of step number ``step`` (1-based, already incremented)."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if wd_mode == "decoupled":
        decay = 1.0 - lr * weight_decay
    elif wd_mode == "full":
        decay = 1.0 - (lr / max_lr) * weight_decay  # type: ignore[operator]
    elif wd_mode == "runtime":
        raise ValueError("adam_scalars needs the group's own weight-decay mode, not 'runtime'")
    else:
        decay = 1.0
    return Scalars(
        l2=weight_decay if wd_mode == "l2" else 0.0,
        decay=decay,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        eps=eps,
        step_size=lr / bc1,
        bc2_sqrt=math.sqrt(bc2),
        grad_sign=-1.0 if maximize else 1.0,
    )


# --------------------------------------------------------------------------------------------------
# The stages. Each takes and returns values; none mutates its inputs.
# --------------------------------------------------------------------------------------------------


def decay(p, g, s: Scalars, f: Flags):
    """Stage 1: weight decay. Returns (p, g)."""
    if f.wd_mode in ("l2", "runtime"):
        g = g + p * s.l2
    if f.wd_mode in ("decoupled", "full", "runtime"):
        p = p * s.decay
    return p, g


def moments(g, m, v, s: Scalars):
    """Stage 2: exponential moving averages of g and g^2 (torch's lerp / mul+addcmul order)."""
    m = m.lerp(g, s.one_minus_beta1)
    v = v * s.beta2 + (g * g) * s.one_minus_beta2
    return m, v


def precondition(m, v, vmax, s: Scalars, f: Flags):
    """Stages 3-4: bias correction of v (the m correction is folded into step_size) and the
    preconditioned direction m / (sqrt(v_hat) + eps). With amsgrad the running max of v is used."""
    if f.amsgrad:
        vmax = vmax.maximum(v)
        v = vmax
    denom = v.sqrt() / s.bc2_sqrt + s.eps
    return m / denom, vmax


def select(cond, a, b):
    """Elementwise ``cond ? a : b`` for tensors and TensorLists."""
    if isinstance(cond, TensorList):
        bs = b.ts if isinstance(b, TensorList) else [b] * len(cond.ts)
        return TensorList([torch.where(c, x, y) for c, x, y in zip(cond.ts, a.ts, bs)])
    return torch.where(cond, a, b)


def adam_update(p, g, m, v, vmax, s: Scalars, f: Flags):
    """One Adam(W) step on compute-dtype values. Returns new (p, m, v, vmax); vmax is None
    unless amsgrad. With ``skip_nonfinite`` an element whose gradient is inf/nan keeps its old
    parameter and moments (the rest of its tensor and block steps normally)."""
    if f.skip_nonfinite:
        ok = g.isfinite()
        new = adam_update(p, select(ok, g, 0.0), m, v, vmax, s, f._replace(skip_nonfinite=False))
        olds = (p, m, v, vmax)
        return tuple(None if o is None else select(ok, n, o) for n, o in zip(new, olds))
    if f.maximize is None:
        g = g * s.grad_sign
    elif f.maximize:
        g = -g
    p, g = decay(p, g, s, f)
    m, v = moments(g, m, v, s)
    direction, vmax = precondition(m, v, vmax, s, f)
    p = p - direction * s.step_size
    return p, m, v, vmax


# --------------------------------------------------------------------------------------------------
# TensorList: the same operators over lists of tensors, one multi-tensor kernel per operator.
# --------------------------------------------------------------------------------------------------


class TensorList:
    """A list of tensors with elementwise arithmetic mapped to ``torch._foreach_*`` kernels.

    Operands may be another TensorList of the same length, a Python number or a 0-D tensor.
    """

    __slots__ = ("ts",)

    def __init__(self, ts: list[torch.Tensor]):
        self.ts = ts

    def __len__(self) -> int:
        return len(self.ts)

    @staticmethod
    def _other(o):
        return o.ts if isinstance(o, TensorList) else o

    def __neg__(self):
        return TensorList(torch._foreach_neg(self.ts))

    def __add__(self, o):
        return TensorList(torch._foreach_add(self.ts, self._other(o)))

    __radd__ = __add__

    def __sub__(self, o):
        return TensorList(torch._foreach_sub(self.ts, self._other(o)))

    def __mul__(self, o):
        return TensorList(torch._foreach_mul(self.ts, self._other(o)))

    __rmul__ = __mul__

    def __truediv__(self, o):
        return TensorList(torch._foreach_div(self.ts, self._other(o)))

    def sqrt(self):
        return TensorList(torch._foreach_sqrt(self.ts))

    def lerp(self, end, weight):
        return TensorList(torch._foreach_lerp(self.ts, end.ts, weight))

    def maximum(self, o):
        return TensorList(torch._foreach_maximum(self.ts, o.ts))

    def isfinite(self):
        return TensorList([t.isfinite() for t in self.ts])
