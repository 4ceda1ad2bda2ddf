"""Bytes per tensor: the formulas for parameters, gradients, master copies, Kahan buffers and
each optimizer state tensor in every format, per tensor (so block padding, quantization scales and
per-tensor counters are exact), and the activation estimate."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ...storage import quant8
from .models import ModelSpec, TensorSpec
from .recipes import (
    ADAMKIT_CLASSES,
    BLOCK_SIZE,
    COMPONENTS,
    DTYPE_BYTES,
    MIN_8BIT_SIZE,
    OPTIMIZERS,
    SCALE_BYTES,
    Recipe,
    _dtype_name,
    adamkit_slots,
    state_component,
)

# ----------------------------------------------------------------------------------------------
# Bytes per tensor: the formulas
# ----------------------------------------------------------------------------------------------


def blockwise_8bit_bytes(
    numel: int, *, block_size: int = BLOCK_SIZE, scale_bytes: int = SCALE_BYTES
) -> tuple[int, int]:
    """Bytes of one 8-bit blockwise state tensor: ``(codes, scales)``.

    One uint8 code per element, padded up to whole blocks (so every block has ``block_size``
    codes and kernels need no tail case), and one ``scale_bytes`` scale per block.
    """
    blocks = -(-numel // block_size)
    return blocks * block_size, blocks * scale_bytes


def eight_bit_layout(
    shape: tuple[int, ...] | None,
    numel: int,
    min_8bit_size: int,
    block_size: int = BLOCK_SIZE,
    sharded: bool = False,
) -> str | None:
    """How adamkit stores a parameter's moments under state_format='8bit': the engine's own rule
    (``storage.quant8.layout``): ``"rows"``, ``"flat"`` or None (fp32). An unknown shape (a
    parameter count) is planned as one flat tensor."""
    if shape is None:
        return None if numel < min_8bit_size else "flat"
    return quant8.layout(shape, min_8bit_size, sharded, block_size)


def kahan_bytes(kahan: bool | str, param_dtype: str) -> int:
    """Bytes per element of a Kahan compensation buffer: the parameter's dtype, or 1 for
    ``kahan="8bit"`` (int8 units of ulp/256); 0 without one."""
    if not kahan:
        return 0
    return 1 if kahan == "8bit" else DTYPE_BYTES[param_dtype]


def state_tensor_bytes(
    numel: int,
    state_dtype: str,
    *,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
    scale_bytes: int = SCALE_BYTES,
    shape: tuple[int, ...] | None = None,
    sharded: bool = False,
) -> tuple[int, int]:
    """Bytes of one full-size optimizer state tensor (the size of its parameter): ``(payload, scales)``.

    Args:
        numel: elements of the parameter.
        state_dtype: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"8bit"``.
        block_size, min_8bit_size, scale_bytes: the 8-bit format; tensors below ``min_8bit_size``
            elements stay fp32.
        shape: the parameter's shape, where known: 8-bit state of a >= 2-D parameter is kept in
            rows (see :func:`eight_bit_layout`).
        sharded: the parameter is an FSDP2 (DTensor) parameter: a 1-D one keeps fp32 state.
    """
    if state_dtype == "8bit":
        layout = eight_bit_layout(shape, numel, min_8bit_size, block_size, sharded)
        if layout == "rows":
            codes, scales = blockwise_8bit_bytes(
                math.prod(shape[1:]), block_size=block_size, scale_bytes=scale_bytes
            )
            return shape[0] * codes, shape[0] * scales
        if layout == "flat":
            return blockwise_8bit_bytes(numel, block_size=block_size, scale_bytes=scale_bytes)
        return 4 * numel, 0
    return DTYPE_BYTES[state_dtype] * numel, 0


def tensor_bytes(t: TensorSpec, recipe: Recipe, model: ModelSpec | None = None) -> dict[str, int]:
    """Bytes of every component for one parameter tensor under ``recipe`` (zeros omitted).

    Frozen tensors cost their parameter bytes only: no gradient, master copy or optimizer state.
    """
    n = t.numel
    p = DTYPE_BYTES[recipe.param_dtype]
    out = {"params": p * n}
    if not t.trainable:
        return out
    if not recipe.gradient_release:  # release: one gradient at a time (model_state_bytes)
        out["grads"] = p * n  # autograd produces gradients in the parameter's dtype
    # fp32 grads are their own fp32 accumulator; the buffer exists only for low-precision grads
    # (optimizer accumulation with gradient release folds into the moments: no buffer)
    if recipe.grad_accum and recipe.param_dtype != "fp32" and not recipe.gradient_release:
        out["grad_accum"] = 4 * n
    if recipe.master_weights:
        out["master"] = 4 * n
    if recipe.kahan:
        out["kahan"] = kahan_bytes(recipe.kahan, recipe.param_dtype) * n
    opt = OPTIMIZERS[recipe.optimizer]
    small_dtype = "fp32" if recipe.state_dtype == "8bit" else recipe.state_dtype
    for component, k, full in opt.states(t, model or ModelSpec("", ()), recipe):
        if component == "z":  # a copy of the weights: fp32 in every state format (Slot.weights)
            payload, scales = 4 * k, 0
        elif full:
            payload, scales = state_tensor_bytes(
                k, recipe.state_dtype, block_size=recipe.block_size, min_8bit_size=recipe.min_8bit_size,
                shape=t.shape if k == n else None,
            )  # fmt: skip
        else:
            payload, scales = DTYPE_BYTES[small_dtype] * k, 0
        out[component] = out.get(component, 0) + payload
        if scales:
            out["scales"] = out.get("scales", 0) + scales
    if opt.step_bytes:
        out["step"] = opt.step_bytes
    return {k: v for k, v in out.items() if v}


def model_state_bytes(model: ModelSpec, recipe: Recipe) -> dict[str, int]:
    """Whole-model bytes of every component (all keys of :data:`COMPONENTS`, zeros included).

    Raises:
        ValueError: for an optimizer whose state depends on shapes when the shapes are unknown.
    """
    opt = OPTIMIZERS[recipe.optimizer]
    if opt.needs_shapes and not model.shapes_known:
        raise ValueError(
            f"{opt.title} keeps per-matrix (factored or per-block) state: it needs tensor shapes. A "
            "parameter count has none; give a preset, a config.json or a module:callable instead"
        )
    total = dict.fromkeys(COMPONENTS, 0)
    for t in model.tensors:
        for k, v in tensor_bytes(t, recipe, model).items():
            total[k] += v
    if recipe.gradient_release:  # each gradient is freed by its hook: the largest one at a time
        trainable = [t.numel for t in model.tensors if t.trainable]
        total["grads"] = DTYPE_BYTES[recipe.param_dtype] * max(trainable, default=0)
    return total


def adamkit_state_bytes(
    shapes: Iterable[Any],
    *,
    optimizer: str = "adamw",
    state_format: str | None = None,
    amsgrad: bool = False,
    param_dtype: Any = "fp32",
    kahan: bool | str = False,
    master: bool = False,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> dict[str, int]:
    """Bytes of an adamkit optimizer's state for parameters of these shapes, per component.

    Meant to equal, to the byte, the sum of ``nbytes`` of the live state tensors after a step.
    Counted from the algorithm's slots (:func:`adamkit_slots`): each slot of a parameter has
    ``prod(slot.shape_for(shape))`` elements in the state format; under 8 bit (parameters chosen
    by :func:`eight_bit_layout`) parameter-shaped slots of matrices are kept in rows and every
    other slot as its own flat blocks (1 B/element padded + 4 B/block); a 0-D fp32 step counter
    per parameter.

    Args:
        shapes: one shape (tuple, ``torch.Size``) or tensor per parameter.
        optimizer: a key of :data:`ADAMKIT_CLASSES` (``"adamw"``, ``"lion"``, ``"came"``...);
            extra components ``"hessian"``, ``"confidence"`` where the algorithm keeps them.
        state_format: ``None`` (the parameter's dtype; fp32 for fp16 parameters, as adamkit
            does: fp16 cannot hold typical g^2), ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        amsgrad: count ``max_exp_avg_sq`` (Adam/AdamW).
        param_dtype: the parameters' dtype (``torch.bfloat16``, ``"bf16"``...).
        kahan: a compensation buffer in the parameter dtype; ``"8bit"``: in int8 (bf16 parameters).
        master: an fp32 master copy.
        block_size, min_8bit_size: the 8-bit format.

    Returns:
        ``{"step", "m", "v", "max_v", "scales", "kahan", "master"}`` in bytes (zeros included;
        ``"hessian"``/``"confidence"`` added where kept).
    """
    if optimizer not in ADAMKIT_CLASSES:
        raise ValueError(
            f"adamkit has no {optimizer!r} optimizer; choose one of {', '.join(ADAMKIT_CLASSES)} "
            "(plan() and parse_recipe() estimate the others)"
        )
    dtype = _dtype_name(param_dtype)
    fmt = state_format or ("fp32" if dtype == "fp16" else dtype)
    out = dict.fromkeys(("step", "m", "v", "max_v", "scales", "kahan", "master"), 0)
    for s in shapes:
        shape = tuple(getattr(s, "shape", s))
        n = math.prod(shape)
        out["step"] += 4  # a 0-D fp32 tensor per parameter
        eight = fmt == "8bit" and eight_bit_layout(shape, n, min_8bit_size, block_size) is not None
        for slot in adamkit_slots(optimizer, shape, amsgrad):
            k = math.prod(slot.shape_for(shape))
            if slot.weights:  # a copy of the weights: fp32 in every format (Slot.weights)
                payload, scales = 4 * k, 0
            elif eight and slot.shape is None and len(shape) >= 2:  # rows, like the parameter
                payload, scales = state_tensor_bytes(
                    k, "8bit", block_size=block_size, min_8bit_size=0, shape=shape
                )
            elif eight:  # a slot of its own shape, or a 1-D parameter: flat blocks
                payload, scales = blockwise_8bit_bytes(k, block_size=block_size)
            else:
                payload, scales = DTYPE_BYTES["fp32" if fmt == "8bit" else fmt] * k, 0
            comp = state_component(slot.name)
            out[comp] = out.get(comp, 0) + payload
            out["scales"] += scales
        out["kahan"] += kahan_bytes(kahan, dtype) * n
        out["master"] += 4 * n if master else 0
    return out


def activation_bytes(
    model: ModelSpec, batch_size: int, seq_len: int, *, element_bytes: int = 2, recompute: str = "none"
) -> int:
    """Activation memory of the transformer layers for one micro-batch (Korthikanti et al., 2023).

    Per layer :math:`sbh(16e + 2) + as^2b(2e + 1)` bytes, which is :math:`sbh(34 + 5as/h)` for
    :math:`e = 2`; see the module docstring for the terms and what it leaves out.

    Args:
        model: needs ``hidden_size``, ``num_layers`` and ``num_heads``.
        batch_size: micro-batch per device :math:`b`.
        seq_len: sequence length :math:`s`.
        element_bytes: :math:`e`, 2 for 16-bit activations, 4 for fp32.
        recompute: ``"none"``, ``"selective"`` (drops the :math:`as^2b` term, as FlashAttention
            does) or ``"full"`` (each layer's input only, :math:`sbhe`).
    """
    h, layers, heads = model.hidden_size, model.num_layers, model.num_heads
    if not (h and layers and heads):
        raise ValueError(
            "the activation estimate needs transformer shapes (hidden size, layers, heads): give a "
            "preset or a config.json, or leave out batch size and sequence length"
        )
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch size and sequence length must be >= 1")
    sbh = seq_len * batch_size * h
    attention = heads * seq_len * seq_len * batch_size
    e = element_bytes
    if recompute == "none":
        per_layer = sbh * (16 * e + 2) + attention * (2 * e + 1)
    elif recompute == "selective":
        per_layer = sbh * (16 * e + 2)
    elif recompute == "full":
        per_layer = sbh * e
    else:
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    return layers * per_layer
