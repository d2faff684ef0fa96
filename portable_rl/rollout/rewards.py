"""Reward hub: the built-in math reward, a token-rule reward for tests, and user reward functions by dotted path.

Contract
--------
* A reward function is ``fn(response: str, label, sample) -> float`` (``sample`` is the
  ``portable_rl.data.types.Sample`` being scored; sync or ``async def``).
* ``load_reward_fn(spec, **options)``: ``spec`` is ``"math"`` (``MathReward(MathRewardConfig(**options))``),
  ``"remote"`` (an HTTP reward server, ``portable_rl.rollout.reward_client``; options are a
  ``RemoteRewardConfig``; one instance per process for the same options, so its concurrency limit holds over
  every rollout) or ``"package.module:function"``; an import that fails raises ``RewardLoadError`` with one line naming the spec,
  the reason and the fix. ``options`` for a user function are bound as keyword arguments.
* ``MathReward``: the answer is the content of the last ``\\boxed{...}`` (or ``\\fbox``) in the response; without
  one, and with ``accept_last_number``, the last number in the response. It is compared with the label by
  math-verify (symbolic/numeric equivalence: "0.5" = "1/2" = "\\frac{1}{2}", "1,000" = "1000"). Score:
  ``correct`` if equal else ``wrong``, plus ``format_bonus`` when the response contains a ``\\boxed{}`` answer.
  math-verify's signal-based timeouts are off, so the reward runs in any thread (Ray actors, executors).
* ``even_token_fraction`` (``"portable_rl.rollout.rewards:even_token_fraction"``): the fraction of the
  response's token ids that are even; 0.0 for an empty response; needs no label. A rule on the generated
  tokens themselves, so a randomly initialised model earns about half of it from its first step and the
  samples of a group almost never tie: every step has non-zero advantages and a gradient, and the policy can
  learn it (move probability to even ids). The tiny test recipe uses it so end-to-end tests see learning.
* Output: the reward runs under the training progress bar, so math-verify's log records are filtered
  (``quiet_math_verify``): its notice that timeouts are off is dropped (they are off on purpose, above), any
  other warning is shown once per process, errors always.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RewardFn = Callable[..., Any]


class RewardLoadError(ImportError):
    """A reward function named by dotted path could not be loaded; the message is one line."""


# ---- answer extraction ---------------------------------------------------------------------------------------
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, or None."""
    found = None
    for m in _BOX.finditer(text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i]
                    break
    return found


def last_number(text: str) -> str | None:
    """The last number in ``text`` ("1,000", "-3", "2.5", "3/4"), or None."""
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


# Loggers math-verify writes to (one per module; a filter on a logger sees only its own records).
MATH_VERIFY_LOGGERS = ("math_verify.parser", "math_verify.grader", "math_verify.utils", "math_verify.metric")
_TIMEOUTS_OFF = "Timeout is disabled"


class _OnceFilter(logging.Filter):
    """Drops math-verify's timeouts-off notice and repeats of a warning; lets errors through."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()  # rewards run in worker threads

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        text = str(record.msg)
        if text.startswith(_TIMEOUTS_OFF):
            return False
        key = (record.name, record.levelno, text)
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


_FILTER = _OnceFilter()


def quiet_math_verify() -> None:
    """Install the filter on math-verify's loggers (idempotent)."""
    for name in MATH_VERIFY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> tuple:
    from math_verify import parse

    quiet_math_verify()
    return tuple(parse(text, parsing_timeout=None))


def answers_match(answer: str, label: Any) -> bool:
    """math-verify equivalence of ``answer`` and ``label``; exact string equality when neither parses."""
    from math_verify import verify

    quiet_math_verify()
    gold_text, answer_text = str(label).strip(), answer.strip()
    if not gold_text or not answer_text:
        return False
    gold, pred = _parsed(gold_text), _parsed(answer_text)
    if gold and pred:
        return bool(verify(list(gold), list(pred), timeout_seconds=None))
    return gold_text == answer_text


@dataclass
class MathRewardConfig:
    correct: float = 1.0
    wrong: float = 0.0
    format_bonus: float = 0.0  # added when the response has a \boxed{} answer (right or wrong)
    accept_last_number: bool = True  # grade the last number when there is no \boxed{}

    def __post_init__(self) -> None:
        for name in ("correct", "wrong", "format_bonus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"reward.{name}={value!r} must be a number")
        if not isinstance(self.accept_last_number, bool):
            raise ValueError(f"reward.accept_last_number={self.accept_last_number!r} must be true or false")


class MathReward:
    def __init__(self, cfg: MathRewardConfig | None = None) -> None:
        self.cfg = cfg or MathRewardConfig()

    def extract(self, response: str) -> tuple[str | None, bool]:
        """(answer, boxed): the graded answer string and whether it came from a \\boxed{}."""
        boxed = last_boxed(response)
        if boxed is not None:
            return boxed, True
        if self.cfg.accept_last_number:
            return last_number(response), False
        return None, False

    def __call__(self, response: str, label: Any, sample: Any = None) -> float:
        answer, boxed = self.extract(response)
        if label is None:
            raise ValueError("the math reward needs a label (the reference answer) for every prompt")
        right = answer is not None and answers_match(answer, label)
        score = self.cfg.correct if right else self.cfg.wrong
        return float(score + (self.cfg.format_bonus if boxed else 0.0))


def even_token_fraction(response: str, label: Any = None, sample: Any = None) -> float:
    """Fraction of ``sample.response_tokens`` with an even id (see module docstring)."""
    if sample is None:
        raise ValueError("even_token_fraction scores token ids: call it with the Sample being scored")
    tokens = sample.response_tokens
    return sum(1 for t in tokens if t % 2 == 0) / len(tokens) if tokens else 0.0


def load_callable(spec: str, what: str = "reward function") -> Callable[..., Any]:
    """The callable ``"package.module:function"`` names; ``RewardLoadError`` (one line) when it cannot be loaded."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardLoadError(f"{what} {spec!r} is not of the form 'package.module:function'; use that form")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import-time failure of user code becomes one clear line
        raise RewardLoadError(
            f"{what} {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
            "make the module importable (PYTHONPATH or pip install) or fix it"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardLoadError(
            f"{what} {spec!r}: module {module_name!r} has no callable {attr!r}; check the name after ':'"
        )
    return fn


def load_reward_fn(spec: str, **options: Any) -> RewardFn:
    """The reward function ``spec`` names (see module docstring)."""
    if spec == "math":
        return MathReward(MathRewardConfig(**options))
    if spec == "remote":
        from portable_rl.rollout.reward_client import shared_remote_reward

        return shared_remote_reward(options)
    fn = load_callable(spec)
    return functools.partial(fn, **options) if options else fn


async def call_reward(fn: RewardFn, response: str, label: Any, sample: Any) -> float:
    """Run ``fn`` (sync functions in a worker thread, so slow graders do not stall the rollout loop)."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__)
    if is_async:
        value = await fn(response, label, sample)
    else:
        value = await asyncio.to_thread(fn, response, label, sample)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"reward function returned {value!r}, which is not a number") from None
