"""The one registry of the names the tools share: optimizers, precisions and state formats.

``adamkit train``, ``race``, ``bench`` and ``plan`` look every name up here, so an optimizer or a
recipe added once is trained, raced, benchmarked and planned alike:

- :data:`OPTIMIZERS`: each optimizer's title, how the tools build it (:class:`Training`: class,
  tuned lr and decay; None for those the tools only plan) and, for adamkit's own, the class whose
  algorithm's slots give its state exactly (the planner counts bytes from them; the planner's
  ``recipes`` module adds the state layouts of the other implementations).
- :data:`PRECISIONS`: a parameter dtype and what keeps low-precision training accurate (master
  weights, Kahan summation, stochastic rounding), with the adamkit options that select it.
- :data:`STATE_FORMATS`: the optimizer state's storage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import adamkit

# --------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Training:
    """How the tools build an optimizer: its class, tuned lr and decay, fixed keyword arguments."""

    label: str  # e.g. "adamkit.AdamW"
    factory: Callable[..., torch.optim.Optimizer]
    lr: float
    weight_decay: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    adamkit: bool = False  # accepts adamkit's precision / state-format options
    # (model, weight decay) -> parameter groups; None: param_groups_weight_decay
    groups: Callable[[nn.Module, float], list[dict[str, Any]]] | None = None
    # Schedule-Free: trained at a constant lr with the optimizer's own warmup (``warmup_steps``),
    # evaluated in its eval mode (the average x), no warmup + cosine schedule
    schedule_free: bool = False


@dataclass(frozen=True)
class Optimizer:
    """One optimizer of the tools.

    Attributes:
        name: the name every tool takes (``--optimizer``, a recipe phrase).
        title: its display name.
        train: how ``train``/``race`` build it; None: planned only (no training recipe).
        adamkit: ``(class name, slot options)`` of the adamkit class whose algorithm's slots are its
            state (the options that are on, or a rule giving them from a parameter's shape); None
            for other implementations.
    """

    name: str
    title: str
    train: Training | None = None
    adamkit: tuple[str, tuple[str, ...] | Callable[[tuple], tuple[str, ...]]] | None = None


# AdEMAMix and Schedule-Free: the lrs picked on `adamkit train`'s settings (600 steps of the 4x128
# GPT, seed 0, `--threads 1`), validation loss at step 600 (AdamW at 3e-3: 1.461).
# AdEMAMix (alpha 5, betas (0.9, 0.999, 0.9999), no alpha/beta3 warmup, decoupled decay 0.1):
# 1e-3 1.661, 3e-3 1.463, 1e-2 2.144.
ADEMAMIX_LR = 3e-3
# Schedule-Free AdamW (decay 0.1 at y; its own warmup over the run's first 5 %, then a constant lr):
# 1e-3 1.688, 2e-3 1.581, 3e-3 1.514, 5e-3 1.457, 7e-3 1.704, 1e-2 2.219.
SCHEDULE_FREE_LR = 5e-3

# The lr of the parameters Muon leaves to its AdamW fallback (Keller Jordan's recipe
# gives embeddings, the output head and vectors to AdamW).
MUON_ADAMW_LR = 3e-3


def muon_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Muon on the hidden layers' matrices; AdamW on embeddings, the output head (the last Linear)
    and vectors (no decay on vectors, as param_groups_weight_decay)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    aside = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    aside |= {id(p) for p in linears[-1].parameters()} if linears else set()
    hidden, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or name.endswith(".bias"):
            vectors.append(p)
        else:
            (matrices if id(p) in aside or p.dim() != 2 else hidden).append(p)
    groups = [
        {"params": hidden, "use_muon": True, "weight_decay": weight_decay},
        {"params": matrices, "use_muon": False, "weight_decay": weight_decay, "lr": MUON_ADAMW_LR},
        {"params": vectors, "use_muon": False, "weight_decay": 0.0, "lr": MUON_ADAMW_LR},
    ]
    return [g for g in groups if g["params"]]


# Weight decay, where used, applies to matrices and embeddings only (not to biases and LayerNorm
# gains), as in GPT-2 / nanoGPT. SGD has no per-coordinate scaling and needs a much larger lr than
# Adam: on 200 steps of the default GPT, momentum 0.9 with lr 0.3 diverged, 0.1 and 0.05 reached the
# same validation loss; 0.05 leaves a margin. Adam(W) at 1e-2 did clearly worse than at 3e-3; on the
# quick race, where the variants' lrs were picked, AdamW's is the best of four too (val loss: 1e-3
# 3.58, 3e-3 3.10, 1e-2 3.11, 3e-2 3.30).
_SGD_MOMENTUM = Training("torch.optim.SGD", torch.optim.SGD, lr=0.05, kwargs={"momentum": 0.9})
OPTIMIZERS: dict[str, Optimizer] = {
    o.name: o
    for o in (
        Optimizer(
            "adamw", "AdamW", Training("adamkit.AdamW", adamkit.AdamW, 3e-3, 0.1, adamkit=True), ("AdamW", ())
        ),
        Optimizer("adam", "Adam", Training("adamkit.Adam", adamkit.Adam, 3e-3, adamkit=True), ("Adam", ())),
        # AdamW with the cautious mask (Liang et al. 2024), at AdamW's lr and decay
        Optimizer(
            "adamw-cautious",
            "AdamW (cautious)",
            Training(
                "adamkit.AdamW(cautious=True)",
                adamkit.AdamW,
                3e-3,
                0.1,
                kwargs={"cautious": True},
                adamkit=True,
            ),
            ("AdamW", ()),
        ),
        Optimizer(
            "torch-adamw", "AdamW (torch)", Training("torch.optim.AdamW", torch.optim.AdamW, 3e-3, 0.1)
        ),
        Optimizer("sgd", "SGD"),  # momentum 0: planned only (no state)
        Optimizer("sgd-momentum", "SGD+momentum", _SGD_MOMENTUM),
        # Lion's update is lr * sign(c) per element, larger than Adam's: the paper advises a 3-10x
        # smaller lr and a 3-10x larger decay (keeping lr * wd, the decay per step, about AdamW's)
        Optimizer(
            "lion", "Lion", Training("adamkit.Lion", adamkit.Lion, 1e-3, 0.3, adamkit=True), ("Lion", ())
        ),
        # The memory-lean variants. Adafactor's lr caps a *relative* step (min(lr, 1/sqrt(t)) times
        # the weight's RMS); LAMB's step is lr * ||p|| per tensor (trust ratio). Their lrs were
        # picked on the quick race only (val loss: Adafactor 1e-2 4.16, 3e-2 3.15, 1e-1 2.58; LAMB
        # 3e-3 4.42, 1e-2 4.09, 3e-2 3.03; AdamW 3e-3 3.10). CAME and Adam-mini take Adam-sized
        # steps: AdamW's lr and decay (quick race 3.02 and 3.07).
        Optimizer(
            "adafactor",
            "Adafactor",
            Training("adamkit.Adafactor", adamkit.Adafactor, 1e-1, adamkit=True),
            ("Adafactor", ()),
        ),
        Optimizer("adafactor-m", "Adafactor+momentum", None, ("Adafactor", ("beta1",))),
        Optimizer(
            "came", "CAME", Training("adamkit.CAME", adamkit.CAME, 3e-3, 0.1, adamkit=True), ("CAME", ())
        ),
        Optimizer(
            "adam-mini",
            "Adam-mini",
            Training("adamkit.AdamMini", adamkit.AdamMini, 3e-3, 0.1, adamkit=True),
            ("AdamMini", ()),
        ),
        # Sophia-G is planned only: it needs update_hessian() on sampled-label gradients, which the
        # training loop does not produce
        Optimizer("sophia", "Sophia", None, ("SophiaG", ())),
        # ADOPT, decoupled decay 0.1, at AdamW's lr: the quick race favoured 3e-2 (val loss: 1e-3
        # 3.39, 3e-3 2.99, 1e-2 2.92, 3e-2 2.86, 1e-1 3.36, 3e-1 3.46; AdamW 3e-3 3.10), but on
        # `adamkit train`'s 600 steps of the 4x128 GPT (seed 0) 3e-2 ends at 2.500, 1e-2 at 2.258,
        # 3e-3 at 1.448 (AdamW 1.461), and the 400-step race at 3e-2 at 2.530
        Optimizer(
            "adopt",
            "ADOPT",
            Training("adamkit.ADOPT", adamkit.ADOPT, 3e-3, 0.1, kwargs={"decouple": True}, adamkit=True),
            ("ADOPT", ()),
        ),
        # AdEMAMix: Adam's step plus alpha times the slow momentum's (ADEMAMIX_LR's note)
        Optimizer(
            "ademamix",
            "AdEMAMix",
            Training("adamkit.AdEMAMix", adamkit.AdEMAMix, ADEMAMIX_LR, 0.1, adamkit=True),
            ("AdEMAMix", ()),
        ),
        # Schedule-Free AdamW (SCHEDULE_FREE_LR's note)
        Optimizer(
            "schedule-free",
            "Schedule-Free AdamW",
            Training(
                "adamkit.ScheduleFreeAdamW",
                adamkit.ScheduleFreeAdamW,
                SCHEDULE_FREE_LR,
                0.1,
                adamkit=True,
                schedule_free=True,
            ),  # fmt: skip
            ("ScheduleFreeAdamW", ()),
        ),
        # StableAdamW: AdamW whose lr is divided by each tensor's update RMS where it exceeds 1;
        # decay 0.1, lr picked on the quick race (val loss: 1e-3 3.64, 3e-3 3.12, 1e-2 3.08, 3e-2
        # 3.31, 1e-1 3.03: noisy; the middle of the good range)
        Optimizer(
            "stable-adamw",
            "StableAdamW",
            Training("adamkit.StableAdamW", adamkit.StableAdamW, 1e-2, 0.1, adamkit=True),
            ("StableAdamW", ()),
        ),
        Optimizer(
            "lamb", "LAMB", Training("adamkit.Lamb", adamkit.Lamb, 3e-2, 0.1, adamkit=True), ("Lamb", ())
        ),
        # Muon's lr is that of its hidden matrices (the "original" adjustment, sqrt(max(1, A/B)));
        # the AdamW fallback keeps AdamW's tuned 3e-3. Picked on the quick race (val loss: 5e-3
        # 3.04, 1e-2 3.00, 2e-2 2.98, 5e-2 3.06, 1e-1 3.07; AdamW 3e-3 3.10). The constructor's
        # split: 2-D parameters take Muon (momentum), the others AdamW (m, v).
        Optimizer(
            "muon",
            "Muon",
            Training("adamkit.Muon", adamkit.Muon, 2e-2, 0.1, adamkit=True, groups=muon_groups),
            ("Muon", lambda shape: ("use_muon",) if len(shape) == 2 else ("use_adamw",)),
        ),
    )
}
# Each trainable optimizer's learning rate as its paper or reference package gives it: the centre
# of the race's learning-rate sweep (``race --sweep``), the same multipliers for every optimizer.
PAPER_LR: dict[str, float] = {
    "adamw": 1e-3, "adam": 1e-3, "adamw-cautious": 1e-3, "torch-adamw": 1e-3,
    "sgd-momentum": 1e-2,  # torch's SGD has no default; a common one with momentum 0.9
    "lion": 1e-4,  # lion-pytorch's default (the paper: 3-10x below AdamW's)
    "adafactor": 1e-2,  # torch.optim.Adafactor's (its relative step's cap)
    "came": 2e-4, "adam-mini": 1e-3, "adopt": 1e-3, "ademamix": 1e-3,
    "schedule-free": 2.5e-3,  # schedulefree.AdamWScheduleFree's
    "stable-adamw": 1e-3, "lamb": 1e-3,
    "muon": 2e-2,  # Keller Jordan's recipe (torch.optim.Muon's default is 1e-3)
}  # fmt: skip

# Names command lines and saved training runs used before this registry: "sgd" trained SGD with
# momentum 0.9 (now "sgd-momentum"; "sgd" itself is plain SGD, as the planner always had it).
TRAIN_ALIASES = {"sgd": "sgd-momentum"}
# what train and race can build, by every name they accept
TRAINABLE: dict[str, Training] = {n: o.train for n, o in OPTIMIZERS.items() if o.train is not None}
TRAINABLE.update({alias: TRAINABLE[name] for alias, name in TRAIN_ALIASES.items()})


def adamkit_algorithm(name: str):
    """The algorithm declaration (``adamkit.algorithm.Algorithm``) behind optimizer ``name``."""
    return getattr(adamkit, OPTIMIZERS[name].adamkit[0]).algorithm


def adamkit_slots(name: str, shape: tuple, amsgrad: bool = False) -> list:
    """The slots adamkit's optimizer ``name`` keeps for a parameter of ``shape``: those whose option
    is on (``amsgrad`` turns on Adam's) and whose shape rule keeps them for that shape."""
    options = OPTIMIZERS[name].adamkit[1]
    on = set(options(tuple(shape)) if callable(options) else options) | ({"amsgrad"} if amsgrad else set())
    return [
        s
        for s in adamkit_algorithm(name).slots
        if s.shape_for(shape) is not None and (s.option is None or s.option in on)
    ]


# --------------------------------------------------------------------------------------------------
# Precisions and state formats
# --------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A parameter dtype and what keeps training accurate in it (at most one of the three)."""

    dtype: str  # "fp32", "bf16", "fp16"; gradients have the same dtype
    master: bool = False  # an fp32 master copy takes the update (+4 B/param)
    kahan: bool | str = False  # a compensation buffer: True in the parameter dtype, "8bit" int8
    sr: bool = False  # stochastic rounding (no buffer)
    about: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kwargs(self) -> dict[str, Any]:
        """The adamkit options that select this precision (none for fp32)."""
        if self.dtype == "fp32":
            return {}
        if self.master:
            return {"master_weights": True}
        if self.sr:
            return {"stochastic_rounding": True, "kahan_sum": False}
        return {"kahan_sum": self.kahan}


_MIXED_BF16 = Precision("bf16", master=True, about="bf16 parameters + fp32 master")
_BF16 = Precision("bf16", about="bf16 parameters, round to nearest")
PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", about="fp32 parameters"),
    # An fp32 master copy (+4 B/param) takes the update; the low-precision weights are rounded from it.
    "mixed-bf16": _MIXED_BF16,
    "bf16-master": _MIXED_BF16,  # the same recipe, by the name the race gives it
    "mixed-fp16": Precision("fp16", master=True, about="fp16 parameters + fp32 master"),
    # bf16 keeps 8 mantissa bits: an update smaller than 2^-9 of a weight is lost when added.
    # Kahan summation keeps the lost low bits in a bf16 buffer (+2 B/param) and adds them back.
    "bf16-kahan": Precision("bf16", kahan=True, about="bf16 parameters + Kahan summation"),
    # The same with the lost bits in an int8 buffer (+1 B/param), in units of ulp/256: ~16 bits.
    "bf16-kahan8": Precision("bf16", kahan="8bit", about="bf16 parameters + int8 Kahan compensation"),
    "fp16-kahan": Precision("fp16", kahan=True, about="fp16 parameters + Kahan summation"),
    # Stochastic rounding rounds up or down with probability by distance: unbiased, no buffer.
    "bf16-sr": Precision("bf16", sr=True, about="bf16 parameters + stochastic rounding"),
    "fp16-sr": Precision("fp16", sr=True, about="fp16 parameters + stochastic rounding"),
    # Round to nearest, nothing kept: the failure mode the recipes above exist to avoid.
    "bf16": _BF16,
    "bf16-plain": _BF16,  # the same recipe, by the name the race gives it
    "fp16": Precision("fp16", about="fp16 parameters, round to nearest"),
}
# What train and race can run: fp16 training needs a loss scaler, which their loop does not have.
TRAIN_PRECISIONS = tuple(n for n, p in PRECISIONS.items() if p.dtype != "fp16")

# state format name -> adamkit's state_format (None: the default, the parameter's dtype)
STATE_FORMATS: dict[str, str | None] = {"default": None, "fp32": "fp32", "bf16": "bf16", "8bit": "8bit"}


class RecipeUnavailableError(RuntimeError):
    """The installed adamkit does not accept an option that a recipe needs."""


def optimizer_kwargs(optimizer: str, precision: str = "fp32", state: str = "default") -> dict[str, Any]:
    """The keyword arguments a (optimizer, precision, state) recipe passes beyond lr and decay."""
    for name, table, what in (
        (optimizer, TRAINABLE, "optimizer"),
        (precision, PRECISIONS, "precision"),
        (state, STATE_FORMATS, "state"),
    ):
        if name not in table:
            raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    spec = TRAINABLE[optimizer]
    extra = recipe_options(precision, state)
    if extra and not spec.adamkit:
        raise ValueError(
            f"precision {precision!r} / state {state!r} need an adamkit optimizer "
            f"({', '.join(k for k, v in TRAINABLE.items() if v.adamkit)}), "
            f"not {optimizer!r}"
        )
    return {**spec.kwargs, **extra}


def recipe_options(precision: str, state: str) -> dict[str, Any]:
    """The adamkit options of a precision and a state format."""
    fmt = STATE_FORMATS[state]
    return {**PRECISIONS[precision].kwargs, **({"state_format": fmt} if fmt else {})}


def cast_model(model: nn.Module, precision: str) -> nn.Module:
    """Cast ``model``'s parameters to the precision recipe's dtype (in place; returns it)."""
    return model.to(PRECISIONS[precision].torch_dtype)


def build_optimizer(
    model: nn.Module,
    optimizer: str = "adamw",
    lr: float | None = None,
    precision: str = "fp32",
    state: str = "default",
    **engine: Any,
) -> torch.optim.Optimizer:
    """The optimizer of a recipe over ``model``'s parameters (already cast to the recipe's dtype).
    ``engine``: adamkit engine options (``gradient_release``, ``max_grad_norm``), adamkit only.

    Raises:
        ValueError: an unknown name, or precision/state options on a non-adamkit optimizer.
        RecipeUnavailableError: the installed adamkit does not accept an option the recipe needs.
    """
    kwargs = optimizer_kwargs(optimizer, precision, state)
    spec = TRAINABLE[optimizer]
    lr = spec.lr if lr is None else lr
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    groups = (spec.groups or adamkit.param_groups_weight_decay)(model, spec.weight_decay)
    if engine and not spec.adamkit:
        raise ValueError(f"{', '.join(engine)} need an adamkit optimizer, not {optimizer!r}")
    extra = {**recipe_options(precision, state), **engine}
    try:
        return spec.factory(groups, lr=lr, **kwargs, **engine)
    except TypeError as err:
        if not extra:
            raise
        args = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise RecipeUnavailableError(
            f"{spec.label}({args}) is not supported by this adamkit ({err})"
        ) from err
