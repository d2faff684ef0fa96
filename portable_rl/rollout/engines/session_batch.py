"""``POST /session_batch`` of portable_rl's CPU engine server: several weight-update session calls, one request.

A weight sync opens each engine's session with pause -> flush -> begin and closes it with end -> resume ->
version read-back, one HTTP round trip per call (1-2 ms each on a small CPU host, several times the work the
engine does for them). This endpoint takes such a sequence at once and answers every call's outcome.

Contract
--------
* ``install(app)`` adds the route to the FastAPI ``app``. Body: ``{"calls": [{"method": "POST", "path":
  "/pause_generation", "body": {...}}, ...], "stop_on_error": true}``. Only the session endpoints
  (``protocol.client.SESSION_CALLS``' paths, also listed in the server's ``/server_info`` under
  ``session_batch``) may be called: no generation, no nested batch.
* Each call runs through ``app`` itself, in-process: the same middleware (auth), routing and handler the call
  would meet had it arrived alone, so its effect and answer are those of the lone request. Calls run in order,
  each once the previous one answered. The caller's ``Authorization`` header goes with each call.
* Answer: ``{"success": true, "results": [{"status": int, "body": JSON or text}, ...]}``, one entry per call
  that ran; with ``stop_on_error`` (the default) the batch stops after the first call that failed (HTTP status
  >= 400 or a JSON ``success: false``), as a client sending them one by one would.
* A malformed batch (no list of calls, an unknown path or method) answers 400 and runs none of them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from portable_rl.protocol.client import SESSION_BATCH_PATH, SESSION_CALLS

# What a batch may call: the session endpoints, each with the method the client sends it with.
ALLOWED: frozenset[tuple[str, str]] = frozenset(SESSION_CALLS.values())
PATHS: list[str] = sorted({path for _, path in ALLOWED})


def install(app: FastAPI) -> None:
    @app.post(SESSION_BATCH_PATH)
    async def session_batch(request: Request):
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = None
        calls = body.get("calls") if isinstance(body, dict) else None
        problem = _problem(calls)
        if problem is not None:
            return JSONResponse({"error": {"message": f"session_batch: {problem}"}}, status_code=400)
        stop_on_error = bool(body.get("stop_on_error", True))
        auth = [(k, v) for k, v in request.scope["headers"] if k == b"authorization"]
        results = []
        for call in calls:
            status, answer = await _call(app, call["method"], call["path"], call.get("body"), auth)
            results.append({"status": status, "body": answer})
            failed = status >= 400 or (isinstance(answer, dict) and answer.get("success") is False)
            if failed and stop_on_error:
                break
        return {"success": True, "results": results}


def _problem(calls: Any) -> str | None:
    if not isinstance(calls, list) or not calls:
        return "'calls' must be a non-empty list of {method, path, body}"
    for call in calls:
        if not isinstance(call, dict) or (call.get("method"), call.get("path")) not in ALLOWED:
            shown = f"{call.get('method')} {call.get('path')}" if isinstance(call, dict) else repr(call)
            return (
                f"{shown} is not a session call; allowed: {', '.join(f'{m} {p}' for m, p in sorted(ALLOWED))}"
            )
    return None


async def _call(
    app: FastAPI, method: str, path: str, payload: Any, headers: list[tuple[bytes, bytes]]
) -> tuple[int, Any]:
    """One request through ``app`` in-process: (status, decoded body)."""
    data = b"" if payload is None else json.dumps(payload).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            *headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ],
        "client": None,
        "server": None,
    }
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            await asyncio.Future()  # a sub-request never disconnects; whoever listens is cancelled instead
        delivered = True
        return {"type": "http.request", "body": data, "more_body": False}

    status, chunks, ctype = 500, [], b""

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, ctype
        if message["type"] == "http.response.start":
            status = int(message["status"])
            ctype = dict(message.get("headers") or []).get(b"content-type", b"")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw = b"".join(chunks)
    if b"json" in ctype and raw:
        try:
            return status, json.loads(raw)
        except ValueError:
            pass
    return status, raw.decode("utf-8", "replace")
