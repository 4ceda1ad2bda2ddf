"""Built-in model shapes for the memory planner, written as Hugging Face ``config.json`` dictionaries.

Presets go through the same reader as a user's ``config.json`` (``adamkit.tools.plan.model_from_config``),
so a preset is nothing but the published configuration's shape keys. The parameter count each
gives is pinned in the tests against the published figure.
"""

from __future__ import annotations

# GPT-2 (Radford et al., 2019): learned positions, fused qkv, biases everywhere, the output head
# tied to the token embedding (so it is counted once).
_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}

# Llama family (Touvron et al., 2023; Meta, 2024): RMSNorm without bias, SwiGLU MLP (gate, up,
# down), no linear biases, an untied output head. Llama 3 uses grouped-query attention (8 kv heads).
_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096}
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 8192}

# BERT (Devlin et al., 2019), counted as BertModel: embeddings (word, position, token type), post-LN
# encoder layers with biases, the pooler; the masked-LM head is not included.
_BERT = {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}

# T5 (Raffel et al., 2020): encoder-decoder, no biases, relative positions. t5-* tie the output head
# to the shared embedding; Flan-T5 (T5 v1.1) has a gated-GELU MLP and an untied head.
_T5 = {"model_type": "t5", "vocab_size": 32128, "d_kv": 64, "relative_attention_num_buckets": 32}

PRESETS: dict[str, dict] = {
    # 109,482,240
    "bert-base-uncased": {
        **_BERT,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    # 335,141,888
    "bert-large-uncased": {
        **_BERT,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
    # 124,645,632 (BERT's layout; a larger vocabulary, 514 positions, one token type)
    "roberta-base": {
        **_BERT,
        "model_type": "roberta",
        "vocab_size": 50265,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    # 60,506,624
    "t5-small": {**_T5, "d_model": 512, "d_ff": 2048, "num_layers": 6, "num_heads": 8},
    # 222,903,552
    "t5-base": {**_T5, "d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12},
    # 247,577,856
    "flan-t5-base": {
        **_T5,
        "d_model": 768,
        "d_ff": 2048,
        "num_layers": 12,
        "num_heads": 12,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
    # 124,439,808 parameters
    "gpt2": {**_GPT2, "n_embd": 768, "n_layer": 12, "n_head": 12},
    # 354,823,168
    "gpt2-medium": {**_GPT2, "n_embd": 1024, "n_layer": 24, "n_head": 16},
    # 774,030,080
    "gpt2-large": {**_GPT2, "n_embd": 1280, "n_layer": 36, "n_head": 20},
    # 1,557,611,200
    "gpt2-xl": {**_GPT2, "n_embd": 1600, "n_layer": 48, "n_head": 25},
    # 6,738,415,616
    "llama-2-7b": {
        **_LLAMA2,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    # 13,015,864,320
    "llama-2-13b": {
        **_LLAMA2,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
    # 68,976,648,192
    "llama-2-70b": {
        **_LLAMA2,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    # 8,030,261,248
    "llama-3-8b": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    # 70,553,706,496
    "llama-3-70b": {
        **_LLAMA3,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    # 405,853,388,800
    "llama-3.1-405b": {
        **_LLAMA3,
        "max_position_embeddings": 131072,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
    },
    # 7,241,732,096
    "mistral-7b": {
        "model_type": "mistral",
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}
