"""RolloutConfig: the ``rollout:`` section of a recipe (sampling, engines, router, rewards, dynamic sampling).

Validated when built; every bad value raises ``ValueError`` with one line naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from portable_rl.config import refuse_non_finite
from portable_rl.config.reward import REMOTE_REWARD, RemoteRewardConfig

ENGINE_KINDS = ("auto", "cpu", "sglang")
ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two")


@dataclass
class RolloutConfig:
    """prompts_per_step x samples_per_prompt samples per step, generated through the router.

    prompts_per_step:     groups a rollout returns (after filtering)
    samples_per_prompt:   samples per prompt (the GRPO group size)
    max_new_tokens, temperature, top_p, top_k (-1: off), stop, stop_token_ids: SGLang sampling params
    seeded:               per-sample sampling_seed derived from (run seed, step, prompt, sample), so a resumed
                          run repeats the samples an uninterrupted run draws
    reward:               "math", "remote" (an HTTP reward server; reward_options are a RemoteRewardConfig:
                          url, timeout_s, retries, backoff_s, max_backoff_s, max_concurrency, api_key) or
                          "package.module:function"; reward_options are its keyword arguments
    filter:               dynamic-sampling filter: null (keep every group), "nonzero_std" (drop groups whose
                          rewards are all equal) or "package.module:function" (group -> bool)
    over_sample_factor:   with a filter, prompts launched per missing group
    max_prompts_factor:   with a filter, a rollout launches at most this x prompts_per_step prompts
    over_sampling_factor: launch this x prompts_per_step prompts at once (>= 1; 1: no over-sampling) and abort
                          the rest once prompts_per_step groups passed the filter; the cut prompts go back to
                          the front of the queue (continued with partial_rollout, else generated again)
    partial_rollout:      a cut rollout keeps what it generated: finished samples of an unfinished group are
                          reused and cut samples continue from their tokens later; each token span records
                          the weight version that produced it (rollouts.jsonl: weight_spans). With
                          run.async_rollout the weight sync cuts the running rollout instead of waiting for it
    generate:             generate hook, "package.module:function" (async; see docs/customise-rollout.md);
                          null: one /generate call per sample. generate_options are its keyword arguments
    max_turns:            turns a multi-turn generate hook may take per sample (>= 1; the shipped
                          tool-calling example reads it; the default hook makes one call)
    max_concurrency:      samples in progress per rollout (one in-flight /generate request each)
    num_engines, engine_tp_size, engine ("auto" | "cpu" | "sglang"), engine_args (--sglang-<name> pass-through)
    router_policy:        sglang-router load-balancing policy
    eval_samples_per_prompt, eval_temperature: sampling for evaluation rollouts
    health_check_interval_s: during rollouts every engine is probed this often (0: no health checks; a dead
                          engine then fails the run); a dead, hung or unhealthy engine is replaced, re-synced to
                          the trainer's weights, and its unfinished groups are generated again
    health_timeout_s:     an engine that does not answer a probe within this is hung (above SGLang's own
                          20 s /health_generate limit)
    max_engine_restarts:  engine replacements allowed in one run (0: the first failure ends the run)
    """

    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seeded: bool = True
    reward: str = "math"
    reward_options: dict[str, Any] = field(default_factory=dict)
    filter: str | None = None
    over_sample_factor: float = 1.5
    max_prompts_factor: float = 4.0
    over_sampling_factor: float = 1.0
    partial_rollout: bool = False
    generate: str | None = None
    generate_options: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 1
    max_concurrency: int = 256
    request_timeout_s: float = 3600.0
    num_engines: int = 1
    engine_tp_size: int = 1
    engine: str = "auto"
    engine_args: dict[str, Any] = field(default_factory=dict)
    engine_startup_timeout_s: float = 600.0
    router_policy: str = "round_robin"
    eval_samples_per_prompt: int = 1
    eval_temperature: float = 0.0
    health_check_interval_s: float = 5.0
    health_timeout_s: float = 60.0
    max_engine_restarts: int = 3

    def __post_init__(self) -> None:
        refuse_non_finite(self, "rollout.")

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rollout.{name}={value!r} must be an integer >= 1")

        for name in (
            "prompts_per_step",
            "samples_per_prompt",
            "max_new_tokens",
            "max_concurrency",
            "num_engines",
            "engine_tp_size",
            "eval_samples_per_prompt",
            "max_turns",
        ):
            positive_int(name)
        r = self.max_engine_restarts
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rollout.max_engine_restarts={r!r} must be an integer >= 0 (0: never restart)")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"rollout.{name}={value!r} must be a number of seconds")
            return value

        if not number("health_check_interval_s") >= 0:
            raise ValueError(
                f"rollout.health_check_interval_s={self.health_check_interval_s!r} must be >= 0 (0: no checks)"
            )
        if not number("health_timeout_s") > 0:
            raise ValueError(f"rollout.health_timeout_s={self.health_timeout_s!r} must be > 0")
        for name in ("temperature", "eval_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"rollout.{name}={value!r} must be a number >= 0 (0: greedy)")
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"rollout.top_p={self.top_p!r} must be in (0, 1]")
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or (self.top_k < 1 and self.top_k != -1)
        ):
            raise ValueError(f"rollout.top_k={self.top_k!r} must be an integer >= 1, or -1 for no top-k")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"rollout.stop={self.stop!r} must be a list of non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"rollout.stop_token_ids={self.stop_token_ids!r} must be a list of token ids")
        if not isinstance(self.reward, str) or not (
            self.reward in ("math", REMOTE_REWARD) or ":" in self.reward
        ):
            raise ValueError(
                f"rollout.reward={self.reward!r} must be 'math', 'remote' or 'package.module:function'"
            )
        if self.reward == REMOTE_REWARD and isinstance(self.reward_options, dict):
            RemoteRewardConfig.from_options(self.reward_options)  # url, timeout, retries, concurrency
        if self.filter is not None and not (self.filter == "nonzero_std" or ":" in str(self.filter)):
            raise ValueError(
                f"rollout.filter={self.filter!r} must be null, 'nonzero_std' or 'package.module:function'"
            )
        if not self.over_sample_factor >= 1.0:
            raise ValueError(f"rollout.over_sample_factor={self.over_sample_factor!r} must be >= 1")
        f = self.over_sampling_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 1.0:
            raise ValueError(
                f"rollout.over_sampling_factor={f!r} must be a number >= 1 (1: launch exactly prompts_per_step)"
            )
        if not isinstance(self.partial_rollout, bool):
            raise ValueError(f"rollout.partial_rollout={self.partial_rollout!r} must be true or false")
        if self.generate is not None and (not isinstance(self.generate, str) or ":" not in self.generate):
            raise ValueError(f"rollout.generate={self.generate!r} must be null or 'package.module:function'")
        if not isinstance(self.generate_options, dict):
            raise ValueError("rollout.generate_options must be a mapping (the hook's keyword arguments)")
        if not self.max_prompts_factor >= 1.0:
            raise ValueError(f"rollout.max_prompts_factor={self.max_prompts_factor!r} must be >= 1")
        if not self.request_timeout_s > 0 or not self.engine_startup_timeout_s > 0:
            raise ValueError(
                "rollout.request_timeout_s and rollout.engine_startup_timeout_s must be positive"
            )
        if self.engine not in ENGINE_KINDS:
            raise ValueError(f"rollout.engine={self.engine!r} is not one of {', '.join(ENGINE_KINDS)}")
        if self.router_policy not in ROUTER_POLICIES:
            raise ValueError(
                f"rollout.router_policy={self.router_policy!r} is not one of {', '.join(ROUTER_POLICIES)}"
            )
        if not isinstance(self.engine_args, dict) or not isinstance(self.reward_options, dict):
            raise ValueError("rollout.engine_args and rollout.reward_options must be mappings")

    def sampling_params(self, *, eval_mode: bool = False) -> dict[str, Any]:
        """SGLang ``sampling_params`` for one request (without the per-sample seed)."""
        params: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.eval_temperature if eval_mode else self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }
        if self.stop:
            params["stop"] = list(self.stop)
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        return params
