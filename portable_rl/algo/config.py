"""``AlgoConfig`` and the two entry points the trainer calls: ``compute_advantages`` and ``compute_policy_loss``.

Recipes (section ``algo``):

* GRPO: ``advantage_estimator: grpo`` (+ ``kl_coef``, ``kl_mode: loss``, ``kl_estimator: low_var_kl``).
* Dr.GRPO: GRPO with ``grpo_normalize_std: false`` and ``loss_agg: seq-mean-token-sum-norm``
  (``loss_norm_constant`` = the generation budget, e.g. ``max_new_tokens``).
* DAPO-style clip-higher: ``clip_eps_high: 0.28``. Dual-clip: ``dual_clip_c: 3.0``.
* REINFORCE++: ``advantage_estimator: reinforce_plus_plus``, ``kl_mode: reward``, ``kl_estimator: k1``.
* PPO: ``advantage_estimator: gae`` with ``gamma``/``lam`` and a critic (``value_clip``).
* Engine/trainer mismatch: ``tis_cap: 2.0`` (needs the engine's rollout log-probs).

Shapes follow ``portable_rl.algo.aggregation``: per-token ``[B, T]`` over response tokens plus a mask.
``compute_policy_loss`` returns ``(loss, metrics)``; metrics are detached 0-dim tensors (call ``.item()``
when logging, once per step, to avoid a device sync per metric).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from portable_rl.algo import advantages as adv_mod
from portable_rl.algo.aggregation import LOSS_AGG_MODES, LossAgg, aggregate_loss, masked_mean
from portable_rl.algo.entropy import entropy_bonus
from portable_rl.algo.kl import KL_ESTIMATORS, KLEstimator, kl_estimate, kl_penalty_rewards
from portable_rl.algo.policy_loss import ppo_policy_loss
from portable_rl.algo.tis import tis_weights

AdvantageEstimator = Literal["grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
KLMode = Literal["loss", "reward"]
KL_MODES: tuple[str, ...] = get_args(KLMode)
GROUPED_ESTIMATORS = ("grpo", "reinforce_plus_plus_baseline")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"algo.{name}={value!r} must be a finite number")
    return float(value)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"algo.{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


@dataclass
class AlgoConfig:
    advantage_estimator: AdvantageEstimator = "grpo"
    grpo_normalize_std: bool = True  # False = Dr.GRPO's advantage (no division by the group std)
    adv_eps: float = 1e-6  # added to the group std before dividing
    gamma: float = 1.0  # discount for reinforce_plus_plus(_baseline) and gae
    lam: float = 1.0  # GAE lambda
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2  # > clip_eps_low = clip-higher (DAPO uses 0.28)
    dual_clip_c: float | None = None  # > 1 bounds the loss of negative-advantage tokens; None = off
    kl_coef: float = 0.0  # 0 = no KL term and no reference model needed
    kl_estimator: KLEstimator = "low_var_kl"
    kl_mode: KLMode = "loss"  # "loss": add kl_coef * KL to the loss; "reward": subtract it from the reward
    entropy_coef: float = 0.0
    tis_cap: float | None = None  # truncated importance sampling cap; None = off
    loss_agg: LossAgg = "token-mean"
    loss_norm_constant: int | None = None  # L of seq-mean-token-sum-norm; None = padded length T
    value_clip: float | None = 0.2  # critic value clipping range (gae only); None = off
    whiten_gae: bool = True  # batch-whiten GAE advantages

    def __post_init__(self) -> None:
        _choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("kl_mode", self.kl_mode, KL_MODES)
        _choice("loss_agg", self.loss_agg, LOSS_AGG_MODES)
        for flag in ("grpo_normalize_std", "whiten_gae"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"algo.{flag}={getattr(self, flag)!r} must be true or false")
        if _number("adv_eps", self.adv_eps) <= 0:
            raise ValueError(f"algo.adv_eps={self.adv_eps!r} must be > 0 (e.g. 1e-6)")
        for name in ("gamma", "lam"):
            if not 0.0 <= _number(name, getattr(self, name)) <= 1.0:
                raise ValueError(f"algo.{name}={getattr(self, name)!r} must be in [0, 1]")
        if not 0.0 < _number("clip_eps_low", self.clip_eps_low) < 1.0:
            raise ValueError(f"algo.clip_eps_low={self.clip_eps_low!r} must be in (0, 1), e.g. 0.2")
        if _number("clip_eps_high", self.clip_eps_high) <= 0.0:
            raise ValueError(f"algo.clip_eps_high={self.clip_eps_high!r} must be > 0, e.g. 0.2 or 0.28")
        if self.dual_clip_c is not None and _number("dual_clip_c", self.dual_clip_c) <= 1.0:
            raise ValueError(
                f"algo.dual_clip_c={self.dual_clip_c!r} must be > 1 (e.g. 3.0) or null to disable"
            )
        for name in ("kl_coef", "entropy_coef"):
            if _number(name, getattr(self, name)) < 0.0:
                raise ValueError(f"algo.{name}={getattr(self, name)!r} must be >= 0 (0 disables the term)")
        if self.tis_cap is not None and _number("tis_cap", self.tis_cap) < 1.0:
            raise ValueError(f"algo.tis_cap={self.tis_cap!r} must be >= 1 (peers use 2) or null to disable")
        if self.loss_norm_constant is not None and (
            isinstance(self.loss_norm_constant, bool)
            or not isinstance(self.loss_norm_constant, int)
            or self.loss_norm_constant <= 0
        ):
            raise ValueError(
                f"algo.loss_norm_constant={self.loss_norm_constant!r} must be a positive integer "
                "(the generation budget, e.g. max_new_tokens) or null for the padded length"
            )
        if self.value_clip is not None and _number("value_clip", self.value_clip) <= 0.0:
            raise ValueError(f"algo.value_clip={self.value_clip!r} must be > 0 or null to disable")
        if self.advantage_estimator == "grpo" and self.kl_mode == "reward" and self.kl_coef > 0:
            raise ValueError(
                "algo.kl_mode='reward' does not apply to advantage_estimator='grpo' (a sequence-level "
                "reward); use kl_mode='loss' or a token-level estimator such as reinforce_plus_plus"
            )

    @property
    def uses_reference(self) -> bool:
        """True when a reference model's log-probs are needed."""
        return self.kl_coef > 0

    @property
    def needs_old_logprobs(self) -> bool:
        """True when advantages need the old policy's log-probs before training (KL penalty in the reward)."""
        return self.kl_mode == "reward" and self.kl_coef > 0

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"


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
    """Actor loss = PPO clip (x TIS weights) + kl_coef * KL (kl_mode='loss') - entropy_coef * entropy.

    ``logprobs`` carries the gradient; everything else is treated as constant. ``global_tokens`` /
    ``global_seqs`` are the whole optimizer batch's counts when it is split into micro-batches
    (see ``aggregation``). Metrics: pg_loss, pg_clipfrac, ppo_kl, [pg_clipfrac_lower], [kl_loss],
    [entropy], [tis_*], loss.
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
    loss, metrics = ppo_policy_loss(
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
