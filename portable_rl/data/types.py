"""Rollout data types shared by the rollout manager, the data buffer and the trainer.

A ``Sample`` is one prompt + one sampled response, as token ids, with the rollout engine's per-token
log-probs of the response and the reward. Samples of one prompt form a ``Group`` (GRPO's unit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class SampleStatus(str, Enum):
    COMPLETED = "completed"  # stopped on EOS / a stop token
    TRUNCATED = "truncated"  # hit max_new_tokens
    ABORTED = "aborted"  # engine aborted it (dynamic sampling leftovers, engine failure)


@dataclass
class Sample:
    prompt_index: int  # position of the prompt in the data source (epoch-local)
    group_id: int  # all samples of one prompt in one rollout share it
    prompt_tokens: list[int]
    response_tokens: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)  # one per response token
    loss_mask: list[int] = field(default_factory=list)  # one per response token (1 = trained on)
    reward: float = 0.0
    status: SampleStatus = SampleStatus.COMPLETED
    weight_version: int = 0  # engine weight version that generated the response
    response_text: str = ""
    label: Any = None  # ground truth from the prompt file (e.g. the answer)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.loss_mask:
            self.loss_mask = [1] * len(self.response_tokens)
        n = len(self.response_tokens)
        if len(self.loss_mask) != n:
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {n} response tokens")
        if self.rollout_logprobs and len(self.rollout_logprobs) != n:
            raise ValueError(
                f"rollout_logprobs has {len(self.rollout_logprobs)} entries for {n} response tokens"
            )

    @property
    def tokens(self) -> list[int]:
        return self.prompt_tokens + self.response_tokens

    @property
    def response_length(self) -> int:
        return len(self.response_tokens)


@dataclass
class Group:
    group_id: int
    prompt_index: int
    samples: list[Sample]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]
