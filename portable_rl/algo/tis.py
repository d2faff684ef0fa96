"""Truncated importance sampling (TIS) for the rollout-engine / trainer log-prob mismatch.

The engine (SGLang, other kernels, other precision) samples from pi_rollout, while the loss assumes
samples from the trainer's pi_old. Per token:

    w = min(exp(logp_old_train - logp_rollout), cap)      (log-ratio clamped to <= 20 before exp)

``w`` is detached and multiplies the per-token policy loss before aggregation. Metrics (masked means):
``tis_weight_mean``, ``tis_clipfrac`` (share of tokens where the cap was hit) and the mismatch itself,
``train_rollout_abs_logprob_diff`` = mean |logp_old_train - logp_rollout|.
"""

from __future__ import annotations

import torch

from portable_rl.algo.aggregation import masked_mean


def tis_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(weights [B, T], metrics)``; weights are 0 outside the mask."""
    if rollout_logprobs.shape != old_logprobs.shape:
        raise ValueError(
            f"rollout_logprobs shape {tuple(rollout_logprobs.shape)} does not match "
            f"old_logprobs {tuple(old_logprobs.shape)}"
        )
    if cap <= 0:
        raise ValueError(f"TIS cap={cap} must be > 0 (peers use about 2)")
    diff = (old_logprobs - rollout_logprobs).detach()
    raw = torch.exp(diff.clamp(max=20.0))
    weights = torch.where(mask.to(torch.bool), raw.clamp(max=cap), torch.zeros_like(raw))
    metrics = {
        "tis_weight_mean": masked_mean(weights, mask),
        "tis_clipfrac": masked_mean((raw > cap).float(), mask),
        "train_rollout_abs_logprob_diff": masked_mean(diff.abs(), mask),
    }
    return weights, metrics
