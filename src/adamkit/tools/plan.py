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
any + ``8bit`` state          ..      ..      ..      m 1, v 1 + one fp32 scale per 256 (each)
============================  ======  ======  ======  =====================================

plus ``max_v`` (like v) with amsgrad, an optional fp32 gradient-accumulation buffer (4), and a 4-byte
``step`` per parameter *tensor* for optimizers that keep it as a tensor (Adam/AdamW do, like torch;
adamkit's Lion too). Lion (``--optimizer lion``, or ``-lion`` in a recipe) keeps m only: 4 B/param
of state in fp32, 2 in bf16, 1 + 4/256 in 8 bit, half of AdamW's.

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

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .presets import PRESETS

GB = 1e9  # decimal gigabytes, as device vendors and the published tables count

# adamkit's 8-bit state format: uint8 codes padded to whole blocks, one fp32 scale per block; tensors
# smaller than MIN_8BIT_SIZE keep fp32 state (their scales and padding would cost more than they save).
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096
SCALE_BYTES = 4

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
    "scales": "8-bit block scales (fp32)",
    "step": "step counters (one tensor per parameter tensor)",
}
# Which ZeRO stage first shards a component; everything else is optimizer state (stage 1).
_SHARDED_FROM = {"params": 3, "grads": 2, "grad_accum": 2}
_GROUPS = {"params": ("params",), "grads": ("grads", "grad_accum")}


def _group_of(component: str) -> str:
    for group, members in _GROUPS.items():
        if component in members:
            return group
    return "optimizer"


# ----------------------------------------------------------------------------------------------
# The model: a list of parameter tensors with their shapes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor: its name (used to classify it, e.g. for Adam-mini), shape and trainability."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """A model as the planner sees it: its parameter tensors and, for transformers, their shapes.

    Attributes:
        name: what to call it in the output.
        tensors: every parameter tensor once (tied weights once).
        shapes_known: False when the model was given as a bare count (one flat tensor stands in for
            it); factored optimizers then cannot be planned.
        hidden_size, num_layers, num_heads, num_kv_heads: transformer shapes, for activations and
            Adam-mini's per-head blocks; None when unknown.
    """

    name: str
    tensors: tuple[TensorSpec, ...]
    shapes_known: bool = True
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def n_trainable(self) -> int:
        return sum(t.numel for t in self.tensors if t.trainable)

    @property
    def n_frozen(self) -> int:
        return self.n_params - self.n_trainable

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.n_params,
            "trainable": self.n_trainable,
            "frozen": self.n_frozen,
            "tensors": len(self.tensors),
            "shapes_known": self.shapes_known,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
        }


def parse_count(text: str | int | float) -> int:
    """A parameter count from ``70e9``, ``7.5B``, ``124M``, ``350k`` or ``1,000,000``.

    Raises:
        ValueError: if it is not a positive whole number of parameters.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a parameter count: {text!r}")
    s = str(text).strip().replace(",", "").replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}.get(s[-1:].lower(), 1)
    if scale != 1:
        s = s[:-1]
    try:
        value = Decimal(s) * scale  # Decimal, not float: 7.5e9 and 70553706496 stay exact
    except InvalidOperation:
        raise ValueError(f"not a parameter count: {text!r} (examples: 70e9, 7.5B, 124M)") from None
    if not value.is_finite() or value <= 0 or value != value.to_integral_value():
        raise ValueError(f"a parameter count must be a positive whole number, got {text!r}")
    return int(value)


def model_from_count(n: str | int | float, name: str | None = None) -> ModelSpec:
    """A model known only by its parameter count: one flat tensor stands in for all of it.

    Exact for element-wise optimizers (Adam, Lion, SGD...) up to per-tensor overheads (8-bit
    padding, step counters), which are negligible at these sizes; factored optimizers need shapes.
    """
    count = parse_count(n)
    return ModelSpec(name or f"{count:,} parameters", (TensorSpec("params", (count,)),), shapes_known=False)


def _gpt2_tensors(cfg: dict) -> tuple[list[TensorSpec], dict]:
    h, layers, heads = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
    inner = cfg.get("n_inner") or 4 * h
    positions = cfg.get("n_positions", cfg.get("n_ctx", 1024))
    # nn.Linear layout (out, in), as nanoGPT writes GPT-2; HF's Conv1D stores the transpose, which
    # changes no count.
    t = [TensorSpec("transformer.wte.weight", (cfg["vocab_size"], h))]
    t.append(TensorSpec("transformer.wpe.weight", (positions, h)))
    for i in range(layers):
        pre = f"transformer.h.{i}."
        for name, shape in (
            ("ln_1", (h,)),
            ("attn.c_attn", (3 * h, h)),
            ("attn.c_proj", (h, h)),
            ("ln_2", (h,)),
            ("mlp.c_fc", (inner, h)),
            ("mlp.c_proj", (h, inner)),
        ):
            t.append(TensorSpec(pre + name + ".weight", shape))
            t.append(TensorSpec(pre + name + ".bias", (shape[0],)))
    t += [TensorSpec("transformer.ln_f.weight", (h,)), TensorSpec("transformer.ln_f.bias", (h,))]
    if cfg.get("tie_word_embeddings") is False:  # GPT-2 ties the head unless told otherwise
        t.append(TensorSpec("lm_head.weight", (cfg["vocab_size"], h)))
    return t, dict(hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=heads)


_LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2")


def _llama_tensors(cfg: dict) -> tuple[list[TensorSpec], dict]:
    kind = cfg.get("model_type", "llama")
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    # Llama's attention_bias puts biases on q, k, v and o; Qwen2 always has them on q, k, v only.
    qkv_bias = bool(cfg.get("attention_bias", False)) or kind == "qwen2"
    o_bias = bool(cfg.get("attention_bias", False)) and kind != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    experts = cfg.get("num_local_experts")
    t = [TensorSpec("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        t.append(TensorSpec(pre + "input_layernorm.weight", (h,)))
        for name, shape, bias in (
            ("q_proj", (q_dim, h), qkv_bias),
            ("k_proj", (kv_dim, h), qkv_bias),
            ("v_proj", (kv_dim, h), qkv_bias),
            ("o_proj", (h, q_dim), o_bias),
        ):
            t.append(TensorSpec(f"{pre}self_attn.{name}.weight", shape))
            if bias:
                t.append(TensorSpec(f"{pre}self_attn.{name}.bias", (shape[0],)))
        t.append(TensorSpec(pre + "post_attention_layernorm.weight", (h,)))
        if experts:  # Mixtral: a router and `experts` SwiGLU MLPs (w1 gate, w3 up, w2 down)
            t.append(TensorSpec(pre + "block_sparse_moe.gate.weight", (experts, h)))
            for e in range(experts):
                ex = f"{pre}block_sparse_moe.experts.{e}."
                t += [
                    TensorSpec(ex + "w1.weight", (inter, h)),
                    TensorSpec(ex + "w2.weight", (h, inter)),
                    TensorSpec(ex + "w3.weight", (inter, h)),
                ]
            continue
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            t.append(TensorSpec(f"{pre}mlp.{name}.weight", shape))
            if mlp_bias:
                t.append(TensorSpec(f"{pre}mlp.{name}.bias", (shape[0],)))
    t.append(TensorSpec("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        t.append(TensorSpec("lm_head.weight", (cfg["vocab_size"], h)))
    return t, dict(hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads)


_BERT_LIKE = ("bert", "roberta", "xlm-roberta")


def _bert_tensors(cfg: dict) -> tuple[list[TensorSpec], dict]:
    """BERT / RoBERTa encoders as ``BertModel`` builds them (pooler included, no task head)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    t = [
        TensorSpec("embeddings.word_embeddings.weight", (cfg["vocab_size"], h)),
        TensorSpec("embeddings.position_embeddings.weight", (cfg.get("max_position_embeddings", 512), h)),
        TensorSpec("embeddings.token_type_embeddings.weight", (cfg.get("type_vocab_size", 2), h)),
        TensorSpec("embeddings.LayerNorm.weight", (h,)),
        TensorSpec("embeddings.LayerNorm.bias", (h,)),
    ]
    for i in range(layers):
        pre = f"encoder.layer.{i}."
        for name, shape in (
            ("attention.self.query", (h, h)),
            ("attention.self.key", (h, h)),
            ("attention.self.value", (h, h)),
            ("attention.output.dense", (h, h)),
            ("attention.output.LayerNorm", (h,)),
            ("intermediate.dense", (inter, h)),
            ("output.dense", (h, inter)),
            ("output.LayerNorm", (h,)),
        ):
            t.append(TensorSpec(pre + name + ".weight", shape))
            t.append(TensorSpec(pre + name + ".bias", (shape[0],)))
    if cfg.get("add_pooling_layer", True):
        t += [TensorSpec("pooler.dense.weight", (h, h)), TensorSpec("pooler.dense.bias", (h,))]
    return t, dict(hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=heads)


def _distilbert_tensors(cfg: dict) -> tuple[list[TensorSpec], dict]:
    """DistilBERT (``DistilBertModel``): BERT's layers under other key names; no token types, no pooler."""
    h, inter, layers, heads = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["n_heads"]
    t = [
        TensorSpec("embeddings.word_embeddings.weight", (cfg["vocab_size"], h)),
        TensorSpec("embeddings.position_embeddings.weight", (cfg.get("max_position_embeddings", 512), h)),
        TensorSpec("embeddings.LayerNorm.weight", (h,)),
        TensorSpec("embeddings.LayerNorm.bias", (h,)),
    ]
    for i in range(layers):
        pre = f"transformer.layer.{i}."
        for name, shape in (
            ("attention.q_lin", (h, h)),
            ("attention.k_lin", (h, h)),
            ("attention.v_lin", (h, h)),
            ("attention.out_lin", (h, h)),
            ("sa_layer_norm", (h,)),
            ("ffn.lin1", (inter, h)),
            ("ffn.lin2", (h, inter)),
            ("output_layer_norm", (h,)),
        ):
            t.append(TensorSpec(pre + name + ".weight", shape))
            t.append(TensorSpec(pre + name + ".bias", (shape[0],)))
    return t, dict(hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=heads)


def _t5_tensors(cfg: dict) -> tuple[list[TensorSpec], dict]:
    """T5 / mT5 / Flan-T5 encoder-decoders (``T5ForConditionalGeneration``): no biases, weight-only
    norms, relative position buckets in each stack's first layer, a cross-attention in every decoder
    layer; ``gated-*`` feed-forwards (T5 v1.1, Flan-T5) have two input matrices. The output head
    is tied to the shared embedding unless ``tie_word_embeddings`` is false (v1.1, mT5)."""
    d, d_ff, heads = cfg["d_model"], cfg["d_ff"], cfg["num_heads"]
    inner = heads * cfg.get("d_kv", d // heads)
    enc_layers = cfg["num_layers"]
    dec_layers = cfg.get("num_decoder_layers") or enc_layers
    buckets = cfg.get("relative_attention_num_buckets", 32)
    gated = str(cfg.get("feed_forward_proj", "relu")).startswith("gated")
    wi = ("wi_0", "wi_1") if gated else ("wi",)
    t = [TensorSpec("shared.weight", (cfg["vocab_size"], d))]

    def attention(pre: str) -> list[TensorSpec]:
        return [
            TensorSpec(pre + "q.weight", (inner, d)),
            TensorSpec(pre + "k.weight", (inner, d)),
            TensorSpec(pre + "v.weight", (inner, d)),
            TensorSpec(pre + "o.weight", (d, inner)),
        ]

    for stack, layers in (("encoder", enc_layers), ("decoder", dec_layers)):
        for i in range(layers):
            pre = f"{stack}.block.{i}.layer."
            t += attention(pre + "0.SelfAttention.")
            if i == 0:
                t.append(TensorSpec(pre + "0.SelfAttention.relative_attention_bias.weight", (buckets, heads)))
            t.append(TensorSpec(pre + "0.layer_norm.weight", (d,)))
            ff = "1"
            if stack == "decoder":
                t += attention(pre + "1.EncDecAttention.")
                t.append(TensorSpec(pre + "1.layer_norm.weight", (d,)))
                ff = "2"
            t += [TensorSpec(f"{pre}{ff}.DenseReluDense.{w}.weight", (d_ff, d)) for w in wi]
            t.append(TensorSpec(f"{pre}{ff}.DenseReluDense.wo.weight", (d, d_ff)))
            t.append(TensorSpec(f"{pre}{ff}.layer_norm.weight", (d,)))
        t.append(TensorSpec(f"{stack}.final_layer_norm.weight", (d,)))
    if cfg.get("tie_word_embeddings") is False:
        t.append(TensorSpec("lm_head.weight", (cfg["vocab_size"], d)))
    # Activations: the paper's per-layer formula over both stacks is an estimate here (a decoder
    # layer also holds cross-attention).
    return t, dict(hidden_size=d, num_layers=enc_layers + dec_layers, num_heads=heads, num_kv_heads=heads)


# model_type -> reader; the first key of a config without model_type that matches picks the reader.
_READERS = {
    "gpt2": _gpt2_tensors,
    **dict.fromkeys(_LLAMA_LIKE, _llama_tensors),
    **dict.fromkeys(_BERT_LIKE, _bert_tensors),
    "distilbert": _distilbert_tensors,
    **dict.fromkeys(("t5", "mt5"), _t5_tensors),
}
_GUESS_BY_KEY = (
    ("n_embd", _gpt2_tensors),
    ("d_ff", _t5_tensors),
    ("type_vocab_size", _bert_tensors),
    ("intermediate_size", _llama_tensors),
)


def model_from_config_dict(cfg: dict, name: str = "config") -> ModelSpec:
    """A model from a Hugging Face config dictionary: GPT-2, Llama, Mistral, Mixtral, Qwen2, BERT,
    RoBERTa, DistilBERT, T5, mT5 or Flan-T5 keys.

    Raises:
        ValueError: for a model type whose layer layout the reader does not know (build such a model
            with ``model_from_callable`` instead) or missing keys.
    """
    kind = cfg.get("model_type")
    if kind is None:
        reader = next((r for key, r in _GUESS_BY_KEY if key in cfg), None)
    else:
        reader = _READERS.get(kind)
    if reader is None:
        raise ValueError(
            f"model_type {kind!r} is not known to the config reader (it reads {', '.join(_READERS)}); "
            "build the model with --module MODULE:CALLABLE instead"
        )
    try:
        tensors, shapes = reader(cfg)
    except KeyError as e:
        raise ValueError(f"config {name!r} lacks the key {e.args[0]!r}") from None
    return ModelSpec(name, tuple(tensors), **shapes)


def model_from_preset(name: str) -> ModelSpec:
    """A built-in model shape: one of :data:`adamkit.tools.presets.PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return model_from_config_dict(PRESETS[name], name)


def model_from_config(path: str | Path) -> ModelSpec:
    """A model from a local ``config.json`` (or a folder holding one). Reads the file; no network."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ValueError(f"no config.json at {str(path)!r}")
    with p.open() as f:
        cfg = json.load(f)
    return model_from_config_dict(cfg, str(path))


def model_from_module(module: Any, name: str | None = None) -> ModelSpec:
    """A model from an ``nn.Module``: its parameters (shared ones once), trainable if ``requires_grad``.

    Works on modules on the meta device, so nothing needs to be allocated.
    """
    tensors = tuple(
        TensorSpec(n, tuple(p.shape), bool(p.requires_grad)) for n, p in module.named_parameters()
    )
    return ModelSpec(name or type(module).__name__, tensors)


def model_from_callable(spec: str) -> ModelSpec:
    """A model from ``"package.module:callable"``, called with no arguments on the meta device.

    ``with torch.device("meta")`` makes every parameter created inside the call shape-only: a
    70B-parameter model is counted without allocating its weights.

    Raises:
        ValueError: if the spec is malformed or cannot be imported.
        TypeError: if the callable does not return an ``nn.Module``.
    """
    import torch

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"expected MODULE:CALLABLE (e.g. mypkg.models:build), got {spec!r}")
    # Like `python -m`, a module in the current directory is found: users run `adamkit plan
    # --module mymodel:build` next to mymodel.py. The path is put back afterwards.
    added = os.getcwd() not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(
            f"cannot import {mod_name!r} for {spec!r}: {e} (searched the current directory "
            f"{os.getcwd()} and sys.path; run from the folder that holds the module, or add it "
            "to PYTHONPATH)"
        ) from e
    finally:
        if added:
            sys.path.remove(os.getcwd())
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    with torch.device("meta"):
        module = obj()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{spec} returned {type(module).__name__}, not a torch.nn.Module")
    return model_from_module(module, spec)


def load_model(model: Any) -> ModelSpec:
    """Any model input as a :class:`ModelSpec`.

    Args:
        model: a :class:`ModelSpec`; an ``nn.Module``; a parameter count (``70e9``, ``"7.5B"``); a
            preset name; a path to a ``config.json`` or its folder; or ``"module:callable"``.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        return model_from_count(model)
    if isinstance(model, (str, Path)):
        s = str(model)
        if s in PRESETS:
            return model_from_preset(s)
        if Path(s).exists():
            return model_from_config(s)
        if ":" in s:
            return model_from_callable(s)
        try:
            return model_from_count(s)
        except ValueError:
            raise ValueError(
                f"{s!r} is not a preset ({', '.join(PRESETS)}), a config.json path, "
                "a module:callable or a parameter count"
            ) from None
    if hasattr(model, "named_parameters"):
        return model_from_module(model)
    raise TypeError(f"cannot plan a model given as {type(model).__name__}")


# ----------------------------------------------------------------------------------------------
# Recipes: precision, optimizer, state format
# ----------------------------------------------------------------------------------------------

# Precision phrases of a recipe spec: (param dtype, master weights, Kahan, stochastic rounding).
PRECISIONS = {
    "fp32": ("fp32", False, False, False),
    "mixed-bf16": ("bf16", True, False, False),
    "mixed-fp16": ("fp16", True, False, False),
    "bf16-kahan": ("bf16", False, True, False),
    "bf16-kahan8": ("bf16", False, "8bit", False),  # int8 compensation (kahan_sum="8bit"): 1 B/param
    "fp16-kahan": ("fp16", False, True, False),
    "bf16-sr": ("bf16", False, False, True),
    "fp16-sr": ("fp16", False, False, True),
    "bf16": ("bf16", False, False, False),
    "fp16": ("fp16", False, False, False),
}
STATE_FORMATS = {"fp32state": "fp32", "bf16state": "bf16", "8bit": "8bit"}
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
    dtype, master, kahan, sr = PRECISIONS[chosen.get("precision", "fp32")]
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
    """How adamkit stores a parameter's moments under state_format='8bit' (``optim.layout.quantizable``):
    ``"rows"`` (>= 2-D: blocks inside dim-0 rows, each row padded to whole blocks), ``"flat"`` (a
    plain 1-D/0-D tensor, or an unknown shape), or None (fp32: below ``min_8bit_size``, rows
    narrower than 66 elements, where padding would cost more than fp32, or a 1-D tensor that
    FSDP2 shards, ``sharded``)."""
    if numel < min_8bit_size:
        return None
    if shape is not None and len(shape) >= 2:
        length = math.prod(shape[1:])
        blocks = -(-length // block_size)
        return "rows" if blocks * block_size + SCALE_BYTES * blocks < 4 * length else None
    return None if sharded and shape is not None else "flat"


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
        name, title: key and display name.
        step_bytes: bytes of the step counter per parameter tensor (0 where the reference
            implementation keeps a Python int, 4 where a 0-D fp32 tensor).
        full: full-size states (component names); they follow the recipe's state format.
        needs_shapes: the state depends on tensor shapes (factored / per-block statistics).
        reference: where the state layout comes from.
    """

    name: str
    title: str
    step_bytes: int
    full: tuple[str, ...]
    needs_shapes: bool = False
    reference: str = ""

    def has_full_state(self, recipe: Recipe) -> bool:
        return bool(self.full or self.needs_shapes or recipe.amsgrad)

    def states(self, t: TensorSpec, model: ModelSpec, recipe: Recipe) -> list[tuple[str, int, bool]]:
        """``(component, elements, full)`` of each state tensor of one trainable parameter.

        Full states are stored in the recipe's state format (8-bit included); the small factored
        or per-block statistics in the state dtype (fp32 when the format is 8-bit: they are tiny).
        """
        n = t.numel
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
        elif self.name == "muon" and len(t.shape) != 2:  # the AdamW fallback: m and v
            out.append(("v", n, True))
        return out


OPTIMIZERS: dict[str, OptimizerSpec] = {
    o.name: o
    for o in (
        OptimizerSpec("adamw", "AdamW", 4, ("m", "v"), reference="adamkit / torch.optim.AdamW"),
        OptimizerSpec("adam", "Adam", 4, ("m", "v"), reference="adamkit / torch.optim.Adam"),
        OptimizerSpec("sgd", "SGD", 0, (), reference="torch.optim.SGD, momentum=0"),
        OptimizerSpec("sgd-momentum", "SGD+momentum", 0, ("m",), reference="torch.optim.SGD momentum_buffer"),
        # m only: 4 B/param fp32, 2 bf16, 1 + 4/256 8-bit; adamkit.Lion keeps a 0-D step tensor
        # like Adam (lion-pytorch keeps none: 4 bytes per tensor less)
        OptimizerSpec("lion", "Lion", 4, ("m",), reference="adamkit.Lion / lion-pytorch: exp_avg"),
        OptimizerSpec(
            "adafactor", "Adafactor", 4, (), True, "torch.optim.Adafactor: row/col variance, beta1=None"
        ),
        OptimizerSpec("adafactor-m", "Adafactor+momentum", 4, ("m",), True, "Adafactor with beta1 (exp_avg)"),
        OptimizerSpec("came", "CAME", 0, ("m",), True, "CAME reference: exp_avg, factored v and residual"),
        OptimizerSpec("adam-mini", "Adam-mini", 0, ("m",), True, "adam-mini 1.1: m, one v per block"),
        OptimizerSpec(
            "sophia", "Sophia", 4, ("m", "hessian"), reference="SophiaG reference: exp_avg, hessian"
        ),
        OptimizerSpec("lamb", "LAMB", 0, ("m", "v"), reference="torch-optimizer Lamb: exp_avg, exp_avg_sq"),
        # adamkit.Muon's split by shape: momentum for matrices, AdamW's m and v for the rest
        # (embeddings and heads given to AdamW add a v each: 4 B/param in fp32)
        OptimizerSpec("muon", "Muon", 4, ("m",), True, "adamkit.Muon: momentum_buffer; m, v off matrices"),
    )
}


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
        if full:
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


# The planner's optimizers that adamkit implements (adamkit_state_bytes is exact for these).
ADAMKIT_OPTIMIZERS = ("adamw", "adam", "lion")
# adamkit's variants, counted from their slots' shape rules (``Slot.shape``): (class, slot options)
ADAMKIT_SLOT_OPTIMIZERS = {
    "adafactor": ("Adafactor", ()),
    "adafactor-m": ("Adafactor", ("beta1",)),
    "came": ("CAME", ()),
    "adam-mini": ("AdamMini", ()),
    "lamb": ("Lamb", ()),
    "sophia": ("SophiaG", ()),
    # the constructor's split: 2-D parameters take Muon (momentum), the others AdamW (m, v)
    "muon": ("Muon", lambda shape: ("use_muon",) if len(shape) == 2 else ("use_adamw",)),
}
# slot name -> component
_SLOT_COMPONENT = {"exp_avg": "m", "max_exp_avg_sq": "max_v", "hessian": "hessian", "momentum_buffer": "m"}


def state_component(key: str) -> str:
    """The planner component of an adamkit optimizer's state key (a live state dict's key):
    ``*_scale`` -> "scales", Kahan/master buffers and step by name, CAME's ``*_res_*`` ->
    "confidence", m-like slots -> "m", every other statistic of v -> "v"."""
    if key.endswith("_scale"):
        return "scales"
    if key in STATE_COMPONENTS:
        return STATE_COMPONENTS[key]
    return _SLOT_COMPONENT.get(key, "confidence" if "_res" in key else "v")


def _slot_state_bytes(shapes, optimizer, state_format, param_dtype, kahan, master, block, min_8bit):
    """Bytes of an adamkit variant's live state, from its algorithm's slots: each slot of a parameter
    has ``prod(slot.shape_for(shape))`` elements in the state format; 8-bit (parameters chosen by
    :func:`eight_bit_layout`) keeps parameter-shaped slots of matrices in rows and every other slot
    as its own flat blocks (1 B/element padded + 4 B/block)."""
    import adamkit

    cls_name, options = ADAMKIT_SLOT_OPTIMIZERS[optimizer]
    alg = getattr(adamkit, cls_name).algorithm
    dtype = _dtype_name(param_dtype)
    fmt = state_format or ("fp32" if dtype == "fp16" else dtype)
    out = dict.fromkeys(("step", "m", "v", "max_v", "scales", "kahan", "master"), 0)
    for s in shapes:
        shape = tuple(getattr(s, "shape", s))
        n = math.prod(shape)
        out["step"] += 4  # a 0-D fp32 tensor per parameter
        eight = fmt == "8bit" and eight_bit_layout(shape, n, min_8bit, block) is not None
        on = options(shape) if callable(options) else options  # options by shape (Muon's split)
        for slot in alg.slots:
            k = slot.shape_for(shape)
            if k is None or (slot.option is not None and slot.option not in on):
                continue
            k = math.prod(k)
            comp = state_component(slot.name)
            if eight and slot.shape is None and len(shape) >= 2:  # rows, like the parameter
                payload, scales = state_tensor_bytes(
                    k, "8bit", block_size=block, min_8bit_size=0, shape=shape
                )
                out["scales"] = out.get("scales", 0) + scales
            elif eight:  # a slot of its own shape, or a 1-D parameter: flat blocks
                payload, scales = blockwise_8bit_bytes(k, block_size=block, scale_bytes=SCALE_BYTES)
                out["scales"] = out.get("scales", 0) + scales
            else:
                payload = DTYPE_BYTES["fp32" if fmt == "8bit" else fmt] * k
            out[comp] = out.get(comp, 0) + payload
        out["kahan"] += kahan_bytes(kahan, dtype) * n
        out["master"] += 4 * n if master else 0
    return out


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

    Args:
        shapes: one shape (tuple, ``torch.Size``) or tensor per parameter.
        optimizer: ``"adamw"``/``"adam"`` (m, v), ``"lion"`` (m only), or a variant of
            :data:`ADAMKIT_SLOT_OPTIMIZERS` (counted from its slots' shape rules; extra components
            ``"hessian"``, ``"confidence"``).
        state_format: ``None`` (the parameter's dtype), ``"fp32"``, ``"bf16"`` or ``"8bit"``.
        amsgrad: count ``max_exp_avg_sq`` (Adam/AdamW).
        param_dtype: the parameters' dtype (``torch.bfloat16``, ``"bf16"``...).
        kahan: a compensation buffer in the parameter dtype; ``"8bit"``: in int8 (bf16 parameters).
        master: an fp32 master copy.
        block_size, min_8bit_size: the 8-bit format.

    Returns:
        ``{"step", "m", "v", "max_v", "scales", "kahan", "master"}`` in bytes (zeros included).
    """
    if optimizer in ADAMKIT_SLOT_OPTIMIZERS:
        return _slot_state_bytes(
            shapes, optimizer, state_format, param_dtype, kahan, master, block_size, min_8bit_size
        )
    if optimizer not in ADAMKIT_OPTIMIZERS:
        raise ValueError(
            f"adamkit has no {optimizer!r} optimizer; choose one of {', '.join(ADAMKIT_OPTIMIZERS)} "
            "(plan() and parse_recipe() estimate the others)"
        )
    dtype = _dtype_name(param_dtype)
    if state_format is None and dtype == "fp16":
        # adamkit keeps fp16 parameters' moments in fp32 by default (fp16 cannot hold typical g^2)
        state_format = "fp32"
    recipe = Recipe(
        name="adamkit",
        param_dtype=dtype,
        master_weights=master,
        kahan=kahan,
        optimizer=optimizer,
        state_format=state_format,
        amsgrad=amsgrad,
        block_size=block_size,
        min_8bit_size=min_8bit_size,
    )
    tensors = tuple(TensorSpec(f"p{i}", tuple(getattr(s, "shape", s))) for i, s in enumerate(shapes))
    total = model_state_bytes(ModelSpec("adamkit", tensors), recipe)
    return {k: total[k] for k in ("step", "m", "v", "max_v", "scales", "kahan", "master")}


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


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


def _gb(n: float) -> float:
    return n / GB


@dataclass(frozen=True)
class RecipePlan:
    """The memory of one recipe: whole-model bytes per component, and per device after sharding.

    Attributes:
        recipe: the recipe.
        n_params: the model's parameters (trainable and frozen): the bytes/param denominator.
        components: whole-model bytes of each component of :data:`COMPONENTS`.
        per_device: the same after ZeRO sharding (what one device holds).
        activations: per-device activation bytes, or None when not estimated.
        device_memory_gb: the device's memory to check against, or None.
    """

    recipe: Recipe
    n_params: int
    components: dict[str, int]
    per_device: dict[str, int]
    activations: int | None = None
    device_memory_gb: float | None = None

    @property
    def model_states(self) -> int:
        """Whole-model bytes of params, grads and optimizer state (no activations)."""
        return sum(self.components.values())

    @property
    def per_device_model_states(self) -> int:
        return sum(self.per_device.values())

    @property
    def per_device_total(self) -> int:
        """What one device holds: its share of the model states plus its activations."""
        return self.per_device_model_states + (self.activations or 0)

    def bytes_per_param(self, component: str | None = None) -> float:
        """Whole-model bytes per parameter, of one component or of all model states."""
        n = self.components[component] if component else self.model_states
        return n / self.n_params

    def group_bytes(self, group: str) -> int:
        """Whole-model bytes of ``"params"``, ``"grads"`` or ``"optimizer"`` (master weights included)."""
        return sum(v for k, v in self.components.items() if _group_of(k) == group)

    @property
    def fits(self) -> bool | None:
        """Whether the per-device total fits ``device_memory_gb`` (None when no memory was given)."""
        if self.device_memory_gb is None:
            return None
        return self.per_device_total <= self.device_memory_gb * GB

    def to_dict(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "name": r.name,
            "description": r.describe(),
            "settings": {
                "param_dtype": r.param_dtype,
                "master_weights": r.master_weights,
                "kahan": r.kahan,
                "stochastic_rounding": r.stochastic_rounding,
                "optimizer": r.optimizer,
                "state_format": r.state_format,
                "state_dtype": r.state_dtype,
                "amsgrad": r.amsgrad,
                "grad_accum": r.grad_accum,
                "gradient_release": r.gradient_release,
                "block_size": r.block_size,
                "min_8bit_size": r.min_8bit_size,
            },
            "components": {
                k: {
                    "bytes": v,
                    "gb": _gb(v),
                    "bytes_per_param": v / self.n_params,
                    "per_device_bytes": self.per_device[k],
                    "per_device_gb": _gb(self.per_device[k]),
                }
                for k, v in self.components.items()
            },
            "groups": {
                g: {"bytes": self.group_bytes(g), "bytes_per_param": self.group_bytes(g) / self.n_params}
                for g in ("params", "grads", "optimizer")
            },
            "model_states_bytes": self.model_states,
            "model_states_gb": _gb(self.model_states),
            "bytes_per_param": self.bytes_per_param(),
            "per_device_model_states_bytes": self.per_device_model_states,
            "activations_bytes": self.activations,
            "per_device_total_bytes": self.per_device_total,
            "per_device_total_gb": _gb(self.per_device_total),
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the model, the setting, and one :class:`RecipePlan` per recipe."""

    model: ModelSpec
    results: tuple[RecipePlan, ...]
    zero_stage: int = 0
    devices: int = 1
    batch_size: int | None = None
    seq_len: int | None = None
    recompute: str = "none"
    device_memory_gb: float | None = None
    notes: tuple[str, ...] = field(default=())

    def __getitem__(self, key: int | str) -> RecipePlan:
        """A recipe's result by position or by name."""
        if isinstance(key, int):
            return self.results[key]
        for r in self.results:
            if r.recipe.name == key:
                return r
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "sharding": {"zero_stage": self.zero_stage, "devices": self.devices},
            "activations": None
            if self.batch_size is None
            else {
                "batch_size": self.batch_size,
                "seq_len": self.seq_len,
                "recompute": self.recompute,
                "formula": "L*[sbh(16e+2) + as^2b(2e+1)] (Korthikanti et al. 2023; e=2: sbh(34+5as/h))",
            },
            "device_memory_gb": self.device_memory_gb,
            "gb": GB,
            "recipes": [r.to_dict() for r in self.results],
            "notes": list(self.notes),
        }

    def _header(self) -> list[str]:
        m = self.model
        # A bare count's name is the count itself; say it once.
        name = f"{m.name}: " if m.shapes_known else ""
        lines = [
            f"model: {name}{m.n_params:,} parameters ({m.n_trainable:,} trainable, "
            f"{m.n_frozen:,} frozen) in {len(m.tensors):,} tensor{'s' if len(m.tensors) != 1 else ''}"
        ]
        shard = "not sharded" if self.zero_stage == 0 or self.devices == 1 else "sharded"
        lines.append(f"ZeRO stage {self.zero_stage} over {self.devices} device(s) ({shard}); GB = 1e9 bytes")
        if self.batch_size is not None:
            lines.append(
                f"activations: micro-batch {self.batch_size} x {self.seq_len} tokens per device, "
                f"recompute={self.recompute} (Korthikanti et al. 2023: sbh(34 + 5as/h) per layer at 16 bit)"
            )
        return lines

    def table(self) -> str:
        """The plan as text: a detailed table for one recipe, side by side for several."""
        lines = self._header()
        lines += self._detail() if len(self.results) == 1 else self._compare()
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _fits_text(self, r: RecipePlan) -> str:
        if r.fits is None:
            return ""
        scope = "" if r.activations is not None else " (model states only; no activation estimate)"
        return f"{'yes' if r.fits else 'no'}{scope}"

    def _detail(self) -> list[str]:
        r = self.results[0]
        lines = [f"recipe {r.recipe.name}: {r.recipe.describe()}", ""]
        head = f"{'component':<12}{'bytes':>22}{'GB':>12}{'B/param':>10}{'GB/device':>12}  what"
        lines += [head, "-" * len(head)]
        for k, v in r.components.items():
            if v or k == "params":
                lines.append(
                    f"{k:<12}{v:>22,}{_gb(v):>12.2f}{r.bytes_per_param(k):>10.3f}"
                    f"{_gb(r.per_device[k]):>12.2f}  {COMPONENTS[k]}"
                )
        lines.append("-" * len(head))
        ms = r.model_states
        lines.append(
            f"{'states':<12}{ms:>22,}{_gb(ms):>12.2f}{r.bytes_per_param():>10.3f}"
            f"{_gb(r.per_device_model_states):>12.2f}  params + grads + optimizer "
            f"({r.group_bytes('optimizer') / r.n_params:.2f} B/param optimizer state)"
        )
        if r.activations is not None:
            lines.append(
                f"{'activations':<12}{'':>22}{'':>12}{'':>10}{_gb(r.activations):>12.2f}  "
                "per device, separate from model states"
            )
        lines.append(f"{'total':<12}{'':>22}{'':>12}{'':>10}{_gb(r.per_device_total):>12.2f}  per device")
        if r.fits is not None:
            lines.append(f"fits in {self.device_memory_gb:g} GB: {self._fits_text(r)}")
        return lines

    def _compare(self) -> list[str]:
        res = self.results
        widths = [max(10, len(r.recipe.name) + 2) for r in res]

        def row(label: str, cells: Iterable[str]) -> str:
            return f"{label:<14}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths))

        lines = [""] + [f"{r.recipe.name}: {r.recipe.describe()}" for r in res] + [""]
        head = row("GB per device", (r.recipe.name for r in res))
        lines += [head, "-" * len(head)]
        for k in COMPONENTS:
            if k == "params" or any(r.components[k] for r in res):
                lines.append(row(k, (f"{_gb(r.per_device[k]):.2f}" for r in res)))
        lines.append("-" * len(head))
        lines.append(row("states", (f"{_gb(r.per_device_model_states):.2f}" for r in res)))
        lines.append(row("B/param", (f"{r.bytes_per_param():.3f}" for r in res)))
        if res[0].activations is not None:
            lines.append(row("activations", (f"{_gb(r.activations or 0):.2f}" for r in res)))
        lines.append(row("total", (f"{_gb(r.per_device_total):.2f}" for r in res)))
        if self.device_memory_gb is not None:
            lines.append(row(f"fits {self.device_memory_gb:g} GB", ("yes" if r.fits else "no" for r in res)))
            if res[0].activations is None:
                lines.append("(fits: model states only; no activation estimate)")
        return lines


def _shard(components: dict[str, int], zero_stage: int, devices: int) -> dict[str, int]:
    """Per-device bytes: each component sharded from its ZeRO stage on, rounded up (uneven last shard)."""
    return {
        k: -(-v // devices) if zero_stage >= _SHARDED_FROM.get(k, 1) else v for k, v in components.items()
    }


def plan(
    model: Any,
    recipes: str | Recipe | Sequence[str | Recipe] = "mixed-bf16",
    *,
    optimizer: str = "adamw",
    state_format: str | None = "auto",
    amsgrad: bool = False,
    grad_accum: bool = False,
    gradient_release: bool = False,
    zero_stage: int = 0,
    devices: int = 1,
    batch_size: int | None = None,
    seq_len: int | None = None,
    recompute: str = "none",
    device_memory: float | None = None,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> Plan:
    """Plan the training memory of ``model`` under one or several recipes.

    Args:
        model: anything :func:`load_model` takes: a parameter count (``70e9``, ``"7.5B"``), a preset
            name, a ``config.json`` path, ``"module:callable"``, an ``nn.Module`` or a :class:`ModelSpec`.
        recipes: a recipe spec (see :func:`parse_recipe`), a :class:`Recipe`, or a sequence of them.
        optimizer, state_format, amsgrad, grad_accum, gradient_release: defaults for what a spec
            does not name.
        zero_stage: 0-3; stage 1 shards optimizer state (master weights included) over ``devices``,
            2 also gradients, 3 also parameters.
        devices: data-parallel devices the states are sharded over.
        batch_size, seq_len: micro-batch per device and sequence length, for the activation estimate
            (both or neither).
        recompute: ``"none"``, ``"selective"`` or ``"full"`` activation recomputation.
        device_memory: GB (1e9 bytes) per device, to answer "fits: yes/no".
        block_size, min_8bit_size: the 8-bit state format.

    Returns:
        A :class:`Plan`; ``plan(...)[0]`` or ``plan(...)["mixed-bf16"]`` is one recipe's result.

    Raises:
        ValueError: for inconsistent settings, an unknown recipe, or a factored optimizer on a bare
            parameter count.
    """
    spec = load_model(model)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    if (batch_size is None) != (seq_len is None):
        raise ValueError("the activation estimate needs both batch size and sequence length")
    if device_memory is not None and not device_memory > 0:
        raise ValueError(f"device memory must be > 0 GB, got {device_memory!r}")
    if spec.n_params == 0:
        raise ValueError(f"{spec.name} has no parameters")
    items = [recipes] if isinstance(recipes, (str, Recipe)) else list(recipes)
    if not items:
        raise ValueError("no recipe to plan")
    defaults = dict(
        optimizer=optimizer,
        state_format=state_format,
        amsgrad=amsgrad,
        grad_accum=grad_accum,
        gradient_release=gradient_release,
        block_size=block_size,
        min_8bit_size=min_8bit_size,
    )
    parsed = [parse_recipe(r, **defaults) if isinstance(r, str) else r for r in items]
    results = []
    for r in parsed:
        comps = model_state_bytes(spec, r)
        act = None
        if batch_size is not None:
            e = 4 if r.param_dtype == "fp32" else 2  # activations are computed in the compute dtype
            act = activation_bytes(spec, batch_size, seq_len, element_bytes=e, recompute=recompute)
        results.append(
            RecipePlan(r, spec.n_params, comps, _shard(comps, zero_stage, devices), act, device_memory)
        )
    notes = []
    if not spec.shapes_known:
        notes.append(
            "a bare parameter count is planned as one flat tensor (per-tensor overheads counted once)"
        )
    if zero_stage and devices == 1:
        notes.append("ZeRO over 1 device shards nothing; pass the number of devices")
    return Plan(
        spec,
        tuple(results),
        zero_stage=zero_stage,
        devices=devices,
        batch_size=batch_size,
        seq_len=seq_len,
        recompute=recompute,
        device_memory_gb=device_memory,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------
# Per rank under FSDP2 and DDP + ZeroRedundancyOptimizer: what each rank's live tensors hold
# ----------------------------------------------------------------------------------------------

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


# state key of adamkit's optimizers -> planner component (``*_scale``: "scales")
STATE_COMPONENTS = {
    "step": "step",
    "exp_avg": "m",
    "exp_avg_sq": "v",
    "max_exp_avg_sq": "max_v",
    "kahan_comp": "kahan",
    "kahan_comp8": "kahan",
    "master_weight": "master",
}


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
    # (component, slot): slot None or of the parameter's shape holds the rank's rows; a variant's
    # slot of its own shape (ADAMKIT_SLOT_OPTIMIZERS) follows the rows (``Slot.follows_rows``:
    # Adafactor's and CAME's row statistics, Adam-mini's per-row v) or is whole on every rank (a
    # matrix's column statistics, a vector's one v), in fp32 under 8 bit (``optim.layout.slot_format``)
    if recipe.optimizer in ADAMKIT_SLOT_OPTIMIZERS:
        import adamkit

        cls_name, options = ADAMKIT_SLOT_OPTIMIZERS[recipe.optimizer]
        on = options(t.shape) if callable(options) else options
        slots = [
            (state_component(s.name), s)
            for s in getattr(adamkit, cls_name).algorithm.slots
            if s.shape_for(t.shape) is not None and (s.option is None or s.option in on)
        ]
        step = 4
    else:
        names = OPTIMIZERS[recipe.optimizer].full + (("max_v",) if recipe.amsgrad else ())
        slots, step = [(name, None) for name in names], OPTIMIZERS[recipe.optimizer].step_bytes
    out = []
    for r in fsdp2_rows(rows, world):
        d = dict.fromkeys(COMPONENTS, 0)
        d["params"] = padded_rows * length * p
        if t.trainable:
            d["grads"] = padded_rows * length * p
            d["master"] = 4 * r * length if recipe.master_weights else 0
            d["kahan"] = kahan_bytes(recipe.kahan, recipe.param_dtype) * r * length
            for comp, slot in slots:
                if slot is not None and slot.shape is not None:
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
    supported = ADAMKIT_OPTIMIZERS + tuple(ADAMKIT_SLOT_OPTIMIZERS)
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


# ----------------------------------------------------------------------------------------------
# CLI: parse, call plan(), print
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``adamkit plan`` arguments."""
    src = parser.add_argument_group("model (one of)").add_mutually_exclusive_group(required=True)
    src.add_argument("--params", metavar="N", help="a parameter count: 70e9, 7.5B, 124M")
    src.add_argument("--preset", choices=list(PRESETS), help="a built-in model shape")
    src.add_argument(
        "--config", metavar="PATH", help="a local Hugging Face config.json or its folder (offline)"
    )
    src.add_argument(
        "--module",
        metavar="MODULE:CALLABLE",
        help="a function returning an nn.Module, built on the meta device",
    )
    rec = parser.add_argument_group("recipe")
    rec.add_argument(
        "--recipe",
        metavar="SPEC",
        help="precision[-state][-optimizer][-amsgrad][-accum], e.g. mixed-bf16 (default), fp32, "
        f"bf16-kahan-8bit, bf16-sr-lion. Precisions: {', '.join(PRECISIONS)}; states: "
        f"{', '.join(STATE_FORMATS)}",
    )
    rec.add_argument("--compare", metavar="SPEC,SPEC,...", help="several recipes side by side")
    rec.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        default="adamw",
        help="the optimizer of recipes that name none (default: %(default)s)",
    )
    rec.add_argument(
        "--state-format",
        choices=["auto", "param", "fp32", "bf16", "8bit"],
        default="auto",
        help="state storage of recipes that name none; auto: fp32 with master weights, else the "
        "parameters' dtype (default: %(default)s)",
    )
    rec.add_argument("--amsgrad", action="store_true", help="Adam/AdamW keep max_v")
    rec.add_argument(
        "--grad-accum",
        action="store_true",
        help="an fp32 gradient-accumulation buffer (with --gradient-release: none, optimizer accumulation)",
    )
    rec.add_argument(
        "--gradient-release",
        action="store_true",
        help="step each parameter in backward and free its gradient: one gradient at a time",
    )
    rec.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="8-bit block length")
    rec.add_argument(
        "--min-8bit-size", type=int, default=MIN_8BIT_SIZE, help="smallest tensor stored in 8 bit"
    )
    dev = parser.add_argument_group("devices and activations")
    dev.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0, help="ZeRO stage")
    dev.add_argument("--devices", type=int, default=1, help="data-parallel devices to shard over")
    dev.add_argument(
        "--per-rank",
        choices=list(PARALLEL),
        help="exact bytes of each of --devices ranks as FSDP2 (fully_shard) or DDP + "
        "ZeroRedundancyOptimizer lay them out, with an adamkit optimizer (instead of ZeRO stages)",
    )
    dev.add_argument("--device-memory", type=float, metavar="GB", help="memory per device: fits yes/no")
    dev.add_argument("--batch-size", type=int, help="micro-batch per device, for activations")
    dev.add_argument("--seq-len", type=int, help="sequence length, for activations")
    dev.add_argument(
        "--recompute",
        choices=["none", "selective", "full"],
        default="none",
        help="activation recomputation: selective drops the attention scores, full keeps layer inputs",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run ``adamkit plan``: 0 on success, 2 on bad input (the message goes to stderr)."""
    try:
        if args.recipe and args.compare:
            raise ValueError("give --recipe or --compare, not both")
        if args.params is not None:
            model = model_from_count(args.params)
        elif args.preset is not None:
            model = model_from_preset(args.preset)
        elif args.config is not None:
            model = model_from_config(args.config)
        else:
            model = model_from_callable(args.module)
        recipes = [s.strip() for s in args.compare.split(",") if s.strip()] if args.compare else args.recipe
        if args.per_rank:
            extra = (args.zero, args.batch_size, args.seq_len, args.device_memory, args.grad_accum)
            if any(x not in (None, 0, False) for x in extra):
                raise ValueError(
                    "--per-rank counts parameters, gradients and optimizer state per rank: it takes no "
                    "--zero, --batch-size, --seq-len, --device-memory or --grad-accum"
                )
            names = recipes if isinstance(recipes, list) else [recipes or "mixed-bf16"]
            ranked = [
                per_rank(
                    model,
                    r,
                    parallel=args.per_rank,
                    devices=args.devices,
                    optimizer=args.optimizer,
                    state_format=None if args.state_format == "param" else args.state_format,
                    amsgrad=args.amsgrad,
                    block_size=args.block_size,
                    min_8bit_size=args.min_8bit_size,
                )
                for r in names
            ]
            if args.json:
                print(json.dumps([r.to_dict() for r in ranked], indent=2))
            else:
                print("\n\n".join(r.table() for r in ranked))
            return 0
        result = plan(
            model,
            recipes or "mixed-bf16",
            optimizer=args.optimizer,
            state_format=None if args.state_format == "param" else args.state_format,
            amsgrad=args.amsgrad,
            grad_accum=args.grad_accum,
            gradient_release=args.gradient_release,
            zero_stage=args.zero,
            devices=args.devices,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            recompute=args.recompute,
            device_memory=args.device_memory,
            block_size=args.block_size,
            min_8bit_size=args.min_8bit_size,
        )
    except (ValueError, TypeError) as e:
        print(f"adamkit plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


__all__ = [
    "ADAMKIT_OPTIMIZERS",
    "state_component",
    "COMPONENTS",
    "OPTIMIZERS",
    "PARALLEL",
    "PRECISIONS",
    "ModelSpec",
    "OptimizerSpec",
    "Plan",
    "Recipe",
    "RankPlan",
    "RecipePlan",
    "STATE_COMPONENTS",
    "TensorSpec",
    "activation_bytes",
    "adamkit_state_bytes",
    "blockwise_8bit_bytes",
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
    "state_tensor_bytes",
    "tensor_bytes",
    "zero_partition",
]
