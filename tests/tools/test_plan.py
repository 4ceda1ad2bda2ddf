"""The memory planner: published tables, preset counts, model inputs, CLI, and live tensors to the byte."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

import adamkit
from adamkit.tools import cli
from adamkit.tools.plan import (
    ModelSpec,
    Recipe,
    TensorSpec,
    activation_bytes,
    adamkit_state_bytes,
    blockwise_8bit_bytes,
    load_model,
    model_from_callable,
    model_from_config,
    model_from_module,
    model_from_preset,
    model_state_bytes,
    parse_count,
    parse_recipe,
    plan,
    state_tensor_bytes,
)

# ----------------------------------------------------------------------------------------------
# Builders for the module:callable input (imported by name, called on the meta device)
# ----------------------------------------------------------------------------------------------


def small_sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))  # 220 + 105 = 325 params


def huge_linear() -> nn.Module:
    # 10^10 weights: 40 GB if it were allocated; on the meta device it costs nothing.
    return nn.Linear(100_000, 100_000)


def partly_frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    model[0].requires_grad_(False)  # 220 frozen, 105 trainable
    return model


def not_a_module() -> int:
    return 3


class TinyLM(nn.Module):
    """A 2-layer transformer language model from torch.nn (108,224 parameters)."""

    def __init__(self, vocab: int = 64, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(idx)))


GB = 1e9

# ----------------------------------------------------------------------------------------------
# Published figures
# ----------------------------------------------------------------------------------------------


def test_70b_mixed_precision_table():
    r = plan(70e9, "mixed-bf16")[0]
    c = r.components
    assert c["params"] == 140 * GB
    assert c["grads"] == 140 * GB
    assert c["m"] == 280 * GB
    assert c["v"] == 280 * GB
    assert c["master"] == 280 * GB
    assert c["step"] == 4  # one 0-D fp32 step tensor for the one flat tensor
    assert all(c[k] == 0 for k in ("kahan", "max_v", "scales", "grad_accum"))
    assert r.bytes_per_param() == pytest.approx(16)
    assert r.group_bytes("optimizer") / r.n_params == pytest.approx(12)
    assert r.model_states / GB == pytest.approx(1120)
    # The 840 GB explainer figure is this table without the fp32 master weights.
    assert (c["params"] + c["grads"] + c["m"] + c["v"]) / GB == 840


@pytest.mark.parametrize("stage, expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_per_device_figures(stage, expected_gb):
    # Rajbhandari et al. (2020), Figure 1: 7.5B parameters, 64 devices, mixed-precision Adam (K = 12).
    r = plan(7.5e9, "mixed-fp16", zero_stage=stage, devices=64)[0]
    psi, n = 7.5e9, 64
    exact = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]
    assert r.per_device_total == pytest.approx(exact, rel=1e-9)
    assert round(r.per_device_total / GB, 1) == expected_gb


def test_zero_shards_components_by_stage():
    comps = {}
    for stage in range(4):
        comps[stage] = plan(1e9, "mixed-bf16-accum", zero_stage=stage, devices=8)[0].per_device
    assert comps[0]["m"] == 4e9 and comps[1]["m"] == 0.5e9 and comps[1]["master"] == 0.5e9
    assert comps[1]["grads"] == 2e9 and comps[2]["grads"] == 0.25e9 and comps[2]["grad_accum"] == 0.5e9
    assert comps[2]["params"] == 2e9 and comps[3]["params"] == 0.25e9


# ----------------------------------------------------------------------------------------------
# Model inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count",
    [
        ("gpt2", 124_439_808),  # tied output head, counted once
        ("llama-2-7b", 6_738_415_616),
        ("llama-3-8b", 8_030_261_248),
        ("llama-3-70b", 70_553_706_496),
        ("mistral-7b", 7_241_732_096),
        ("bert-base-uncased", 109_482_240),
        ("bert-large-uncased", 335_141_888),
        ("roberta-base", 124_645_632),
        ("t5-small", 60_506_624),
        ("t5-base", 222_903_552),
        ("flan-t5-base", 247_577_856),
    ],
)
def test_preset_parameter_counts(name, count):
    m = model_from_preset(name)
    assert m.n_params == count and m.n_trainable == count and m.n_frozen == 0
    assert m.shapes_known and m.hidden_size and m.num_layers and m.num_heads


def test_parse_count():
    assert parse_count("70e9") == 70_000_000_000
    assert parse_count("7.5B") == 7_500_000_000
    assert parse_count("124M") == 124_000_000
    assert parse_count("1,000") == 1000
    assert parse_count(70553706496) == 70553706496
    for bad in ("abc", "0", "-5", "1.5", "inf"):
        with pytest.raises(ValueError):
            parse_count(bad)


LLAMA_2_7B_CONFIG = {  # as published, including keys the reader does not need
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_config_json_llama_and_gpt2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_7B_CONFIG))
    assert model_from_config(tmp_path / "config.json").n_params == 6_738_415_616
    assert model_from_config(tmp_path).n_params == 6_738_415_616  # the folder works too
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
            "n_ctx": 1024, "vocab_size": 50257, "activation_function": "gelu_new"}  # fmt: skip
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps(gpt2))
    assert model_from_config(path).n_params == 124_439_808
    assert load_model(str(path)).n_params == 124_439_808


def _small_llama(**extra) -> dict:
    return {"model_type": "mistral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **extra}  # fmt: skip


def test_config_json_grouped_query_attention_and_tying(tmp_path):
    # embed 6400; per layer q 4096, k 2048, v 2048, o 4096, mlp 3*64*128, norms 2*64; final norm 64
    per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 64 * 128 + 128
    untied = 6400 + 2 * per_layer + 64 + 6400
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_small_llama()))
    assert model_from_config(path).n_params == untied
    path.write_text(json.dumps(_small_llama(tie_word_embeddings=True)))
    assert model_from_config(path).n_params == untied - 6400
    path.write_text(json.dumps(_small_llama(attention_bias=True, model_type="llama")))
    assert model_from_config(path).n_params == untied + 2 * (64 + 32 + 32 + 64)


# The shape keys of the published config.json files (other keys omitted); counts as the real
# models report them (BertModel with its pooler, T5ForConditionalGeneration, DistilBertModel).
BERT_BASE_UNCASED_CONFIG = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "type_vocab_size": 2,
    "vocab_size": 30522,
}
T5_SMALL_CONFIG = {
    "model_type": "t5",
    "d_ff": 2048,
    "d_kv": 64,
    "d_model": 512,
    "feed_forward_proj": "relu",
    "num_decoder_layers": 6,
    "num_heads": 8,
    "num_layers": 6,
    "relative_attention_num_buckets": 32,
    "vocab_size": 32128,
}
FLAN_T5_SMALL_CONFIG = {
    "model_type": "t5",
    "d_ff": 1024,
    "d_kv": 64,
    "d_model": 512,
    "feed_forward_proj": "gated-gelu",
    "num_decoder_layers": 8,
    "num_heads": 6,
    "num_layers": 8,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}
DISTILBERT_BASE_UNCASED_CONFIG = {
    "model_type": "distilbert",
    "dim": 768,
    "hidden_dim": 3072,
    "max_position_embeddings": 512,
    "n_heads": 12,
    "n_layers": 6,
    "vocab_size": 30522,
}


@pytest.mark.parametrize(
    "cfg, count",
    [
        (BERT_BASE_UNCASED_CONFIG, 109_482_240),
        (T5_SMALL_CONFIG, 60_506_624),  # tied head, relative-position tables in both stacks
        (FLAN_T5_SMALL_CONFIG, 76_961_152),  # gated MLP, untied head, 8+8 layers of 6 heads (384 inner)
        (DISTILBERT_BASE_UNCASED_CONFIG, 66_362_880),
    ],
)
def test_config_json_encoders_and_encoder_decoders(tmp_path, cfg, count):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    m = model_from_config(path)
    assert m.n_params == count and m.hidden_size and m.num_layers and m.num_heads
    # without model_type the reader goes by the keys
    path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "model_type"}))
    if "n_layers" not in cfg:  # DistilBERT's keys say nothing unique
        assert model_from_config(path).n_params == count


def test_cli_config_bert(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(BERT_BASE_UNCASED_CONFIG))
    assert cli.main(["plan", "--config", str(tmp_path), "--recipe", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["trainable"] == 109_482_240


def test_cli_module_from_the_current_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodel_cwd.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(10, 3)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert cli.main(["plan", "--module", "mymodel_cwd:build", "--recipe", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["trainable"] == 33
    assert str(tmp_path) not in sys.path  # put back
    assert cli.main(["plan", "--module", "no_such_module_here:build"]) == 2
    assert "current directory" in capsys.readouterr().err


def test_config_json_unknown_model_type(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "whisper", "d_model": 512}))
    with pytest.raises(ValueError, match="module"):
        model_from_config(path)
    with pytest.raises(ValueError, match="no config.json"):
        model_from_config(tmp_path / "missing")


def test_module_callable_is_built_on_meta():
    assert model_from_callable(f"{__name__}:small_sequential").n_params == 325
    huge = model_from_callable(f"{__name__}:huge_linear")  # would need 40 GB if materialized
    assert huge.n_params == 100_000 * 100_000 + 100_000
    with pytest.raises(TypeError, match="nn.Module"):
        model_from_callable(f"{__name__}:not_a_module")
    with pytest.raises(ValueError, match="MODULE:CALLABLE"):
        model_from_callable("no_colon")
    with pytest.raises(ValueError, match="no attribute"):
        model_from_callable(f"{__name__}:missing")


def test_trainable_and_frozen_are_counted_apart():
    m = model_from_callable(f"{__name__}:partly_frozen")
    assert (m.n_params, m.n_trainable, m.n_frozen) == (325, 105, 220)
    c = plan(m, "fp32")[0].components
    assert c["params"] == 4 * 325  # frozen weights are still held
    assert c["grads"] == c["m"] == c["v"] == 4 * 105  # but get no gradient or state
    assert c["step"] == 4 * 2  # two trainable tensors
    mixed = plan(m, "mixed-bf16")[0].components
    assert mixed["master"] == 4 * 105 and mixed["params"] == 2 * 325


# ----------------------------------------------------------------------------------------------
# Recipes and formulas
# ----------------------------------------------------------------------------------------------


def test_parse_recipe():
    r = parse_recipe("bf16-kahan-8bit")
    assert (r.param_dtype, r.kahan, r.master_weights, r.state_format) == ("bf16", True, False, "8bit")
    assert parse_recipe("mixed-bf16").state_dtype == "fp32"  # the optimizer runs on the fp32 master
    assert parse_recipe("bf16-kahan").state_dtype == "bf16"  # None: the parameter's dtype
    assert parse_recipe("bf16-sr-adam-mini").optimizer == "adam-mini"
    assert parse_recipe("fp32-amsgrad").amsgrad
    assert parse_recipe("lion", optimizer="adamw").optimizer == "lion"
    with pytest.raises(ValueError, match="unknown part"):
        parse_recipe("bf16-kahan-sr")
    with pytest.raises(ValueError, match="two precisions"):
        parse_recipe("fp32-bf16")
    with pytest.raises(ValueError, match="amsgrad"):
        parse_recipe("fp32-lion-amsgrad")
    with pytest.raises(ValueError, match="bf16/fp16"):
        Recipe(param_dtype="fp32", kahan=True)
    r = parse_recipe("bf16-kahan8-8bit")  # the int8 Kahan compensation
    assert (r.param_dtype, r.kahan, r.state_format) == ("bf16", "8bit", "8bit")
    assert "Kahan compensation (int8)" in r.describe()
    with pytest.raises(ValueError, match="bf16 params"):
        Recipe(param_dtype="fp16", kahan="8bit")
    with pytest.raises(ValueError, match="kahan must be"):
        Recipe(param_dtype="bf16", kahan="4bit")


def test_bytes_per_param_of_recipes():
    expected = {
        "fp32": 16,
        "mixed-bf16": 16,
        "mixed-fp16-accum": 20,
        "bf16-kahan": 10,
        "bf16-sr": 8,
        "fp32-amsgrad": 20,
        "fp32-bf16state": 12,
        "bf16-kahan-8bit": 6 + 2 + 2 * 2 / 32,
        "bf16-kahan8-8bit": 5 + 2 + 2 * 2 / 32,  # p 2 + int8 comp 1 + m, v 2 + scales; grads 2
        "fp32-sgd": 8,
        "fp32-sgd-momentum": 12,
        "bf16-sr-lion": 6,
        "fp32-sophia": 16,
        "fp32-lamb": 16,
    }
    result = plan(70e9, list(expected))
    for name, bpp in expected.items():
        assert result[name].bytes_per_param() == pytest.approx(bpp, rel=1e-9), name


def test_8bit_format_bytes():
    assert blockwise_8bit_bytes(4096) == (4096, 256)  # 128 groups of 32, a 2-byte scale each
    assert blockwise_8bit_bytes(5000) == (5024, 314)  # padded to 157 whole groups, 157 scales
    assert blockwise_8bit_bytes(5000, block_size=128) == (5120, 80)
    assert state_tensor_bytes(4095, "8bit") == (4 * 4095, 0)  # below the threshold: fp32
    assert state_tensor_bytes(4095, "8bit", min_8bit_size=1024) == (4096, 256)
    b = adamkit_state_bytes([(16, 256), (5000,), (4095,)], state_format="8bit")
    assert b["m"] == b["v"] == 4096 + 5024 + 4 * 4095
    assert b["scales"] == 2 * (16 * 8 * 2 + 157 * 2)
    # >= 2-D: rows, each padded to whole groups; rows narrower than 9 elements stay fp32 (a row
    # costs at least 32 + 2 bytes)
    assert state_tensor_bytes(7 * 300, "8bit", min_8bit_size=0, shape=(7, 300)) == (7 * 320, 7 * 10 * 2)
    assert state_tensor_bytes(64 * 64, "8bit", shape=(64, 64)) == (64 * 64, 64 * 2 * 2)
    assert state_tensor_bytes(9 * 1000, "8bit", shape=(1000, 9)) == (1000 * 32, 1000 * 2)
    assert state_tensor_bytes(8 * 1000, "8bit", shape=(1000, 8)) == (4 * 8 * 1000, 0)
    assert state_tensor_bytes(5000, "8bit", shape=(5000,), sharded=True) == (4 * 5000, 0)  # FSDP2's 1-D
    assert b["step"] == 3 * 4
    for n in (4096, 5000, 70_000):  # the per-tensor formula 2 * (ceil(n/32)*32 + ceil(n/32)*2)
        b = adamkit_state_bytes([(n,)], state_format="8bit")
        assert b["m"] + b["v"] + b["scales"] == 2 * (math.ceil(n / 32) * 32 + math.ceil(n / 32) * 2)


def test_adamkit_state_bytes_low_precision():
    b = adamkit_state_bytes([(10, 10)], param_dtype=torch.bfloat16, kahan=True)
    assert (b["kahan"], b["m"], b["v"], b["master"]) == (200, 200, 200, 0)
    b = adamkit_state_bytes([(10, 10)], param_dtype="bf16", master=True, state_format="fp32", amsgrad=True)
    assert (b["master"], b["m"], b["v"], b["max_v"], b["kahan"]) == (400, 400, 400, 400, 0)


def test_factored_optimizers_per_matrix():
    model = ModelSpec("m", (TensorSpec("w", (1000, 500)), TensorSpec("b", (500,))))
    c = model_state_bytes(model, parse_recipe("fp32-adafactor"))
    assert c["v"] == 4 * (1000 + 500) + 4 * 500 and c["m"] == 0  # 1-D tensors keep a full v
    c = model_state_bytes(model, parse_recipe("fp32-adafactor-m"))
    assert c["m"] == 4 * 500_500
    c = model_state_bytes(model, parse_recipe("fp32-came"))
    assert c["m"] == 4 * 500_500 and c["v"] == 4 * 2000 and c["confidence"] == 4 * 1500
    # 3-D: factored over the last two dims, per leading index
    c = model_state_bytes(ModelSpec("m", (TensorSpec("w", (4, 30, 20)),)), parse_recipe("fp32-adafactor"))
    assert c["v"] == 4 * (4 * 30 + 4 * 20)
    with pytest.raises(ValueError, match="shapes"):
        plan(7e9, "adafactor")


def test_adam_mini_blocks(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_small_llama()))
    c = model_state_bytes(model_from_config(path), parse_recipe("fp32-adam-mini"))
    # per layer: q 4 heads, k 2 kv heads, v_proj 32 rows, o_proj 64, mlp 128 + 128 + 64, 2 norms 1
    # each; embedding and head 100 rows each; final norm 1.
    assert c["v"] == 4 * (2 * (4 + 2 + 32 + 64 + 128 + 128 + 64 + 2) + 100 + 100 + 1)
    assert c["m"] == 4 * model_from_config(path).n_params


def test_activation_estimate_gpt2():
    m = model_from_preset("gpt2")
    sbh, as2b = 1024 * 768, 12 * 1024 * 1024
    assert activation_bytes(m, 1, 1024) == 12 * (34 * sbh + 5 * as2b)  # sbh(34 + 5as/h) per layer
    assert activation_bytes(m, 1, 1024, recompute="selective") == 12 * 34 * sbh
    assert activation_bytes(m, 1, 1024, recompute="full") == 12 * 2 * sbh
    assert activation_bytes(m, 1, 1024, element_bytes=4) == 12 * (66 * sbh + 9 * as2b)
    r = plan("gpt2", "mixed-bf16", batch_size=1, seq_len=1024)[0]
    assert r.activations == 1_075_838_976
    assert r.per_device_total == r.per_device_model_states + r.activations
    with pytest.raises(ValueError, match="transformer shapes"):
        plan(7e9, batch_size=1, seq_len=1024)
    with pytest.raises(ValueError, match="both"):
        plan("gpt2", batch_size=1)


def test_fits():
    assert plan("llama-2-7b", "mixed-bf16", device_memory=80)[0].fits is False  # 107.8 GB
    assert plan("llama-2-7b", "bf16-kahan-8bit", device_memory=80)[0].fits is True  # 54.1 GB
    assert plan("llama-2-7b", "mixed-bf16", zero_stage=3, devices=8, device_memory=80)[0].fits is True
    assert plan("gpt2")[0].fits is None


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_json_70b(capsys):
    assert cli.main(["plan", "--params", "70e9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (r,) = out["recipes"]
    assert out["model"]["params"] == 70_000_000_000
    assert r["name"] == "mixed-bf16"
    assert {k: r["components"][k]["gb"] for k in ("params", "grads", "m", "v", "master")} == {
        "params": 140.0, "grads": 140.0, "m": 280.0, "v": 280.0, "master": 280.0}  # fmt: skip
    assert r["bytes_per_param"] == pytest.approx(16)
    assert r["groups"]["optimizer"]["bytes_per_param"] == pytest.approx(12)
    assert r["fits"] is None


def test_cli_table_fits_and_compare(capsys):
    assert cli.main(["plan", "--preset", "llama-3-8b", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GB: no" in out and "master" in out and "8,030,261,248" in out
    specs = "fp32,mixed-bf16,bf16-kahan,bf16-kahan-8bit"
    argv = ["plan", "--preset", "llama-3-8b", "--compare", specs, "--device-memory", "80"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert all(s in table for s in specs.split(","))
    assert cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["recipes"]] == specs.split(",")
    # 16, 16, 10 and ~8.03 B/param of 8.03e9: only the 8-bit recipe fits in 80 GB
    assert [r["fits"] for r in out["recipes"]] == [False, False, False, True]


def test_cli_module_zero_and_activations(capsys):
    argv = ["plan", "--module", f"{__name__}:partly_frozen", "--recipe", "fp32", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model"]["trainable"], out["model"]["frozen"]) == (105, 220)
    argv = ["plan", "--preset", "gpt2", "--zero", "3", "--devices", "4"]
    argv += ["--batch-size", "2", "--seq-len", "512"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "ZeRO stage 3 over 4" in out


def test_cli_errors(capsys):
    assert cli.main(["plan", "--params", "lots"]) == 2
    assert "parameter count" in capsys.readouterr().err
    assert cli.main(["plan", "--params", "7e9", "--recipe", "adafactor"]) == 2
    assert "shapes" in capsys.readouterr().err
    assert cli.main(["plan", "--params", "7e9", "--recipe", "fp32", "--compare", "fp32,bf16"]) == 2
    with pytest.raises(SystemExit):  # argparse: exactly one model input
        cli.main(["plan", "--params", "7e9", "--preset", "gpt2"])


# ----------------------------------------------------------------------------------------------
# Planned bytes equal live tensors
# ----------------------------------------------------------------------------------------------


def _live_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    keys = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "max_v", "step": "step"}
    live = {"params": sum(p.nbytes for p in model.parameters())}
    live["grads"] = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    for state in opt.state.values():
        for k, t in state.items():
            live[keys[k]] = live.get(keys[k], 0) + t.nbytes
    return live


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("freeze_embedding", [False, True])
def test_planned_bytes_equal_live_adamw(amsgrad, backend, freeze_embedding):
    torch.manual_seed(0)
    model = TinyLM()
    model.embed.requires_grad_(not freeze_embedding)
    opt = adamkit.AdamW(model.parameters(), lr=1e-3, amsgrad=amsgrad, backend=backend)
    idx = torch.randint(0, 64, (2, 16))
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()

    live = _live_bytes(model, opt)
    spec = model_from_module(model)
    assert spec.n_params == 108_224 and spec.n_frozen == (4096 if freeze_embedding else 0)
    planned = plan(model, Recipe(name="fp32", amsgrad=amsgrad))[0].components
    planned = {k: v for k, v in planned.items() if v}
    assert planned == live

    # The optimizer-only view a state-format test can compare with: same bytes.
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = adamkit_state_bytes(trainable, amsgrad=amsgrad)
    assert {k: v for k, v in state.items() if v} == {k: live[k] for k in state if k in live}


def test_one_registry_names_what_every_tool_takes():
    """train, race, bench and plan take their optimizer, precision and state names from
    ``tools.registry``: every optimizer there is planned, every race recipe is made of its names,
    and adamkit's optimizers are planned from their algorithms' slots (no second declaration)."""
    from adamkit.tools import bench, race, registry
    from adamkit.tools.plan import OPTIMIZERS, parse_recipe

    assert list(OPTIMIZERS) == list(registry.OPTIMIZERS)
    for name in registry.OPTIMIZERS:
        assert parse_recipe(f"fp32-{name}").optimizer == name  # every name is a recipe phrase
    exact = {n: o.full for n, o in OPTIMIZERS.items() if o.adamkit is not None}
    assert exact == {
        "adamw": ("m", "v"), "adam": ("m", "v"), "lion": ("m",), "adopt": ("m", "v"),
        "ademamix": ("m", "v", "m"), "stable-adamw": ("m", "v"), "muon": (), "schedule-free": ("z", "v"),
        "adamw-cautious": ("m", "v"),
    }  # fmt: skip
    for r in race.RECIPES.values():
        assert r.optimizer in registry.TRAINABLE and r.state in registry.STATE_FORMATS
        assert r.precision in registry.TRAIN_PRECISIONS
    for precision in registry.PRECISIONS:
        parse_recipe(precision)
    assert {
        k: v.dtype for k, v in bench.implementations().items() if k.startswith("adamkit fused, bf16 +")
    } == {
        "adamkit fused, bf16 + Kahan, bf16 state": torch.bfloat16,
        "adamkit fused, bf16 + Kahan, 8-bit state": torch.bfloat16,
        "adamkit fused, bf16 + int8 Kahan, 8-bit state": torch.bfloat16,
    }


def test_a_new_slot_is_planned_without_a_planner_change(monkeypatch):
    """adamkit's bytes are counted from ``Algorithm.slots``: a slot added to Lion's declaration is
    counted at once (here a signed parameter-shaped slot: 4 B/param more in fp32, rows in 8 bit)."""
    import dataclasses

    from adamkit.algorithm import Slot

    before = adamkit_state_bytes([(64, 256)], optimizer="lion")
    alg = adamkit.Lion.algorithm
    extra = dataclasses.replace(alg, slots=(*alg.slots, Slot("exp_avg_extra", signed=True)))
    monkeypatch.setattr(adamkit.Lion, "algorithm", extra)
    after = adamkit_state_bytes([(64, 256)], optimizer="lion")
    assert after["v"] - before["v"] == 4 * 64 * 256  # a new key lands in "v" (state_component)
    eight = adamkit_state_bytes([(64, 256)], optimizer="lion", state_format="8bit")
    assert eight["v"] == 64 * 256 and eight["scales"] == 2 * 64 * 8 * 2
