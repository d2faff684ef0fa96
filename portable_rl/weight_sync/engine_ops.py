"""The engine calls a weight sync makes, on top of portable_rl's engine HTTP client.

Contract: ``EngineOps(engine, timeout_s)`` wraps one engine (a ``portable_rl.rollout.engines.client`` client, or
a base URL) and exposes exactly the SGLang endpoints weight sync needs, with SGLang's request fields. A reply
with ``success: false`` or an HTTP error raises ``EngineCallError`` carrying the engine's message.
Capabilities, read once from the engine's server info:
  * ``tp_size``: ranks the engine contributes to a weight-update group (its tensor-parallel size);
  * ``supports_flattened_bucket()``: the engine accepts ``load_format="flattened_bucket"`` in
    /update_weights_from_distributed and /update_weights_from_tensor. portable_rl's engine declares it in
    ``weight_update_load_formats``; SGLang declares nothing, so it is inferred from its ``version``
    (0.5.23 is the release read and tested; older ones get per-tensor broadcasts);
  * ``supports_weights_checksum()``: the engine serves portable_rl's ``/get_weights_checksum``.
The weight version is read from ``/get_weight_version`` where served, else from ``/model_info``'s
``weight_version`` (SGLang 0.5.23 serves only the latter).
"""

from __future__ import annotations

from typing import Any

import requests

# First SGLang release whose update endpoints were checked to take load_format="flattened_bucket".
SGLANG_FLATTENED_SINCE = (0, 5, 23)


class EngineCallError(RuntimeError):
    """An engine answered a weight-sync call with an error (or not at all)."""


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in str(text).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


class EngineOps:
    def __init__(self, engine: Any, timeout_s: float) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        url = (
            engine
            if isinstance(engine, str)
            else getattr(engine, "base_url", None) or getattr(engine, "url", None)
        )
        if not url:
            raise TypeError(f"{engine!r} is not an engine client or URL (it has no base_url)")
        self.base_url = str(url).rstrip("/")
        self._session = requests.Session()
        self._info: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return self.base_url

    def __repr__(self) -> str:
        return f"EngineOps({self.label})"

    # ---- transport --------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        url = f"{self.base_url}{path}"
        try:
            resp = self._session.request(method, url, json=payload, timeout=self.timeout_s)
        except requests.Timeout as exc:
            raise EngineCallError(f"{url}: no answer within {self.timeout_s:g}s") from exc
        except requests.RequestException as exc:
            raise EngineCallError(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            message = body.get("message") or body.get("detail") or body if isinstance(body, dict) else body
            raise EngineCallError(f"{url}: HTTP {resp.status_code}: {str(message)[:500]}")
        if isinstance(body, dict) and body.get("success") is False:
            raise EngineCallError(f"{url}: {str(body.get('message', body))[:500]}")
        return body

    def post(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        return self._request("POST", path, payload or {})

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    # ---- capabilities -----------------------------------------------------------------------------------
    def server_info(self) -> dict[str, Any]:
        if self._info is None:
            info = self.get("/get_server_info")
            self._info = info if isinstance(info, dict) else {}
        return self._info

    @property
    def tp_size(self) -> int:
        explicit = getattr(self.engine, "tp_size", None)
        if isinstance(explicit, int) and explicit > 0:
            return explicit
        return int(self.server_info().get("tp_size", 1) or 1)

    def supports_flattened_bucket(self) -> bool:
        info = self.server_info()
        if "weight_update_load_formats" in info:
            return "flattened_bucket" in (info.get("weight_update_load_formats") or [])
        version = _version_tuple(info.get("version", ""))
        return bool(version) and version >= SGLANG_FLATTENED_SINCE

    def supports_weights_checksum(self) -> bool:
        return bool(self.server_info().get("weights_checksum"))

    # ---- generation control -----------------------------------------------------------------------------
    def pause_generation(self) -> None:
        self.post("/pause_generation")

    def continue_generation(self) -> None:
        self.post("/continue_generation")

    def flush_cache(self) -> None:
        self.post("/flush_cache")

    def begin_weight_update(self) -> None:
        self.post("/begin_weight_update")

    def end_weight_update(self) -> None:
        self.post("/end_weight_update")

    def get_weight_version(self) -> str | None:
        try:
            body = self.get("/get_weight_version")
        except EngineCallError as exc:
            if "HTTP 404" not in str(exc):
                raise
            body = self.get("/model_info")
        if isinstance(body, dict):
            version = body.get("weight_version")
            return None if version is None else str(version)
        return str(body)

    # ---- weight updates ---------------------------------------------------------------------------------
    def init_weights_update_group(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        self.post(
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )

    def destroy_weights_update_group(self, *, group_name: str) -> None:
        self.post("/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_distributed(
        self,
        *,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        load_format: str | None,
        weight_version: str | None,
        flush_cache: bool,
    ) -> None:
        payload: dict[str, Any] = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "flush_cache": flush_cache,
        }
        if load_format is not None:
            payload["load_format"] = load_format
        if weight_version is not None:
            payload["weight_version"] = weight_version
        self.post("/update_weights_from_distributed", payload)

    def update_weights_from_tensor(
        self,
        *,
        serialized_named_tensors: list[str],
        load_format: str | None,
        weight_version: str | None,
        flush_cache: bool,
    ) -> None:
        payload: dict[str, Any] = {
            "serialized_named_tensors": serialized_named_tensors,
            "flush_cache": flush_cache,
        }
        if load_format is not None:
            payload["load_format"] = load_format
        if weight_version is not None:
            payload["weight_version"] = weight_version
        self.post("/update_weights_from_tensor", payload)

    def update_weights_from_disk(self, *, model_path: str, weight_version: str | None) -> None:
        payload: dict[str, Any] = {"model_path": model_path}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        self.post("/update_weights_from_disk", payload)

    # ---- reading weights back ---------------------------------------------------------------------------
    def get_weights_checksum(self, names: list[str] | None = None) -> dict[str, str | None]:
        body = self.post("/get_weights_checksum", {"names": names})
        return dict(body.get("checksums", {}))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any:
        try:
            return self.post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})
        except EngineCallError as exc:
            if "HTTP 4" in str(exc):
                return None  # the engine does not know this name
            raise
