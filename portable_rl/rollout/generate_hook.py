"""Generate hooks: the user function that turns one prompt into one sampled response.

Contract
--------
* A generate hook is ``async def hook(sample: HookSample, sampling_params: dict, engine: HookEngine,
  **generate_options) -> HookOutput``, named in the recipe as ``rollout.generate: "package.module:function"``
  (``rollout.generate_options`` are bound as its keyword arguments). ``load_generate_hook(spec, options)``
  imports it and checks, before anything runs, that it is an ``async def`` whose signature takes
  ``(sample, sampling_params, engine, **options)``; otherwise ``GenerateHookLoadError`` (one line).
* ``HookSample``: which prompt and sample this is (``prompt_index``, ``group_id``, ``sample_index``), the
  templated ``prompt_tokens``, ``label``, ``metadata``, ``max_turns`` (``rollout.max_turns``) and ``partial``:
  a ``Transcript`` of tokens generated for this sample before its rollout was cut (partial rollouts), or None.
  A hook that gets a ``partial`` continues it (the default hook does).
* ``HookEngine.generate(input_ids, sampling_params)`` is one ``/generate`` call through the router, returning
  ``GenerateOutput`` (token ids, engine log-probs, finish reason, weight version). A hook may call it any
  number of times. Every call gets its own request id and, when the rollout is seeded, its own sampling seed
  derived from the sample's (so turn 2 does not replay turn 1's random draws). When the rollout is cut (the
  over-sampling target reached), running calls end with finish reason ``"abort"`` and later calls return an
  empty ``"abort"`` output at once: a hook should then return what it has with ``finish_reason="abort"``.
  ``engine.tokenizer`` is the model's tokenizer (for chat templates and parsing).
* ``HookOutput``: everything after the prompt. ``tokens`` (ids), ``logprobs`` (the engine's, one per token;
  any value, by convention 0.0, for tokens the environment inserted), ``loss_mask`` (one 0/1 per token: **1 for
  tokens the model sampled, 0 for tokens the environment inserted** — tool output, chat-template glue),
  ``finish_reason`` (``"stop" | "length" | "abort"``), optional ``weight_versions`` (one per token; default: the
  version of the engine call that produced it, as ``Transcript`` records) and ``metadata`` (merged into the
  sample's). ``check_output`` refuses lengths that differ, naming the field, the hook and the prompt.
  Masked tokens get no policy loss, KL or entropy and do not count in token-mean aggregation: the trainer
  reads ``Sample.loss_mask``.
* ``Transcript`` builds a ``HookOutput`` turn by turn: ``add_model(out)`` appends a ``GenerateOutput`` (mask 1,
  its log-probs, its weight version), ``add_env(tokens)`` appends inserted tokens (mask 0). ``spans()`` lists
  ``[start, end, weight_version]`` of consecutive model tokens of one version (what ``rollouts.jsonl`` shows).
* ``single_turn`` is the default hook: one ``/generate`` call (or, given a ``partial``, the continuation of the
  cut response for the tokens it has left), exactly the request portable_rl made before hooks existed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from portable_rl.protocol.client import GenerateOutput
from portable_rl.rollout.rewards import RewardLoadError, load_callable

FINISH_REASONS = ("stop", "length", "abort")
HookFn = Callable[..., Any]


class GenerateHookLoadError(RewardLoadError):
    """The recipe's generate hook cannot be loaded or has the wrong signature; the message is one line."""


class GenerateHookError(RuntimeError):
    """A generate hook raised or returned something unusable; the message names the hook and the prompt."""


def _version_int(version: str | None) -> int:
    return int(version) if version is not None and str(version).isdigit() else 0


@dataclass
class Transcript:
    """A response under construction: tokens, engine log-probs, loss mask and weight version per token."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)

    def add_model(self, out: GenerateOutput) -> None:
        n = len(out.output_ids)
        self.tokens += list(out.output_ids)
        self.logprobs += list(out.output_logprobs) if out.output_logprobs else [0.0] * n
        self.loss_mask += [1] * n
        self.weight_versions += [_version_int(out.weight_version)] * n

    def add_env(self, tokens: list[int], weight_version: int | None = None) -> None:
        n = len(tokens)
        version = weight_version if weight_version is not None else self.last_version()
        self.tokens += list(tokens)
        self.logprobs += [0.0] * n
        self.loss_mask += [0] * n
        self.weight_versions += [version] * n

    def last_version(self) -> int:
        return self.weight_versions[-1] if self.weight_versions else 0

    def copy(self) -> Transcript:
        return Transcript(
            list(self.tokens), list(self.logprobs), list(self.loss_mask), list(self.weight_versions)
        )

    def spans(self) -> list[list[int]]:
        """``[start, end, version]`` of each run of model tokens (mask 1) of one weight version."""
        out: list[list[int]] = []
        for i, (m, v) in enumerate(zip(self.loss_mask, self.weight_versions, strict=True)):
            if not m:
                continue
            if out and out[-1][1] == i and out[-1][2] == v:
                out[-1][1] = i + 1
            else:
                out.append([i, i + 1, v])
        return out

    def output(self, finish_reason: str, metadata: dict[str, Any] | None = None) -> HookOutput:
        return HookOutput(
            tokens=list(self.tokens),
            logprobs=list(self.logprobs),
            loss_mask=list(self.loss_mask),
            finish_reason=finish_reason,
            weight_versions=list(self.weight_versions),
            metadata=dict(metadata or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "logprobs": self.logprobs,
            "loss_mask": self.loss_mask,
            "weight_versions": self.weight_versions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        return cls(
            list(data["tokens"]),
            list(data["logprobs"]),
            list(data["loss_mask"]),
            list(data["weight_versions"]),
        )


@dataclass
class HookOutput:
    tokens: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    finish_reason: str = "stop"
    weight_versions: list[int] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class HookSample:
    prompt_index: int
    group_id: int
    sample_index: int
    prompt_tokens: list[int]
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 1
    partial: Transcript | None = None


class HookEngine:
    """What a hook generates with: one sample's view of the rollout's engines (see the module docstring)."""

    def __init__(self, call: Callable[..., Any], tokenizer: Any, rid: str, seed: int | None) -> None:
        self._call = call  # async (input_ids, params, rid) -> GenerateOutput; the manager's, abort-aware
        self.tokenizer = tokenizer
        self._rid = rid
        self._seed = seed
        self.calls = 0
        self.last_weight_version: str | None = None  # of the latest call's output

    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any]) -> GenerateOutput:
        params = dict(sampling_params)
        # The first call is the request portable_rl always made (same rid, same seed); later ones differ.
        rid = self._rid if self.calls == 0 else f"{self._rid}-c{self.calls}"
        if self._seed is not None:
            params["sampling_seed"] = (self._seed + self.calls * 0x9E3779B97F4A7C15) % (1 << 63)
        self.calls += 1
        out = await self._call(list(input_ids), params, rid)
        if out.weight_version is not None:
            self.last_weight_version = out.weight_version
        return out


def hook_name(fn: HookFn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def load_generate_hook(spec: str | None, options: dict[str, Any] | None = None) -> HookFn:
    """The hook ``spec`` names (None: ``single_turn``), its signature checked against ``options``."""
    options = dict(options or {})
    if spec is None:
        if options:
            raise GenerateHookLoadError(
                f"rollout.generate_options={options!r} need rollout.generate (the default hook takes none)"
            )
        return single_turn
    try:
        fn = load_callable(spec, what="generate hook")
    except RewardLoadError as exc:
        raise GenerateHookLoadError(str(exc)) from None
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)):
        raise GenerateHookLoadError(
            f"generate hook {spec!r} is not an async function; define it as "
            "`async def hook(sample, sampling_params, engine, **options)`"
        )
    try:
        inspect.signature(fn).bind(None, None, None, **options)
    except TypeError as exc:
        raise GenerateHookLoadError(
            f"generate hook {spec!r} does not take (sample, sampling_params, engine"
            f"{', ' + ', '.join(f'{k}=' for k in options) if options else ''}) ({exc}); "
            "fix its signature or rollout.generate_options"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): checked when called
        pass
    return fn


def check_output(out: Any, where: str) -> HookOutput:
    """``out`` if it is a well-formed ``HookOutput``; else ``GenerateHookError`` naming the bad field."""
    if not isinstance(out, HookOutput):
        raise GenerateHookError(f"{where} returned {type(out).__name__}, not a HookOutput")
    n = len(out.tokens)
    lengths = {"logprobs": out.logprobs, "loss_mask": out.loss_mask}
    if out.weight_versions is not None:
        lengths["weight_versions"] = out.weight_versions
    for name, values in lengths.items():
        if len(values) != n:
            raise GenerateHookError(
                f"{where} returned {len(values)} {name} for {n} tokens; return one per token"
            )
    if any(m not in (0, 1) for m in out.loss_mask):
        raise GenerateHookError(f"{where} returned a loss_mask with values other than 0 and 1")
    if out.finish_reason not in FINISH_REASONS:
        raise GenerateHookError(
            f"{where} returned finish_reason={out.finish_reason!r}; use one of {', '.join(FINISH_REASONS)}"
        )
    return out


async def single_turn(sample: HookSample, sampling_params: dict[str, Any], engine: HookEngine) -> HookOutput:
    """The default hook: one ``/generate`` call, or the continuation of a partial response."""
    done = sample.partial.copy() if sample.partial is not None else Transcript()
    params = dict(sampling_params)
    if done.tokens:
        left = int(params["max_new_tokens"]) - len(done.tokens)
        if left <= 0:
            return done.output("length")
        params["max_new_tokens"] = left
    out = await engine.generate(sample.prompt_tokens + done.tokens, params)
    done.add_model(out)
    return done.output(out.finish_reason if out.finish_reason in FINISH_REASONS else "abort")
