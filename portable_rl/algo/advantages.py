"""Advantage estimators: GRPO / Dr.GRPO, REINFORCE++, REINFORCE++-baseline, PPO's GAE.

Inputs (see ``aggregation`` for the shared representation)
----------------------------------------------------------
* ``rewards``: ``[B]`` sequence-level outcome rewards, one per sample.
* ``mask``: ``[B, T]`` response-token mask (1 = trained on); padded tokens are 0.
* ``group_index``: ``[B]`` long tensor, samples with equal values belong to one prompt's group
  (``batch.group_index`` builds it from arbitrary ids). Groups may differ in size.
* ``token_rewards``: optional ``[B, T]`` per-token rewards added to the outcome reward, e.g. the KL penalty
  ``-beta * kl`` from ``kl.kl_penalty_rewards``.
* ``values``: ``[B, T]`` critic values of the response tokens (GAE only).

Every estimator returns ``(advantages, returns)``, both ``[B, T]`` and 0 outside the mask.
The outcome reward sits on the last masked token of each sample. Tokens with mask 0 inside a response
(e.g. tool output) are skipped by the backward recursions: they neither discount nor reset the return.

Conventions: the group std is Bessel-corrected (``torch.std``'s default, as peers use); a group of one
sample has advantage 0 (nothing to compare with); batch whitening uses ``aggregation.masked_whiten``
(Bessel-corrected variance over all masked tokens of the batch, ``rsqrt(var + 1e-8)``).
"""

from __future__ import annotations

import torch

from portable_rl.algo.aggregation import masked_whiten


def _check(rewards: torch.Tensor, mask: torch.Tensor, group_index: torch.Tensor | None = None) -> None:
    if rewards.dim() != 1 or mask.dim() != 2 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(
            f"rewards must be [B] and mask [B, T]; got rewards {tuple(rewards.shape)}, mask {tuple(mask.shape)}"
        )
    if group_index is not None and tuple(group_index.shape) != tuple(rewards.shape):
        raise ValueError(
            f"group_index shape {tuple(group_index.shape)} does not match rewards {tuple(rewards.shape)}"
        )


def group_baseline(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(group mean, group std)``; std is 0 for groups of one sample."""
    _, inv = torch.unique(group_index.to(rewards.device), return_inverse=True)
    num_groups = int(inv.max().item()) + 1 if inv.numel() else 0
    r = rewards.to(torch.float64)  # group stats in float64: small groups of near-equal rewards
    acc = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    counts = acc.clone().index_add_(0, inv, torch.ones_like(r))
    mean = acc.clone().index_add_(0, inv, r) / counts
    sq = acc.clone().index_add_(0, inv, (r - mean[inv]) ** 2)
    var = torch.where(counts > 1, sq / (counts - 1).clamp(min=1), torch.zeros_like(sq))
    return mean[inv].to(rewards.dtype), var.sqrt()[inv].to(rewards.dtype)


def _float(rewards: torch.Tensor) -> torch.Tensor:
    return rewards if rewards.is_floating_point() else rewards.to(torch.float32)


def _broadcast(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.bool)
    return torch.where(m, per_sample.unsqueeze(-1).expand(m.shape), torch.zeros_like(per_sample)[:, None])


def grpo_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_index: torch.Tensor,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``(r - mean_group) / (std_group + eps)`` on every response token.

    ``normalize_std=False`` is Dr.GRPO's advantage: ``r - mean_group``, nothing else changes.
    """
    _check(rewards, mask, group_index)
    rewards = _float(rewards)
    mean, std = group_baseline(rewards, group_index)
    adv = rewards - mean
    if normalize_std:
        adv = adv / (std + eps)
    adv = _broadcast(adv, mask)
    return adv, adv.clone()


def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` tensor holding each sample's reward on its last masked token, 0 elsewhere."""
    _check(rewards, mask)
    rewards = _float(rewards)
    m = mask.to(torch.bool)
    T = m.shape[-1]
    last = T - 1 - torch.flip(m, dims=[-1]).to(torch.int64).argmax(dim=-1)
    # scatter, not boolean indexing: no host sync on accelerators
    placed = rewards * m.any(dim=-1).to(rewards.dtype)  # rows without a masked token get nothing
    out = torch.zeros(m.shape, dtype=rewards.dtype, device=rewards.device)
    out.scatter_(1, last.unsqueeze(-1), placed.unsqueeze(-1))
    return out


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma * G_next`` over masked tokens (masked-out tokens pass the return through)."""
    m = mask.to(torch.bool)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[-1])):
        candidate = token_rewards[:, t] + gamma * running
        running = torch.where(m[:, t], candidate, running)
        returns[:, t] = torch.where(m[:, t], candidate, torch.zeros_like(candidate))
    return returns


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    token_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted token-level returns (outcome + optional KL-shaped rewards), batch-whitened."""
    r = outcome_token_rewards(rewards, mask)
    if token_rewards is not None:
        r = r + torch.where(mask.to(torch.bool), token_rewards, torch.zeros_like(token_rewards))
    returns = discounted_returns(r, mask, gamma)
    return masked_whiten(returns, mask), returns


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_index: torch.Tensor,
    gamma: float = 1.0,
    token_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: subtract the group mean reward, then REINFORCE++ (returns + batch whitening)."""
    _check(rewards, mask, group_index)
    rewards = _float(rewards)
    mean, _ = group_baseline(rewards, group_index)
    return reinforce_pp_advantages(rewards - mean, mask, gamma, token_rewards)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    token_rewards: torch.Tensor | None = None,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's GAE(gamma, lambda). ``returns = advantages + values`` (before whitening) is the critic target.

    The value after the last masked token is 0 (terminal). With ``whiten`` the advantages are
    batch-whitened; the returns never are.
    """
    _check(rewards, mask)
    if values.shape != mask.shape:
        raise ValueError(f"values shape {tuple(values.shape)} does not match mask {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    r = outcome_token_rewards(rewards, mask)
    if token_rewards is not None:
        r = r + torch.where(m, token_rewards, torch.zeros_like(token_rewards))
    v = values.detach().to(r.dtype)
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    last_gae = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[-1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        gae = delta + gamma * lam * last_gae
        next_value = torch.where(m[:, t], v[:, t], next_value)
        last_gae = torch.where(m[:, t], gae, last_gae)
        adv[:, t] = torch.where(m[:, t], gae, torch.zeros_like(gae))
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv, returns
