"""The CPU engine: a HF causal LM on torch with step-level continuous batching and a KV cache.

Contract
--------
* One engine thread owns the model. Everything that touches it (prefill, decode, weight updates, aborts,
  pause) runs on that thread, between decode steps, so a weight update never lands mid-forward.
* ``submit(GenRequest) -> Future[GenResult]`` queues a request; each step the thread admits waiting requests
  (up to ``max_running_requests``) with one left-padded prefill (requests with identical tokens, such as the
  samples of one GRPO group, share one row of it), merges their KV cache into the running batch
  (``kv_cache.merge``) and runs one decode step for every running request. A request ends on a stop token
  (its EOS ids unless ``ignore_eos``, plus ``stop_token_ids``), a stop string, ``max_new_tokens`` or the
  context length; the stop token is part of ``output_ids`` as in SGLang.
* ``call(fn, needs_idle)`` runs ``fn(engine)`` on the engine thread and returns a Future of its result. With
  ``needs_idle`` (weight updates) and generation not paused, admissions stop and the call waits until the
  running requests finish, like SGLang's model-update writer lock; while paused it runs at once.
* Pause modes as SGLang's ``/pause_generation``: ``abort`` (in-flight requests end with finish reason
  ``abort``), ``in_place`` (they wait, keeping their KV cache), ``retract`` (they wait without KV cache and
  are prefilled again from prompt + output on resume). New requests queue while paused.
* ``abort(rid, abort_all)`` ends matching requests (rid prefix match, as SGLang's scheduler does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from portable_rl.rollout.engines import kv_cache
from portable_rl.rollout.engines.sampling import SamplingParams, make_generator, sample

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model_path: str
    dtype: str = "float32"
    max_running_requests: int = 64
    context_length: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    weight_version: str = "default"  # SGLang's initial weight_version
    num_threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} is not one of float32, bfloat16, float16")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests={self.max_running_requests} must be >= 1")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length={self.context_length} must be >= 2")


@dataclass
class GenRequest:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    future: Future = field(default_factory=Future)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    generator: torch.Generator | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return len(self.input_ids) + len(self.output_ids)


@dataclass
class GenResult:
    rid: str
    prompt_tokens: int
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: dict[str, Any]
    weight_version: str
    latency_s: float


def abort_reason(message: str) -> dict[str, Any]:
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


@dataclass
class _Call:
    fn: Callable[[CpuEngine], Any]
    needs_idle: bool
    future: Future = field(default_factory=Future)


class CpuEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.num_threads = torch.get_num_threads()
        self.model_path = cfg.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=getattr(torch, cfg.dtype))
        self.model.eval()
        self._new_cache = lambda: DynamicCache(config=self.model.config)
        kv_cache.check_supported(self._new_cache())
        self.context_length = cfg.context_length or int(
            getattr(self.model.config, "max_position_embeddings", 0) or 4096
        )
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.weight_version = cfg.weight_version
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.paused = False
        self.update_session_open = False
        self.session_loaded = False
        self.update_groups: dict[str, Any] = {}

        self._cv = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._calls: deque[_Call] = deque()
        self._running: list[GenRequest] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._stop = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="cpu-engine", daemon=True)
        self._thread.start()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(t) for t in source)
        return ids

    # ---- public, any thread ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def submit(self, req: GenRequest) -> Future:
        if req.generator is None:
            with self._cv:
                req.generator = make_generator(req.params.sampling_seed, self.rng)
        with self._cv:
            self._waiting.append(req)
            self._cv.notify_all()
        return req.future

    def call(self, fn: Callable[[CpuEngine], Any], needs_idle: bool = False) -> Future:
        c = _Call(fn, needs_idle)
        with self._cv:
            self._calls.append(c)
            self._cv.notify_all()
        return c.future

    def load(self) -> dict[str, int]:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)
        for req in list(self._running) + list(self._waiting):
            if not req.future.done():
                req.future.set_exception(RuntimeError("engine shut down"))

    # ---- engine-thread operations (call them through ``call``) ----------------------------------------
    def abort(self, rid: str = "", abort_all: bool = False, message: str = "Aborted by AbortReq.") -> int:
        def match(r: GenRequest) -> bool:
            return abort_all or (bool(rid) and r.rid.startswith(rid))

        n = 0
        with self._cv:
            keep = deque()
            for r in self._waiting:
                if match(r):
                    r.finish = abort_reason(message)
                    self._resolve(r)
                    n += 1
                else:
                    keep.append(r)
            self._waiting = keep
        hit = [i for i, r in enumerate(self._running) if match(r)]
        for i in hit:
            self._running[i].finish = abort_reason(message)
        n += len(hit)
        self._retire()
        return n

    def pause(self, mode: str) -> None:
        if mode not in ("abort", "in_place", "retract"):
            raise ValueError(f"pause mode {mode!r} is not one of abort, retract, in_place")
        self.paused = True
        if mode == "abort":
            self.abort(abort_all=True, message="Aborted by pause_generation.")
        elif mode == "retract":
            with self._cv:
                self._waiting.extendleft(reversed(self._running))
            self._running, self._cache, self._mask = [], None, None

    def resume(self) -> None:
        self.paused = False

    # ---- the loop ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(self.num_threads)  # OpenMP thread counts are per calling thread
        while True:
            with self._cv:
                while not self._stop and not self._has_work():
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    return
                call = self._calls[0] if self._calls else None
            if call is not None and (not call.needs_idle or self.paused or not self._running):
                with self._cv:
                    self._calls.popleft()
                self._run_call(call)
                continue
            draining = call is not None  # a weight update waits: finish running requests, admit none
            try:
                if not self.paused and not draining:
                    self._admit()
                if self._running and not self.paused:
                    self._decode()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the engine
                log.exception("engine step failed")
                self._fail_running(exc)

    def _has_work(self) -> bool:
        return bool(self._calls) or (not self.paused and bool(self._waiting or self._running))

    def _run_call(self, call: _Call) -> None:
        try:
            call.future.set_result(call.fn(self))
        except Exception as exc:  # noqa: BLE001 - the caller receives the exception through its future
            call.future.set_exception(exc)

    def _fail_running(self, exc: Exception) -> None:
        for r in self._running:
            if not r.future.done():
                r.future.set_exception(RuntimeError(f"engine step failed: {type(exc).__name__}: {exc}"))
        self._running, self._cache, self._mask = [], None, None

    def _admit(self) -> None:
        room = self.cfg.max_running_requests - len(self._running)
        batch: list[GenRequest] = []
        with self._cv:
            while self._waiting and len(batch) < room:
                r = self._waiting.popleft()
                if r.params.max_new_tokens == 0 or r.length >= self.context_length:
                    r.finish = {"type": "length", "length": len(r.output_ids)}
                    self._resolve(r)
                    continue
                batch.append(r)
        if not batch:
            return
        # Requests with identical tokens (the samples of a GRPO group share their prompt) are prefilled once
        # and their cache rows copied: the prompt's forward is the same computation for each of them.
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(r.input_ids + r.output_ids), len(unique)) for r in batch]
        tokens = list(unique)
        width = max(len(t) for t in tokens)
        ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(tokens), width), dtype=torch.long)
        for i, t in enumerate(tokens):
            ids[i, width - len(t) :] = torch.tensor(t, dtype=torch.long)
            mask[i, width - len(t) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache, logits = out.past_key_values, out.logits[:, -1]
        if len(tokens) < len(batch):
            cache, mask = kv_cache.select(cache, mask, rows)
            logits = logits[rows]
        if self._running:
            self._cache, self._mask = kv_cache.merge(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._running.extend(batch)
        self._accept(batch, logits)

    def _decode(self) -> None:
        last = torch.tensor([[r.output_ids[-1]] for r in self._running], dtype=torch.long)
        positions = torch.tensor([[r.length - 1] for r in self._running], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((len(self._running), 1), dtype=torch.long)], dim=1)
        with torch.inference_mode():
            out = self.model(
                input_ids=last,
                attention_mask=self._mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
            )
        self._cache = out.past_key_values
        self.steps += 1
        self._accept(self._running, out.logits[:, -1])

    def _accept(self, reqs: list[GenRequest], logits: torch.Tensor) -> None:
        tokens, logprobs = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        for r, tok, lp in zip(reqs, tokens, logprobs, strict=True):
            r.output_ids.append(tok)
            r.logprobs.append(lp)
            r.finish = self._finish_reason(r, tok)
        self._retire()

    def _finish_reason(self, r: GenRequest, tok: int) -> dict[str, Any] | None:
        p = r.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return {"type": "stop", "matched": tok}
        if p.stop:
            tail = self.tokenizer.decode(r.output_ids[-32:], skip_special_tokens=p.skip_special_tokens)
            for s in p.stop:
                if s in tail:
                    return {"type": "stop", "matched": s}
        if len(r.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        if r.length >= self.context_length:
            return {"type": "length", "length": len(r.output_ids)}
        return None

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self._running) if r.finish is None]
        if len(keep) == len(self._running):
            return
        for r in self._running:
            if r.finish is not None:
                self._resolve(r)
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        self._cache, self._mask = kv_cache.select(self._cache, self._mask, keep)
        self._cache, self._mask = kv_cache.trim_left(self._cache, self._mask)
        self._running = [self._running[i] for i in keep]

    def _resolve(self, r: GenRequest) -> None:
        if r.future.done():
            return
        r.future.set_result(
            GenResult(
                rid=r.rid,
                prompt_tokens=len(r.input_ids),
                output_ids=list(r.output_ids),
                logprobs=list(r.logprobs),
                finish_reason=r.finish or abort_reason("Aborted"),
                weight_version=self.weight_version,
                latency_s=time.monotonic() - r.created,
            )
        )
