"""The engine calls a weight sync makes, driven through portable_rl's engine client.

Contract
--------
``EngineOps(engine, timeout_s)`` wraps one engine: an ``EngineClient`` (its URL and API key are reused by a
private client, so the caller's client and its event loop are never touched) or a base URL. Every call is
scheduled on one background event loop shared by all EngineOps and returns a ``concurrent.futures.Future``,
so a sync can start HTTP calls on every engine, run a blocking collective, then collect the answers. An HTTP
error or a ``success: false`` reply surfaces as ``EngineError`` (alias ``EngineCallError``) from the future.
Request fields are SGLang 0.5.23's. Capabilities, read once from ``/server_info``:
  * ``tp_size``: ranks the engine contributes to a weight-update group (its tensor-parallel size);
  * ``supports_flattened_bucket()``: the engine takes ``load_format="flattened_bucket"`` in the tensor and
    distributed updates. portable_rl's engine lists it in ``weight_update_load_formats``; SGLang lists nothing,
    so it is inferred from ``version`` (0.5.23 is the release whose code was read and tested; older releases
    get per-tensor broadcasts);
  * ``prefers_flattened_bucket()``: flattened buckets are also the faster form for this engine, i.e. it
    supports them and does not declare ``weight_update_prefers_per_tensor`` (portable_rl's CPU engine does:
    a per-tensor broadcast lands straight in its parameters, a flattened one costs a staging copy on each
    side); ``flatten_buckets="auto"`` follows it;
  * ``supports_weights_checksum()``: the engine serves portable_rl's ``/get_weights_checksum``;
  * ``weight_update_backends()``: the torch.distributed backends the engine can join a weight-update group
    with, or None when it does not say (SGLang: whatever the platform's backend is). portable_rl's CPU engine
    lists ``["gloo"]``, so a GPU trainer broadcasting to it uses gloo instead of NCCL/RCCL;
  * ``supports_resident_weights()``: the engine serves portable_rl's ``/resident_weights`` (its weights in a
    shared-memory segment a co-located trainer writes; ``weight_sync.resident``).
``run_steps(steps, done, failed)`` runs several session calls as one coroutine (one hop to the loop instead of
one per call): steps run in order, a tuple of steps runs concurrently; each success is recorded in ``done``
and each failure in ``failed`` as it happens, so a caller that stops waiting still sees how far the engine got.
An engine whose ``/server_info`` lists every step's path under ``session_batch`` (portable_rl's CPU engine) gets
the whole sequence in one request (``EngineClient.session_batch``: one round trip instead of one per step; a
tuple's steps then run in the order written); if that request fails as a whole, its first step (every step,
without ``stop_on_error``) is recorded as failed. SGLang lists nothing and gets one request per step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from portable_rl.config.weight_sync import PAUSE_MODES
from portable_rl.protocol.client import SESSION_CALLS, EngineClient, EngineError, session_request

T = TypeVar("T")
EngineCallError = EngineError

# First SGLang release whose update endpoints were checked to take load_format="flattened_bucket".
SGLANG_FLATTENED_SINCE = (0, 5, 23)

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _background_loop() -> asyncio.AbstractEventLoop:
    """One daemon event loop for every weight-sync HTTP call of this process."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="weight-sync-http", daemon=True).start()
            _loop = loop
        return _loop


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in str(text).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


class EngineOps:
    def __init__(self, engine: EngineClient | str, timeout_s: float, pause_mode: str = "abort") -> None:
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode={pause_mode!r} is not one of {', '.join(PAUSE_MODES)}")
        if isinstance(engine, EngineClient):
            self.client = EngineClient(engine.base_url, api_key=engine.api_key, timeout_s=timeout_s)
        elif isinstance(engine, str):
            self.client = EngineClient(engine, timeout_s=timeout_s)
        else:
            raise TypeError(f"{engine!r} is neither an EngineClient nor an engine URL")
        self.timeout_s = timeout_s
        self.pause_mode = pause_mode
        self._info: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return self.client.base_url

    def __repr__(self) -> str:
        return f"EngineOps({self.label})"

    def submit(self, call: Callable[[EngineClient], Awaitable[T]]) -> Future[T]:
        """Schedule ``call(client)`` on the background loop; the future carries its result or EngineError."""
        return asyncio.run_coroutine_threadsafe(call(self.client), _background_loop())

    def close(self) -> None:
        self.submit(lambda c: c.close()).result(timeout=30)

    # ---- capabilities (blocking) ------------------------------------------------------------------------
    def server_info(self) -> dict[str, Any]:
        if self._info is None:
            info = self.submit(lambda c: c.get_server_info()).result()
            self._info = info if isinstance(info, dict) else {}
        return self._info

    @property
    def tp_size(self) -> int:
        return int(self.server_info().get("tp_size", 1) or 1)

    def supports_flattened_bucket(self) -> bool:
        info = self.server_info()
        if "weight_update_load_formats" in info:
            return "flattened_bucket" in (info.get("weight_update_load_formats") or [])
        version = _version_tuple(info.get("version", ""))
        return bool(version) and version >= SGLANG_FLATTENED_SINCE

    def prefers_flattened_bucket(self) -> bool:
        return self.supports_flattened_bucket() and not self.server_info().get(
            "weight_update_prefers_per_tensor"
        )

    def supports_weights_checksum(self) -> bool:
        return bool(self.server_info().get("weights_checksum"))

    def supports_resident_weights(self) -> bool:
        return bool(self.server_info().get("resident_weights"))

    def weight_update_backends(self) -> list[str] | None:
        listed = self.server_info().get("weight_update_backends")
        return [str(b) for b in listed] if isinstance(listed, list) else None

    # ---- calls (each returns a Future) ------------------------------------------------------------------
    def pause_generation(self) -> Future[None]:
        return self.submit(lambda c: c.pause_generation(self.pause_mode))

    def continue_generation(self) -> Future[None]:
        return self.submit(lambda c: c.continue_generation())

    def flush_cache(self) -> Future[None]:
        return self.submit(lambda c: c.flush_cache())

    def begin_weight_update(self) -> Future[None]:
        return self.submit(lambda c: c.begin_weight_update())

    def end_weight_update(self) -> Future[None]:
        return self.submit(lambda c: c.end_weight_update())

    def get_weight_version(self) -> Future[str | None]:
        return self.submit(lambda c: c.get_weight_version())

    def run_steps(
        self,
        steps: Sequence[str | tuple[str, ...]],
        done: dict[str, Any],
        failed: dict[str, BaseException],
        stop_on_error: bool = True,
        weight_version: str | None = None,
    ) -> Future[None]:
        """Run session calls (names in ``SESSION_STEPS``) in order as one coroutine; see the module docstring.

        A tuple of steps is issued concurrently. With ``stop_on_error`` the first failure ends the sequence;
        without it every step is still issued (a cleanup sequence must resume generation even when closing the
        session failed). ``weight_version`` is the body of a ``commit_resident_weights`` step. The future itself
        only fails if the coroutine is cancelled.
        """
        unknown = [s for s in step_names(steps) if s not in SESSION_STEPS]
        if unknown:
            raise ValueError(f"unknown session step(s) {unknown}; use {', '.join(SESSION_STEPS)}")

        async def one(c: EngineClient, step: str) -> None:
            try:
                done[step] = await SESSION_STEPS[step](self, c, weight_version)
            except EngineError as exc:
                failed[step] = exc

        async def call(c: EngineClient) -> None:
            if await self._batches(c, step_names(steps)):
                await batched(c)
                return
            for step in steps:
                await asyncio.gather(*(one(c, s) for s in step_names([step])))
                if failed and stop_on_error:
                    return

        async def batched(c: EngineClient) -> None:
            names = step_names(steps)
            try:
                results = await c.session_batch(names, self.pause_mode, stop_on_error, weight_version)
            except EngineError as exc:
                for step in names[:1] if stop_on_error else names:
                    failed[step] = exc
                return
            for step, result in zip(names, results, strict=False):
                if isinstance(result, EngineError):
                    failed[step] = result
                else:
                    done[step] = result

        return self.submit(call)

    async def _batches(self, c: EngineClient, steps: Sequence[str]) -> bool:
        """Whether the engine runs all of ``steps`` in one ``/session_batch`` request (server info read once)."""
        if self._info is None:
            try:
                info = await c.get_server_info()
            except EngineError:
                return False  # one request per step then; each reports its own failure
            self._info = info if isinstance(info, dict) else {}
        offered = self._info.get("session_batch") or ()
        return all(SESSION_CALLS[step][1] in offered for step in steps)

    def init_weights_update_group(self, **fields: Any) -> Future[None]:
        return self.submit(lambda c: c.init_weights_update_group(**fields))

    def destroy_weights_update_group(self, group_name: str) -> Future[None]:
        return self.submit(lambda c: c.destroy_weights_update_group(group_name))

    def update_weights_from_distributed(self, **fields: Any) -> Future[None]:
        return self.submit(lambda c: c.update_weights_from_distributed(**fields))

    def update_weights_from_tensor(self, **fields: Any) -> Future[None]:
        return self.submit(lambda c: c.update_weights_from_tensor(**fields))

    def update_weights_from_disk(self, model_path: str, weight_version: str | None) -> Future[None]:
        return self.submit(lambda c: c.update_weights_from_disk(model_path, weight_version=weight_version))

    def resident_weights(self) -> Future[dict[str, Any]]:
        """The engine's resident-weight segment: {segment, size, tensors: {name: {dtype, shape, stride, offset}}}."""

        async def call(c: EngineClient) -> dict[str, Any]:
            body = await c.post("/resident_weights")
            if not isinstance(body, dict) or "segment" not in body or "tensors" not in body:
                raise EngineError(f"{c.base_url}/resident_weights: malformed answer {str(body)[:200]}")
            return body

        return self.submit(call)

    def get_weights_checksum(self, names: list[str] | None) -> Future[dict[str, str | None]]:
        async def call(c: EngineClient) -> dict[str, str | None]:
            body = await c.post("/get_weights_checksum", {"names": names})
            return dict(body.get("checksums", {}))

        return self.submit(call)

    def get_weights_by_name(self, name: str, truncate_size: int) -> Future[Any]:
        async def call(c: EngineClient) -> Any:
            try:
                return await c.post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})
            except EngineError as exc:
                if exc.status is not None and 400 <= exc.status < 500:
                    return None  # the engine serves no weight of that name
                raise

        return self.submit(call)


def step_names(steps: Sequence[str | tuple[str, ...]]) -> list[str]:
    """Every step name of a ``run_steps`` sequence, in order (a tuple's names in their order)."""
    return [s for step in steps for s in ((step,) if isinstance(step, str) else step)]


# The calls an update session is made of, by endpoint name (what ``run_steps`` accepts); each gets the sync's
# weight version, which only the commit of resident weights sends.
SESSION_STEPS: dict[str, Callable[[EngineOps, EngineClient, str | None], Awaitable[Any]]] = {
    "pause_generation": lambda ops, c, v: c.pause_generation(ops.pause_mode),
    "flush_cache": lambda ops, c, v: c.flush_cache(),
    "begin_weight_update": lambda ops, c, v: c.begin_weight_update(),
    "end_weight_update": lambda ops, c, v: c.end_weight_update(),
    "continue_generation": lambda ops, c, v: c.continue_generation(),
    "get_weight_version": lambda ops, c, v: c.get_weight_version(),
    "commit_resident_weights": lambda ops, c, v: c.request(
        *session_request("commit_resident_weights", "abort", v)
    ),
}
