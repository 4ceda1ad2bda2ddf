r"""Per rank under FSDP2 and DDP + ZeroRedundancyOptimizer: what each rank's live tensors hold
(``adamkit plan --per-rank``), exact to the byte for adamkit's optimizers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .bytes import adamkit_state_bytes, blockwise_8bit_bytes, eight_bit_layout, kahan_bytes
from .models import ModelSpec, TensorSpec, load_model
from .recipes import (
    ADAMKIT_CLASSES,
    BLOCK_SIZE,
    COMPONENTS,
    DTYPE_BYTES,
    MIN_8BIT_SIZE,
    Recipe,
    adamkit_slots,
    parse_recipe,
    state_component,
)
from .report import _gb

PARALLEL = {
    "fsdp2": "FSDP2 (fully_shard, ZeRO-3): each tensor's dim 0 cut in torch.chunk pieces",
    "ddp+zero": "DDP + ZeroRedundancyOptimizer (ZeRO-1): whole tensors' state, assigned greedily by size",
}


def fsdp2_rows(rows: int, world: int) -> list[int]:
    """Rows of a tensor's dim 0 that each rank holds under FSDP2 (``torch.chunk`` semantics).

    Pieces of :math:`c = \\lceil R / N \\rceil` rows in rank order, so the last ranks may get fewer
    or none: 7 rows over 3 ranks give 3, 3, 1; 1 row over 2 ranks gives 1, 0. Every rank allocates
    :math:`c` rows of parameter (and gradient) storage, whatever it holds.
    """
    c = -(-rows // world)
    return [max(0, min(c, rows - k * c)) for k in range(world)]


def zero_partition(numels: Sequence[int], world: int) -> list[list[int]]:
    """Which tensors ``ZeroRedundancyOptimizer`` gives each rank: indices into ``numels``.

    Its partition of one parameter group: the tensors sorted by size, largest first (a stable sort:
    equal sizes keep their order), each given to the rank with the fewest elements so far (the
    lowest rank on a tie). A rank keeps optimizer state for its tensors only.
    """
    sizes = [0] * world
    ranks: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(numels)), key=lambda i: numels[i], reverse=True):
        rank = sizes.index(min(sizes))
        ranks[rank].append(i)
        sizes[rank] += numels[i]
    return ranks


def _fsdp2_tensor_bytes(t: TensorSpec, recipe: Recipe, world: int) -> list[dict[str, int]]:
    """Each rank's bytes of one tensor under FSDP2, an adamkit optimizer and ``recipe``.

    Parameter and gradient storage: c = ceil(R / N) rows on every rank (FSDP2 pads each shard to
    the first one's size; gradients are views of the reduce-scatter output, padded alike).
    Optimizer state: the rank's own rows (a DTensor of the parameter's placement; an empty local
    tensor on a rank without rows), each row of L elements costing 4 B/element in fp32, 2 in
    bf16/fp16, and in 8 bit padded(L) + 4 blocks(L) B where the global shape is quantized
    (:func:`eight_bit_layout` with ``sharded=True``), else fp32; 4 B of step counter per tensor.
    """
    if not t.shape:
        raise ValueError(f"{t.name}: FSDP2 shards dim 0, which a 0-D parameter does not have")
    rows, length = t.shape[0], math.prod(t.shape[1:])
    padded_rows = -(-rows // world)
    p = DTYPE_BYTES[recipe.param_dtype]
    fmt = recipe.state_dtype
    layout = None
    if fmt == "8bit":
        layout = eight_bit_layout(t.shape, t.numel, recipe.min_8bit_size, recipe.block_size, sharded=True)
    codes, scales = blockwise_8bit_bytes(length, block_size=recipe.block_size)
    each = DTYPE_BYTES["fp32" if fmt == "8bit" else fmt]  # unquantized slots keep fp32 under 8 bit
    # (component, slot): adamkit's optimizers by their algorithm's slots: a slot of the parameter's
    # shape holds the rank's rows; a slot of its own shape follows the rows (``Slot.follows_rows``:
    # Adafactor's and CAME's row statistics, Adam-mini's per-row v) or is whole on every rank (a
    # matrix's column statistics, a vector's one v), in fp32 under 8 bit (``optim.layout.slot_format``)
    slots = [(state_component(s.name), s) for s in adamkit_slots(recipe.optimizer, t.shape, recipe.amsgrad)]
    step = 4
    out = []
    for r in fsdp2_rows(rows, world):
        d = dict.fromkeys(COMPONENTS, 0)
        d["params"] = padded_rows * length * p
        if t.trainable:
            d["grads"] = padded_rows * length * p
            d["master"] = 4 * r * length if recipe.master_weights else 0
            d["kahan"] = kahan_bytes(recipe.kahan, recipe.param_dtype) * r * length
            for comp, slot in slots:
                if slot.weights:  # a copy of the weights: fp32 in every format
                    d[comp] += 4 * r * length
                elif slot.shape is not None:
                    local = (r, *t.shape[1:]) if slot.follows_rows(t.shape) else t.shape
                    d[comp] += each * math.prod(slot.shape_for(local))
                elif layout == "rows":
                    d[comp] += r * codes
                    d["scales"] += r * scales
                else:
                    d[comp] += each * r * length
            d["step"] = step
        out.append(d)
    return out


def _zero_rank_bytes(
    model: ModelSpec, recipe: Recipe, world: int
) -> tuple[list[dict[str, int]], list[list[int]]]:
    """Each rank's bytes under DDP + ZeroRedundancyOptimizer(optimizer_class=adamkit's): every
    parameter and gradient whole on every rank (DDP replicates them), the optimizer state of the
    rank's tensors (:func:`zero_partition`) as :func:`adamkit_state_bytes` counts it."""
    ranks = zero_partition([t.numel for t in model.tensors], world)
    p = DTYPE_BYTES[recipe.param_dtype]
    out = []
    for mine in ranks:
        d = dict.fromkeys(COMPONENTS, 0)
        d["params"] = p * model.n_params
        d["grads"] = p * model.n_trainable
        trainable = [model.tensors[i].shape for i in mine if model.tensors[i].trainable]
        state = adamkit_state_bytes(
            trainable,
            optimizer=recipe.optimizer,
            state_format=recipe.state_format,
            amsgrad=recipe.amsgrad,
            param_dtype=recipe.param_dtype,
            kahan=recipe.kahan,
            master=recipe.master_weights,
            block_size=recipe.block_size,
            min_8bit_size=recipe.min_8bit_size,
        )
        for k, v in state.items():
            d[k] += v
        out.append(d)
    return out, ranks


@dataclass(frozen=True)
class RankPlan:
    """Bytes each rank holds under FSDP2 or DDP + ZeroRedundancyOptimizer, per component.

    Attributes:
        model, recipe: what was planned (the recipe as adamkit runs it: fp16 parameters keep fp32
            moments unless a state format is named).
        parallel: a key of :data:`PARALLEL`.
        devices: the world size.
        ranks: one dict per rank, every key of :data:`COMPONENTS`, in bytes.
        assignment: ``ddp+zero``: the indices of ``model.tensors`` whose state each rank keeps.
    """

    model: ModelSpec
    recipe: Recipe
    parallel: str
    devices: int
    ranks: tuple[dict[str, int], ...]
    assignment: tuple[tuple[int, ...], ...] | None = None

    def total(self, rank: int) -> int:
        """All bytes of one rank: parameters, gradients and optimizer state."""
        return sum(self.ranks[rank].values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "recipe": self.recipe.name,
            "description": self.recipe.describe(),
            "parallel": self.parallel,
            "devices": self.devices,
            "ranks": [
                {"rank": i, "bytes": dict(r), "total_bytes": self.total(i)} for i, r in enumerate(self.ranks)
            ],
            "assignment": None if self.assignment is None else [list(a) for a in self.assignment],
        }

    def table(self) -> str:
        """Bytes per component (rows) and rank (columns)."""
        m = self.model
        lines = [
            f"model: {m.name}: {m.n_params:,} parameters ({m.n_trainable:,} trainable) in "
            f"{len(m.tensors):,} tensors",
            f"{PARALLEL[self.parallel]}, {self.devices} ranks",
            f"recipe {self.recipe.name}: {self.recipe.describe()}",
            "",
        ]
        cells = [[f"{r[k]:,}" for r in self.ranks] for k in COMPONENTS]
        totals = [f"{self.total(i):,}" for i in range(self.devices)]
        w = max(10, *(len(c) for c in totals)) + 2
        head = f"{'bytes':<12}" + "".join(f"{'rank ' + str(i):>{w}}" for i in range(self.devices))
        lines += [head, "-" * len(head)]
        for k, row in zip(COMPONENTS, cells):
            if k == "params" or any(r[k] for r in self.ranks):
                lines.append(f"{k:<12}" + "".join(f"{c:>{w}}" for c in row))
        lines.append("-" * len(head))
        lines.append(f"{'total':<12}" + "".join(f"{c:>{w}}" for c in totals))
        lines.append(f"{'GB':<12}" + "".join(f"{_gb(self.total(i)):>{w}.3f}" for i in range(self.devices)))
        return "\n".join(lines)


def per_rank(
    model: Any,
    recipe: str | Recipe = "fp32",
    *,
    parallel: str = "fsdp2",
    devices: int = 2,
    optimizer: str = "adamw",
    state_format: str | None = "auto",
    amsgrad: bool = False,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> RankPlan:
    """Exact bytes of each rank's parameters, gradients and adamkit optimizer state under FSDP2 or
    DDP + ZeroRedundancyOptimizer, as the live engines lay them out (not total / N).

    ``fsdp2`` (``fully_shard`` per module, ZeRO-3): every tensor's dim 0 is cut in
    :math:`c = \\lceil R/N \\rceil`-row pieces (:func:`fsdp2_rows`); each rank stores :math:`c` rows of
    parameter and of gradient (FSDP2 pads shards to equal size), and state for its own rows only.
    ``ddp+zero`` (ZeRO-1): parameters and gradients whole on every rank; optimizer state of whole
    tensors, assigned as ``ZeroRedundancyOptimizer`` does (:func:`zero_partition`; the model's
    parameters as one group in ``model.tensors`` order). Per rank, state bytes for ``R_k`` rows of
    :math:`L` elements: fp32 :math:`4 R_k L`, bf16 :math:`2 R_k L`, 8 bit (rows chosen by the
    global shape) :math:`R_k(\\mathrm{padded}(L) + 4\\,\\mathrm{blocks}(L))`; Kahan :math:`2 R_k L`,
    master :math:`4 R_k L`; a 4-byte step per tensor.

    FSDP2 is taken without a ``MixedPrecisionPolicy`` (gradients in the parameters' dtype).
    Not counted: FSDP2's transient all-gathered parameters and reduce-scatter inputs, DDP's
    gradient buckets (another copy of the gradients unless ``gradient_as_bucket_view=True``),
    activations.

    Args:
        model: anything :func:`load_model` takes (an ``nn.Module``, ``"module:callable"``, a preset,
            a config.json, a :class:`ModelSpec`); a list of shapes is planned as tensors ``p0``, ``p1``...
        recipe: a spec (:func:`parse_recipe`) or a :class:`Recipe`.
        parallel: ``"fsdp2"`` or ``"ddp+zero"``.
        devices: the world size.
        optimizer, state_format, amsgrad, block_size, min_8bit_size: defaults for what a spec does
            not name (as :func:`plan`).

    Raises:
        ValueError: an unknown layout, fewer than 1 device, a gradient-accumulation recipe (its
            buffer's placement is not modelled), an optimizer adamkit does not have, a 0-D tensor
            under FSDP2.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    if isinstance(model, (list, tuple)):
        model = ModelSpec("shapes", tuple(TensorSpec(f"p{i}", tuple(s)) for i, s in enumerate(model)))
    spec = load_model(model)
    if isinstance(recipe, str):
        recipe = parse_recipe(
            recipe, optimizer=optimizer, state_format=state_format, amsgrad=amsgrad,
            block_size=block_size, min_8bit_size=min_8bit_size,
        )  # fmt: skip
    if recipe.grad_accum:
        raise ValueError(
            f"{recipe.name}: per-rank bytes do not model a gradient-accumulation buffer; plan it "
            "without 'accum' (or with plan(), which shards it as ZeRO does)"
        )
    supported = tuple(ADAMKIT_CLASSES)
    if recipe.optimizer not in supported:
        raise ValueError(
            f"{recipe.name}: per-rank bytes under {parallel} are counted for adamkit's "
            f"{', '.join(supported)}, not {recipe.optimizer!r}"
        )
    if recipe.state_format is None and recipe.param_dtype == "fp16":
        # adamkit keeps fp16 parameters' moments in fp32 by default (fp16 cannot hold typical g^2)
        recipe = dataclasses.replace(recipe, state_format="fp32")
    if parallel == "fsdp2":
        ranks = [dict.fromkeys(COMPONENTS, 0) for _ in range(devices)]
        for t in spec.tensors:
            for d, part in zip(ranks, _fsdp2_tensor_bytes(t, recipe, devices)):
                for k, v in part.items():
                    d[k] += v
        assignment = None
    else:
        ranks, parts = _zero_rank_bytes(spec, recipe, devices)
        assignment = tuple(tuple(p) for p in parts)
    return RankPlan(spec, recipe, parallel, devices, tuple(ranks), assignment)
