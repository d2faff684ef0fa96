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
  * ``supports_weights_checksum()``: the engine serves portable_rl's ``/get_weights_checksum``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from portable_rl.config.weight_sync import PAUSE_MODES
from portable_rl.protocol.client import EngineClient, EngineError

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

    def supports_weights_checksum(self) -> bool:
        return bool(self.server_info().get("weights_checksum"))

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
