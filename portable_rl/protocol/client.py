"""Async HTTP client of SGLang's native API; the same calls drive the real SGLang server, portable_rl's CPU engine
server and the sglang-router in front of either.

Contract
--------
* ``EngineClient(base_url, api_key=None, timeout_s=...)``: every call sends ``Authorization: Bearer <api_key>``
  when a key is set (SGLang's ``--api-key``; the router passes it through). Request fields and endpoint names
  are SGLang 0.5.23's; there is no branch on what serves the URL.
* A transport failure, an HTTP status >= 400, or a JSON reply with ``success: false`` raises ``EngineError``
  carrying the URL, the status and the server's message.
* ``generate`` returns a ``GenerateOutput``: ``output_ids``, per-token ``output_logprobs`` (from
  ``meta_info.output_token_logprobs``, [logprob, token_id, text] triples, checked against ``output_ids``),
  the finish reason (``"stop" | "length" | "abort"``), and the ``weight_version`` that produced it.
* The weight version is read from ``/model_info`` (served by SGLang and the CPU engine alike).
* ``session_batch(steps)``: several weight-update session calls (names in ``SESSION_CALLS``, the same requests
  the one-call methods send) in one round trip, to an engine whose ``/server_info`` lists their paths under
  ``session_batch`` (portable_rl's CPU engine; SGLang has no such endpoint, so it only ever gets one request per
  call). The engine runs them in order, each exactly as if it had arrived alone, and answers each call's status
  and body; with ``stop_on_error`` it stops after the first that failed. Each call's result is then judged by
  the same rule as a lone request: its value, or the ``EngineError`` that request would have raised.
* The client owns one aiohttp session per event loop; ``await client.close()`` (or ``async with``) releases it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DEFAULT_GROUP = "weight_update_group"

# The calls of a weight-update session: (method, path). Their payloads: {"mode": ...} for the pause,
# {"weight_version": ...} for the commit of resident weights (portable_rl's CPU engine), else {} for a POST and
# none for a GET (``session_request``).
SESSION_CALLS: dict[str, tuple[str, str]] = {
    "pause_generation": ("POST", "/pause_generation"),
    "flush_cache": ("POST", "/flush_cache"),
    "begin_weight_update": ("POST", "/begin_weight_update"),
    "end_weight_update": ("POST", "/end_weight_update"),
    "continue_generation": ("POST", "/continue_generation"),
    "get_weight_version": ("GET", "/model_info"),
    "commit_resident_weights": ("POST", "/commit_resident_weights"),
}
# portable_rl's CPU engine: runs several of them in one request (see the module docstring).
SESSION_BATCH_PATH = "/session_batch"


class EngineError(RuntimeError):
    """An engine (or router) call failed; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class GenerateOutput:
    rid: str
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    finish_detail: dict[str, Any] = field(default_factory=dict)
    weight_version: str | None = None
    prompt_tokens: int = 0
    text: str = ""

    @classmethod
    def from_response(cls, body: dict[str, Any], url: str = "") -> GenerateOutput:
        meta = body.get("meta_info") or {}
        ids = list(body.get("output_ids") or [])
        triples = meta.get("output_token_logprobs")
        logprobs: list[float] = []
        if triples is not None:
            logprobs = [float(t[0]) for t in triples]
            seen = [int(t[1]) for t in triples]
            if seen != ids:
                raise EngineError(
                    f"{url}: output_token_logprobs name tokens {seen[:8]}... but output_ids are {ids[:8]}..."
                )
        finish = meta.get("finish_reason") or {}
        if isinstance(finish, str):
            finish = {"type": finish}
        version = meta.get("weight_version")
        return cls(
            rid=str(meta.get("id", "")),
            output_ids=ids,
            output_logprobs=logprobs,
            finish_reason=str(finish.get("type", "abort")),
            finish_detail=dict(finish),
            weight_version=None if version is None else str(version),
            prompt_tokens=int(meta.get("prompt_tokens") or 0),
            text=body.get("text") or "",
        )


class EngineClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 3600.0,
        max_connections: int = 256,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"engine URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"EngineClient({self.base_url})"

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ---- transport --------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers=self._headers(),
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        if (
            self._session is not None
            and not self._session.closed
            and self._loop is asyncio.get_running_loop()
        ):
            await self._session.close()
        self._session = None

    async def request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """One call; returns the decoded JSON (or text) body, raises ``EngineError`` as the module docstring says."""
        url = f"{self.base_url}{path}"
        session = await self._get_session()
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        try:
            async with session.request(method, url, json=payload, timeout=timeout) as resp:
                raw = await resp.read()
                status = resp.status
                ctype = resp.headers.get("content-type", "")
        except asyncio.TimeoutError as exc:
            raise EngineError(f"{url}: no answer within {timeout_s or self.timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"{url}: {type(exc).__name__}: {exc}") from exc
        body: Any = raw.decode("utf-8", "replace")
        if "json" in ctype and raw:
            import json

            try:
                body = json.loads(raw)
            except ValueError:
                pass
        return checked(url, status, body)

    async def post(
        self, path: str, payload: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        return await self.request("POST", path, payload or {}, timeout_s)

    async def get(self, path: str, timeout_s: float | None = None) -> Any:
        return await self.request("GET", path, None, timeout_s)

    # ---- generation -------------------------------------------------------------------------------------
    async def generate(
        self,
        input_ids: list[int],
        sampling_params: dict[str, Any],
        *,
        return_logprob: bool = True,
        rid: str | None = None,
    ) -> GenerateOutput:
        payload: dict[str, Any] = {
            "input_ids": list(input_ids),
            "sampling_params": dict(sampling_params),
            "return_logprob": return_logprob,
        }
        if rid is not None:
            payload["rid"] = rid
        body = await self.post("/generate", payload)
        if not isinstance(body, dict):
            raise EngineError(f"{self.base_url}/generate: expected a JSON object, got {str(body)[:200]}")
        return GenerateOutput.from_response(body, f"{self.base_url}/generate")

    async def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        await self.post("/abort_request", {"rid": rid, "abort_all": abort_all})

    async def pause_generation(self, mode: str = "abort") -> None:
        await self.request(*session_request("pause_generation", mode))

    async def continue_generation(self) -> None:
        await self.request(*session_request("continue_generation"))

    async def flush_cache(self) -> None:
        await self.request(*session_request("flush_cache"))

    # ---- memory saver (SGLang started with --enable-memory-saver) ------------------------------------------
    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free the engine's device memory for ``tags`` ("weights", "kv_cache", "cuda_graph"; None: all)."""
        await self.post("/release_memory_occupation", {"tags": tags})

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self.post("/resume_memory_occupation", {"tags": tags})

    # ---- health and info --------------------------------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> bool:
        try:
            await self.get("/health", timeout_s=timeout_s)
        except EngineError:
            return False
        return True

    async def health_generate(self, timeout_s: float = 30.0) -> bool:
        try:
            await self.get("/health_generate", timeout_s=timeout_s)
        except EngineError:
            return False
        return True

    async def get_model_info(self) -> dict[str, Any]:
        return await self.get("/model_info")

    async def get_server_info(self) -> dict[str, Any]:
        return await self.get("/server_info")

    async def get_weight_version(self) -> str | None:
        return _weight_version(await self.request(*session_request("get_weight_version")))

    async def update_weight_version(self, new_version: str, abort_all_requests: bool = True) -> None:
        await self.post(
            "/update_weight_version",
            {"new_version": str(new_version), "abort_all_requests": abort_all_requests},
        )

    # ---- weight updates ---------------------------------------------------------------------------------
    async def begin_weight_update(self) -> None:
        await self.request(*session_request("begin_weight_update"))

    async def end_weight_update(self) -> None:
        await self.request(*session_request("end_weight_update"))

    async def session_batch(
        self,
        steps: list[str],
        pause_mode: str = "abort",
        stop_on_error: bool = True,
        weight_version: str | None = None,
    ) -> list[Any]:
        """Run session ``steps`` in one request (see the module docstring): per step that ran, its value (the
        version for ``get_weight_version``, else None) or its ``EngineError``. Raises ``EngineError`` itself when
        the request as a whole fails."""
        calls = []
        for step in steps:
            method, path, payload = session_request(step, pause_mode, weight_version)
            calls.append({"method": method, "path": path, "body": payload})
        body = await self.post(SESSION_BATCH_PATH, {"calls": calls, "stop_on_error": stop_on_error})
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) > len(steps):
            raise EngineError(f"{self.base_url}{SESSION_BATCH_PATH}: malformed answer {str(body)[:200]}")
        out: list[Any] = []
        for step, call, result in zip(steps, calls, results, strict=False):
            try:
                if not isinstance(result, dict):
                    raise EngineError(f"{self.base_url}{call['path']}: malformed answer {str(result)[:200]}")
                value = checked(f"{self.base_url}{call['path']}", int(result["status"]), result.get("body"))
                out.append(_weight_version(value) if step == "get_weight_version" else None)
            except EngineError as exc:
                out.append(exc)
        return out

    async def init_weights_update_group(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        group_name: str = DEFAULT_GROUP,
    ) -> None:
        await self.post(
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

    async def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP) -> None:
        await self.post("/destroy_weights_update_group", {"group_name": group_name})

    async def update_weights_from_distributed(
        self,
        *,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str = DEFAULT_GROUP,
        load_format: str | None = None,
        weight_version: str | None = None,
        flush_cache: bool = True,
    ) -> None:
        payload = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name}
        await self.post(
            "/update_weights_from_distributed",
            _with_options(payload, load_format, weight_version, flush_cache),
        )

    async def update_weights_from_tensor(
        self,
        *,
        serialized_named_tensors: list[str],
        load_format: str | None = None,
        weight_version: str | None = None,
        flush_cache: bool = True,
    ) -> None:
        payload = {"serialized_named_tensors": serialized_named_tensors}
        await self.post(
            "/update_weights_from_tensor", _with_options(payload, load_format, weight_version, flush_cache)
        )

    async def update_weights_from_disk(
        self, model_path: str, *, weight_version: str | None = None, load_format: str | None = None
    ) -> None:
        payload: dict[str, Any] = {"model_path": model_path}
        if load_format is not None:
            payload["load_format"] = load_format
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        await self.post("/update_weights_from_disk", payload)


def session_request(
    step: str, pause_mode: str = "abort", weight_version: str | None = None
) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, payload) of one session call (``SESSION_CALLS``)."""
    method, path = SESSION_CALLS[step]
    if step == "pause_generation":
        return method, path, {"mode": pause_mode}
    if step == "commit_resident_weights":
        return method, path, {"weight_version": weight_version}
    return method, path, ({} if method == "POST" else None)


def checked(url: str, status: int, body: Any) -> Any:
    """``body`` of an answer with ``status``, or the ``EngineError`` a failed one raises (HTTP >= 400 or a JSON
    ``success: false``)."""
    if status >= 400:
        raise EngineError(f"{url}: HTTP {status}: {_message(body)[:500]}", status)
    if isinstance(body, dict) and body.get("success") is False:
        raise EngineError(f"{url}: {_message(body)[:500]}", status)
    return body


def _weight_version(model_info: Any) -> str | None:
    version = model_info.get("weight_version") if isinstance(model_info, dict) else None
    return None if version is None else str(version)


def _with_options(
    payload: dict[str, Any], load_format: str | None, weight_version: str | None, flush_cache: bool
) -> dict[str, Any]:
    payload["flush_cache"] = flush_cache
    if load_format is not None:
        payload["load_format"] = load_format
    if weight_version is not None:
        payload["weight_version"] = str(weight_version)
    return payload


def _message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(body.get("message") or err or body.get("detail") or body)
    return str(body).strip()
