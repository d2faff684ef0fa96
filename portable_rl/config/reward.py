"""RemoteRewardConfig: the options of ``rollout.reward: remote`` (``rollout.reward_options``).

A remote reward POSTs every finished sample to an HTTP reward server (``portable-rl reward-server`` ships one)
and reads a number back. Validated when the recipe is built; a bad value raises ``ValueError`` with one line
naming ``rollout.reward_options.<field>`` and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

REMOTE_REWARD = "remote"  # the rollout.reward value that selects this reward


@dataclass
class RemoteRewardConfig:
    """Where and how a remote reward asks for scores.

    url:              the scoring endpoint, http:// or https:// (the shipped server scores at ``/score``);
                      the request is JSON ``{"response", "label", "prompt_tokens", "response_tokens",
                      "metadata"}`` and the answer JSON ``{"reward": <finite number>}``
    timeout_s:        seconds one request may take before it counts as failed (> 0)
    retries:          further attempts after a failed one (>= 0): connection errors, timeouts and HTTP 5xx/429
                      are retried, other answers fail at once
    backoff_s:        wait before the first retry; doubled after each further failure, capped at max_backoff_s
    max_backoff_s:    the longest wait between two attempts
    max_concurrency:  requests in flight to the server at once, over the whole run (>= 1)
    api_key:          sent as ``Authorization: Bearer <api_key>`` when set (never written to the run dir)
    """

    url: str = ""
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_concurrency: int = 16
    api_key: str | None = None

    def __post_init__(self) -> None:
        where = "rollout.reward_options."
        parts = urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{where}url={self.url!r} must be an http:// or https:// URL with a host, e.g. "
                "http://127.0.0.1:8000/score"
            )
        for name in ("timeout_s", "backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}{name}={value!r} must be a finite number of seconds")
        if not self.timeout_s > 0:
            raise ValueError(f"{where}timeout_s={self.timeout_s!r} must be > 0 seconds")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"{where}backoff_s and max_backoff_s must be >= 0 seconds")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"{where}retries={self.retries!r} must be an integer >= 0 (0: one attempt)")
        c = self.max_concurrency
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{where}max_concurrency={c!r} must be an integer >= 1")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ValueError(f"{where}api_key must be a string")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RemoteRewardConfig:
        """The config ``rollout.reward_options`` describe; an unknown option is one line naming the known ones."""
        known = [f.name for f in fields(cls)]
        for key in options:
            if key not in known:
                raise ValueError(
                    f"rollout.reward_options.{key} is not an option of the remote reward; known: {', '.join(known)}"
                )
        if "url" not in options:
            raise ValueError(
                "rollout.reward=remote needs rollout.reward_options.url (the reward server's scoring URL)"
            )
        return cls(**options)
