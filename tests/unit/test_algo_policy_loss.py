"""PPO clipped policy loss (clip-higher, dual-clip) and the clipped value loss, against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from portable_rl.algo.policy_loss import clipped_value_loss, ppo_policy_loss

# Four tokens: (advantage, ratio) = (+1, 1.5), (-1, 0.5), (-1, 5), (+1, 1)
ADV = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
RATIOS = [1.5, 0.5, 5.0, 1.0]
OLD = torch.zeros(1, 4)
MASK = torch.ones(1, 4)


def _logp():
    return torch.tensor([[math.log(r) for r in RATIOS]], requires_grad=True)


def test_clip_hand_values_and_gradient():
    # per-token losses: max(-1.5, -1.2) = -1.2 (clipped), max(0.5, 0.8) = 0.8 (clipped), 5, -1
    logp = _logp()
    loss, m = ppo_policy_loss(logp, OLD, ADV, MASK, 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 5.0 - 1.0) / 4, abs=1e-6)
    assert m["pg_clipfrac"].item() == pytest.approx(0.5)
    assert m["ppo_kl"].item() == pytest.approx(-(math.log(1.5) + math.log(0.5) + math.log(5.0)) / 4, abs=1e-6)
    assert "pg_clipfrac_lower" not in m
    loss.backward()
    # d(-A * ratio)/d logp = -A * ratio on unclipped tokens, 0 where the clipped term is active
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, 5.0 / 4, -1.0 / 4]]), atol=1e-6)


def test_clip_higher_uses_eps_high_for_positive_advantages():
    loss, _ = ppo_policy_loss(_logp(), OLD, ADV, MASK, 0.2, 0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8 + 5.0 - 1.0) / 4, abs=1e-6)


def test_dual_clip_hand_values():
    logp = _logp()
    loss, m = ppo_policy_loss(logp, OLD, ADV, MASK, 0.2, 0.2, dual_clip_c=3.0)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 3.0 - 1.0) / 4, abs=1e-6)
    assert m["pg_clipfrac_lower"].item() == pytest.approx(0.25)
    loss.backward()
    assert logp.grad[0, 2].item() == 0.0  # bounded token gives no gradient


def test_dual_clip_bounds_negative_advantage_loss():
    gen = torch.Generator().manual_seed(0)
    adv = -torch.rand(8, 16, generator=gen) * 3
    logp = torch.randn(8, 16, generator=gen) * 4  # ratios up to e^12
    c = 3.0
    loss, _ = ppo_policy_loss(logp, torch.zeros(8, 16), adv, torch.ones(8, 16), 0.2, 0.2, dual_clip_c=c)
    assert loss.item() <= c * adv.abs().mean().item() + 1e-5
    unbounded, _ = ppo_policy_loss(logp, torch.zeros(8, 16), adv, torch.ones(8, 16), 0.2, 0.2)
    assert unbounded.item() > c * adv.abs().mean().item()


def test_first_step_on_policy_has_zero_kl_and_no_clipping():
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(6, 10, generator=gen) - 2.0
    adv = torch.randn(6, 10, generator=gen)
    mask = (torch.rand(6, 10, generator=gen) > 0.2).float()
    _, m = ppo_policy_loss(logp.clone().requires_grad_(), logp, adv, mask, 0.2, 0.28, dual_clip_c=3.0)
    assert abs(m["ppo_kl"].item()) < 1e-8
    assert m["pg_clipfrac"].item() == 0.0
    assert m["pg_clipfrac_lower"].item() == 0.0


def test_mask_and_weights_and_errors():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    loss, _ = ppo_policy_loss(_logp(), OLD, ADV, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.0) / 3, abs=1e-6)
    w = torch.tensor([[2.0, 0.5, 1.0, 1.0]])
    loss, _ = ppo_policy_loss(_logp(), OLD, ADV, MASK, 0.2, 0.2, weights=w)
    assert loss.item() == pytest.approx((-2.4 + 0.4 + 5.0 - 1.0) / 4, abs=1e-6)
    with pytest.raises(ValueError, match=r"dual_clip_c=1.0 must be > 1"):
        ppo_policy_loss(_logp(), OLD, ADV, MASK, dual_clip_c=1.0)
    with pytest.raises(ValueError, match=r"advantages shape \(1, 3\) does not match logprobs \(1, 4\)"):
        ppo_policy_loss(_logp(), OLD, ADV[:, :3], MASK)


def test_clipped_value_loss_hand_values():
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0]])
    returns = torch.tensor([[2.0, 0.0]])
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped active); token 1: max(4, 4) = 4
    loss, m = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 4.0) / 2, abs=1e-6)
    assert m["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped token: v_clipped = old + clamp(v - old) is at its bound, so no gradient; token 1: 0.5 * 2 * 2 / 2
    assert torch.allclose(values.grad, torch.tensor([[0.0, 1.0]]))
    loss_noclip, m = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip_range=None)
    assert loss_noclip.item() == pytest.approx(0.5 * (1.0 + 4.0) / 2)
    assert m["vf_clipfrac"].item() == 0.0
