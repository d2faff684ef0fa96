"""Several optimizer steps per rollout: the mini-batch split and how the steps' metrics are reported.

* ``split_mini_batches(batch, n, data_parallel)``: ``batch`` cut into ``n`` consecutive mini-batches of equal size
  (samples of one prompt stay together when the group size divides it), each of which must split over the
  data-parallel ranks; one optimizer step is taken per mini-batch. ``n = 1`` returns ``[batch]`` itself.
* ``mean_over_updates(updates, per_pass)``: the metrics of the optimizer steps of one rollout as one row: the
  mean of every key over the steps, except ``num_tokens`` (the tokens of one pass over the rollout) and
  ``logp_abs_diff`` (the first step's, over its mini-batch: it measures the engine against the weights that
  sampled, which later steps have moved on purpose), plus ``optimizer_steps``. With one step it is that step's metrics
  unchanged (no arithmetic: a single-step run reports what it always did).
* ``set_lr(optimizer, lr)`` and ``optimizer_step(optimizer, what)``: the learning rate of the coming steps, and
  one step of Megatron's optimizer returning the gradient norm; a step it skipped (non-finite gradients) raises
  ``FloatingPointError`` naming ``what``. The policy and the critic take their steps through these.
* ``set_optimizer_options(optimizer, options)``: ``options`` (``Platform.optimizer_options()``) written into the
  param groups of every torch optimizer inside Megatron's (chained) optimizer, for the keys a group already has.
"""

from __future__ import annotations

from typing import Any

from portable_rl.training.batch import TrainBatch


def split_mini_batches(batch: TrainBatch, n: int, data_parallel: int = 1) -> list[TrainBatch]:
    if n == 1:
        return [batch]
    if len(batch) % n or (len(batch) // n) % data_parallel:
        raise ValueError(
            f"a rollout batch of {len(batch)} samples does not split into algo.num_mini_batches={n} mini-batches "
            f"of a multiple of train.data_parallel={data_parallel} samples; choose num_mini_batches so that "
            f"{n} x {data_parallel} divides {len(batch)}"
        )
    return batch.micro_batches(len(batch) // n)


def mean_over_updates(updates: list[dict[str, float]], per_pass: int) -> dict[str, float]:
    if len(updates) == 1:
        return dict(updates[0])
    out = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
    if "num_tokens" in updates[0]:
        out["num_tokens"] = sum(u["num_tokens"] for u in updates[:per_pass])
    if "logp_abs_diff" in updates[0]:
        out["logp_abs_diff"] = updates[0]["logp_abs_diff"]
    out["optimizer_steps"] = float(len(updates))
    return out


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer: Any, what: str) -> float:
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise FloatingPointError(f"{what} was skipped (non-finite gradients)")
    return float(grad_norm)


def torch_optimizers(optimizer: Any) -> list[Any]:
    """The torch optimizers inside a Megatron optimizer (a chained one holds one per parameter kind)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [inner for part in chained for inner in torch_optimizers(part)]
    inner = getattr(optimizer, "optimizer", None)
    return [inner] if inner is not None else []


def set_optimizer_options(optimizer: Any, options: dict[str, Any]) -> int:
    """Write ``options`` into every param group that has those keys; returns how many groups changed."""
    changed = 0
    for inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            keys = [k for k in options if k in group]
            for k in keys:
                group[k] = options[k]
            changed += bool(keys)
    return changed
