"""AlgoConfig validation and the composed compute_advantages / compute_policy_loss entry points."""

from __future__ import annotations

import math

import pytest
import torch

from portable_rl.algo import AlgoConfig, compute_advantages, compute_policy_loss
from portable_rl.config_loader import ConfigError, build


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"advantage_estimator": "ppo"},
            "algo.advantage_estimator='ppo' is not allowed; choose one of grpo, reinforce_plus_plus, "
            "reinforce_plus_plus_baseline, gae",
        ),
        (
            {"kl_estimator": "k4"},
            "algo.kl_estimator='k4' is not allowed; choose one of k1, k2, k3, low_var_kl",
        ),
        ({"kl_mode": "both"}, "algo.kl_mode='both' is not allowed; choose one of loss, reward"),
        (
            {"loss_agg": "mean"},
            "algo.loss_agg='mean' is not allowed; choose one of token-mean, seq-mean-token-mean, "
            "seq-mean-token-sum, seq-mean-token-sum-norm",
        ),
        ({"clip_eps_low": 1.0}, "algo.clip_eps_low=1.0 must be in (0, 1), e.g. 0.2"),
        ({"clip_eps_high": "0.28"}, "algo.clip_eps_high='0.28' must be a finite number"),
        ({"dual_clip_c": 0.5}, "algo.dual_clip_c=0.5 must be > 1 (e.g. 3.0) or null to disable"),
        ({"kl_coef": -0.1}, "algo.kl_coef=-0.1 must be >= 0 (0 disables the term)"),
        ({"tis_cap": 0.5}, "algo.tis_cap=0.5 must be >= 1 (peers use 2) or null to disable"),
        ({"gamma": 1.5}, "algo.gamma=1.5 must be in [0, 1]"),
        ({"grpo_normalize_std": "no"}, "algo.grpo_normalize_std='no' must be true or false"),
        ({"loss_norm_constant": 0}, "algo.loss_norm_constant=0 must be a positive integer"),
        (
            {"kl_mode": "reward", "kl_coef": 0.01},
            "algo.kl_mode='reward' does not apply to advantage_estimator='grpo'",
        ),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        AlgoConfig(**kwargs)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_builds_from_recipe_dict():
    cfg = build(
        AlgoConfig, {"advantage_estimator": "reinforce_plus_plus", "kl_mode": "reward", "kl_coef": 0.01}
    )
    assert cfg.advantage_estimator == "reinforce_plus_plus" and cfg.uses_reference and not cfg.uses_critic
    with pytest.raises(ConfigError, match="unknown key 'algo.clip_eps_hi'; did you mean 'clip_eps_high'"):
        build(AlgoConfig, {"clip_eps_hi": 0.3}, "algo")
    with pytest.raises(
        ConfigError, match=r"algo.dual_clip_c=1.0 must be > 1 \(e.g. 3.0\) or null to disable"
    ):
        build(AlgoConfig, {"dual_clip_c": 1}, "algo")


def _batch():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 5, generator=gen) - 1.0
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    return gen, logp, mask


def test_first_step_on_policy_kl_zero_clipfrac_zero_for_every_estimator():
    gen, logp, mask = _batch()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    values = torch.rand(4, 5, generator=gen)
    for est in ("grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae"):
        cfg = AlgoConfig(advantage_estimator=est, clip_eps_high=0.28, dual_clip_c=3.0)
        adv, _, _ = compute_advantages(cfg, rewards, mask, groups, values=values)
        _, m = compute_policy_loss(logp.clone().requires_grad_(), logp, adv, mask, cfg)
        assert abs(m["ppo_kl"].item()) < 1e-8, est
        assert m["pg_clipfrac"].item() == 0.0, est


def test_composed_loss_equals_sum_of_terms():
    _, logp, mask = _batch()
    adv = torch.linspace(-1, 1, 20).reshape(4, 5)
    ref = logp - 0.3
    rollout = logp + 0.1
    entropy = torch.full((4, 5), 2.0)
    cfg = AlgoConfig(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, tis_cap=2.0)
    cur = logp.clone().requires_grad_()
    loss, m = compute_policy_loss(cur, logp, adv, mask, cfg, ref, rollout, entropy)
    k3 = math.exp(-0.3) + 0.3 - 1.0
    assert m["kl_loss"].item() == pytest.approx(k3, abs=1e-6)
    assert m["entropy"].item() == pytest.approx(2.0)
    assert m["tis_weight_mean"].item() == pytest.approx(math.exp(-0.1), abs=1e-6)
    # on-policy: ratio 1, pg per token = -A * w; token-mean over 18 masked tokens
    pg = (-adv * math.exp(-0.1) * mask).sum().item() / 18
    assert m["pg_loss"].item() == pytest.approx(pg, abs=1e-6)
    assert loss.item() == pytest.approx(pg + 0.1 * k3 - 0.01 * 2.0, abs=1e-6)
    loss.backward()
    assert cur.grad is not None and torch.isfinite(cur.grad).all()
    assert torch.equal(cur.grad[1, 3:], torch.zeros(2))


def test_missing_inputs_are_named():
    _, logp, mask = _batch()
    adv = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="algo.kl_coef=0.1 with kl_mode='loss' needs ref_logprobs"):
        compute_policy_loss(logp, logp, adv, mask, AlgoConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="algo.tis_cap=2.0 needs the engine's rollout_logprobs"):
        compute_policy_loss(logp, logp, adv, mask, AlgoConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match="algo.entropy_coef=0.01 needs the per-token entropy"):
        compute_policy_loss(logp, logp, adv, mask, AlgoConfig(entropy_coef=0.01))
    with pytest.raises(ValueError, match="advantage_estimator='grpo' needs group_index"):
        compute_advantages(AlgoConfig(), torch.zeros(4), mask)
    with pytest.raises(ValueError, match="advantage_estimator='gae' needs the critic's values"):
        compute_advantages(AlgoConfig(advantage_estimator="gae"), torch.zeros(4), mask)


def test_kl_in_reward_shapes_reinforce_pp_returns():
    cfg = AlgoConfig(
        advantage_estimator="reinforce_plus_plus", kl_mode="reward", kl_coef=0.5, kl_estimator="k1"
    )
    old = torch.zeros(1, 3)
    ref = torch.tensor([[-0.2, -0.2, -0.2]])  # k1 = 0.2 per token -> reward -0.1 per token
    _, ret, m = compute_advantages(
        cfg, torch.tensor([1.0]), torch.ones(1, 3), old_logprobs=old, ref_logprobs=ref
    )
    assert torch.allclose(ret, torch.tensor([[0.7, 0.8, 0.9]]))
    assert m["kl_reward"].item() == pytest.approx(0.2)


def test_dr_grpo_recipe_differs_from_grpo_only_by_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mask = torch.ones(4, 3)
    groups = torch.zeros(4, dtype=torch.long)
    a_grpo, _, _ = compute_advantages(AlgoConfig(adv_eps=1e-6), rewards, mask, groups)
    a_dr, _, _ = compute_advantages(AlgoConfig(grpo_normalize_std=False), rewards, mask, groups)
    assert torch.allclose(a_grpo * (0.5 + 1e-6), a_dr, atol=1e-7)
