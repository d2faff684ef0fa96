"""Token entropy of the policy and the entropy bonus term.

* ``entropy_from_logits(logits)``: ``H = logsumexp(z) - sum(softmax(z) * z)`` over the vocabulary, per
  token (``[..., V] -> [...]``), computed in float32 for stability. With tensor-parallel vocab shards the
  caller must reduce across shards itself; this helper sees a full vocabulary.
* ``entropy_bonus(entropy, mask, coef, mode)``: the term *added to the loss*, ``-coef * agg(entropy)``
  (a positive coef rewards exploration), aggregated like the policy loss.
"""

from __future__ import annotations

import torch

from portable_rl.algo.aggregation import aggregate_loss


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, coef: float, mode: str = "token-mean", **agg_kwargs
) -> torch.Tensor:
    return -coef * aggregate_loss(entropy, mask, mode, **agg_kwargs)
