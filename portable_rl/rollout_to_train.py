"""Glue between rollout groups, the advantage estimators and the trainer's loss callback.

* ``build_train_batch(groups, cfg, old_logprobs, ref_logprobs, values)`` flattens groups into a ``TrainBatch``
  with per-token ``advantages`` and ``old_logprobs`` (and ``ref_logprobs`` when a reference model is used;
  ``returns`` and ``old_values`` for the critic when ``values`` are given), computed by
  ``portable_rl.algo.compute_advantages`` on the padded ``[B, T]`` representation.
* ``prepare_train_batch(groups, cfg, compute_logprobs, compute_values)`` is what the trainer runs: it asks
  ``compute_logprobs(batch, "ref" | "policy")`` (the actor's own method, in the trainer process) for the
  reference log-probs when ``cfg.uses_reference`` and for the old-policy log-probs when ``cfg.needs_old_logprobs``
  (a KL penalty in the reward, or several optimizer steps per rollout), and ``compute_values(batch)`` (the
  critic's) for GAE, then calls ``build_train_batch``. Nothing else runs a forward: with one optimizer step
  and no KL term the training forward's own log-probs are the old ones.
* ``make_loss_fn(cfg)`` returns the ``loss_fn(logprobs, entropy, mb)`` the Megatron actor calls per
  micro-batch; it is a thin adapter over ``portable_rl.algo.compute_policy_loss``. ``make_value_loss_fn(cfg)``
  is the critic's, ``loss_fn(values, mb)`` over ``portable_rl.algo.objective.compute_value_loss``.
* ``rollout_metrics(groups)`` summarises rewards, lengths and statuses of a rollout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from portable_rl.algo.objective import compute_advantages, compute_policy_loss, compute_value_loss
from portable_rl.algo.padding import group_index, pad_sequences
from portable_rl.config.algo import AlgoConfig
from portable_rl.data.types import Group, Sample, SampleStatus
from portable_rl.training.batch import TrainBatch


def flatten(groups: Sequence[Group]) -> list[Sample]:
    return [s for g in groups for s in g.samples]


def _rows(padded: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [padded[i, :n].tolist() for i, n in enumerate(lengths)]


def build_train_batch(
    groups: Sequence[Group],
    cfg: AlgoConfig,
    old_logprobs: list[list[float]] | None = None,
    ref_logprobs: list[list[float]] | None = None,
    values: list[list[float]] | None = None,
) -> tuple[TrainBatch, dict[str, float]]:
    """The trainer's batch for ``groups`` plus advantage metrics."""
    samples = flatten(groups)
    if not samples:
        raise ValueError("no samples to train on: every group was filtered out")
    lengths = [s.response_length for s in samples]
    mask = pad_sequences([s.loss_mask for s in samples])[0]
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    gidx = group_index([s.group_id for s in samples])
    old = pad_sequences(old_logprobs)[0] if old_logprobs is not None else None
    ref = pad_sequences(ref_logprobs)[0] if ref_logprobs is not None else None
    if old is not None:
        old = _fit(old, mask)
    if ref is not None:
        ref = _fit(ref, mask)
    vals = _fit(pad_sequences(values)[0], mask) if values is not None else None
    adv, ret, metrics = compute_advantages(
        cfg, rewards, mask, gidx, old_logprobs=old, ref_logprobs=ref, values=vals
    )
    token_fields = {"advantages": _rows(adv, lengths)}
    if values is not None:
        token_fields["returns"] = _rows(ret, lengths)
        token_fields["old_values"] = [list(r) for r in values]
    if old_logprobs is not None:
        token_fields["old_logprobs"] = [list(r) for r in old_logprobs]
    if ref_logprobs is not None:
        token_fields["ref_logprobs"] = [list(r) for r in ref_logprobs]
    batch = TrainBatch.from_samples(samples, token_fields=token_fields)
    return batch, {k: float(v) for k, v in metrics.items()}


def prepare_train_batch(
    groups: Sequence[Group],
    cfg: AlgoConfig,
    compute_logprobs: Callable[[TrainBatch, str], list[list[float]]],
    compute_values: Callable[[TrainBatch], list[list[float]]] | None = None,
) -> tuple[TrainBatch, dict[str, float]]:
    """``build_train_batch`` with the log-probs (and critic values) ``cfg`` needs, computed by the callbacks."""
    if cfg.uses_critic and compute_values is None:
        raise ValueError("advantage_estimator='gae' needs the critic's compute_values")
    needed = cfg.uses_reference or cfg.needs_old_logprobs or cfg.uses_critic
    plain = TrainBatch.from_samples(flatten(groups)) if needed else None
    ref = compute_logprobs(plain, "ref") if cfg.uses_reference else None
    old = compute_logprobs(plain, "policy") if cfg.needs_old_logprobs else None
    values = compute_values(plain) if cfg.uses_critic else None
    return build_train_batch(groups, cfg, old_logprobs=old, ref_logprobs=ref, values=values)


def _fit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pad/trim ``t`` to ``like``'s width (rows may be shorter when responses are empty)."""
    if t.shape[1] == like.shape[1]:
        return t
    out = torch.zeros_like(like)
    w = min(t.shape[1], like.shape[1])
    out[:, :w] = t[:, :w]
    return out


def make_loss_fn(cfg: AlgoConfig):
    """The per-micro-batch loss callback for ``MegatronActor.train_step``."""

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: dict[str, Any]):
        mask = mb["loss_mask"]
        # Without a separate old-policy pass (one optimizer step per rollout) the old policy is the
        # current one, detached: ratio 1 at the first micro-batch, as on-policy GRPO prescribes.
        old = mb.get("old_logprobs")
        old = logprobs.detach() if old is None else old
        loss, metrics = compute_policy_loss(
            logprobs,
            old,
            mb["advantages"],
            mask,
            cfg,
            ref_logprobs=mb.get("ref_logprobs"),
            rollout_logprobs=mb.get("rollout_logprobs"),
            entropy=entropy,
        )
        return loss, {k: v.detach() if hasattr(v, "detach") else v for k, v in metrics.items() if k != "loss"}

    return loss_fn


def make_value_loss_fn(cfg: AlgoConfig):
    """The critic's per-micro-batch loss callback: clipped value loss against the GAE returns."""

    def loss_fn(values: torch.Tensor, mb: dict[str, Any]):
        loss, metrics = compute_value_loss(
            values,
            mb["old_values"],
            mb["returns"],
            mb["loss_mask"],
            cfg,
            global_tokens=mb.get("global_num_tokens"),
        )
        return loss, metrics

    return loss_fn


def rollout_metrics(groups: Sequence[Group]) -> dict[str, float]:
    samples = flatten(groups)
    if not samples:
        return {"num_samples": 0}
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    lengths = torch.tensor([s.response_length for s in samples], dtype=torch.float64)
    per_group_std = [
        torch.tensor(g.rewards, dtype=torch.float64).std().item() for g in groups if len(g.samples) > 1
    ]
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(samples) > 1 else 0.0,
        "response_len_mean": lengths.mean().item(),
        "truncated_frac": sum(s.status == SampleStatus.TRUNCATED for s in samples) / len(samples),
        "zero_std_group_frac": sum(std == 0 for std in per_group_std) / max(len(per_group_std), 1),
        "num_samples": float(len(samples)),
        "num_response_tokens": lengths.sum().item(),
    }
