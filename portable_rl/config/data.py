"""Data configuration: the prompt files a recipe trains and evaluates on (read by ``portable_rl.data.prompts``)."""

from __future__ import annotations

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
