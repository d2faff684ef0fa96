"""Remote reward: score a sample by POSTing it to an HTTP reward server (``rollout.reward: remote``).

Contract
--------
* ``RemoteReward(cfg)`` is an async reward function ``await fn(response, label, sample) -> float`` (the shape
  ``portable_rl.rollout.rewards`` expects). It POSTs JSON ``{"response", "label", "prompt_tokens",
  "response_tokens", "metadata"}`` to ``cfg.url`` and reads ``{"reward": x}`` (or a bare JSON number) back.
* Each attempt has ``cfg.timeout_s``. A connection error, a timeout, HTTP 5xx and HTTP 429 are transient: the
  request is tried again up to ``cfg.retries`` more times, waiting ``backoff_s``, then twice that, ... (capped
  at ``max_backoff_s``). After the last attempt ``RemoteRewardError`` names the URL, the attempts and the last
  failure. Another HTTP error (4xx) fails at once with the server's message: asking again cannot help.
* An answer that is not a finite number (a string, ``true``, ``NaN``, a missing ``reward`` key, not JSON) is
  refused with ``RemoteRewardError`` naming the URL and the value: a reward is never guessed.
* At most ``cfg.max_concurrency`` requests are in flight at once over the whole process: rollouts run in their
  own event loops (a new one per rollout round, the next step's async rollout in another thread), so the limit
  (``ConcurrencyLimit``) is shared across threads and loops, and ``shared_remote_reward`` hands every rollout
  of a run the same instance. A request waiting out its backoff does not hold a slot.
* A failed reward ends the rollout, hence the run, with that one line; the last checkpoint stays as it was.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import threading
from typing import Any

import aiohttp

from portable_rl.config.reward import RemoteRewardConfig

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


class RemoteRewardError(RuntimeError):
    """The reward server could not score a sample; the message is one line naming the URL."""


class ConcurrencyLimit:
    """At most ``n`` holders at once, across threads and event loops (``async with limit:``).

    A released slot goes straight to the oldest waiter (woken on its own loop), so waiters are served in order.
    ``peak`` is the most holders seen at once.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a concurrency limit must be >= 1, got {n}")
        self.n = n
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = (
            collections.deque()
        )

    async def __aenter__(self) -> ConcurrencyLimit:
        with self._lock:
            if self.held < self.n:
                self.held += 1
                self.peak = max(self.peak, self.held)
                return self
            loop = asyncio.get_running_loop()
            waiter = (loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiters:  # never granted: just leave the queue
                    self._waiters.remove(waiter)
                    raise
            self._release()  # granted while being cancelled: pass the slot on
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._release()

    def _release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, fut = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(_grant, fut)
                except RuntimeError:  # that waiter's loop has closed: it waits no more
                    continue
                return  # the slot changes hands; the number held stays the same
            self.held -= 1


def _grant(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def parse_reward(url: str, text: str) -> float:
    """The reward in a server's answer ``text``; ``RemoteRewardError`` naming ``url`` and the value otherwise."""
    try:
        body = json.loads(text)
    except ValueError:
        raise RemoteRewardError(
            f"reward server {url} answered {text[:200]!r}, which is not JSON; it must answer "
            '{"reward": <finite number>}'
        ) from None
    value = body.get("reward", "<no 'reward' key>") if isinstance(body, dict) else body
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RemoteRewardError(
            f"reward server {url} answered reward {value!r}, which is not a finite number; it must answer "
            '{"reward": <finite number>}'
        )
    return float(value)


def request_body(response: str, label: Any, sample: Any) -> bytes:
    """The JSON a reward server receives for one sample (token ids too, for rewards that score tokens)."""
    body = {
        "response": response,
        "label": label,
        "prompt_tokens": list(getattr(sample, "prompt_tokens", []) or []),
        "response_tokens": list(getattr(sample, "response_tokens", []) or []),
        "metadata": dict(getattr(sample, "metadata", {}) or {}),
    }
    return json.dumps(body, default=str).encode("utf-8")


class RemoteReward:
    """Async reward function asking ``cfg.url`` (see the module docstring)."""

    def __init__(self, cfg: RemoteRewardConfig) -> None:
        self.cfg = cfg
        self.limit = ConcurrencyLimit(cfg.max_concurrency)
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"

    def __repr__(self) -> str:  # no api key in logs
        return f"RemoteReward(url={self.cfg.url!r})"

    async def __call__(self, response: str, label: Any = None, sample: Any = None) -> float:
        cfg, data = self.cfg, request_body(response, label, sample)
        attempts = cfg.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1)))
            try:
                async with self.limit:
                    status, text = await self._post(data)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last = _describe(exc, cfg.timeout_s)
                continue
            if status in TRANSIENT_STATUS:
                last = f"HTTP {status}: {text.strip()[:200]}"
                continue
            if status >= 400:
                raise RemoteRewardError(
                    f"reward server {cfg.url} answered HTTP {status}: {text.strip()[:300]}; not retried "
                    "(only timeouts, connection errors, 5xx and 429 are)"
                )
            return parse_reward(cfg.url, text)
        raise RemoteRewardError(
            f"reward server {cfg.url} failed {attempts} attempt(s) (last: {last}); check that it runs and "
            "answers there (rollout.reward_options.url), or raise rollout.reward_options.retries / timeout_s"
        )

    async def _post(self, data: bytes) -> tuple[int, str]:
        # One session per request: rollouts run in short-lived event loops, and a session outliving its loop
        # would leak its connector.
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(self.cfg.url, data=data, headers=self.headers) as resp:
                return resp.status, await resp.text()


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within timeout_s={timeout_s:g}"
    return f"{type(exc).__name__}: {exc}"


_SHARED: dict[tuple, RemoteReward] = {}
_SHARED_LOCK = threading.Lock()


def shared_remote_reward(options: dict[str, Any]) -> RemoteReward:
    """The process's one ``RemoteReward`` for these options, so every rollout shares its concurrency limit."""
    cfg = RemoteRewardConfig.from_options(options)
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = RemoteReward(cfg)
        return _SHARED[key]
