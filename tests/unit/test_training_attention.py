"""SDPA core attention and packed micro-batches: against float64 references, and the platform's kernel choice.

* ``SdpaCoreAttention`` (padded ``bshd`` and packed ``thd``) against explicit causal softmax attention in float64,
  with grouped-query attention; packed samples never see each other.
* Megatron's rotary embedding on a packed row restarts positions per sample when given ``cu_seqlens`` — the
  fact packing relies on, since ``GPTModel`` ignores ``position_ids`` for RoPE.
* ``TrainBatch.pack`` / ``to_packed_micro_batch`` / ``response_view`` layout.
* ``Platform.trainer_kernels``: one answer for the builder and ``doctor``; TransformerEngine only where it
  imports (a stand-in package here), refusals are one line naming the value and the fix.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch

from portable_rl import platform as plat
from portable_rl.training.batch import TrainBatch, to_micro_batch, to_packed_micro_batch
from portable_rl.training.logprobs import response_view


# ---- SDPA core attention -------------------------------------------------------------------------------------
def _config(heads: int, groups: int, head_dim: int):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def _reference(q, k, v, scale):
    """q [s, h, d], k/v [s, g, d] -> [s, h*d], causal, float64, GQA in Megatron's order."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("shd,thd->hst", q, k) * scale
    s = q.shape[0]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hst,thd->shd", scores.softmax(-1), v)
    return out.reshape(s, -1)


def _module(heads=4, groups=2, head_dim=8):
    from megatron.core.transformer.enums import AttnMaskType

    from portable_rl.training.attention import SdpaCoreAttention

    return SdpaCoreAttention(_config(heads, groups, head_dim), 1, AttnMaskType.causal, "self")


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_core_attention_bshd_matches_float64(heads, groups):
    torch.manual_seed(0)
    attn = _module(heads, groups)
    s, b, d = 11, 3, 8
    q, k, v = torch.randn(s, b, heads, d), torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    out = attn(q, k, v, None)
    assert out.shape == (s, b, heads * d)
    for i in range(b):
        ref = _reference(q[:, i], k[:, i], v[:, i], 1 / math.sqrt(d))
        assert (out[:, i].double() - ref).abs().max() < 1e-5


def test_sdpa_core_attention_thd_keeps_samples_apart():
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(1)
    attn = _module(4, 2)
    lengths = [5, 9, 3]
    t, d = sum(lengths), 8
    q, k, v = torch.randn(t, 4, d), torch.randn(t, 2, d), torch.randn(t, 2, d)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9
    )
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (t, 4 * d)
    for a, z in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = _reference(q[a:z], k[a:z], v[a:z], 1 / math.sqrt(d))
        assert (out[a:z].double() - ref).abs().max() < 1e-5
    # Changing the first sample's keys and values leaves the others untouched.
    k2, v2 = k.clone(), v.clone()
    k2[:5] += 1.0
    v2[:5] -= 1.0
    again = attn(q, k2, v2, None, packed_seq_params=params)
    assert torch.equal(again[5:], out[5:])
    assert not torch.equal(again[:5], out[:5])


def test_sdpa_core_attention_refuses_masks_and_dropout():
    attn = _module()
    x = torch.randn(4, 1, 4, 8)
    with pytest.raises(ValueError, match="causal only"):
        attn(x, x[:, :, :2], x[:, :, :2], torch.ones(1, 1, 4, 4, dtype=torch.bool))
    from megatron.core.transformer.enums import AttnMaskType

    from portable_rl.training.attention import SdpaCoreAttention

    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        SdpaCoreAttention(_config(4, 2, 8), 1, AttnMaskType.causal, "self", attention_dropout=0.1)


# ---- rotary positions restart per packed sample ---------------------------------------------------------------
@pytest.mark.parametrize("lengths", [[5, 9, 3], [12], [7, 7]])
def test_megatron_rope_restarts_positions_per_packed_sample(lengths):
    """``GPTModel`` gives RoPE ``max_seqlen`` positions; with ``cu_seqlens`` each sample starts at position 0."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    def rope(n: int) -> torch.Tensor:  # RotaryEmbedding.forward(n)'s table, [n, 1, 1, d] (built on CPU here)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    torch.manual_seed(2)
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    cp = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    t = sum(lengths)
    x = torch.randn(t, 2, 8)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = apply_rotary_pos_emb(x, rope(max(lengths)), config=config, cu_seqlens=cu, cp_group=cp)
    for a, z in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = apply_rotary_pos_emb(x[a:z].unsqueeze(1), rope(z - a), config=config, cp_group=cp)
        torch.testing.assert_close(packed[a:z], alone.squeeze(1), rtol=0, atol=1e-6)


# ---- packing layout -------------------------------------------------------------------------------------------
def _batch() -> TrainBatch:
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    responses = [[11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21], [22], [23, 24, 25]]
    return TrainBatch(
        prompts,
        responses,
        [[1] * len(r) for r in responses],
        token_fields={"advantages": [[float(i)] * len(r) for i, r in enumerate(responses)]},
        sample_fields={"rewards": [0.0, 1.0, 2.0, 3.0]},
    )


def test_pack_keeps_order_and_budget_and_gives_long_samples_their_own_micro_batch():
    batch = _batch()  # sample lengths 5, 11, 5, 4
    packs = batch.pack(10)
    assert [p.prompt_tokens for p in packs] == [[[1, 2, 3]], [[4, 5]], [[6, 7, 8, 9], [10]]]
    assert [p.num_tokens() for p in packs] == [5, 11, 9]  # the 11-token sample alone, over the budget
    assert [len(p) for p in batch.pack(100)] == [4]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            batch.pack(bad)


def test_packed_micro_batch_layout_and_response_view_match_the_padded_one():
    batch = _batch()
    packed = to_packed_micro_batch(batch, 32)
    padded = to_micro_batch(batch, 11)
    assert packed.tokens.shape == (1, 32)
    assert packed.sample_starts == [0, 5, 16, 21]
    assert packed.cu_seqlens.tolist() == [0, 5, 16, 21, 25, 32]  # the padding is its own segment
    assert packed.cu_seqlens.dtype == torch.int32 and packed.max_seqlen == 11
    assert packed.segment_bounds == packed.cu_seqlens.tolist()
    assert packed.position_ids[0, :6].tolist() == [0, 1, 2, 3, 4, 0]
    assert packed.position_ids[0, 25:].tolist() == list(range(7))
    for i, start in enumerate(packed.sample_starts):
        n = len(batch.prompt_tokens[i]) + len(batch.response_tokens[i])
        assert torch.equal(packed.tokens[0, start : start + n], padded.tokens[i, :n])
    for key in ("loss_mask",):
        assert torch.equal(getattr(packed, key), getattr(padded, key))
    assert packed.as_loss_batch().keys() == padded.as_loss_batch().keys()
    # Per-position values laid out like the tokens give the same response view either way.
    flat = packed.tokens[:, 1:].float()
    rows = padded.tokens[:, 1:].float()
    assert torch.equal(
        response_view(flat, packed.prompt_lengths, packed.response_lengths, packed.sample_starts),
        response_view(rows, padded.prompt_lengths, padded.response_lengths),
    )
    with pytest.raises(ValueError, match="25 packed tokens do not fit seq_len=20"):
        to_packed_micro_batch(batch, 20)


# ---- the platform's kernel choice -----------------------------------------------------------------------------
def test_cpu_platform_answers_sdpa_and_refuses_transformer_engine():
    cpu = plat.load("cpu")
    k = cpu.trainer_kernels()
    assert (k.attention, k.layer_spec, k.packed_sequences) == ("sdpa", "local", True)
    assert cpu.trainer_kernels("local").packed_sequences is False
    with pytest.raises(plat.UnsupportedKernel) as err:
        cpu.trainer_kernels("transformer_engine")
    msg = str(err.value)
    assert "train.attention='transformer_engine'" in msg and "use train.attention=auto" in msg
    assert "\n" not in msg
    with pytest.raises(plat.UnsupportedKernel, match="train.attention='flash' is not one of"):
        cpu.trainer_kernels("flash")


def _gpu_platform(monkeypatch):
    from fake_hosts import simulate_cuda

    simulate_cuda(monkeypatch, [(9, 0)])
    return plat.load("cuda")


def test_gpu_platform_without_transformer_engine_uses_sdpa(monkeypatch):
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p])  # no stand-in on the path
    gpu = _gpu_platform(monkeypatch)
    assert gpu.trainer_kernels().attention == "sdpa"
    assert gpu.default_train_dtype == "bfloat16"
    with pytest.raises(plat.UnsupportedKernel, match="transformer_engine does not import"):
        gpu.trainer_kernels("transformer_engine")


def test_gpu_platform_with_transformer_engine_builds_the_te_spec(monkeypatch, tmp_path):
    """A stand-in ``transformer_engine`` package on the path: the platform picks TE, the builder asks for TE's spec."""
    from megatron.core.models.gpt import gpt_layer_specs  # imported before the stand-in is on the path

    from portable_rl.training import model_builder

    (tmp_path / "transformer_engine").mkdir()
    (tmp_path / "transformer_engine" / "__init__.py").write_text('"""test stand-in"""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    gpu = _gpu_platform(monkeypatch)
    kernels = gpu.trainer_kernels()
    assert (kernels.attention, kernels.layer_spec) == ("transformer_engine", "transformer_engine")
    assert gpu.trainer_kernels("sdpa").attention == "sdpa"  # an explicit fallback stays possible
    asked = {}
    monkeypatch.setattr(
        gpt_layer_specs,
        "get_gpt_layer_with_transformer_engine_spec",
        lambda **kw: asked.update(kw) or "te-spec",
    )
    spec = model_builder.ModelSpec.from_hf(_qwen3_config())
    assert model_builder.layer_spec(spec, kernels) == "te-spec"
    assert asked == {"num_experts": None, "moe_grouped_gemm": False, "qk_layernorm": True}


def _qwen3_config() -> dict:
    return {
        "model_type": "qwen3",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }


def test_builder_and_doctor_read_the_same_answer():
    """``doctor`` prints ``trainer_kernels()``; the layer spec built from it holds the matching core attention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from portable_rl.commands.doctor import report
    from portable_rl.training.attention import SdpaCoreAttention
    from portable_rl.training.model_builder import ModelSpec, layer_spec

    plat.reset_current_platform()
    try:
        facts = report()
        kernels = plat.current_platform().trainer_kernels()
    finally:
        plat.reset_current_platform()
    assert facts["trainer_kernels"] == kernels.__dict__
    spec = ModelSpec.from_hf(_qwen3_config())
    built = layer_spec(spec, kernels).submodules.self_attention.submodules.core_attention
    expected = {"sdpa": SdpaCoreAttention, "local": DotProductAttention}[
        facts["trainer_kernels"]["attention"]
    ]
    assert built is expected
    local = layer_spec(spec, plat.load("cpu").trainer_kernels("local"))
    assert local.submodules.self_attention.submodules.core_attention is DotProductAttention
