"""PPO / GSPO clipped surrogates (clip-higher, dual-clip) for the policy and the clipped value loss for a critic.

Policy, per token, with ``ratio = exp(logp - old_logp)`` (log-ratio clamped to [-20, 20]) and advantage A:

    l = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))          # PPO + clip-higher (DAPO)
    if A < 0 and dual_clip_c:  l = min(l, -A * c)                               # dual-clip (c > 1)

then optionally multiplied by per-token ``weights`` (truncated importance sampling, ``tis``) and aggregated
with ``aggregation.aggregate_loss``. Metrics (detached 0-dim tensors, masked token means):
``pg_clipfrac`` (the clipped term is the active one), ``pg_clipfrac_lower`` (dual-clip bound active),
``ppo_kl = mean(old_logp - logp)`` (0 on the first step where the policies are equal).

GSPO (``gspo_policy_loss``, Zheng et al. 2025, the GSPO-token form): one importance ratio per sequence,
``s_i = exp(mean over the sequence's masked tokens of (logp - old_logp))`` (the geometric mean of its token
ratios; log clamped like PPO's). Every token of sequence i uses the value ``s_i`` in the clipped surrogate above,
so clipping acts on whole sequences, but its gradient flows through that token's own log-prob only:
``ratio_t = sg[s_i] * exp(logp_t - sg[logp_t])``. With an advantage constant over a sequence (GRPO) this is
exactly the paper's sequence-level objective for every ``loss_agg`` (the per-sequence token weights are equal);
token-level advantages (GAE) work too. Extra metric: ``gspo_seq_ratio_mean`` (mean ``s_i`` over sequences with a
trained token).

Value, per token: ``0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)`` aggregated;
metric ``vf_clipfrac``.
"""

from __future__ import annotations

import torch

from portable_rl.algo.aggregation import aggregate_loss, masked_mean

_LOG_RATIO_LIMIT = 20.0  # exp() of larger log-ratios overflows in bf16/fp16 and means nothing useful


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    loss_agg: str = "token-mean",
    weights: torch.Tensor | None = None,
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss; returns ``(loss, metrics)``. See the module docstring."""
    _check_shapes(logprobs, old_logprobs, advantages, mask, dual_clip_c)
    adv = advantages.detach()
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    return _clipped_surrogate(
        ratio, log_ratio, adv, mask, clip_eps_low, clip_eps_high, dual_clip_c, loss_agg, weights, **agg_kwargs
    )


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float = 4e-4,
    dual_clip_c: float | None = None,
    loss_agg: str = "seq-mean-token-mean",
    weights: torch.Tensor | None = None,
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's sequence-level clipped loss (GSPO-token form); returns ``(loss, metrics)``. See the module docstring."""
    _check_shapes(logprobs, old_logprobs, advantages, mask, dual_clip_c)
    adv = advantages.detach()
    token_log_ratio = logprobs - old_logprobs.detach()
    seq_log_ratio = masked_mean(token_log_ratio.detach(), mask, dim=-1).clamp(
        -_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT
    )
    # Value s_i on every token; gradient s_i * d logp_t (the detached copy cancels in value, not in gradient).
    ratio = torch.exp(seq_log_ratio).unsqueeze(-1) * torch.exp(logprobs - logprobs.detach())
    loss, metrics = _clipped_surrogate(
        ratio,
        token_log_ratio.detach(),
        adv,
        mask,
        clip_eps_low,
        clip_eps_high,
        dual_clip_c,
        loss_agg,
        weights,
        **agg_kwargs,
    )
    has_tokens = (mask.to(torch.float32).sum(dim=-1) > 0).to(seq_log_ratio.dtype)
    metrics["gspo_seq_ratio_mean"] = masked_mean(torch.exp(seq_log_ratio), has_tokens).detach()
    return loss, metrics


def _check_shapes(logprobs, old_logprobs, advantages, mask, dual_clip_c) -> None:
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match logprobs {tuple(logprobs.shape)}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c={dual_clip_c} must be > 1 (e.g. 3.0) or None to disable dual-clip")


def _clipped_surrogate(
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip_c: float | None,
    loss_agg: str,
    weights: torch.Tensor | None,
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped (and dual-clipped, TIS-weighted) surrogate of ``ratio`` [B, T], aggregated; PPO and GSPO."""
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    metrics = {
        "pg_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask).detach(),
        "ppo_kl": masked_mean(-log_ratio, mask).detach(),
    }
    if dual_clip_c is not None:
        bound = -adv * dual_clip_c
        negative = adv < 0
        metrics["pg_clipfrac_lower"] = masked_mean(((per_token > bound) & negative).float(), mask).detach()
        per_token = torch.where(negative, torch.minimum(per_token, bound), per_token)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate_loss(per_token, mask, loss_agg, **agg_kwargs)
    metrics["pg_loss"] = loss.detach()
    return loss, metrics


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    loss_agg: str = "token-mean",
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO critic loss with value clipping around the rollout-time values; ``clip_range=None`` disables it."""
    for name, t in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if t.shape != values.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match values {tuple(values.shape)}")
    target = returns.detach()
    loss_unclipped = (values - target) ** 2
    if clip_range is None:
        per_token = loss_unclipped
        clipfrac = values.new_zeros(())
    else:
        old = old_values.detach()
        v_clipped = old + (values - old).clamp(-clip_range, clip_range)
        loss_clipped = (v_clipped - target) ** 2
        per_token = torch.maximum(loss_unclipped, loss_clipped)
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    loss = 0.5 * aggregate_loss(per_token, mask, loss_agg, **agg_kwargs)
    return loss, {"vf_loss": loss.detach(), "vf_clipfrac": clipfrac.detach()}
