"""Co-located engines lend their KV-cache memory to the trainer while it computes (SGLang's memory saver).

Contract
--------
* ``EngineMemorySaver(platform, mode, engine_kind, api_key)`` is ``enabled`` only in co-located mode, with SGLang
  engines, on a platform whose ``memory_saver_supported`` holds (SGLang's saver needs the GPU driver's virtual
  memory API; the CPU engine holds no device memory). Disabled, every method below does nothing.
* ``engine_args(args)``: the SGLang server args with ``enable_memory_saver`` on (a user's
  ``--sglang-enable-memory-saver`` value wins).
* ``release(urls)`` after a rollout, before the trainer computes (and once at start, before the trainer is
  built); ``resume(urls)`` before anything generates or weights are pushed. Both POST SGLang's
  ``/release_memory_occupation`` / ``/resume_memory_occupation`` to every engine, and both are idempotent: the
  saver remembers whether the engines are released, so callers may call ``resume`` before every use.
* Only the KV cache is released (``TAGS``): the engine keeps its weights, so no weight sync is needed before it
  generates again (releasing weights too would discard them until the next sync, and the first rollout of a
  run has none before it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from portable_rl.platform import Platform
from portable_rl.protocol.client import EngineClient

TAGS = ["kv_cache"]


class EngineMemorySaver:
    def __init__(self, platform: Platform, mode: str, engine_kind: str, api_key: str | None = None):
        self.enabled = (
            bool(platform.memory_saver_supported) and mode == "colocated" and engine_kind == "sglang"
        )
        self.api_key = api_key
        self.released = False

    def engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            return dict(args)
        return {"enable_memory_saver": True, **args}

    def release(self, urls: Sequence[str]) -> None:
        if self.enabled and not self.released:
            self._call(urls, "release_memory_occupation")
            self.released = True

    def resume(self, urls: Sequence[str]) -> None:
        if self.enabled and self.released:
            self._call(urls, "resume_memory_occupation")
            self.released = False

    def _call(self, urls: Sequence[str], method: str) -> None:
        async def one(url: str) -> None:
            async with EngineClient(url, api_key=self.api_key, timeout_s=300) as client:
                await getattr(client, method)(TAGS)

        async def every() -> None:
            await asyncio.gather(*(one(u) for u in urls))

        asyncio.run(every())
