"""Per-token KL estimators between the policy and a reference policy, from sampled-token log-probs.

With ``log_ratio = logp - ref_logp`` evaluated on tokens sampled from the policy (Schulman's notes,
"Approximating KL Divergence"):

* ``k1 = log_ratio``: unbiased for KL(pi || ref), high variance, can be negative per token.
* ``k2 = 0.5 * log_ratio**2``: biased, low variance, always >= 0; its gradient is the KL's gradient.
* ``k3 = exp(-log_ratio) + log_ratio - 1``: unbiased, always >= 0.
* ``low_var_kl``: k3 with the log-ratio clamped to [-20, 20] and the result clamped to [-10, 10], the
  guarded form peers use for GRPO's KL loss (keeps exp() finite when the policies drift apart).

Usage: as a reward penalty, pass detached log-probs and subtract ``coef * kl`` from the per-token reward
(``kl_penalty_rewards``); as a loss term, pass the live policy log-probs and aggregate ``kl`` like the
policy loss. Outputs are ``[B, T]`` like the inputs; padded positions hold values that callers mask.
"""

from __future__ import annotations

import torch

from portable_rl.config.algo import KL_ESTIMATORS


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "low_var_kl"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) with the named estimator."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs shape {tuple(ref_logprobs.shape)} does not match logprobs {tuple(logprobs.shape)}"
        )
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    if estimator == "low_var_kl":
        lr = log_ratio.clamp(min=-20.0, max=20.0)
        return (torch.exp(-lr) + lr - 1.0).clamp(min=-10.0, max=10.0)
    raise ValueError(f"KL estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token reward ``-coef * kl`` (detached, 0 outside the mask) for KL-in-reward estimators."""
    kl = kl_estimate(logprobs.detach(), ref_logprobs.detach(), estimator)
    return torch.where(mask.to(torch.bool), -coef * kl, torch.zeros_like(kl))
