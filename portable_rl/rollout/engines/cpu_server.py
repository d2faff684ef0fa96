"""portable_rl's CPU rollout engine server: the subset of SGLang's native HTTP API that portable_rl uses.

Run: ``python -m portable_rl.rollout.engines.cpu_server --model-path DIR --port P [--host H] [--api-key K]``.

Endpoints, request fields and response shapes follow SGLang 0.5.23, so one client drives both servers:
  generation  POST /generate (input_ids or text, single or batch; sampling_params; return_logprob -> meta_info
              output_token_logprobs as [logprob, token_id, text|null]; finish_reason {"type": "stop"|"length"|
              "abort", ...}; weight_version), POST /abort_request {rid, abort_all} (rid prefix match),
              POST /pause_generation {mode: abort|retract|in_place}, POST /continue_generation
  health      GET /health, /health_generate (one greedy token), /ready
  info        GET /model_info (+ deprecated /get_model_info) with weight_version, GET /server_info
              (+ /get_server_info) with tp_size, weight_update_load_formats, weights_checksum and
              weight_update_prefers_per_tensor (portable_rl: per-tensor distributed updates are the fast form)
  weights     POST /init_weights_update_group {master_address, master_port, rank_offset, world_size,
              group_name, backend}, /destroy_weights_update_group, /update_weights_from_distributed
              {names, dtypes, shapes, group_name, load_format, weight_version, flush_cache},
              /update_weights_from_tensor {serialized_named_tensors, load_format, weight_version},
              /update_weights_from_disk {model_path, weight_version}, /begin_weight_update,
              /end_weight_update, /update_weight_version {new_version}, GET|POST /flush_cache,
              POST /session_batch (portable_rl: several session calls in one request, see session_batch.py),
              POST /resident_weights and /commit_resident_weights {weight_version} (portable_rl, below)
  read-back   POST /get_weights_checksum {names} (portable_rl), GET|POST /get_weights_by_name {name,
              truncate_size}, GET /get_weight_version (portable_rl; SGLang reports it in /model_info only)
As in SGLang 0.5.23, tensor and distributed updates must sit between /begin_weight_update and
/end_weight_update, and an update that arrives while requests run (generation not paused) waits for them.

Tensor updates use the payload of ``portable_rl.protocol.tensor_codec``: per TP rank a base64
``ForkingPickler`` pickle of handles, on CPU named shared-memory segments (torch's ``file_system`` sharing
strategy), opened here with an allow-list unpickler; the engine copies the tensors into its weights before it
answers. It keeps the last update's segment mapped until /end_weight_update (a sender that stages every bucket in
one segment then pays the mapping once per session); the sender may free its memory after that.

Resident weights (portable_rl, ``resident_weights.py``; ``/server_info`` lists ``resident_weights: true``):
``/resident_weights`` moves the served weights into one shared-memory segment and answers its name and layout;
a co-located trainer then writes the weights in place during an update session and calls
``/commit_resident_weights`` (inside the session, like a tensor update) to set the weight version.

Auth: with ``--api-key`` (or env ``PORTABLE_RL_ENGINE_TOKEN``, which keeps the key off the command line) every
endpoint except /health, /health_generate, /ready and /metrics needs ``Authorization: Bearer <key>`` and
answers 401 otherwise (SGLang's ``--api-key`` rule).
The server binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from portable_rl.protocol.buckets import Staging
from portable_rl.protocol.process_group import HOST_BACKEND
from portable_rl.rollout.engines import session_batch
from portable_rl.rollout.engines.cpu_engine import CpuEngine, EngineConfig, GenRequest, GenResult
from portable_rl.rollout.engines.engine_weights import (
    checksums,
    load_named_tensors,
    read_checkpoint_dir,
    receive_distributed,
    weight_by_name,
)
from portable_rl.rollout.engines.resident_weights import ResidentWeights, make_resident
from portable_rl.rollout.engines.sampling import InvalidRequest, SamplingParams

TOKEN_ENV = "PORTABLE_RL_ENGINE_TOKEN"
# Probes stay open (as in SGLang); matched exactly, so no other route can hide behind a prefix.
OPEN_PATHS = frozenset({"/health", "/health_generate", "/ready", "/metrics"})
LOAD_FORMATS = ["direct", "flattened_bucket"]
log = logging.getLogger(__name__)


def _error(message: str, code: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=code)


def _outcome(success: bool, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"success": success, "message": message, **extra}, status_code=200 if success else 400
    )


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = await request.json()
    except ValueError as exc:
        raise InvalidRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


class _BearerAuth:
    """ASGI middleware: every path but OPEN_PATHS needs ``Authorization: Bearer <key>`` when a key is set."""

    def __init__(self, app: Any, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        key = self.server._key_bytes
        if scope["type"] == "http" and self.server.api_key and scope["path"] not in OPEN_PATHS:
            header = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    header = value
                    break
            scheme, _, token = header.partition(b" ")
            # Bytes, not str: compare_digest refuses non-ASCII strings, which a client controls.
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token, key):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _version_str(value: Any) -> str | None:
    return None if value is None else str(value)


class Server:
    """The HTTP face of one ``CpuEngine`` (see the module docstring)."""

    def __init__(self, engine: CpuEngine, api_key: str | None, weight_update_timeout_s: float = 600.0):
        self.engine = engine
        self.api_key = api_key or None
        self._key_bytes = (api_key or "").encode("utf-8", "surrogateescape")
        self.timeout_s = weight_update_timeout_s
        # Flattened buckets land here, reused across buckets and syncs (touched on the engine thread only).
        self.receive_buffer = Staging()
        # The shared tensors of the session's last tensor update (engine thread only). Held until the session
        # ends so that the next bucket, staged by the sender in the same segment, finds it still mapped (torch
        # caches open segments by name): no new mapping and no page faults on every byte per bucket.
        self.mapped_inputs: Any = None
        # The shared-memory segment the weights live in once a co-located trainer asked (resident_weights.py).
        self.resident: ResidentWeights | None = None
        self.app = FastAPI(openapi_url=None)
        self._install_auth()
        self._routes()
        session_batch.install(self.app)

    # ---- auth -------------------------------------------------------------------------------------------
    def _install_auth(self) -> None:
        # A plain ASGI wrapper rather than FastAPI's @middleware("http"): that one runs every request through
        # an extra task and memory streams, which costs a measurable share of a weight-sync call's round trip.
        self.app.add_middleware(_BearerAuth, server=self)

    # ---- helpers ----------------------------------------------------------------------------------------
    async def _on_engine(self, fn, needs_idle: bool = False) -> Any:
        return await asyncio.wrap_future(self.engine.call(fn, needs_idle=needs_idle))

    def _set_version(self, version: Any) -> None:
        if version is not None:
            self.engine.weight_version = str(version)

    def _format(self, res: GenResult, params: SamplingParams, body: dict[str, Any]) -> dict[str, Any]:
        tok = self.engine.tokenizer
        text = tok.decode(res.output_ids, skip_special_tokens=params.skip_special_tokens)
        matched = res.finish_reason.get("matched")
        if isinstance(matched, str) and not params.no_stop_trim and matched in text:
            text = text[: text.index(matched)]
        meta: dict[str, Any] = {
            "id": res.rid,
            "finish_reason": res.finish_reason,
            "prompt_tokens": res.prompt_tokens,
            "completion_tokens": len(res.output_ids),
            "cached_tokens": 0,
            "weight_version": res.weight_version,
            "e2e_latency": res.latency_s,
        }
        if body.get("return_logprob"):
            with_text = bool(body.get("return_text_in_logprobs"))
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [
                [lp, t, tok.decode([t]) if with_text else None]
                for lp, t in zip(res.logprobs, res.output_ids, strict=True)
            ]
            meta["output_token_logprobs_length"] = len(res.output_ids)
        return {"text": text, "output_ids": res.output_ids, "meta_info": meta}

    def _requests(self, body: dict[str, Any]) -> tuple[list[GenRequest], bool]:
        if body.get("stream"):
            raise InvalidRequest("stream=true is not supported by the CPU engine; send stream=false")
        ids, text = body.get("input_ids"), body.get("text")
        if (ids is None) == (text is None):
            raise InvalidRequest("send exactly one of input_ids or text")
        if ids is not None:
            single = bool(ids) and all(isinstance(t, int) for t in ids)
            prompts = [ids] if single else ids
            if not prompts or not all(
                isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                for p in prompts
            ):
                raise InvalidRequest(
                    "input_ids must be a non-empty list of token ids (or a list of such lists)"
                )
        else:
            single = isinstance(text, str)
            texts = [text] if single else text
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise InvalidRequest("text must be a string or a list of strings")
            prompts = [self.engine.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        vocab = self.engine.model.config.vocab_size
        context = self.engine.context_length
        for p in prompts:
            if len(p) >= context:  # SGLang's check and words: the engine never runs such a request
                raise InvalidRequest(
                    f"The input ({len(p)} tokens) is longer than the model's context length ({context} tokens)."
                )
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"input_ids contain token {bad[0]} outside the vocabulary [0, {vocab})")
        raw_params = body.get("sampling_params")
        params_list = raw_params if isinstance(raw_params, list) else [raw_params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequest(f"{len(params_list)} sampling_params for {len(prompts)} prompts")
        rid = body.get("rid")
        if isinstance(rid, list):
            if len(rid) != len(prompts):
                raise InvalidRequest(f"{len(rid)} rids for {len(prompts)} prompts")
            rids = [str(r) for r in rid]
        elif rid is not None:
            rids = [str(rid)] if single else [f"{rid}_{i}" for i in range(len(prompts))]
        else:
            rids = [uuid.uuid4().hex for _ in prompts]
        reqs = [
            GenRequest(rid=r, input_ids=list(p), params=SamplingParams.from_request(sp))
            for r, p, sp in zip(rids, prompts, params_list, strict=True)
        ]
        return reqs, single

    # ---- routes -----------------------------------------------------------------------------------------
    def _routes(self) -> None:  # noqa: C901 - one flat list of small endpoint handlers
        app, engine = self.app, self.engine

        @app.exception_handler(InvalidRequest)
        async def invalid(_: Request, exc: InvalidRequest):
            return _error(str(exc))

        @app.api_route("/generate", methods=["POST", "PUT"])
        async def generate(request: Request):
            body = await _body(request)
            reqs, single = self._requests(body)
            futures = [asyncio.wrap_future(engine.submit(r)) for r in reqs]
            pending = set(futures)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=1.0)
                if pending and await request.is_disconnected():
                    for r in reqs:  # the client went away: free the engine (SGLang aborts them too)
                        engine.call(lambda e, rid=r.rid: e.abort(rid=rid))
                    return Response(status_code=499)
            try:
                results = [f.result() for f in futures]
            except RuntimeError as exc:
                return _error(str(exc), 500)
            out = [self._format(res, r.params, body) for res, r in zip(results, reqs, strict=True)]
            return JSONResponse(out[0] if single else out)

        @app.get("/health")
        @app.get("/ready")
        async def health():
            return Response(status_code=200 if engine.alive else 503)

        @app.get("/health_generate")
        async def health_generate():
            if not engine.alive:
                return Response(status_code=503)
            load = engine.load()
            if engine.paused or load["running"] or load["waiting"]:
                # Busy engines are healthy, as in SGLang: a probe queued behind a long prefill on a loaded
                # machine could otherwise time out and get a working engine replaced.
                return Response(status_code=200)
            probe = GenRequest(
                rid=f"HEALTH_CHECK_{uuid.uuid4().hex}",
                input_ids=[0],
                params=SamplingParams.from_request({"max_new_tokens": 1, "temperature": 0.0}),
            )
            try:
                await asyncio.wait_for(asyncio.wrap_future(engine.submit(probe)), timeout=20)
            except (TimeoutError, RuntimeError):
                return Response(status_code=503)
            return Response(status_code=200)

        def model_info() -> dict[str, Any]:
            cfg = engine.model.config
            return {
                "model_path": engine.model_path,
                "tokenizer_path": engine.cfg.model_path,
                "is_generation": True,
                "weight_version": engine.weight_version,
                "model_type": getattr(cfg, "model_type", None),
                "architectures": getattr(cfg, "architectures", None),
            }

        app.get("/model_info")(lambda: model_info())
        app.get("/get_model_info")(lambda: model_info())

        def server_info() -> dict[str, Any]:
            from portable_rl import __version__

            return {
                "engine": "portable_rl-cpu",
                "version": __version__,
                "model_path": engine.model_path,
                "tp_size": 1,
                "dp_size": 1,
                "dtype": engine.cfg.dtype,
                "num_threads": engine.num_threads,
                "context_length": engine.context_length,
                "max_running_requests": engine.cfg.max_running_requests,
                "weight_update_load_formats": LOAD_FORMATS,
                # Per-tensor broadcasts land straight in the parameters; a flattened bucket costs a staging copy
                # on each side, so a client choosing the format ("auto") should send per tensor.
                "weight_update_prefers_per_tensor": True,
                # Its weights live in host memory: it joins a weight-update group only over gloo.
                "weight_update_backends": [HOST_BACKEND],
                "weights_checksum": True,
                # A co-located trainer may write straight into its weights (POST /resident_weights).
                "resident_weights": True,
                "session_batch": session_batch.PATHS,
                "internal_states": [{**engine.load(), "paused": engine.paused, "decode_steps": engine.steps}],
            }

        app.get("/server_info")(lambda: server_info())
        app.get("/get_server_info")(lambda: server_info())

        @app.get("/get_weight_version")
        async def get_weight_version():
            return {"weight_version": engine.weight_version}

        @app.post("/update_weight_version")
        async def update_weight_version(request: Request):
            body = await _body(request)
            if body.get("new_version") is None:
                raise InvalidRequest("update_weight_version needs new_version")
            if body.get("abort_all_requests", True):
                await self._on_engine(lambda e: e.abort(abort_all=True))
            self._set_version(body["new_version"])
            return {
                "success": True,
                "message": f"Weight version updated to {body['new_version']}",
                "new_version": str(body["new_version"]),
            }

        @app.api_route("/flush_cache", methods=["GET", "POST"])
        async def flush_cache():
            busy = await self._on_engine(lambda e: e.load()["running"])
            if busy:
                return Response("Flush cache failed: requests are still running.\n", status_code=400)
            return Response("Cache flushed.\n", status_code=200)

        @app.post("/pause_generation")
        async def pause_generation(request: Request):
            mode = (await _body(request)).get("mode", "abort")
            if mode not in ("abort", "retract", "in_place"):
                raise InvalidRequest(f"mode={mode!r} is not one of abort, retract, in_place")
            await self._on_engine(lambda e: e.pause(mode))
            return {"message": "Generation paused successfully.", "status": "ok"}

        @app.post("/continue_generation")
        async def continue_generation():
            await self._on_engine(lambda e: e.resume())
            return {"message": "Generation continued successfully.", "status": "ok"}

        @app.post("/abort_request")
        async def abort_request(request: Request):
            body = await _body(request)
            rid, abort_all = str(body.get("rid") or ""), bool(body.get("abort_all", False))
            if rid or abort_all:
                await self._on_engine(lambda e: e.abort(rid=rid, abort_all=abort_all))
            return Response(status_code=200)

        @app.post("/begin_weight_update")
        async def begin_weight_update():
            def begin(e: CpuEngine) -> tuple[bool, str]:
                if e.update_session_open:
                    return False, "a weight-update session is already open; call end_weight_update() first"
                e.update_session_open = True
                return True, "Success"

            return _outcome(*await self._on_engine(begin))

        @app.post("/end_weight_update")
        async def end_weight_update():
            def end(e: CpuEngine) -> tuple[bool, str]:
                if not e.update_session_open:
                    return False, "no weight-update session is open; call begin_weight_update() first"
                e.update_session_open = False
                self.mapped_inputs = None  # the sender may free its staging segment now
                return True, "Success"

            return _outcome(*await self._on_engine(end))

        @app.post("/init_weights_update_group")
        async def init_weights_update_group(request: Request):
            from portable_rl.errors import CollectiveTimeout
            from portable_rl.protocol.process_group import init_weight_update_group

            body = await _body(request)
            backend = str(body.get("backend", HOST_BACKEND))
            if backend != HOST_BACKEND:
                # Refused before the rendezvous, so the trainer gets this reason instead of a join timeout.
                return _outcome(
                    False,
                    f"Failed to init group: backend={backend!r}; this engine's weights are in host memory and it "
                    f"joins weight-update groups over {HOST_BACKEND!r} only (it lists weight_update_backends)",
                )
            try:
                group = await asyncio.to_thread(
                    init_weight_update_group,
                    master_address=str(body["master_address"]),
                    master_port=int(body["master_port"]),
                    rank=int(body["rank_offset"]),  # + tp_rank, which is 0 on this single-rank engine
                    world_size=int(body["world_size"]),
                    group_name=str(body.get("group_name", "weight_update_group")),
                    backend=backend,
                    timeout_s=self.timeout_s,
                )
            except KeyError as exc:
                raise InvalidRequest(f"init_weights_update_group needs field {exc.args[0]!r}") from None
            except (CollectiveTimeout, ValueError) as exc:
                return _outcome(False, f"Failed to init group: {exc}")
            engine.update_groups[group.group_name] = group
            return _outcome(True, "Succeeded to initialize custom process group.")

        @app.post("/destroy_weights_update_group")
        async def destroy_weights_update_group(request: Request):
            name = (await _body(request)).get("group_name", "weight_update_group")
            group = engine.update_groups.pop(name, None)
            if group is None:
                return _outcome(False, f"Group {name} not in {list(engine.update_groups)}.")
            await asyncio.to_thread(group.destroy)
            await self._on_engine(lambda e: self.receive_buffer.release())
            return _outcome(True, "Succeeded to destroy custom process group.")

        def in_session(e: CpuEngine, what: str) -> None:
            if not e.update_session_open:
                raise RuntimeError(f"{what} must run between begin_weight_update() and end_weight_update()")

        @app.post("/update_weights_from_distributed")
        async def update_weights_from_distributed(request: Request):
            body = await _body(request)
            name = body.get("group_name", "weight_update_group")

            def update(e: CpuEngine) -> int:
                in_session(e, "update_weights_from_distributed")
                group = e.update_groups.get(name)
                if group is None:
                    raise RuntimeError(
                        f"Group {name} not in {list(e.update_groups)}. Please call `init_weights_update_group` first."
                    )
                return receive_distributed(
                    e.model,
                    group,
                    body["names"],
                    body["dtypes"],
                    body["shapes"],
                    body.get("load_format"),
                    self.receive_buffer,
                )

            return await self._update(update, body, "Succeeded to update parameter online.")

        @app.post("/update_weights_from_tensor")
        async def update_weights_from_tensor(request: Request):
            from portable_rl.protocol.tensor_codec import deserialize_tensors, named_tensors_from_payload

            body = await _body(request)
            payloads = body.get("serialized_named_tensors")
            if not isinstance(payloads, list) or not payloads:
                raise InvalidRequest(
                    "serialized_named_tensors must be a non-empty list (one entry per TP rank)"
                )

            def update(e: CpuEngine) -> int:
                in_session(e, "update_weights_from_tensor")
                obj = deserialize_tensors(payloads[0])  # this engine is TP rank 0 of 1
                count = load_named_tensors(e.model, named_tensors_from_payload(obj, body.get("load_format")))
                self.mapped_inputs = (
                    obj  # replaces (and unmaps) the previous bucket's only after this one opened
                )
                return count

            return await self._update(update, body, "Success")

        @app.post("/resident_weights")
        async def resident_weights():
            def share(e: CpuEngine) -> dict[str, Any]:
                self.resident = make_resident(e.model, self.resident)
                return self.resident.describe()

            try:
                layout = await self._on_engine(share)
            except ValueError as exc:
                return _outcome(False, f"Failed to make weights resident: {exc}")
            return {"success": True, "message": "Success", **layout}

        @app.post("/commit_resident_weights")
        async def commit_resident_weights(request: Request):
            body = await _body(request)

            def commit(e: CpuEngine) -> int:
                in_session(e, "commit_resident_weights")
                if self.resident is None:
                    raise RuntimeError("no resident weights; call /resident_weights first")
                return len(self.resident.layout)

            return await self._update(commit, body, "Resident weights committed")

        @app.post("/update_weights_from_disk")
        async def update_weights_from_disk(request: Request):
            body = await _body(request)
            path = body.get("model_path")
            if not path:
                raise InvalidRequest("update_weights_from_disk needs model_path")

            def update(e: CpuEngine) -> int:
                n = load_named_tensors(e.model, read_checkpoint_dir(path))
                e.model_path = str(path)
                return n

            return await self._update(
                update, body, "Succeeded to update model weights.", num_paused_requests=0
            )

        @app.post("/get_weights_checksum")
        async def get_weights_checksum(request: Request):
            names = (await _body(request)).get("names")
            return {"checksums": await self._on_engine(lambda e: checksums(e.model, names))}

        @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
        async def get_weights_by_name(request: Request):
            body = await _body(request)
            name, size = body.get("name"), int(body.get("truncate_size", 100))
            values = await self._on_engine(lambda e: weight_by_name(e.model, str(name), size))
            if values is None:
                return _error(f"Get parameter by name failed: no weight {name!r}")
            return JSONResponse(values)

    async def _update(self, fn, body: dict[str, Any], ok: str, **extra: Any) -> JSONResponse:
        if body.get("abort_all_requests"):
            await self._on_engine(lambda e: e.abort(abort_all=True))
        try:
            count = await self._on_engine(fn, needs_idle=True)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            message = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
            return _outcome(False, f"Failed to update weights: {message}", **extra)
        self._set_version(body.get("weight_version"))
        message = f"{ok} ({count} tensors)."
        if body.get("weight_version") is not None:
            message += f" Weight version updated to {body['weight_version']}."
        return _outcome(True, message, **extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m portable_rl.rollout.engines.cpu_server", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model-path", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help=f"bearer token (default: env {TOKEN_ENV})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--weight-update-timeout", type=float, default=600.0, help="seconds per weight-sync collective"
    )
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    engine = CpuEngine(
        EngineConfig(
            model_path=args.model_path,
            dtype=args.dtype,
            max_running_requests=args.max_running_requests,
            context_length=args.context_length,
            seed=args.random_seed,
            weight_version=args.weight_version,
            num_threads=args.num_threads,
        )
    )
    server = Server(engine, args.api_key or os.environ.get(TOKEN_ENV), args.weight_update_timeout)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        engine.shutdown()
        if server.resident is not None:
            server.resident.release()


if __name__ == "__main__":
    main()
