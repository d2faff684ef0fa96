"""A scripted engine on loopback for rollout tests: answers ``/generate`` in SGLang's response shape.

``StubEngine(script)``: ``script(payload) -> (output_ids, finish_type)`` decides each answer (default: three
tokens ``[201, 202, 203]`` cut to ``max_new_tokens``; "length" when cut, else "stop"). Log-probs are
``-0.01 * token id``, so a test can tell which engine call produced which token. ``version`` is the weight
version reported. Prompts whose first token is in ``hold`` wait until an ``/abort_request`` arrives and then
answer "abort" with the first ``partial_tokens`` of their output (what SGLang returns for an aborted request);
with ``hold_sample`` only that sample index of theirs waits.
``requests`` records every ``/generate`` payload.

``LoopbackEngine`` is the HTTP part alone (``/generate`` answered by ``generate``, ``/abort_request`` sets
``released``) for tests that script other answers; ``sglang_answer`` builds SGLang's ``/generate`` response.
``Prompts`` is a resumable prompt stream (prompt i is ``[TOKEN0 + i, 5, 6]``) and ``engine_group`` the real
``EngineGroup`` over a stand-in engine, for the rollout tests that drive one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

from portable_rl.config.rollout import RolloutConfig
from portable_rl.data.prompts import PromptItem
from portable_rl.orchestration.engine_group import EngineGroup

TOKEN0 = 100  # prompt i is [TOKEN0 + i, 5, 6]: an engine reads the prompt index from the first token
TOKENIZER = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))

Script = Callable[[dict[str, Any]], tuple[list[int], str]]


def default_script(payload: dict[str, Any]) -> tuple[list[int], str]:
    limit = payload["sampling_params"]["max_new_tokens"]
    ids = [201, 202, 203][:limit]
    return ids, "length" if len(ids) == limit else "stop"


class LoopbackEngine:
    """An HTTP server on loopback: ``/generate`` answers ``self.generate(payload)``; ``/abort_request`` sets
    ``released``."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                payload = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
                if self.path == "/abort_request":
                    engine.released.set()
                    self._reply({})
                elif self.path == "/generate":
                    self._reply(engine.generate(payload))
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def sglang_answer(
    rid: str, ids: list[int], finish: str, logprob: Callable[[int], float], version: str
) -> dict:
    """SGLang's ``/generate`` response: ``ids`` with ``logprob(token)`` each, under weight ``version``."""
    return {
        "output_ids": ids,
        "meta_info": {
            "id": rid,
            "finish_reason": {"type": finish},
            "output_token_logprobs": [[logprob(t), t, None] for t in ids],
            "weight_version": version,
        },
    }


class StubEngine(LoopbackEngine):
    def __init__(self, script: Script = default_script) -> None:
        super().__init__()
        self.script = script
        self.version = "0"
        self.hold: set[int] = set()
        self.hold_sample: int | None = None  # hold only this sample index of the held prompts
        self.partial_tokens = 2
        self.requests: list[dict[str, Any]] = []

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests.append(payload)
        ids, finish = self.script(payload)
        sample = payload["rid"].split("-")[2]
        held = self.hold_sample is None or sample == str(self.hold_sample)
        if payload["input_ids"][0] in self.hold and held:
            self.released.wait(timeout=60)
            ids, finish = ids[: self.partial_tokens], "abort"
        return sglang_answer(payload["rid"], ids, finish, lambda t: -0.01 * t, self.version)


class Prompts:
    """A prompt stream over an endless list of distinct prompts, with a resumable position."""

    def __init__(self) -> None:
        self.next = 0

    def next_batch(self, n: int) -> list[PromptItem]:
        items = [PromptItem(i, 0, [TOKEN0 + i, 5, 6], f"p{i}") for i in range(self.next, self.next + n)]
        self.next += n
        return items

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next = state["next"]


def engine_group(engine: LoopbackEngine, **rollout: Any) -> EngineGroup:
    """The real ``EngineGroup`` with ``RolloutConfig(**rollout)`` over ``engine`` (router and only engine)."""
    cfg = RolloutConfig(health_check_interval_s=0, **rollout)  # the stand-in engine is not a Ray actor
    return EngineGroup.on_running_engines(cfg, router_url=engine.url, engine_urls=[engine.url])
