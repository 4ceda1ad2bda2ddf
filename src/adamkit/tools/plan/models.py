"""The model as the planner sees it: its parameter tensors with names and shapes, read from a
parameter count, a preset, a Hugging Face config.json, an ``nn.Module`` or a ``module:callable``
(built on the meta device: nothing allocated)."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ..presets import PRESETS


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
