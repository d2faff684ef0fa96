"""What the trainer consumes: a batch of token sequences with per-token and per-sample fields.

Contract
--------
* ``TrainBatch``: ``prompt_tokens[i]`` and ``response_tokens[i]`` (token ids), ``loss_masks[i]`` (one 0/1 per
  response token), ``token_fields[name][i]`` (one float per response token, e.g. ``advantages``,
  ``old_logprobs``, ``ref_logprobs``, ``rollout_logprobs``) and ``sample_fields[name][i]`` (one float per sample,
  e.g. ``rewards``). Validated on construction: every list has one entry per sample, per-token lists match the
  response length, prompts are non-empty (the first response token is predicted from the last prompt token).
* ``TrainBatch.from_samples(samples, token_fields=..., sample_fields=...)`` builds one from
  ``portable_rl.data.types.Sample`` objects (``rollout_logprobs`` and ``rewards`` are taken from the samples).
* ``shard(rank, size)``: this data-parallel rank's samples (contiguous, equal-sized; the batch size must divide).
* ``micro_batches(size)``: consecutive chunks of ``size`` samples.
* ``pack(max_tokens)``: consecutive samples grouped in order, each group's prompt+response tokens summing to at
  most ``max_tokens`` (``train.max_tokens_per_micro_batch``). A sample longer than ``max_tokens`` is not
  refused and not cut: it becomes a micro-batch of its own (cutting would change its log-probs; refusing
  would throw a finished rollout away), so the budget bounds every micro-batch except single over-long ones.
* ``MicroBatch`` (``to_micro_batch``): padded tensors the model and a loss function use. ``tokens`` [b, T]
  (right-padded with 0), ``position_ids`` [b, T]; response-aligned ``[b, L]`` tensors: ``loss_mask`` (0 on
  padding) and every token field; ``[b]`` tensors for sample fields; ``prompt_lengths``/``response_lengths``.
  ``as_loss_batch()`` gives the dict a ``loss_fn`` sees.
* ``to_packed_micro_batch(batch, seq_len)``: the same ``MicroBatch`` with the samples laid end to end in one row
  (``tokens``/``position_ids`` [1, seq_len], positions restarting at 0 per sample, zero padding after the
  last sample). ``sample_starts[i]`` is sample i's offset in the row; ``cu_seqlens`` (int32, the samples and
  the padding as one trailing segment; ``segment_bounds`` the same as a list) and ``max_seqlen`` describe the
  layout to the model (Megatron's ``thd`` format). The loss-side tensors are the same ``[b, L]`` / ``[b]`` as unpacked, so a ``loss_fn``
  cannot tell the difference.
* ``to_shared_micro_batch(batch, seq_len)`` (``train.share_prompt_prefix``): the samples whose prompts are
  identical token for token (``prompt_groups``, in order of first appearance) become one segment
  ``[prompt, response_1, ..., response_k]`` of a packed row, so the prompt is computed once for its group.
  ``position_ids``: the prompt ``0..lp-1``, every response continuing at ``lp``. ``branches[s]`` describes
  segment s to the attention: ``(lp, r_1, ..., r_k)`` for a shared prompt (k >= 2; the prompt causal over
  itself, each response over the whole prompt and causally over itself, never another response), ``None`` for
  a plain causal segment (a group of one, the padding). ``logit_positions`` (repeats allowed: every response's
  first token is scored from the prompt's last position), ``logit_targets`` (the row index of the token each
  of them scores) and ``logit_offsets`` say which logits score which response token; ``sample_starts[i]`` is
  where sample i's response starts minus its prompt length (only meaningful with those offsets). The
  loss-side tensors are the same ``[b, L]`` / ``[b]`` as unpacked, in the batch's sample order.
  ``shared_micro_batches(batch, micro_batch_size, max_tokens, multiple)`` cuts ``batch`` exactly as without
  sharing (``micro_batches``, or ``pack`` when ``max_tokens`` is set, whose budget counts every sample's
  prompt: the cut weights a per-micro-batch loss, so keeping it keeps the results) into such rows, each padded
  to a multiple of ``multiple`` tokens; returns them and the longest row length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainBatch:
    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]
    loss_masks: list[list[int]]
    token_fields: dict[str, list[list[float]]] = field(default_factory=dict)
    sample_fields: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.prompt_tokens)
        if len(self.response_tokens) != n or len(self.loss_masks) != n:
            raise ValueError(
                f"batch has {n} prompts, {len(self.response_tokens)} responses and {len(self.loss_masks)} "
                "loss masks; they must be equal"
            )
        for i, (p, r, m) in enumerate(
            zip(self.prompt_tokens, self.response_tokens, self.loss_masks, strict=True)
        ):
            if not p:
                raise ValueError(f"sample {i} has an empty prompt; at least one prompt token is required")
            if len(m) != len(r):
                raise ValueError(f"sample {i}: loss mask has {len(m)} entries for {len(r)} response tokens")
        for name, values in self.token_fields.items():
            if len(values) != n:
                raise ValueError(f"token field {name!r} has {len(values)} rows for {n} samples")
            for i, (row, r) in enumerate(zip(values, self.response_tokens, strict=True)):
                if len(row) != len(r):
                    raise ValueError(
                        f"token field {name!r}, sample {i}: {len(row)} values for {len(r)} response tokens"
                    )
        for name, values in self.sample_fields.items():
            if len(values) != n:
                raise ValueError(f"sample field {name!r} has {len(values)} values for {n} samples")

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[Any],
        token_fields: dict[str, list[list[float]]] | None = None,
        sample_fields: dict[str, list[float]] | None = None,
    ) -> TrainBatch:
        tf = dict(token_fields or {})
        if all(s.rollout_logprobs for s in samples) and "rollout_logprobs" not in tf:
            tf["rollout_logprobs"] = [list(s.rollout_logprobs) for s in samples]
        sf = {"rewards": [float(s.reward) for s in samples], **(sample_fields or {})}
        return cls(
            prompt_tokens=[list(s.prompt_tokens) for s in samples],
            response_tokens=[list(s.response_tokens) for s in samples],
            loss_masks=[list(s.loss_mask) for s in samples],
            token_fields=tf,
            sample_fields=sf,
        )

    def select(self, indices: Sequence[int]) -> TrainBatch:
        return TrainBatch(
            prompt_tokens=[self.prompt_tokens[i] for i in indices],
            response_tokens=[self.response_tokens[i] for i in indices],
            loss_masks=[self.loss_masks[i] for i in indices],
            token_fields={k: [v[i] for i in indices] for k, v in self.token_fields.items()},
            sample_fields={k: [v[i] for i in indices] for k, v in self.sample_fields.items()},
        )

    def shard(self, rank: int, size: int) -> TrainBatch:
        if len(self) % size:
            raise ValueError(
                f"batch of {len(self)} samples does not split over {size} data-parallel ranks; "
                f"use a multiple of {size}"
            )
        per = len(self) // size
        return self.select(range(rank * per, (rank + 1) * per))

    def micro_batches(self, size: int) -> list[TrainBatch]:
        if size < 1:
            raise ValueError(f"micro_batch_size={size} must be >= 1")
        return [self.select(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]

    def pack(self, max_tokens: int) -> list[TrainBatch]:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens_per_micro_batch={max_tokens!r} must be an integer >= 1")
        groups: list[list[int]] = []
        used = 0
        for i in range(len(self)):
            n = len(self.prompt_tokens[i]) + len(self.response_tokens[i])
            if not groups or used + n > max_tokens:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n
        return [self.select(g) for g in groups]

    def num_tokens(self, share_prompts: bool = False) -> int:
        """Prompt + response tokens; with ``share_prompts`` each distinct prompt counts once."""
        prompts = {tuple(p) for p in self.prompt_tokens} if share_prompts else map(tuple, self.prompt_tokens)
        return sum(len(p) for p in prompts) + sum(len(r) for r in self.response_tokens)

    def max_length(self) -> int:
        return max(
            (len(p) + len(r) for p, r in zip(self.prompt_tokens, self.response_tokens, strict=True)),
            default=0,
        )


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, T] int64
    position_ids: torch.Tensor  # [b, T]
    loss_mask: torch.Tensor  # [b, L] float32
    prompt_lengths: list[int]
    response_lengths: list[int]
    token_fields: dict[str, torch.Tensor]  # [b, L] float32
    sample_fields: dict[str, torch.Tensor]  # [b] float32
    # Packed layout only (tokens is [1, T]): where each sample starts, and the thd description for the model.
    sample_starts: list[int] | None = None
    cu_seqlens: torch.Tensor | None = None  # [segments + 1] int32
    segment_bounds: list[int] | None = None  # the same bounds as a host list
    max_seqlen: int = 0
    # Shared-prompt layout only: per cu_seqlens segment (lp, r_1, ..., r_k) or None (plain causal).
    branches: list[tuple[int, ...] | None] | None = None
    # Set by the trainer: the only positions the output layer computes logits for (logprobs.response_positions)
    # and each sample's offset into them; None = logits for every position.
    logit_positions: torch.Tensor | None = None
    logit_offsets: list[int] | None = None
    # Set with logit_positions where a kept position does not score the token right after it (shared prompts):
    # the row index of the token each kept position scores. None = logit_positions + 1.
    logit_targets: torch.Tensor | None = None

    def as_loss_batch(self) -> dict[str, Any]:
        return {
            "loss_mask": self.loss_mask,
            "response_lengths": torch.tensor(self.response_lengths),
            **self.token_fields,
            **self.sample_fields,
        }


def _pad_rows(rows: list[list[float]], width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def to_micro_batch(batch: TrainBatch, seq_len: int, device: torch.device | str = "cpu") -> MicroBatch:
    """Pad ``batch`` to ``seq_len`` tokens (>= its longest sequence) and move it to ``device``."""
    if batch.max_length() > seq_len:
        raise ValueError(f"a sequence of {batch.max_length()} tokens does not fit seq_len={seq_len}")
    seqs = [p + r for p, r in zip(batch.prompt_tokens, batch.response_tokens, strict=True)]
    width = max((len(r) for r in batch.response_tokens), default=0)
    tokens = _pad_rows(seqs, seq_len, torch.int64)
    positions = torch.arange(seq_len, dtype=torch.int64).unsqueeze(0).expand(len(batch), -1).contiguous()
    return MicroBatch(
        tokens=tokens.to(device),
        position_ids=positions.to(device),
        loss_mask=_pad_rows(batch.loss_masks, width, torch.float32).to(device),
        prompt_lengths=[len(p) for p in batch.prompt_tokens],
        response_lengths=[len(r) for r in batch.response_tokens],
        token_fields={
            k: _pad_rows(v, width, torch.float32).to(device) for k, v in batch.token_fields.items()
        },
        sample_fields={
            k: torch.tensor(v, dtype=torch.float32).to(device) for k, v in batch.sample_fields.items()
        },
    )


def to_packed_micro_batch(batch: TrainBatch, seq_len: int, device: torch.device | str = "cpu") -> MicroBatch:
    """``batch``'s samples end to end in one row of ``seq_len`` tokens (>= their total), then to ``device``."""
    total = batch.num_tokens()
    if total > seq_len:
        raise ValueError(f"{total} packed tokens do not fit seq_len={seq_len}")
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_tokens, batch.response_tokens, strict=True)]
    flat = [t for p, r in zip(batch.prompt_tokens, batch.response_tokens, strict=True) for t in p + r]
    pad = seq_len - total
    segments = lengths + ([pad] if pad else [])  # padding attends only to itself: its own segment
    tokens = torch.zeros(1, seq_len, dtype=torch.int64)
    tokens[0, :total] = torch.tensor(flat, dtype=torch.int64)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in segments]).unsqueeze(0)
    bounds = [0]
    for n in segments:
        bounds.append(bounds[-1] + n)
    padded = to_micro_batch(batch, max(lengths), device)
    padded.tokens = tokens.to(device)
    padded.position_ids = positions.to(device)
    padded.sample_starts = bounds[: len(lengths)]
    padded.cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(device)
    padded.segment_bounds = bounds
    padded.max_seqlen = max(segments)
    return padded


def prompt_groups(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of samples with identical prompts, grouped, in order of each prompt's first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    return list(groups.values())


def to_shared_micro_batch(batch: TrainBatch, seq_len: int, device: torch.device | str = "cpu") -> MicroBatch:
    """``batch`` as one packed row in which each distinct prompt appears once, before its group's responses."""
    total = batch.num_tokens(share_prompts=True)
    if total > seq_len:
        raise ValueError(f"{total} packed tokens (prompts shared) do not fit seq_len={seq_len}")
    flat: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    branches: list[tuple[int, ...] | None] = []
    n = len(batch)
    response_starts = [0] * n
    prompt_last = [0] * n  # row index of the last token of sample i's (shared) prompt
    for group in prompt_groups(batch.prompt_tokens):
        prompt = batch.prompt_tokens[group[0]]
        lp = len(prompt)
        seg_start = len(flat)
        flat += prompt
        positions += range(lp)
        for i in group:
            response = batch.response_tokens[i]
            response_starts[i] = len(flat)
            prompt_last[i] = seg_start + lp - 1
            flat += response
            positions += range(lp, lp + len(response))
        segments.append(len(flat) - seg_start)
        rs = tuple(len(batch.response_tokens[i]) for i in group)
        branches.append((lp, *rs) if len(group) > 1 else None)
    pad = seq_len - total
    if pad:  # padding attends only to itself: its own segment
        segments.append(pad)
        branches.append(None)
        positions += range(pad)
    # Sample i's response token j is scored from the position before it; for j = 0 that is its prompt's last
    # token, shared by the group. Kept positions are listed sample by sample, so each sample's are contiguous.
    kept: list[int] = []
    targets: list[int] = []
    offsets: list[int] = []
    for i in range(n):
        r, s = len(batch.response_tokens[i]), response_starts[i]
        offsets.append(len(kept))
        if r:
            kept += [prompt_last[i], *range(s, s + r - 1)]
            targets += range(s, s + r)
    bounds = [0]
    for length in segments:
        bounds.append(bounds[-1] + length)
    tokens = torch.zeros(1, seq_len, dtype=torch.int64)
    tokens[0, :total] = torch.tensor(flat, dtype=torch.int64)
    mb = to_micro_batch(batch, batch.max_length(), device)
    mb.tokens = tokens.to(device)
    mb.position_ids = torch.tensor(positions, dtype=torch.int64).unsqueeze(0).to(device)
    mb.sample_starts = [s - p for s, p in zip(response_starts, mb.prompt_lengths, strict=True)]
    mb.cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(device)
    mb.segment_bounds = bounds
    mb.max_seqlen = max(segments)
    mb.branches = branches
    if kept:
        mb.logit_positions = torch.tensor(kept, dtype=torch.long).to(device)
        mb.logit_targets = torch.tensor(targets, dtype=torch.long).to(device)
        mb.logit_offsets = offsets
    return mb


def shared_micro_batches(
    batch: TrainBatch,
    micro_batch_size: int,
    max_tokens: int | None,
    multiple: int,
    device: torch.device | str = "cpu",
) -> tuple[list[MicroBatch], int]:
    """``batch`` cut as without sharing, each part one shared-prompt row (see the module docstring)."""
    parts = batch.micro_batches(micro_batch_size) if max_tokens is None else batch.pack(max_tokens)
    lengths = [
        max(multiple, math.ceil(p.num_tokens(share_prompts=True) / multiple) * multiple) for p in parts
    ]
    return [to_shared_micro_batch(p, n, device) for p, n in zip(parts, lengths, strict=True)], max(lengths)
