"""``AlgoConfig``: the ``algo:`` section of a recipe. The functions that use it are in ``portable_rl.algo``.

Recipes (section ``algo``):

* GRPO: ``advantage_estimator: grpo`` (+ ``kl_coef``, ``kl_mode: loss``, ``kl_estimator: low_var_kl``).
* Dr.GRPO: GRPO with ``grpo_normalize_std: false`` and ``loss_agg: seq-mean-token-sum-norm``
  (``loss_norm_constant`` = the generation budget, e.g. ``max_new_tokens``).
* DAPO-style clip-higher: ``clip_eps_high: 0.28``. Dual-clip: ``dual_clip_c: 3.0``.
* REINFORCE++: ``advantage_estimator: reinforce_plus_plus``, ``kl_mode: reward``, ``kl_estimator: k1``.
* PPO with a value model: ``advantage_estimator: gae`` with ``gamma``/``lam``; the trainer then builds a critic
  (``train.critic``: its checkpoint and its own optimizer) and trains it with the clipped value loss
  (``value_clip``). Usually with several updates per rollout: ``ppo_epochs: 2``, ``num_mini_batches: 2``.
* GSPO: ``policy_loss: gspo`` with small clip ranges (the paper: ``clip_eps_low: 3.0e-4``,
  ``clip_eps_high: 4.0e-4``) and ``loss_agg: seq-mean-token-mean`` (the paper's sequence mean).
* Engine/trainer mismatch: ``tis_cap: 2.0`` (needs the engine's rollout log-probs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from portable_rl.config import refuse_non_finite

AdvantageEstimator = Literal["grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
KLMode = Literal["loss", "reward"]
KL_MODES: tuple[str, ...] = get_args(KLMode)
GROUPED_ESTIMATORS = ("grpo", "reinforce_plus_plus_baseline")
# How per-token losses become one number (portable_rl.algo.aggregation) and the KL estimators (algo.kl).
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAgg)
KLEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
PolicyLoss = Literal["ppo", "gspo"]
POLICY_LOSSES: tuple[str, ...] = get_args(PolicyLoss)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"algo.{name}={value!r} must be a finite number")
    return float(value)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"algo.{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


@dataclass
class AlgoConfig:
    """The ``algo:`` section (recipes above). Fields:

    advantage_estimator:  grpo | reinforce_plus_plus | reinforce_plus_plus_baseline | gae (PPO: needs the critic)
    grpo_normalize_std:   divide GRPO advantages by the group std (false: Dr.GRPO)
    adv_eps:              added to the group std before dividing
    gamma, lam:           discount (REINFORCE++ and GAE) and GAE's lambda, both in [0, 1]
    policy_loss:          ppo: per-token importance ratio ``exp(logp - old_logp)``, clipped per token;
                          gspo: one ratio per sequence, ``exp(mean over its trained tokens of (logp - old_logp))``
                          (the geometric mean of the token ratios), clipped per sequence; each token's gradient
                          goes through its own log-prob (GSPO-token, so token-level advantages work too)
    clip_eps_low, clip_eps_high: the clip range ``[1 - low, 1 + high]`` of the ratio (high > low: clip-higher)
    dual_clip_c:          > 1 bounds the loss of negative-advantage tokens at ``-c * A``; null = off
    kl_coef, kl_estimator, kl_mode: KL to the reference model (0: no reference model is built or run)
    entropy_coef:         entropy bonus
    tis_cap:              truncated importance sampling cap for the engine/trainer mismatch; null = off
    loss_agg, loss_norm_constant: how per-token losses become one number (``portable_rl.algo.aggregation``)
    value_clip:           critic value clipping range around the rollout-time values (gae only); null = off
    whiten_gae:           batch-whiten GAE advantages
    ppo_epochs:           passes over each rollout batch (default 1)
    num_mini_batches:     mini-batches each pass is cut into, one optimizer step each (default 1): a rollout
                          makes ``ppo_epochs x num_mini_batches`` optimizer steps (of the actor, and of the critic
                          with gae). With more than one, the old policy's log-probs are computed once, before
                          the first step; with exactly one they are the current forward's, detached (no extra
                          forward). The rollout batch must split into ``num_mini_batches x train.data_parallel``.
    """

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
    policy_loss: PolicyLoss = "ppo"  # ppo: token-level ratio; gspo: sequence-level ratio and clipping
    ppo_epochs: int = 1  # passes over each rollout batch
    num_mini_batches: int = 1  # optimizer steps per pass (the batch cut into this many mini-batches)

    def __post_init__(self) -> None:
        refuse_non_finite(self, "algo.")
        _choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("kl_mode", self.kl_mode, KL_MODES)
        _choice("loss_agg", self.loss_agg, LOSS_AGG_MODES)
        _choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        for name in ("ppo_epochs", "num_mini_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"algo.{name}={value!r} must be an integer >= 1 (1: one optimizer step)")
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
    def updates_per_rollout(self) -> int:
        """Optimizer steps per rollout batch: ``ppo_epochs x num_mini_batches``."""
        return self.ppo_epochs * self.num_mini_batches

    @property
    def needs_old_logprobs(self) -> bool:
        """True when the old policy's log-probs must be computed before training: for a KL penalty in the reward
        (advantages need them), or for several optimizer steps per rollout (after the first step the current
        policy is no longer the one that sampled). With one step and no KL in the reward, the loss uses the
        training forward's own log-probs, detached, and no extra forward runs."""
        return (self.kl_mode == "reward" and self.kl_coef > 0) or self.updates_per_rollout > 1

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"
