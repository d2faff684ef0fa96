"""Shared-prompt micro-batches (``train.share_prompt_prefix``): layout, mask, attention and RoPE, without a model.

* ``to_shared_micro_batch``: one copy of each distinct prompt, its responses after it, positions continuing from
  the prompt, the segment description the attention reads, and per-kept-position logit targets that score
  exactly the tokens the unshared layout scores; loss-side tensors unchanged.
* ``shared_prefix_mask`` against its definition, and ``SdpaCoreAttention`` on a shared row against float64
  attention over each sample's own ``prompt + response`` (the unshared computation).
* Megatron's ``thd`` RoPE given a frequency table as long as the row (what the actor's hook passes) rotates
  each token by its own position: the shared row's rotated queries equal each unshared sample's.
* Validation: one-line refusals of attention/pipeline/critic combinations.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_training_attention import _config, _reference  # the same config and float64 reference

from portable_rl.config.training import share_prompt_prefix_refusal
from portable_rl.training.attention import shared_prefix_mask
from portable_rl.training.batch import TrainBatch, prompt_groups, to_micro_batch, to_shared_micro_batch
from portable_rl.training.logprobs import response_view

A, B, C = [11, 12, 13], [21, 22], [31, 32, 33, 34]


def _batch() -> TrainBatch:
    prompts = [A, B, A, C, A, B]
    responses = [[1, 2], [3], [4, 5, 6], [7, 8], [], [9, 10, 11]]
    return TrainBatch(
        prompts,
        responses,
        [[1] * len(r) for r in responses],
        token_fields={"adv": [[float(t) for t in r] for r in responses]},
        sample_fields={"rewards": [float(i) for i in range(6)]},
    )


def test_prompt_groups_in_order_of_first_appearance():
    assert prompt_groups([A, B, A, C, A, B]) == [[0, 2, 4], [1, 5], [3]]
    assert prompt_groups([A, [11, 12]]) == [[0], [1]]  # a prefix is not the same prompt


def test_shared_layout_rows_positions_and_segments():
    batch = _batch()
    assert batch.num_tokens(share_prompts=True) == 3 + 2 + 4 + 2 + 1 + 3 + 2 + 3 + 0
    mb = to_shared_micro_batch(batch, 24)
    row = mb.tokens[0].tolist()
    # A's group, then B's, then C alone (a plain segment), then padding
    assert row[:20] == A + [1, 2] + [4, 5, 6] + B + [3] + [9, 10, 11] + C + [7, 8]
    assert row[20:] == [0] * 4
    pos = mb.position_ids[0].tolist()
    assert pos[:8] == [0, 1, 2, 3, 4, 3, 4, 5]  # both A responses continue at len(A)
    assert pos[8:14] == [0, 1, 2, 2, 3, 4]
    assert pos[14:20] == list(range(6)) and pos[20:] == list(range(4))
    assert mb.segment_bounds == [0, 8, 14, 20, 24] and mb.cu_seqlens.tolist() == mb.segment_bounds
    assert mb.branches == [(3, 2, 3, 0), (2, 1, 3), None, None]
    assert mb.max_seqlen == 8


def test_shared_logit_targets_score_what_the_unshared_layout_scores():
    batch = _batch()
    mb = to_shared_micro_batch(batch, 24)
    padded = to_micro_batch(batch, batch.max_length())
    row = mb.tokens[0]
    # Every kept position scores one response token; its input token is the one just before that token in
    # the sample's own prompt + response.
    for i, (p, r) in enumerate(zip(batch.prompt_tokens, batch.response_tokens, strict=True)):
        start = mb.logit_offsets[i]
        kept = mb.logit_positions[start : start + len(r)]
        targets = mb.logit_targets[start : start + len(r)]
        assert row[targets].tolist() == r
        assert row[kept].tolist() == (p + r)[len(p) - 1 : len(p) + len(r) - 1]
        # and sits at the position the unshared sample has there
        assert mb.position_ids[0, kept].tolist() == list(range(len(p) - 1, len(p) + len(r) - 1))
    # The response view of per-kept-position values is [b, L] in the batch's order.
    values = mb.logit_targets.float().unsqueeze(0)
    view = response_view(values, mb.prompt_lengths, mb.response_lengths, mb.sample_starts, mb.logit_offsets)
    assert view.shape == (6, 3)
    assert row[view[2].long()].tolist() == [4, 5, 6]
    # loss-side tensors are exactly the unshared ones
    assert torch.equal(mb.loss_mask, padded.loss_mask)
    assert torch.equal(mb.token_fields["adv"], padded.token_fields["adv"])
    assert torch.equal(mb.sample_fields["rewards"], padded.sample_fields["rewards"])
    assert mb.prompt_lengths == padded.prompt_lengths and mb.response_lengths == padded.response_lengths


def test_shared_layout_refuses_a_short_row():
    with pytest.raises(ValueError, match="do not fit seq_len=19"):
        to_shared_micro_batch(_batch(), 19)


def test_shared_prefix_mask_matches_its_definition():
    parts = (3, 2, 0, 3)
    mask = shared_prefix_mask(parts)
    branch = [-1] * 3 + [0] * 2 + [2] * 3
    for q in range(8):
        for c in range(8):
            assert bool(mask[q, c]) == (c <= q and (branch[c] == -1 or branch[c] == branch[q])), (q, c)


def test_sdpa_on_a_shared_row_equals_each_sample_attending_alone():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from portable_rl.training.attention import SdpaCoreAttention

    heads, groups, d = 4, 2, 8
    config = _config(heads, groups, d)
    attn = SdpaCoreAttention(config, 1, AttnMaskType.causal, "self")
    torch.manual_seed(3)
    # segment 0: prompt of 4 + responses of 3 and 5; segment 1: a plain sample of 6
    lp, rs, plain = 4, (3, 5), 6
    t = lp + sum(rs) + plain
    q, k, v = torch.randn(t, heads, d), torch.randn(t, groups, d), torch.randn(t, groups, d)
    cu = torch.tensor([0, lp + sum(rs), t], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12
    )
    params.host_cu_seqlens = cu.tolist()
    params.host_branches = [(lp, *rs), None]
    out = attn(q, k, v, None, packed_seq_params=params)
    scale = 1 / math.sqrt(d)
    # each response: the unshared sample is prompt + that response
    start = lp
    for r in rs:
        idx = torch.cat([torch.arange(lp), torch.arange(start, start + r)])
        ref = _reference(q[idx], k[idx], v[idx], scale)
        assert (out[idx].double() - ref).abs().max() < 1e-5
        start += r
    ref = _reference(q[-plain:], k[-plain:], v[-plain:], scale)
    assert (out[-plain:].double() - ref).abs().max() < 1e-5
    # one response's keys never reach the other response
    k2 = k.clone()
    k2[lp : lp + rs[0]] += 1.0
    again = attn(q, k2, v, None, packed_seq_params=params)
    assert torch.equal(again[lp + rs[0] :], out[lp + rs[0] :])


def _rope(n: int) -> torch.Tensor:
    """RotaryEmbedding.forward(n)'s table, [n, 1, 1, d] (built on CPU here): row p is position p."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def test_megatron_thd_rope_with_a_row_long_table_uses_each_tokens_position():
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    cp = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    batch = TrainBatch([A, A, B], [[1, 2], [3, 4, 5], [6]], [[1, 1], [1, 1, 1], [1]])
    mb = to_shared_micro_batch(batch, 16)
    torch.manual_seed(4)
    x = torch.randn(16, 2, 8)
    # what the actor's hook hands Megatron: GPTModel's max_seqlen table, one row per packed token
    table = _rope(mb.max_seqlen).index_select(0, mb.position_ids[0])
    shared = apply_rotary_pos_emb(x, table, config=config, cu_seqlens=mb.cu_seqlens, cp_group=cp)
    # unshared: sample i alone is prompt + response at positions 0.. (bshd)
    starts = [3, 5, 10]  # where each response starts in the row: A r0 r1 B r2
    for i, r in enumerate(batch.response_tokens):
        prompt_rows = list(range(0, 3)) if i < 2 else list(range(8, 10))
        idx = torch.tensor(prompt_rows + list(range(starts[i], starts[i] + len(r))))
        alone = apply_rotary_pos_emb(x[idx].unsqueeze(1), _rope(len(idx)), config=config, cp_group=cp)
        torch.testing.assert_close(shared[idx], alone.squeeze(1), rtol=0, atol=1e-6)
    # without the hook (a max_seqlen table), positions would restart per segment: the responses differ
    restart = apply_rotary_pos_emb(
        x, _rope(mb.max_seqlen), config=config, cu_seqlens=mb.cu_seqlens, cp_group=cp
    )
    assert not torch.allclose(restart[5:8], shared[5:8])


@pytest.mark.parametrize(
    ("attention", "pp", "critic", "words"),
    [
        ("transformer_engine", 1, False, "needs train.attention=sdpa"),
        ("local", 1, False, "needs train.attention=sdpa"),
        ("sdpa", 2, False, "pipeline_parallel=2"),
        ("auto", 1, True, "does not support a critic"),
    ],
)
def test_refusals_are_one_line(attention, pp, critic, words):
    why = share_prompt_prefix_refusal(attention, pp, critic)
    assert words in why and "\n" not in why
    assert share_prompt_prefix_refusal("sdpa", 1, False) is None
    assert share_prompt_prefix_refusal("auto", 1, False) is None


@pytest.mark.parametrize(
    ("facts", "words"),
    [
        (dict(sequence_parallel=True), "sequence parallelism"),
        (dict(position_embedding="yarn"), "has 'yarn'"),
        (dict(moe=True), "MoE models"),
    ],
)
def test_model_side_refusals(facts, words):
    why = share_prompt_prefix_refusal("sdpa", 1, False, **facts)
    assert words in why and "\n" not in why


def test_preflight_refuses_sharing_where_auto_attention_is_not_sdpa():
    from pathlib import Path

    from portable_rl.commands.preflight import check_trainer_kernels
    from portable_rl.errors import UserError
    from portable_rl.recipe import load_recipe

    recipe = load_recipe(
        Path(__file__).resolve().parents[2] / "examples/tiny_cpu.yaml", ["train.share_prompt_prefix=true"]
    )

    def platform(attention: str):
        return SimpleNamespace(trainer_kernels=lambda requested: SimpleNamespace(attention=attention))

    assert check_trainer_kernels(recipe, platform("sdpa")).attention == "sdpa"
    with pytest.raises(UserError) as err:
        check_trainer_kernels(recipe, platform("transformer_engine"))
    assert "train.attention=auto gives transformer_engine here" in str(err.value)
    assert "\n" not in str(err.value)
