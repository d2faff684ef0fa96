"""The RL objective the trainer calls: ``compute_advantages``, ``compute_policy_loss`` and, for PPO's critic,
``compute_value_loss``, for an ``AlgoConfig``.

Shapes follow ``portable_rl.algo.aggregation``: per-token ``[B, T]`` over response tokens plus a mask.
``compute_policy_loss`` returns ``(loss, metrics)``; metrics are detached 0-dim tensors (call ``.item()``
when logging, once per step, to avoid a device sync per metric). Which recipe selects which estimator and
loss is listed in ``AlgoConfig``'s module.
"""

from __future__ import annotations

import torch

from portable_rl.algo import advantages as adv_mod
from portable_rl.algo.aggregation import aggregate_loss, masked_mean
from portable_rl.algo.entropy import entropy_bonus
from portable_rl.algo.kl import kl_estimate, kl_penalty_rewards
from portable_rl.algo.policy_loss import clipped_value_loss, gspo_policy_loss, ppo_policy_loss
from portable_rl.algo.tis import tis_weights
from portable_rl.config.algo import GROUPED_ESTIMATORS, AlgoConfig


def compute_advantages(
    cfg: AlgoConfig,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_index: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(advantages, returns, metrics)`` for ``cfg.advantage_estimator``; all ``[B, T]``, detached.

    ``old_logprobs``/``ref_logprobs`` are needed for ``kl_mode='reward'`` with ``kl_coef > 0``;
    ``group_index`` for grpo and reinforce_plus_plus_baseline; ``values`` for gae.
    """
    est = cfg.advantage_estimator
    if est in GROUPED_ESTIMATORS and group_index is None:
        raise ValueError(f"advantage_estimator={est!r} needs group_index (one group id per sample)")
    if est == "gae" and values is None:
        raise ValueError("advantage_estimator='gae' needs the critic's values")
    metrics: dict[str, torch.Tensor] = {}
    token_rewards = None
    if cfg.kl_mode == "reward" and cfg.kl_coef > 0:
        if old_logprobs is None or ref_logprobs is None:
            raise ValueError("kl_mode='reward' with kl_coef > 0 needs old_logprobs and ref_logprobs")
        token_rewards = kl_penalty_rewards(old_logprobs, ref_logprobs, mask, cfg.kl_coef, cfg.kl_estimator)
        metrics["kl_reward"] = masked_mean(token_rewards, mask) / -cfg.kl_coef
    with torch.no_grad():
        if est == "grpo":
            adv, ret = adv_mod.grpo_advantages(
                rewards, mask, group_index, cfg.grpo_normalize_std, cfg.adv_eps
            )
        elif est == "reinforce_plus_plus":
            adv, ret = adv_mod.reinforce_pp_advantages(rewards, mask, cfg.gamma, token_rewards)
        elif est == "reinforce_plus_plus_baseline":
            adv, ret = adv_mod.reinforce_pp_baseline_advantages(
                rewards, mask, group_index, cfg.gamma, token_rewards
            )
        else:
            adv, ret = adv_mod.gae_advantages(
                rewards, values, mask, cfg.gamma, cfg.lam, token_rewards, cfg.whiten_gae
            )
    metrics["advantage_mean"] = masked_mean(adv, mask)
    # Group-normalised advantages have mean ~0 whether or not they carry a signal; their size shows it.
    metrics["advantage_abs_mean"] = masked_mean(adv.abs(), mask)
    metrics["return_mean"] = masked_mean(ret, mask)
    return adv, ret, metrics


def compute_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgoConfig,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    *,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Actor loss = PPO or GSPO clip (``cfg.policy_loss``; x TIS weights) + kl_coef * KL (kl_mode='loss')
    - entropy_coef * entropy.

    ``logprobs`` carries the gradient; everything else is treated as constant. ``global_tokens`` /
    ``global_seqs`` are the whole optimizer batch's counts when it is split into micro-batches
    (see ``aggregation``). Metrics: pg_loss, pg_clipfrac, ppo_kl, [pg_clipfrac_lower], [gspo_seq_ratio_mean],
    [kl_loss], [entropy], [tis_*], loss.
    """
    agg = {
        "norm_constant": cfg.loss_norm_constant,
        "global_tokens": global_tokens,
        "global_seqs": global_seqs,
    }
    weights = None
    tis_metrics: dict[str, torch.Tensor] = {}
    if cfg.tis_cap is not None:
        if rollout_logprobs is None:
            raise ValueError(
                f"algo.tis_cap={cfg.tis_cap} needs the engine's rollout_logprobs; "
                "request logprobs from the engine or set tis_cap to null"
            )
        weights, tis_metrics = tis_weights(old_logprobs, rollout_logprobs, mask, cfg.tis_cap)
    surrogate = gspo_policy_loss if cfg.policy_loss == "gspo" else ppo_policy_loss
    loss, metrics = surrogate(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        cfg.clip_eps_low,
        cfg.clip_eps_high,
        cfg.dual_clip_c,
        cfg.loss_agg,
        weights,
        **agg,
    )
    metrics.update(tis_metrics)
    if cfg.kl_mode == "loss" and cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError(
                f"algo.kl_coef={cfg.kl_coef} with kl_mode='loss' needs ref_logprobs; set kl_coef to 0 to "
                "train without a reference model"
            )
        kl_loss = aggregate_loss(
            kl_estimate(logprobs, ref_logprobs.detach(), cfg.kl_estimator), mask, cfg.loss_agg, **agg
        )
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    if entropy is not None:
        if cfg.entropy_coef > 0:
            loss = loss + entropy_bonus(entropy, mask, cfg.entropy_coef, cfg.loss_agg, **agg)
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
    elif cfg.entropy_coef > 0:
        raise ValueError(f"algo.entropy_coef={cfg.entropy_coef} needs the per-token entropy; pass entropy=")
    metrics["loss"] = loss.detach()
    return loss, metrics


def compute_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgoConfig,
    *,
    global_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss: ``0.5 * (v - R)^2`` clipped around the rollout-time values by ``cfg.value_clip``, token mean.

    Always a token mean (every trained token's value estimate weighs the same, whatever ``loss_agg`` the policy
    uses); ``global_tokens`` is the optimizer batch's token count when it is split into micro-batches. Metrics:
    value_loss, vf_clipfrac, value_mean (the values being trained, token mean).
    """
    loss, metrics = clipped_value_loss(
        values, old_values, returns, mask, cfg.value_clip, "token-mean", global_tokens=global_tokens
    )
    return loss, {
        "value_loss": metrics["vf_loss"],
        "vf_clipfrac": metrics["vf_clipfrac"],
        "value_mean": masked_mean(values.detach(), mask),
    }
