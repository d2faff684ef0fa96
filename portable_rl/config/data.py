"""Data configuration: the prompt files a recipe trains and evaluates on (read by ``portable_rl.data.prompts``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# What a prompt longer than data.max_prompt_tokens does: skipped (counted in the metrics) or refused (the run
# stops with one line naming the file's line).
LONG_PROMPTS = ("skip", "refuse")


@dataclass
class PromptConfig:
    """One prompt file of the recipe's ``data:`` section (``data.train`` / ``data.eval``).

    path:                 JSONL file, one prompt per line
    prompt_key:           field holding the prompt (a string, or a chat message list)
    label_key:            field holding the label the reward function receives
    shuffle:              shuffle the prompts every epoch
    seed:                 seed of that shuffle
    apply_chat_template:  wrap string prompts in the tokenizer's chat template
    """

    path: str = ""
    prompt_key: str = "prompt"
    label_key: str = "label"
    shuffle: bool = True
    seed: int = 0
    apply_chat_template: bool = True

    def __post_init__(self) -> None:
        for name in ("prompt_key", "label_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name}={value!r} must be a non-empty field name")
        if self.prompt_key == self.label_key:
            raise ValueError(
                f"data.prompt_key and data.label_key are both {self.prompt_key!r}; use two fields"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r} must be an integer >= 0")
        for name in ("shuffle", "apply_chat_template"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be true or false")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class EvalSetConfig(PromptConfig):
    """One named eval set of ``data.eval_sets``: a prompt file (every ``PromptConfig`` key) plus

    name:                 logged as ``eval/<name>/reward_mean`` (and ``response_length_mean``,
                          ``truncated_frac``, ``samples``); letters, digits, ``_``, ``-``, ``.``; unique
    size:                 prompts of the file used per evaluation (null: ``data.eval_size``)
    samples_per_prompt:   samples per prompt (null: ``rollout.eval_samples_per_prompt``)
    temperature:          sampling temperature (null: ``rollout.eval_temperature``)
    shuffle:              off by default: an eval set is the same prompts every time
    """

    name: str = ""
    shuffle: bool = False
    size: int | None = None
    samples_per_prompt: int | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"data.eval_sets name={self.name!r} must be a non-empty name of letters, digits, '_', '-', '.' "
                "(it becomes the metrics prefix eval/<name>/)"
            )
        if not self.path:
            raise ValueError(f"data.eval_sets[{self.name}].path is empty; point it at a JSONL prompt file")
        for key in ("size", "samples_per_prompt"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"data.eval_sets[{self.name}].{key}={value!r} must be an integer >= 1, or null"
                )
        t = self.temperature
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf
        ):
            raise ValueError(f"data.eval_sets[{self.name}].temperature={t!r} must be a number >= 0, or null")
