"""Recipes: what a training run keeps per parameter, named by the phrases of a recipe spec
(precision, optimizer, state format, modifiers), and what each optimizer's state is.

adamkit's own optimizers are described by their algorithms' slot declarations
(:data:`ADAMKIT_CLASSES`, ``Algorithm.slots``), never re-declared here; the other optimizers the
planner estimates (SGD, the reference implementations of the variants) by their state layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...optim.options import ENGINE_DEFAULTS
from ...storage import quant8
from .. import registry
from ..registry import adamkit_algorithm, adamkit_slots
from .models import ModelSpec, TensorSpec

# adamkit's 8-bit state format (``storage.quant8``): uint8 codes padded to whole groups of 32, one
# bf16 scale per group; tensors smaller than MIN_8BIT_SIZE keep fp32 state (the engine's default)
BLOCK_SIZE = quant8.BLOCK
MIN_8BIT_SIZE = ENGINE_DEFAULTS["min_8bit_size"]
SCALE_BYTES = quant8.SCALE_BYTES

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {
    "float64": "fp64",
    "double": "fp64",
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}

# Every component the planner reports, in table order, with what it is.
COMPONENTS = {
    "params": "parameters",
    "grads": "gradients (parameter dtype)",
    "grad_accum": "fp32 gradient-accumulation buffer",
    "master": "fp32 master weights",
    "kahan": "Kahan compensation buffer",
    "m": "first moment / momentum",
    "v": "second moment (factored / per block for Adafactor, CAME, Adam-mini)",
    "max_v": "running max of v (amsgrad)",
    "hessian": "diagonal Hessian estimate (Sophia)",
    "confidence": "factored confidence statistics (CAME)",
    "z": "fp32 copy of the weights (Schedule-Free's z)",
    "scales": "8-bit group scales (bf16)",
    "step": "step counters (one tensor per parameter tensor)",
}

# state key of adamkit's optimizers -> planner component (``*_scale``: "scales")
STATE_COMPONENTS = {
    "step": "step",
    "exp_avg": "m",
    "exp_avg_sq": "v",
    "max_exp_avg_sq": "max_v",
    "kahan_comp": "kahan",
    "kahan_comp8": "kahan",
    "master_weight": "master",
    "hessian": "hessian",
    "momentum_buffer": "m",
    "exp_avg_slow": "m",  # AdEMAMix's slow momentum
    "z": "z",  # Schedule-Free's base sequence
}


def state_component(key: str) -> str:
    """The planner component of an adamkit optimizer's state key (a live state dict's key):
    ``*_scale`` -> "scales", Kahan/master buffers and step by name, CAME's ``*_res_*`` ->
    "confidence", m-like slots -> "m", every other statistic of v -> "v"."""
    if key.endswith("_scale"):
        return "scales"
    if key in STATE_COMPONENTS:
        return STATE_COMPONENTS[key]
    return "confidence" if "_res" in key else "v"


# adamkit's optimizers (the registry's with an adamkit class): name -> (class, slot options). Their
# bytes come from the class's algorithm's slots (``Algorithm.slots``: names, shapes, options), so a
# new slot or a new algorithm in the registry is planned with no change here.
ADAMKIT_CLASSES = {n: o.adamkit for n, o in registry.OPTIMIZERS.items() if o.adamkit is not None}
ADAMKIT_OPTIMIZERS = tuple(ADAMKIT_CLASSES)


def _factored_numel(shape: tuple[int, ...]) -> int | None:
    """Elements of a factored second moment (row and column statistics), or None below 2-D.

    Adafactor, CAME and torch.optim.Adafactor factor over the last two dimensions: row statistics
    have shape ``shape[:-1]``, column statistics ``shape[:-2] + shape[-1:]``.
    """
    if len(shape) < 2:
        return None
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


# Adam-mini's partition, by parameter name, as in the reference implementation (adam-mini 1.1):
# biases keep Adam's full v; query/key weights one v per head; embeddings, output head, value,
# attention output and MLP weights one v per output row; anything else (norms) one v per tensor.
_MINI_FULL = ("bias",)
_MINI_HEADS = ("k_proj", "q_proj", "wq", "wk", "query", "key")
_MINI_ROWS = ("embed", "embd", "wte", "lm_head", "output", "final_layer", "v_proj", "wv", "value", "o_proj",
              "wo", "attn.proj", "feed_forward", "linear", "mlp")  # fmt: skip


def adam_mini_v_numel(t: TensorSpec, model: ModelSpec) -> tuple[int, bool]:
    """Adam-mini's v for one tensor: ``(elements, full)``; ``full`` means one v per element.

    Assumption: the reference implementation's name-based partition (see ``_MINI_*``). Query/key
    blocks are heads of ``hidden_size * hidden_size / num_heads`` elements; without transformer
    shapes (a module given as a callable) they fall back to one v per output row.
    """
    if any(k in t.name for k in _MINI_FULL):
        return t.numel, True
    if any(k in t.name for k in _MINI_HEADS) and model.hidden_size and model.num_heads:
        head_numel = model.hidden_size * model.hidden_size // model.num_heads
        return max(1, t.numel // head_numel), False
    if len(t.shape) >= 2 and any(k in t.name for k in _MINI_HEADS + _MINI_ROWS):
        return t.shape[0], False
    return 1, False


@dataclass(frozen=True)
class OptimizerSpec:
    """What one optimizer keeps per parameter tensor.

    Attributes:
        name: its name in the registry (``tools.registry.OPTIMIZERS``, which gives its title).
        step_bytes: bytes of the step counter per parameter tensor (0 where the reference
            implementation keeps a Python int, 4 where a 0-D fp32 tensor).
        full: full-size states (component names); they follow the recipe's state format.
        needs_shapes: the state depends on tensor shapes (factored / per-block statistics).
        reference: where the state layout comes from.
        adamkit: the key of :data:`ADAMKIT_CLASSES` whose algorithm's slots give the states
            (exactly as adamkit keeps them: ``full`` and ``needs_shapes`` are derived from them);
            None: the reference implementation's layout, written out here.
    """

    name: str
    step_bytes: int
    full: tuple[str, ...] = ()
    needs_shapes: bool = False
    reference: str = ""
    adamkit: str | None = None

    def __post_init__(self) -> None:
        if self.adamkit is not None:  # the parameter-shaped slots every parameter keeps
            slots = adamkit_algorithm(self.adamkit).slots
            full = tuple(state_component(s.name) for s in slots if s.shape is None and s.option is None)
            object.__setattr__(self, "full", full)
            # slots of their own shapes, or options chosen by shape (Muon's split)
            by_shape = callable(ADAMKIT_CLASSES[self.adamkit][1]) or any(s.shape is not None for s in slots)
            object.__setattr__(self, "needs_shapes", by_shape)

    @property
    def title(self) -> str:
        return registry.OPTIMIZERS[self.name].title

    def has_full_state(self, recipe: Recipe) -> bool:
        return bool(self.full or self.needs_shapes or recipe.amsgrad)

    def states(self, t: TensorSpec, model: ModelSpec, recipe: Recipe) -> list[tuple[str, int, bool]]:
        """``(component, elements, full)`` of each state tensor of one trainable parameter.

        Full states are stored in the recipe's state format (8-bit included); the small factored
        or per-block statistics in the state dtype (fp32 when the format is 8-bit: they are tiny).
        """
        n = t.numel
        if self.adamkit is not None:
            return [
                (state_component(s.name), math.prod(s.shape_for(t.shape)), s.shape is None)
                for s in adamkit_slots(self.adamkit, t.shape, recipe.amsgrad)
            ]
        out = [(c, n, True) for c in self.full]
        if recipe.amsgrad:
            out.append(("max_v", n, True))
        if self.name in ("adafactor", "adafactor-m", "came"):
            fac = _factored_numel(t.shape)
            if fac is None:
                out.append(("v", n, True))
            else:
                out.append(("v", fac, False))
                if self.name == "came":  # confidence (residual) statistics exist only when factored
                    out.append(("confidence", fac, False))
        elif self.name == "adam-mini":
            k, full = adam_mini_v_numel(t, model)
            out.append(("v", k, full))
        return out


# What the other implementations keep, where the planner estimates theirs: the optimizers the
# registry names without an adamkit class, and those whose reference package it plans (its
# ``--optimizer came`` is the CAME reference's bytes; adamkit's own are adamkit_state_bytes').
_REFERENCE_LAYOUTS = (
    OptimizerSpec("torch-adamw", 4, ("m", "v"), reference="torch.optim.AdamW: exp_avg, exp_avg_sq"),
    OptimizerSpec("sgd", 0, (), reference="torch.optim.SGD, momentum=0"),
    OptimizerSpec("sgd-momentum", 0, ("m",), reference="torch.optim.SGD momentum_buffer"),
    OptimizerSpec("adafactor", 4, (), True, "torch.optim.Adafactor: row/col variance, beta1=None"),
    OptimizerSpec("adafactor-m", 4, ("m",), True, "Adafactor with beta1 (exp_avg)"),
    OptimizerSpec("came", 0, ("m",), True, "CAME reference: exp_avg, factored v and residual"),
    OptimizerSpec("adam-mini", 0, ("m",), True, "adam-mini 1.1: m, one v per block"),
    OptimizerSpec("sophia", 4, ("m", "hessian"), reference="SophiaG reference: exp_avg, hessian"),
    OptimizerSpec("lamb", 0, ("m", "v"), reference="torch-optimizer Lamb: exp_avg, exp_avg_sq"),
)
_REFERENCE = {o.name: o for o in _REFERENCE_LAYOUTS}
# Every optimizer of the registry, in its order: a reference layout where one is written above,
# else adamkit's own from its slots (AdamW, Adam, Lion: a 0-D step tensor like torch's; Muon's split
# by shape: momentum for matrices, AdamW's m and v for the rest)
OPTIMIZERS: dict[str, OptimizerSpec] = {
    n: _REFERENCE[n]
    if n in _REFERENCE
    else OptimizerSpec(n, 4, reference=f"adamkit.{o.adamkit[0]}", adamkit=n)
    for n, o in registry.OPTIMIZERS.items()
}


# ----------------------------------------------------------------------------------------------
# Recipes: precision, optimizer, state format
# ----------------------------------------------------------------------------------------------

# Precision phrases of a recipe spec (``tools.registry.PRECISIONS``) and state-format phrases
PRECISIONS = registry.PRECISIONS
STATE_FORMATS = {("8bit" if f == "8bit" else f"{f}state"): f for f in registry.STATE_FORMATS.values() if f}
MODIFIERS = ("amsgrad", "accum", "release")


def _dtype_name(dtype: Any) -> str:
    """``"bf16"`` from ``torch.bfloat16``, ``"bfloat16"`` or ``"bf16"``."""
    s = str(dtype).removeprefix("torch.")
    s = _DTYPE_ALIASES.get(s, s)
    if s not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return s


@dataclass(frozen=True)
class Recipe:
    """How a model is trained, as far as memory is concerned.

    Attributes:
        name: what to call it in the output (the spec it was parsed from).
        param_dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``; gradients have the same dtype.
        master_weights: keep an fp32 copy of each trainable parameter (4 B/param) that the
            optimizer updates; the low-precision parameters are a rounded copy of it.
        kahan: a compensation buffer in the parameter dtype (2 B/param) carries the rounding error
            of each low-precision update into the next, so small updates are not lost; ``"8bit"``:
            an int8 compensation in units of ulp/256 (1 B/param, bf16 parameters only).
        stochastic_rounding: round low-precision updates stochastically (unbiased; 0 B/param).
        optimizer: a key of :data:`OPTIMIZERS`.
        state_format: ``None`` (same dtype as the parameter, like torch), ``"fp32"``, ``"bf16"`` or
            ``"8bit"`` (adamkit's blockwise format).
        amsgrad: keep the running max of v (Adam/AdamW only).
        grad_accum: an fp32 gradient-accumulation buffer (4 B/param) for low-precision gradients;
            with ``gradient_release``: optimizer accumulation (micro-batches folded into the
            moments, ``accumulation_steps``), which needs no buffer.
        gradient_release: each parameter is stepped in backward and its gradient freed: the
            gradients cost one tensor's at a time (the largest trainable tensor's), not all.
        block_size, min_8bit_size: the 8-bit format's block length and smallest quantized tensor.
    """

    name: str = "fp32"
    param_dtype: str = "fp32"
    master_weights: bool = False
    kahan: bool | str = False
    stochastic_rounding: bool = False
    optimizer: str = "adamw"
    state_format: str | None = None
    amsgrad: bool = False
    grad_accum: bool = False
    block_size: int = BLOCK_SIZE
    min_8bit_size: int = MIN_8BIT_SIZE
    gradient_release: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        low = self.param_dtype in ("bf16", "fp16")
        if sum(map(bool, (self.master_weights, self.kahan, self.stochastic_rounding))) > 1:
            raise ValueError(f"{self.name}: choose one of master weights, Kahan, stochastic rounding")
        if (self.master_weights or self.kahan or self.stochastic_rounding) and not low:
            raise ValueError(
                f"{self.name}: master weights, Kahan and stochastic rounding need bf16/fp16 params"
            )
        if self.kahan not in (False, True, "8bit"):
            raise ValueError(f"{self.name}: kahan must be True, False or '8bit', got {self.kahan!r}")
        if self.kahan == "8bit" and self.param_dtype != "bf16":
            raise ValueError(f"{self.name}: the int8 Kahan compensation needs bf16 params")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"{self.name}: unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.state_format not in (None, "fp32", "bf16", "8bit"):
            raise ValueError(f"{self.name}: state_format must be None, 'fp32', 'bf16' or '8bit'")
        if self.amsgrad and self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"{self.name}: amsgrad applies to adam/adamw, not {self.optimizer}")
        if self.gradient_release and self.grad_accum and self.optimizer not in ("adam", "adamw"):
            raise ValueError(
                f"{self.name}: optimizer accumulation with gradient release (release + accum) is "
                f"defined for adam/adamw only, not {self.optimizer}"
            )
        if self.block_size < 1 or self.min_8bit_size < 0:
            raise ValueError(f"{self.name}: block_size must be >= 1 and min_8bit_size >= 0")

    @property
    def state_dtype(self) -> str:
        """The storage of full-size optimizer states: the format, or the parameter dtype for None."""
        return self.state_format or self.param_dtype

    def describe(self) -> str:
        """One line in words, e.g. ``bf16 params and grads, fp32 master weights; adamw, state fp32``."""
        parts = [f"{self.param_dtype} params and grads"]
        if self.master_weights:
            parts.append("fp32 master weights")
        if self.kahan:
            parts.append(f"Kahan compensation ({'int8' if self.kahan == '8bit' else self.param_dtype})")
        if self.stochastic_rounding:
            parts.append("stochastic rounding")
        if self.gradient_release:
            parts.append("gradient release (one gradient at a time)")
        if self.grad_accum:
            parts.append(
                "optimizer accumulation (no buffer)"
                if self.gradient_release
                else "fp32 grad-accumulation buffer"
                if self.param_dtype != "fp32"
                else "fp32 grads accumulate in place"
            )
        opt = OPTIMIZERS[self.optimizer]
        state = "no state" if not opt.has_full_state(self) else f"state {self.state_dtype}"
        return f"{', '.join(parts)}; {opt.title}{' (amsgrad)' if self.amsgrad else ''}, {state}"


def parse_recipe(
    spec: str,
    *,
    optimizer: str = "adamw",
    state_format: str | None = "auto",
    amsgrad: bool = False,
    grad_accum: bool = False,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
    gradient_release: bool = False,
) -> Recipe:
    """A :class:`Recipe` from a spec such as ``"mixed-bf16"``, ``"bf16-kahan-8bit"``, ``"fp32-lion"``.

    A spec is ``-``-joined phrases, each naming one choice: a precision (:data:`PRECISIONS`; default
    ``fp32``), a state format (``8bit``, ``bf16state``, ``fp32state``), an optimizer
    (:data:`OPTIMIZERS`) and the modifiers ``amsgrad``, ``accum`` (fp32 gradient accumulation;
    with ``release``, the optimizer's accumulation) and ``release`` (gradient release).
    The keyword arguments are the defaults for what the spec does not name. ``state_format="auto"``
    means fp32 state with master weights (the optimizer updates the fp32 master) and the parameter
    dtype otherwise.

    Raises:
        ValueError: for an unknown or repeated phrase.
    """
    phrases: dict[str, str] = {name: "precision" for name in PRECISIONS}
    phrases.update({name: "state" for name in STATE_FORMATS})
    phrases.update({name: "optimizer" for name in OPTIMIZERS})
    phrases.update({name: "modifier" for name in MODIFIERS})
    tokens = [t for t in spec.strip().lower().split("-") if t]
    if not tokens:
        raise ValueError("empty recipe")
    chosen: dict[str, str] = {}
    mods: set[str] = set()
    i = 0
    while i < len(tokens):
        # Longest phrase first: "bf16-kahan" is one precision, "adam-mini" one optimizer.
        for j in range(len(tokens), i, -1):
            phrase = "-".join(tokens[i:j])
            if phrase in phrases:
                break
        else:
            raise ValueError(
                f"recipe {spec!r}: unknown part {tokens[i]!r}. Precisions: {', '.join(PRECISIONS)}; "
                f"states: {', '.join(STATE_FORMATS)}; optimizers: {', '.join(OPTIMIZERS)}; "
                f"modifiers: {', '.join(MODIFIERS)}"
            )
        kind = phrases[phrase]
        if kind == "modifier":
            mods.add(phrase)
        elif kind in chosen:
            raise ValueError(f"recipe {spec!r} names two {kind}s: {chosen[kind]!r} and {phrase!r}")
        else:
            chosen[kind] = phrase
        i = j
    precision = PRECISIONS[chosen.get("precision", "fp32")]
    dtype, master, kahan, sr = precision.dtype, precision.master, precision.kahan, precision.sr
    if "state" in chosen:
        state_format = STATE_FORMATS[chosen["state"]]
    elif state_format == "auto":
        state_format = "fp32" if master else None
    return Recipe(
        name=spec,
        param_dtype=dtype,
        master_weights=master,
        kahan=kahan,
        stochastic_rounding=sr,
        optimizer=chosen.get("optimizer", optimizer),
        state_format=state_format,
        amsgrad=amsgrad or "amsgrad" in mods,
        grad_accum=grad_accum or "accum" in mods,
        block_size=block_size,
        min_8bit_size=min_8bit_size,
        gradient_release=gradient_release or "release" in mods,
    )
