"""A small HTTP reward server: ``python -m portable_rl.rollout.reward_server --reward math [--port N]``.

It scores with any reward ``portable_rl.rollout.rewards.load_reward_fn`` loads (``math``,
``portable_rl.rollout.rewards:even_token_fraction``, or a user ``package.module:function``), so a recipe can
move its reward out of the training job — onto another machine, or in front of a judge model — with
``rollout.reward: remote``.

Contract
--------
* ``POST /score`` with JSON ``{"response": str, "label": any, "prompt_tokens": [int], "response_tokens":
  [int], "metadata": {}}`` (what ``RemoteReward`` sends) answers ``{"reward": <float>}``. The reward function
  receives a ``Sample`` rebuilt from the token ids, so token rules score as they would in the job.
* A body that is not that JSON answers 400; a reward function that raises, or returns something that is not a
  finite number, answers 422 with the error (not retried by the client: it would fail again).
* ``--max-in-flight N`` sheds load: a request beyond N scored at once answers 503 with ``Retry-After`` (the
  client backs off and retries). ``GET /health`` answers 200; ``GET /stats`` counts requests, scored, rejected,
  errors and the most scored at once (``peak_in_flight``).
* ``--api-key`` (or ``PORTABLE_RL_REWARD_API_KEY``): ``/score`` and ``/stats`` then need
  ``Authorization: Bearer KEY``. Binds ``127.0.0.1`` unless ``--host`` says otherwise.
* Once listening it prints one line ``reward server listening on http://HOST:PORT/score`` (``--port 0``: a
  free port the kernel picks), and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from portable_rl.data.types import Sample
from portable_rl.rollout.rewards import RewardLoadError, call_reward, load_reward_fn

API_KEY_ENV = "PORTABLE_RL_REWARD_API_KEY"
MAX_BODY = 64 * 1024**2


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], reward_fn: Any, max_in_flight: int, api_key: str | None):
        super().__init__(address, _Handler)
        self.reward_fn = reward_fn
        self.max_in_flight = max_in_flight
        self.api_key = api_key
        self.lock = threading.Lock()
        self.stats = {
            "requests": 0,
            "scored": 0,
            "rejected": 0,
            "errors": 0,
            "in_flight": 0,
            "peak_in_flight": 0,
        }

    def enter(self) -> bool:
        """Count a scoring request in; False when ``max_in_flight`` are being scored already."""
        with self.lock:
            self.stats["requests"] += 1
            if self.max_in_flight and self.stats["in_flight"] >= self.max_in_flight:
                self.stats["rejected"] += 1
                return False
            self.stats["in_flight"] += 1
            self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], self.stats["in_flight"])
            return True

    def leave(self, outcome: str) -> None:
        with self.lock:
            self.stats["in_flight"] -= 1
            self.stats[outcome] += 1


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass  # one line per request would drown the job's own output

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        key = self.server.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong Authorization: Bearer <api key>"})
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            self._send(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/stats":
            if self._authorised():
                with self.server.lock:
                    stats = dict(self.server.stats)
                self._send(HTTPStatus.OK, stats)
        else:
            self._send(
                HTTPStatus.NOT_FOUND, {"error": f"no {self.path}; POST /score, GET /health, GET /stats"}
            )

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, MAX_BODY))
        if self.path != "/score":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no {self.path}; POST /score"})
            return
        if not self._authorised():
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("response"), str):
                raise ValueError('the body must be a JSON object with a string "response"')
            sample = Sample(
                prompt_index=0,
                group_id=0,
                prompt_tokens=[int(t) for t in body.get("prompt_tokens") or []],
                response_tokens=[int(t) for t in body.get("response_tokens") or []],
                response_text=body["response"],
                label=body.get("label"),
                metadata=dict(body.get("metadata") or {}),
            )
        except (ValueError, TypeError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {exc}"})
            return
        if not self.server.enter():
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "busy; retry"}, {"Retry-After": "1"})
            return
        outcome = "errors"
        try:
            value = asyncio.run(
                call_reward(self.server.reward_fn, sample.response_text, sample.label, sample)
            )
            if not math.isfinite(value):
                raise ValueError(f"the reward function returned {value!r}, which is not a finite number")
            outcome = "scored"
        except Exception as exc:  # noqa: BLE001 - a reward function's failure is answered, not fatal to the server
            self._send(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": f"{type(exc).__name__}: {exc}"})
            return
        finally:
            self.server.leave(outcome)
        self._send(HTTPStatus.OK, {"reward": value})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m portable_rl.rollout.reward_server",
        description=(
            'Serve a reward over HTTP for rollout.reward=remote: POST /score answers {"reward": x}; '
            "GET /health, GET /stats."
        ),
    )
    p.add_argument(
        "--reward",
        default="math",
        help="'math' or a reward function 'package.module:function' (e.g. "
        "portable_rl.rollout.rewards:even_token_fraction); default: math",
    )
    p.add_argument(
        "--reward-options",
        default="{}",
        help="JSON object of the reward's options, e.g. '{\"format_bonus\": 0.1}'",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one; default 8000)")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=0,
        help="score at most this many requests at once; more answer 503 with Retry-After (0: no limit)",
    )
    p.add_argument(
        "--api-key", default=None, help=f"require Authorization: Bearer KEY (or set {API_KEY_ENV})"
    )
    return p


def make_server(args: argparse.Namespace) -> RewardServer:
    """The server ``args`` describe (not yet serving); ``SystemExit(2)`` with one line on bad arguments."""
    try:
        options = json.loads(args.reward_options)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise SystemExit(
            f"reward server: --reward-options {args.reward_options!r} is not a JSON object ({exc})"
        ) from None
    if args.reward == "remote":
        raise SystemExit(
            "reward server: --reward remote would ask itself; name a local reward ('math' or a path)"
        )
    if args.max_in_flight < 0 or not 0 <= args.port < 65536:
        raise SystemExit("reward server: --max-in-flight must be >= 0 and --port in 0..65535")
    try:
        fn = load_reward_fn(args.reward, **options)
    except (RewardLoadError, TypeError, ValueError) as exc:
        raise SystemExit(f"reward server: {exc}") from None
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        return RewardServer((args.host, args.port), fn, args.max_in_flight, api_key)
    except OSError as exc:
        raise SystemExit(
            f"reward server: cannot listen on {args.host}:{args.port} ({exc}); choose another --port"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        server = make_server(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    host, port = server.server_address[:2]
    print(f"reward server listening on http://{host}:{port}/score", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
