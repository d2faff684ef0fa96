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
* ``MicroBatch`` (``to_micro_batch``): padded tensors the model and a loss function use. ``tokens`` [b, T]
  (right-padded with 0), ``position_ids`` [b, T]; response-aligned ``[b, L]`` tensors: ``loss_mask`` (0 on
  padding) and every token field; ``[b]`` tensors for sample fields; ``prompt_lengths``/``response_lengths``.
  ``as_loss_batch()`` gives the dict a ``loss_fn`` sees.
"""

from __future__ import annotations

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
