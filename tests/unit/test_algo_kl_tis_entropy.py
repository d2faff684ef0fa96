"""KL estimators, TIS weights and entropy against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from portable_rl.algo.entropy import entropy_bonus, entropy_from_logits
from portable_rl.algo.kl import kl_estimate, kl_penalty_rewards
from portable_rl.algo.tis import tis_weights


def test_kl_estimators_hand_values():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.5) - 0.5])  # log_ratio = 0.5
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1.0)
    assert kl_estimate(logp, ref, "low_var_kl").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1.0)


def test_low_var_kl_is_clamped_and_k3_is_not():
    logp, ref = torch.tensor([-30.0]), torch.tensor([0.0])  # log_ratio = -30
    assert kl_estimate(logp, ref, "low_var_kl").item() == 10.0
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(30) - 31, rel=1e-5)


def test_k2_k3_nonnegative_and_zero_on_equal_policies():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=gen) * 3, torch.randn(64, 32, generator=gen) * 3
    for est in ("k2", "k3", "low_var_kl"):
        assert (kl_estimate(a, b, est) >= 0).all(), est
        assert torch.equal(kl_estimate(a, a, est), torch.zeros_like(a)), est
    assert (kl_estimate(a, b, "k1") < 0).any()
    with pytest.raises(ValueError, match="KL estimator 'k4' is not one of k1, k2, k3, low_var_kl"):
        kl_estimate(a, b, "k4")


def test_kl_penalty_rewards_sign_mask_and_detach():
    logp = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-0.1, -0.2, -0.3]])
    out = kl_penalty_rewards(logp, ref, torch.tensor([[1, 1, 0]]), coef=2.0, estimator="k1")
    assert torch.allclose(out, torch.tensor([[-0.2, -0.4, 0.0]]))
    assert not out.requires_grad


def test_tis_weights_hand_values():
    old = torch.tensor([[math.log(3.0), math.log(0.5), 0.0, 9.0]])
    rollout = torch.zeros(1, 4)
    w, m = tis_weights(old, rollout, torch.tensor([[1, 1, 1, 0]]), cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 1.0, 0.0]]))
    assert m["tis_weight_mean"].item() == pytest.approx(3.5 / 3)
    assert m["tis_clipfrac"].item() == pytest.approx(1 / 3)
    assert m["train_rollout_abs_logprob_diff"].item() == pytest.approx(
        (math.log(3) + math.log(2)) / 3, abs=1e-6
    )
    with pytest.raises(ValueError, match="TIS cap=0 must be > 0"):
        tis_weights(old, rollout, torch.ones(1, 4), cap=0)


def test_entropy_hand_values_and_bonus():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -1e9]]])
    h = entropy_from_logits(logits)
    assert torch.allclose(h, torch.tensor([[math.log(4), 0.5 * math.log(2) + 0.5 * math.log(4)]]), atol=1e-6)
    bonus = entropy_bonus(h, torch.tensor([[1, 0]]), coef=0.1)
    assert bonus.item() == pytest.approx(-0.1 * math.log(4), abs=1e-6)
