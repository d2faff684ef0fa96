"""Advantage estimators against hand-computed values, plus GRPO / Dr.GRPO / masking properties."""

from __future__ import annotations

import math

import pytest
import torch

from portable_rl.algo.advantages import (
    discounted_returns,
    gae_advantages,
    group_baseline,
    grpo_advantages,
    outcome_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
)
from portable_rl.algo.padding import group_index, pad_sequences


def test_grpo_one_group_hand_values():
    # mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mask = torch.ones(4, 2)
    adv, ret = grpo_advantages(rewards, mask, torch.zeros(4, dtype=torch.long), eps=0.0)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5])
    assert torch.allclose(adv, expected[:, None].expand(4, 2), atol=1e-6)
    assert torch.equal(ret, adv)


def test_dr_grpo_hand_values_and_exact_std_relation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mask = torch.ones(4, 2)
    adv, _ = grpo_advantages(rewards, mask, torch.zeros(4, dtype=torch.long), normalize_std=False)
    assert torch.allclose(adv[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]), atol=1e-7)

    # property on random data: GRPO * (std + eps) == Dr.GRPO, token by token
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=gen)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    mask = (torch.rand(12, 5, generator=gen) > 0.3).float()
    eps = 1e-6
    grpo, _ = grpo_advantages(rewards, mask, groups, normalize_std=True, eps=eps)
    dr, _ = grpo_advantages(rewards, mask, groups, normalize_std=False, eps=eps)
    _, std = group_baseline(rewards, groups)
    assert torch.allclose(grpo * (std + eps)[:, None], dr, atol=1e-6)
    assert not torch.allclose(grpo, dr)


def test_grpo_groups_by_id_not_position_and_masks():
    # groups 7 -> rewards [2, 0], 3 -> rewards [1, 1]; ids interleaved
    rewards = torch.tensor([2.0, 1.0, 0.0, 1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    adv, _ = grpo_advantages(rewards, mask, torch.tensor([7, 3, 7, 3]), normalize_std=False)
    assert torch.equal(adv, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [0, 0, 0]]))


def test_grpo_single_sample_group_and_equal_rewards_give_zero():
    rewards = torch.tensor([5.0, 3.0, 3.0])
    adv, _ = grpo_advantages(rewards, torch.ones(3, 2), torch.tensor([0, 1, 1]))
    assert torch.equal(adv, torch.zeros(3, 2))
    assert torch.isfinite(adv).all()


def test_outcome_reward_on_last_masked_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    out = outcome_token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert torch.equal(out, torch.tensor([[0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 0]]))


def test_discounted_returns_hand_values_and_masked_gap():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    assert torch.allclose(discounted_returns(r, torch.ones(1, 3), 0.5), torch.tensor([[0.25, 0.5, 1.0]]))
    # a masked-out token in the middle (tool output) neither discounts nor resets the return
    gap = discounted_returns(r, torch.tensor([[1, 0, 1]]), 0.5)
    assert torch.allclose(gap, torch.tensor([[0.5, 0.0, 1.0]]))


def test_reinforce_pp_hand_values():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    assert torch.allclose(ret, torch.tensor([[0.25, 0.5, 1.0], [0.0, 0.0, 0.0]]))
    # masked returns 0.25, 0.5, 1, 0, 0: mean 0.35, unbiased var 0.7 / 4 = 0.175
    std = math.sqrt(0.175 + 1e-8)
    expected = torch.tensor([[-0.1, 0.15, 0.65], [-0.35, -0.35, 0.0]]) / std
    expected[1, 2] = 0.0
    assert torch.allclose(adv, expected, atol=1e-6)


def test_reinforce_pp_kl_shaped_returns():
    kl_rewards = torch.tensor([[-0.1, -0.2, -0.3]])
    _, ret = reinforce_pp_advantages(torch.tensor([1.0]), torch.ones(1, 3), 1.0, kl_rewards)
    assert torch.allclose(ret, torch.tensor([[0.4, 0.5, 0.7]]))


def test_reinforce_pp_baseline_hand_values():
    adv, ret = reinforce_pp_baseline_advantages(
        torch.tensor([1.0, 0.0]), torch.ones(2, 2), torch.tensor([0, 0]), gamma=1.0
    )
    assert torch.allclose(ret, torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))
    # whitening: mean 0, unbiased var 4 * 0.25 / 3 = 1/3
    a = 0.5 / math.sqrt(1 / 3 + 1e-8)
    assert torch.allclose(adv, torch.tensor([[a, a], [-a, -a]]), atol=1e-6)


def test_gae_hand_values():
    values = torch.tensor([[0.5, 0.4, 0.3]])
    adv, ret = gae_advantages(torch.tensor([1.0]), values, torch.ones(1, 3), 1.0, 1.0, whiten=False)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.6, 0.7]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]), atol=1e-6)
    # gamma 0.9, lambda 0.5: deltas -0.14, -0.13, 0.7; gae 0.7, -0.13 + 0.45 * 0.7, -0.14 + 0.45 * 0.185
    adv, ret = gae_advantages(torch.tensor([1.0]), values, torch.ones(1, 3), 0.9, 0.5, whiten=False)
    assert torch.allclose(adv, torch.tensor([[-0.05675, 0.185, 0.7]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.44325, 0.585, 1.0]]), atol=1e-6)


def test_gae_skips_masked_tokens_and_whitens():
    values = torch.tensor([[0.5, 9.0, 0.3]])
    adv, ret = gae_advantages(torch.tensor([1.0]), values, torch.tensor([[1, 0, 1]]), whiten=False)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.0, 0.7]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[1.0, 0.0, 1.0]]), atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 6)
    mask[0, 4:] = 0
    w, _ = gae_advantages(torch.rand(4, generator=gen), torch.rand(4, 6, generator=gen), mask, 0.99, 0.95)
    m = mask.bool()
    assert abs(w[m].mean().item()) < 1e-6
    assert abs(w[m].std().item() - 1.0) < 1e-4
    assert torch.equal(w[~m], torch.zeros(2))


def test_shape_errors_name_the_shapes():
    with pytest.raises(
        ValueError, match=r"rewards must be \[B\] and mask \[B, T\]; got rewards \(3,\), mask \(2, 4\)"
    ):
        grpo_advantages(torch.zeros(3), torch.ones(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values shape \(1, 2\) does not match mask \(1, 3\)"):
        gae_advantages(torch.zeros(1), torch.zeros(1, 2), torch.ones(1, 3))


def test_pad_sequences_and_group_index():
    padded, mask = pad_sequences([[1.0, 2.0], [3.0], []], masks=[[1, 0], [1], []])
    assert torch.equal(padded, torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(mask, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    assert pad_sequences([[1.0]], length=3)[0].shape == (1, 3)
    with pytest.raises(ValueError, match="sequence 0 has 2 tokens but its mask has 1 entries"):
        pad_sequences([[1.0, 2.0]], masks=[[1]])
    assert group_index([42, 42, 7, 42, 9]).tolist() == [0, 0, 1, 0, 2]


def test_functions_follow_the_input_device():
    # On the meta device any tensor created without the input's device fails with a device mismatch,
    # which is what would happen on an accelerator (grpo's group stats need data, so not covered here).
    from portable_rl.algo import AlgoConfig, compute_policy_loss
    from portable_rl.algo.aggregation import aggregate_loss
    from portable_rl.algo.policy_loss import clipped_value_loss

    r, m, v = torch.zeros(4, device="meta"), torch.ones(4, 5, device="meta"), torch.zeros(4, 5, device="meta")
    assert reinforce_pp_advantages(r, m, 0.9)[0].device.type == "meta"
    assert gae_advantages(r, v, m, 0.9, 0.9)[1].device.type == "meta"
    cfg = AlgoConfig(kl_coef=0.1, tis_cap=2.0, entropy_coef=0.1, dual_clip_c=3.0)
    assert compute_policy_loss(v, v, v, m, cfg, v, v, v)[0].device.type == "meta"
    assert clipped_value_loss(v, v, v, m)[0].device.type == "meta"
    assert aggregate_loss(v, m, "token-mean", global_tokens=3).device.type == "meta"
