r"""The memory planner: where training memory goes, per component, per device, for any recipe.

``plan(model, recipes)`` counts, tensor by tensor, the bytes of the parameters, gradients and every
optimizer buffer a training recipe keeps, shards them as ZeRO stage 0-3 would over N devices,
optionally adds an activation estimate for transformer shapes, and says whether it fits. The
``adamkit plan`` command parses its arguments into one call and prints the result.
``per_rank(model, recipe, parallel="fsdp2" | "ddp+zero", devices=N)`` (``adamkit plan --per-rank``)
gives each rank's exact bytes as FSDP2 and DDP + ZeroRedundancyOptimizer lay them out.

Model states for :math:`\Psi` trainable parameters (bytes per parameter; all figures per tensor, so
block padding, quantization scales and per-tensor counters are exact):

============================  ======  ======  ======  =====================================
recipe                        params  grads   master  optimizer state (AdamW)
============================  ======  ======  ======  =====================================
fp32                          4       4       --      m 4, v 4
mixed bf16/fp16               2       2       4       m 4, v 4 (the optimizer runs on master)
pure bf16 + Kahan             2       2       --      Kahan compensation 2, m 2, v 2
pure bf16 + stochastic round  2       2       --      m 2, v 2 (rounding needs no buffer)
any + ``8bit`` state          ..      ..      ..      m 1, v 1 + one bf16 scale per 32 (each)
============================  ======  ======  ======  =====================================

plus ``max_v`` (like v) with amsgrad, an optional fp32 gradient-accumulation buffer (4), and a 4-byte
``step`` per parameter *tensor* for optimizers that keep it as a tensor (Adam/AdamW do, like torch;
adamkit's Lion too). Lion (``--optimizer lion``, or ``-lion`` in a recipe) keeps m only: 4 B/param
of state in fp32, 2 in bf16, 1 + 2/32 in 8 bit, half of AdamW's.

ZeRO (Rajbhandari et al., 2020) per device over :math:`N_d` devices: stage 1 divides optimizer state
(master weights included) by :math:`N_d`, stage 2 also gradients, stage 3 also parameters. With
mixed-precision Adam (:math:`K = 12`): :math:`(2+2+K)\Psi`, :math:`(2+2)\Psi + K\Psi/N_d`,
:math:`2\Psi + (2+K)\Psi/N_d`, :math:`(2+2+K)\Psi/N_d`.

Activations (optional; per device, separate from model states) for a transformer of :math:`L` layers,
hidden size :math:`h`, :math:`a` heads, micro-batch :math:`b` and sequence length :math:`s`, following
Korthikanti et al. (2023): :math:`sbh(34 + 5as/h)` bytes per layer with 16-bit activations.
Its terms: 16 tensors of :math:`sbh` elements and 2 one-byte dropout masks of :math:`sbh`, plus 2
tensors of :math:`as^2b` elements (softmax output, its dropout) and one 1-byte mask of :math:`as^2b`.
With element size :math:`e` (2 for 16-bit, 4 for fp32 recipes) that is
:math:`sbh(16e + 2) + as^2b(2e + 1)`. ``recompute="selective"`` (or FlashAttention) drops the
:math:`as^2b` term; ``"full"`` keeps only each layer's input, :math:`sbhe`. The formula is the paper's
GPT layer (4h MLP, multi-head attention); for SwiGLU or grouped-query layers it is an estimate. It
leaves out embeddings, logits and the working set of the layer being computed.

The package: ``models`` (readers: count, preset, config.json, module), ``recipes`` (recipe phrases,
what each optimizer keeps: adamkit's from its algorithms' slots), ``bytes`` (the formulas, the
8-bit rule shared with the engine), ``report`` (``plan()``: ZeRO sharding, activations, tables),
``per_rank`` (FSDP2 / DDP + ZeRO per rank), ``cli`` (``adamkit plan``).

References:
    Micikevicius et al., "Mixed Precision Training", ICLR 2018.
    Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", SC 2020.
    Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", MLSys 2023.
    Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
    Zamirai et al., "Revisiting BFloat16 Training", 2020 (Kahan summation, stochastic rounding).
    Shazeer & Stern, "Adafactor", ICML 2018. Luo et al., "CAME", ACL 2023.
    Chen et al., "Symbolic Discovery of Optimization Algorithms" (Lion), NeurIPS 2023.
    Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", 2024.
    Liu et al., "Sophia", ICLR 2024. You et al., "Large Batch Optimization for Deep Learning" (LAMB),
    ICLR 2020.

Example:
    >>> from adamkit.tools.plan import plan
    >>> p = plan("llama-3-70b", ["mixed-bf16", "bf16-kahan-8bit"], zero_stage=3, devices=8,
    ...          device_memory=80)
    >>> print(p.table())
"""

from __future__ import annotations

from .bytes import (
    activation_bytes,
    adamkit_state_bytes,
    blockwise_8bit_bytes,
    eight_bit_layout,
    model_state_bytes,
    state_tensor_bytes,
    tensor_bytes,
)
from .models import (
    ModelSpec,
    TensorSpec,
    load_model,
    model_from_callable,
    model_from_config,
    model_from_config_dict,
    model_from_count,
    model_from_module,
    model_from_preset,
    parse_count,
)
from .per_rank import PARALLEL, RankPlan, fsdp2_rows, per_rank, zero_partition
from .recipes import (
    ADAMKIT_CLASSES,
    ADAMKIT_OPTIMIZERS,
    COMPONENTS,
    OPTIMIZERS,
    PRECISIONS,
    STATE_COMPONENTS,
    OptimizerSpec,
    Recipe,
    adamkit_slots,
    parse_recipe,
    state_component,
)
from .report import Plan, RecipePlan, plan

__all__ = [
    "ADAMKIT_CLASSES",
    "ADAMKIT_OPTIMIZERS",
    "COMPONENTS",
    "ModelSpec",
    "OPTIMIZERS",
    "OptimizerSpec",
    "PARALLEL",
    "PRECISIONS",
    "Plan",
    "RankPlan",
    "Recipe",
    "RecipePlan",
    "STATE_COMPONENTS",
    "TensorSpec",
    "activation_bytes",
    "adamkit_slots",
    "adamkit_state_bytes",
    "blockwise_8bit_bytes",
    "eight_bit_layout",
    "fsdp2_rows",
    "load_model",
    "model_from_callable",
    "model_from_config",
    "model_from_config_dict",
    "model_from_count",
    "model_from_module",
    "model_from_preset",
    "model_state_bytes",
    "parse_count",
    "parse_recipe",
    "per_rank",
    "plan",
    "state_component",
    "state_tensor_bytes",
    "tensor_bytes",
    "zero_partition",
]
