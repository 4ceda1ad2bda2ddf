"""What an algorithm declares, and the engine's per-element wrapper around its update.

An algorithm is a small declaration (see ``adam.py``, ``lion.py``):

- its state slots (:class:`Slot`): name, sign (8-bit codes for signed values differ from those for
  magnitudes), the group option that enables the slot (AMSGrad's running maximum), bytes;
- its hyperparameters: defaults and a ``check`` that turns a group into validated floats;
- its scalars: a ``NamedTuple`` whose first field is ``grad_sign`` (-1 to maximize), computed on the
  host from the hyperparameters and the step number;
- its update, written once on fp32 (or fp64) values with Python operators, a few methods
  (``maximum``, ``sign``, ``isnan``) and, for every operation the native kernel rounds once, the
  correctly rounded functions of ``adamkit.ieee`` (``sqrt_rn``, ``div_rn``, ``fma_rn``,
  ``lerp_rn``: torch's CPU square root differs between hosts), all of which work on tensors and on
  the foreach backend's tensor lists alike; the reference backend runs it and tests hold every
  other path to it (the native kernel bit for bit, on any host);
- the id of its body in the native kernel (``kernels/kernel.c``), if it has one.

Storage formats, precision options, kernels, state dicts and the planner come from the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple


class Flags(NamedTuple):
    """Choices fixed per call (one compiled kernel per distinct value)."""

    wd_mode: str  # "none", "l2", "decoupled", "full"; "runtime" in the compiled kernel
    maximize: bool | None = False  # None: the sign is taken from the scalars (compiled kernel)
    skip_nonfinite: bool = False  # elements with a non-finite gradient keep every old value
    # the algorithm's own switches that are on: those that enable slots (Adam's "amsgrad",
    # Adafactor's "beta1") and those its update reads (Muon's "nesterov")
    options: tuple[str, ...] = ()

    def on(self, option: str) -> bool:
        """Whether the algorithm's switch ``option`` is on."""
        return option in self.options


@dataclass(frozen=True)
class Slot:
    """One state tensor an algorithm keeps per parameter, shaped like the parameter unless ``shape``
    says otherwise (Adafactor's row/column statistics, Adam-mini's per-row v)."""

    name: str  # the state-dict key (torch's where torch has the algorithm)
    signed: bool  # values of both signs (8-bit: signed codes) or magnitudes only
    option: str | None = None  # the group option that enables it (None: always kept)
    # parameter shape -> this slot's shape, or None where the slot is not kept for a parameter of
    # that shape (Adafactor keeps row/col for matrices, a full variance for vectors). None: the
    # parameter's shape. 8-bit storage encodes such a slot as its own flat blocks.
    shape: Callable[[tuple], tuple | None] | None = None
    # parameter shape -> whether this slot's dim 0 is the parameter's dim 0 (its rows), so that it
    # is split between ranks with the parameter's rows under FSDP2 (Shard(0)); otherwise every rank
    # keeps it whole (Replicate: Adafactor's column statistics of a matrix, a vector's one v in
    # Adam-mini), and the update's reductions over the rows reach it through torch.distributed.
    # None: only a slot of the parameter's own shape follows its rows.
    rows: Callable[[tuple], bool] | None = None
    # a copy of the weights, not a statistic (Schedule-Free's z): it starts as the parameter's
    # full-precision value (others start at zero) and keeps fp32 (fp64 for fp64 parameters) in
    # every state format, as rounding it to bf16 or 8 bit would lose the small updates Kahan or
    # master weights keep
    weights: bool = False

    def shape_for(self, param_shape) -> tuple | None:
        """This slot's shape for a parameter of ``param_shape``; None where it is not kept."""
        return tuple(param_shape) if self.shape is None else self.shape(tuple(param_shape))

    def follows_rows(self, param_shape) -> bool:
        """Whether this slot is split with its parameter's rows (see ``rows``)."""
        if self.shape is None:
            return True
        return self.rows is not None and self.rows(tuple(param_shape))


@dataclass(frozen=True)
class Accumulation:
    """How an algorithm folds the gradients of k micro-batches into its state without a gradient
    buffer (optimizer accumulation, ``accumulation_steps=k`` with gradient release).

    Micro-batches 1..k-1 only ``fold`` their gradient into the slots (parameters, decay and step
    counters unchanged); the k-th runs the algorithm's ordinary update (every backend, the native
    kernel included) with the scalars ``last`` returns, chosen so that the folded slots and the
    k-th gradient give the window's result. The algorithm's docstring states what is exact (the
    parts linear in g) and what is approximated."""

    # validated hyperparameters -> None; raises where the fold is not defined (e.g. a beta of 0)
    check: Callable[[dict], None]
    # (p, g, slots, hyperparameters, flags, k) -> new slots (None: unchanged); g already carries
    # the sign and the gradient multiplier (clipping)
    fold: Callable[..., list]
    # (scalars of the window's step, k) -> the scalars of its last micro-batch
    last: Callable[[Any, int], Any]


@dataclass(frozen=True)
class Algorithm:
    name: str  # for messages: "Adam", "Lion"
    slots: tuple[Slot, ...]
    check: Callable[[dict], dict]  # group -> validated hyperparameters (floats); raises on bad input
    flags: Callable[[dict, dict], Flags]  # (group, checked hyperparameters) -> Flags
    scalars: Callable[[dict, float, Flags], tuple]  # (hyperparameters, step, flags) -> Scalars
    update: Callable[..., tuple]  # (p, g, slots, scalars, flags) -> (p, slots)
    scalar_type: type  # the NamedTuple ``scalars`` returns (field order = the native kernel's)
    native: str | None = None  # the name of its body in kernel.c's ALGORITHMS; None where it has none
    # an optional runner on torch's own fused kernels, for when the native kernel is unavailable
    # (items, hyperparameters, flags) -> the items it did not serve
    torch_fused: Callable[..., list] | None = None
    # whether the update reads the step number (bias corrections): state dicts without a "step"
    # (e.g. lion-pytorch's) load into an algorithm that does not, as step 0
    uses_step: bool = True
    # False: ``update`` reduces over a tensor (norms, row means) or keeps slots of other shapes, so
    # it runs on plain tensors only: the foreach backend and backend auto/fused run it one tensor at
    # a time through the reference loop (no TensorList, no compiled kernel; see ``run_foreach``).
    # Its slots may then be None (not kept for that parameter's shape: ``Slot.shape``).
    elementwise: bool = True
    # optimizer accumulation (``accumulation_steps``); None where it is not defined for the update
    accumulation: Accumulation | None = None
    # why ``accumulation`` is None, for the error a user gets asking for it
    no_accumulation: str = "its update is not defined on folded micro-batch gradients"

    def active_slots(self, flags: Flags) -> tuple[Slot, ...]:
        return tuple(s for s in self.slots if s.option is None or flags.on(s.option))


def where(cond, a, b):
    """Elementwise ``cond ? a : b`` for tensors and the foreach backend's TensorLists."""
    if hasattr(cond, "choose"):  # a TensorList (torch.Tensor.where has other semantics)
        return cond.choose(a, b)
    import torch

    return torch.where(cond, a, b)


def caution(a, b, f: Flags):
    r"""The cautious mask (Liang et al., "Cautious Optimizers: Improving Training with One Line of
    Code", arXiv 2411.16085) where ``f`` has the switch ``cautious`` on, else ``a`` itself.

    :math:`a \cdot [a b > 0] \cdot \frac{n}{c + 1}` with n the tensor's element count and c how many
    elements keep their component: an update component whose sign disagrees with the gradient's
    (``b``) is dropped and the rest are rescaled, normalized as pytorch_optimizer's
    ``apply_cautious`` (timm's ``cadamw`` divides by ``max(c / n, 1e-3)`` instead). The factor
    :math:`n/(c+1)` is a double division rounded once to the compute dtype; the mask times the
    factor is exact, so ``a`` is rounded once (a nan component stays nan, as there). It is a
    reduction over each whole tensor (a DTensor's over the whole tensor): the foreach backend takes
    it per tensor, the native kernel counts in a first pass."""
    if not f.on("cautious"):
        return a
    if hasattr(a, "ts"):  # a TensorList: one factor per tensor
        return type(a)([caution(x, y, f) for x, y in zip(a.ts, b.ts)])
    import torch

    keep = a * b > 0
    count = keep.sum()
    if hasattr(count, "full_tensor"):  # a DTensor: the whole tensor's count (a collective)
        count = count.full_tensor()
    factor = torch.full((), keep.numel(), dtype=torch.float64, device=count.device) / (count.double() + 1)
    if hasattr(keep, "full_tensor"):  # sharded: the reference's per-tensor path syncs anyway
        return a * (keep.to(a.dtype) * float(factor.to(a.dtype)))
    return a * (keep.to(a.dtype) * factor.to(a.dtype))
