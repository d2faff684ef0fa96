"""Per-token log-probs and entropy from (vocab-parallel) logits, and the response-token view of them.

Contract
--------
* ``token_logprobs_and_entropy(logits, targets, vocab_size, tp_group=None, temperature=1.0)``:
  ``logits`` is ``[b, s, V_local]``, this rank's slice of a vocabulary split evenly over the TP group (rank r
  holds columns ``[r*V_local, (r+1)*V_local)``; columns ``>= vocab_size`` are padding and are ignored).
  Returns ``(logprobs, entropy)``, both ``[b, s]`` float32, identical on every TP rank, differentiable:
  ``logprobs[i, t] = log softmax(logits[i, t] / temperature)[targets[i, t]]`` over the full vocabulary and
  ``entropy[i, t]`` that distribution's entropy. Reductions over TP use all-reduce (max is detached: the
  log-sum-exp does not depend on it); the backward of the sums is the identity, as for Megatron's own
  vocab-parallel cross entropy. That is exact only because rank-local values feed nothing but those sums:
  every quantity computed from a reduced sum is the same on all TP ranks.
* ``response_view(values, prompt_lengths, response_lengths, sample_starts=None)``: from per-position values
  over the shifted sequence (position t predicts token t+1) to ``[b, L]`` aligned with response tokens,
  zero-padded, where ``L = max(response_lengths)``. With ``sample_starts`` (a packed row, ``values`` [1, T]),
  sample i's tokens begin at ``sample_starts[i]``; the positions that score the next sample's first token are
  never read. With ``offsets`` (from ``response_positions``), ``values`` holds only the kept positions and
  sample i's response values start at column ``offsets[i]`` of its row.
* ``response_positions(prompt_lengths, response_lengths, sample_starts=None) -> (positions, offsets)``: the
  positions of the shifted sequence that score some response token (sorted, unique; one list for every row of
  a padded micro-batch) and where each sample's first one sits in that list. The trainer computes vocabulary
  logits for these positions only: a prompt position's logits score no trained token, and the output layer plus
  the log-softmax over the vocabulary are a large share of a step when prompts are long.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over the group. Backward: identity (each rank's loss is computed from the same sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _tp_sum(tensor: torch.Tensor, group, size: int) -> torch.Tensor:
    return tensor if size == 1 else _AllReduceSum.apply(tensor, group)


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    tp_group=None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    tp_size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    tp_rank = dist.get_rank(tp_group) if tp_size > 1 else 0
    local_v = logits.shape[-1]
    start = tp_rank * local_v
    valid = max(0, min(local_v, vocab_size - start))
    z = logits[..., :valid].float()
    if temperature != 1.0:
        z = z / temperature

    with torch.no_grad():
        if valid:
            local_max = z.max(dim=-1).values
        else:
            local_max = torch.full(z.shape[:-1], float("-inf"), device=z.device)
        if tp_size > 1:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    z = z - local_max.unsqueeze(-1)

    exp_z = torch.exp(z)
    sum_exp = _tp_sum(exp_z.sum(dim=-1), tp_group, tp_size)
    lse = torch.log(sum_exp)

    local_target = targets - start
    owned = (local_target >= 0) & (local_target < valid)
    picked = torch.gather(z, -1, local_target.clamp(0, max(valid - 1, 0)).unsqueeze(-1)).squeeze(-1)
    target_z = _tp_sum(torch.where(owned, picked, torch.zeros_like(picked)), tp_group, tp_size)
    logprobs = target_z - lse

    # entropy = lse - sum_j p_j z_j = lse - (sum_j e^z_j z_j) / sum_exp. Reducing sum_j e^z_j z_j first keeps
    # every cross-rank dependency inside an all-reduce whose result is used identically on all ranks, which
    # is what makes the identity backward of _AllReduceSum exact.
    weighted = _tp_sum((exp_z * z).sum(dim=-1), tp_group, tp_size)
    entropy = lse - weighted / sum_exp
    return logprobs, entropy


def _first_positions(prompt_lengths: list[int], sample_starts: list[int] | None) -> list[tuple[int, int]]:
    """(row, position scoring the first response token) per sample."""
    return [
        (0, sample_starts[i] + p - 1) if sample_starts is not None else (i, p - 1)
        for i, p in enumerate(prompt_lengths)
    ]


def response_view(
    values: torch.Tensor,
    prompt_lengths: list[int],
    response_lengths: list[int],
    sample_starts: list[int] | None = None,
    offsets: list[int] | None = None,
) -> torch.Tensor:
    """``[b, s]`` per-position values (position t scores token t+1) -> ``[b, L]`` over response tokens."""
    b = len(prompt_lengths)
    width = max(response_lengths) if response_lengths else 0
    out = values.new_zeros(b, width)
    firsts = _first_positions(prompt_lengths, sample_starts)
    for i, ((row, first), r) in enumerate(zip(firsts, response_lengths, strict=True)):
        if r:
            start = offsets[i] if offsets is not None else first
            out[i, :r] = values[row, start : start + r]
    return out


def response_positions(
    prompt_lengths: list[int],
    response_lengths: list[int],
    sample_starts: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Positions that score a response token (sorted, unique) and each sample's offset into them."""
    firsts = _first_positions(prompt_lengths, sample_starts)
    kept = sorted(
        {first + j for (_, first), r in zip(firsts, response_lengths, strict=True) for j in range(r)}
    )
    index = {pos: k for k, pos in enumerate(kept)}
    # A sample's positions are consecutive integers, all kept, so they stay consecutive in the sorted list.
    offsets = [index[first] if r else 0 for (_, first), r in zip(firsts, response_lengths, strict=True)]
    return kept, offsets
