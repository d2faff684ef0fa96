"""HF <-> Megatron weight layout, TP sharding and the model spec, without any process group."""

from __future__ import annotations

import json

import pytest
import torch

from portable_rl.training.convert import (
    ConversionError,
    HFWeights,
    global_name,
    hf_to_megatron,
    load_hf_into_model,
    local_name,
    local_spec_name,
    megatron_to_hf,
    pack_qkv,
    save_hf_checkpoint,
    shard,
    te_name,
    tp_kind,
    unpack_qkv,
    unshard,
)
from portable_rl.training.model_builder import (
    ModelSpec,
    UnsupportedModel,
    check_parallel_layout,
    local_layer_range,
    padded_vocab_size,
)


@pytest.fixture(params=["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def tiny(request):
    return request.getfixturevalue(request.param)


def test_spec_reads_each_architecture(tiny_llama, tiny_qwen2, tiny_qwen3):
    llama, qwen2, qwen3 = (ModelSpec.from_hf(p) for p in (tiny_llama, tiny_qwen2, tiny_qwen3))
    assert (llama.qkv_bias, llama.qk_norm) == (False, False)
    assert (qwen2.qkv_bias, qwen2.qk_norm) == (True, False)
    assert (qwen3.qkv_bias, qwen3.qk_norm) == (False, True)
    assert llama.num_kv_heads == 2 and llama.q_per_kv == 2 and llama.head_dim == 16


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "lacks factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_spec_refuses_what_it_cannot_represent(tiny_llama, patch, field):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg.update(patch)
    with pytest.raises(UnsupportedModel, match=field):
        ModelSpec.from_hf(cfg)


def test_parallel_layout_checks(tiny_llama):
    spec = ModelSpec.from_hf(tiny_llama)
    check_parallel_layout(spec, 2, 2)
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide num_attention_heads=4"):
        check_parallel_layout(spec, 3, 1)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check_parallel_layout(spec, 4, 1)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        check_parallel_layout(spec, 1, 3)
    assert list(local_layer_range(spec, 2, 1)) == [1]
    assert padded_vocab_size(spec, 2) % 2 == 0 and padded_vocab_size(spec, 2) - spec.vocab_size < 2


def test_qkv_packing_is_grouped_and_invertible(tiny_llama):
    spec = ModelSpec.from_hf(tiny_llama)
    h, hd = spec.hidden_size, spec.head_dim
    q = torch.randn(spec.num_attention_heads * hd, h)
    k = torch.randn(spec.num_kv_heads * hd, h)
    v = torch.randn(spec.num_kv_heads * hd, h)
    packed = pack_qkv(spec, q, k, v)
    # group 0 = q heads 0..1, k head 0, v head 0
    rows = spec.q_per_kv * hd
    assert torch.equal(packed[:rows], q[:rows])
    assert torch.equal(packed[rows : rows + hd], k[:hd])
    assert torch.equal(packed[rows + hd : rows + 2 * hd], v[:hd])
    for a, b in zip(unpack_qkv(spec, packed), (q, k, v), strict=True):
        assert torch.equal(a, b)
    bias = pack_qkv(spec, q[:, 0], k[:, 0], v[:, 0])
    assert torch.equal(unpack_qkv(spec, bias)[1], k[:, 0])


@pytest.mark.parametrize("tp", [1, 2])
def test_shard_unshard_round_trip(tiny_llama, tp):
    spec = ModelSpec.from_hf(tiny_llama)
    cases = {
        "embedding.word_embeddings.weight": torch.randn(spec.vocab_size, 8),
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(16, 8),
        "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(8, 16),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(12, 8),
        "decoder.layers.0.input_layernorm.weight": torch.randn(8),
    }
    for name, full in cases.items():
        parts = [shard(name, full, spec, r, tp) for r in range(tp)]
        assert len({tuple(p.shape) for p in parts}) == 1, name
        assert torch.equal(unshard(name, parts, spec), full), name
    fc1 = cases["decoder.layers.0.mlp.linear_fc1.weight"]
    if tp == 2:  # rank 0 holds [gate_0; up_0], not the first half of [gate; up]
        gate, up = fc1[:6], fc1[6:]
        assert torch.equal(
            shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, spec, 0, 2), torch.cat([gate[:3], up[:3]])
        )
    assert tp_kind("output_layer.weight") == "vocab"
    assert tp_kind("decoder.final_layernorm.weight") == "replicated"


def test_vocab_shards_are_zero_padded(tiny_llama):
    spec = ModelSpec.from_hf(tiny_llama)
    full = torch.randn(spec.vocab_size, 4)
    last = shard("output_layer.weight", full, spec, 1, 2)
    pad = padded_vocab_size(spec, 2) - spec.vocab_size
    assert last.shape[0] == padded_vocab_size(spec, 2) // 2
    if pad:
        assert torch.all(last[-pad:] == 0)


def test_layer_names_move_between_stages():
    assert local_name("decoder.layers.5.mlp.linear_fc1.weight", 4) == "decoder.layers.1.mlp.linear_fc1.weight"
    assert (
        global_name("decoder.layers.1.mlp.linear_fc1.weight", 4) == "decoder.layers.5.mlp.linear_fc1.weight"
    )
    assert local_name("output_layer.weight", 4) == "output_layer.weight"


def test_hf_megatron_hf_round_trip_is_exact(tiny):
    spec = ModelSpec.from_hf(tiny)
    hf = HFWeights(tiny)
    back = {}
    for name, full in hf_to_megatron(spec, hf, range(spec.num_layers), True, True):
        for hf_name, tensor in megatron_to_hf(spec, name, full):
            back[hf_name] = tensor
    assert set(back) == set(hf.keys())
    for name in hf.keys():
        assert torch.equal(back[name], hf[name]), name


def test_transformer_engine_names_load_and_export_like_local_ones(tiny_qwen3):
    """TE's spec fuses the pre-norms into the next linear; the same tensors load and export under either name."""
    spec = ModelSpec.from_hf(tiny_qwen3)
    hf = HFWeights(tiny_qwen3)
    assert (
        te_name("decoder.layers.3.input_layernorm.weight")
        == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    )
    assert (
        te_name("decoder.layers.3.pre_mlp_layernorm.weight")
        == "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"
    )
    assert te_name("decoder.final_layernorm.weight") == "decoder.final_layernorm.weight"
    full = dict(hf_to_megatron(spec, hf, range(spec.num_layers), True, True))
    te_state = {te_name(n): torch.zeros_like(t) for n, t in full.items()}
    te_state["decoder.layers.0.self_attention.linear_qkv._extra_state"] = torch.zeros(0)

    class TeShaped(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return te_state

    load_hf_into_model(TeShaped(), spec, hf, 0, 1, range(spec.num_layers), True, True)
    for name, tensor in full.items():
        assert torch.equal(te_state[te_name(name)], tensor), name
    exported = {}
    for name, tensor in te_state.items():
        if not name.endswith("_extra_state"):
            exported.update(megatron_to_hf(spec, name, tensor))
    assert set(exported) == set(hf.keys())
    assert (
        local_spec_name(te_name("decoder.layers.1.pre_mlp_layernorm.weight"))
        == "decoder.layers.1.pre_mlp_layernorm.weight"
    )


def test_tied_output_is_not_exported(tiny_llama):
    spec = ModelSpec.from_hf(
        {**json.loads((tiny_llama / "config.json").read_text()), "tie_word_embeddings": True}
    )
    assert megatron_to_hf(spec, "output_layer.weight", torch.zeros(2, 2)) == []
    with pytest.raises(ConversionError, match="decoder.layers.0.bogus"):
        megatron_to_hf(spec, "decoder.layers.0.bogus", torch.zeros(1))


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    spec = ModelSpec.from_hf(tiny_llama)
    hf = HFWeights(tiny_llama)
    tensors = {k: hf[k] for k in hf.keys() if k != "model.norm.weight"}
    out = save_hf_checkpoint(tensors.items(), tmp_path / "broken", tiny_llama)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(ConversionError, match="model.norm.weight"):
        list(hf_to_megatron(spec, HFWeights(out), range(2), True, True))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        HFWeights(tmp_path)
