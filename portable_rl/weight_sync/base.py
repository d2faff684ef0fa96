"""The weight-sync interface and what every strategy shares.

Contract
--------
* ``WeightSync``: ``connect(engines)`` once, ``update(named_tensors, version)`` after every optimizer step,
  ``disconnect()`` at the end. ``named_tensors`` are HF-named full (unsharded) weights, consumed once, lazily;
  ``version`` becomes the engines' weight version (sent as SGLang's ``weight_version`` string).
* An update runs inside ``update_session``: generation is paused and the KV cache flushed on every engine,
  a weight-update session is opened (``/begin_weight_update``, required by SGLang 0.5.23 for tensor and
  distributed updates), the strategy moves the weights, the session is closed and generation resumed
  (resumed even when the update failed, so engines never stay paused). ``weight_version`` rides on the last
  request of a sync only, so an engine never claims a version whose weights arrived partially. After the
  session the engines' version is read back and must equal ``str(version)`` (``WeightSyncError`` otherwise).
* Engine calls fan out concurrently; any failure raises ``WeightSyncError`` naming the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from portable_rl.protocol.engine_ops import EngineCallError, EngineOps

T = TypeVar("T")


class WeightSyncError(RuntimeError):
    """A weight sync failed; the message names the engine(s) and the step that failed."""


@runtime_checkable
class WeightSync(Protocol):
    def connect(self, engines: Sequence[Any]) -> None: ...

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def disconnect(self) -> None: ...


def wait_all(
    engines: Sequence[EngineOps], futures: Sequence[Future[T]], timeout_s: float, what: str
) -> list[T]:
    """Collect one answer per engine; raise one WeightSyncError listing every engine that failed or timed out."""
    results: list[T] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    for engine, fut in zip(engines, futures, strict=True):
        try:
            results.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            errors.append(f"{engine.label}: no answer within {timeout_s:g}s")
        except (EngineCallError, OSError, RuntimeError) as exc:
            errors.append(str(exc) if engine.label in str(exc) else f"{engine.label}: {exc}")
    if errors:
        raise WeightSyncError(
            f"{what} failed on {len(errors)} of {len(engines)} engine(s): " + "; ".join(errors)
        )
    return results


def fan_out(engines: Sequence[EngineOps], fn: Callable[[EngineOps], Future[T]], what: str) -> list[T]:
    """Start ``fn`` on every engine at once and wait for all answers (bounded by each engine's timeout)."""
    if not engines:
        return []
    return wait_all(engines, [fn(e) for e in engines], max(e.timeout_s for e in engines), what)


@contextmanager
def update_session(
    engines: Sequence[Any],
    version: int,
    *,
    verify_version: bool = True,
    open_session: bool = True,
    enabled: bool = True,
    timeout_s: float = 600.0,
) -> Iterator[None]:
    """Pause + flush, open the weight-update session, yield, close it, resume; then check the version.

    ``engines`` are EngineOps, engine clients or URLs. ``enabled=False`` yields without touching the engines: a
    strategy configured with ``manage_session=False`` leaves the session to a caller that wraps several syncs
    (e.g. one per pipeline stage, each with its own group) in one ``update_session``.
    """
    if not enabled:
        yield
        return
    ops = as_engine_ops(engines, timeout_s)
    created = [o for o, e in zip(ops, engines, strict=True) if o is not e]
    try:
        fan_out(ops, lambda e: e.pause_generation(), "pause_generation")
        try:
            fan_out(ops, lambda e: e.flush_cache(), "flush_cache")
            if open_session:
                fan_out(ops, lambda e: e.begin_weight_update(), "begin_weight_update")
                try:
                    yield
                finally:
                    fan_out(ops, lambda e: e.end_weight_update(), "end_weight_update")
            else:
                yield
        finally:
            fan_out(ops, lambda e: e.continue_generation(), "continue_generation")
        if verify_version:
            versions = fan_out(ops, lambda e: e.get_weight_version(), "get_weight_version")
            stale = [
                f"{e.label} reports {v!r}" for e, v in zip(ops, versions, strict=True) if v != str(version)
            ]
            if stale:
                raise WeightSyncError(f"weight version did not move to {str(version)!r}: " + "; ".join(stale))
    finally:
        close_all(created)


def as_engine_ops(engines: Sequence[Any], timeout_s: float, pause_mode: str = "abort") -> list[EngineOps]:
    """EngineOps for engine clients or URLs (EngineOps pass through unchanged)."""
    if not engines:
        raise ValueError("weight sync needs at least one engine; got an empty list")
    return [e if isinstance(e, EngineOps) else EngineOps(e, timeout_s, pause_mode) for e in engines]


def close_all(engines: Sequence[EngineOps]) -> None:
    for engine in engines:
        engine.close()


def mark_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yield (item, is_last) without materialising the iterable."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def send_in_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    version: int,
    send_bucket: Callable[[list[tuple[str, torch.Tensor]], str | None, bool], None],
) -> None:
    """Cut ``named_tensors`` into buckets and send each; only the last carries the version and flushes the cache."""
    from portable_rl.protocol.buckets import iter_buckets

    sent = 0
    for bucket, last in mark_last(iter_buckets(named_tensors, bucket_bytes)):
        send_bucket(bucket, str(version) if last else None, last)
        sent += 1
    if not sent:
        raise ValueError("update() got no tensors; pass the model's named weights")


def update_in_buckets(
    engines: Sequence[EngineOps],
    cfg: Any,
    staging: Any,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    send_bucket: Callable[[list[tuple[str, torch.Tensor]], str | None, bool], None],
) -> None:
    """One bucketed update inside ``update_session``; staging buffers are released unless ``cfg.keep_staging``."""
    try:
        with update_session(engines, version, verify_version=cfg.verify_version, enabled=cfg.manage_session):
            send_in_buckets(named_tensors, cfg.bucket_bytes, version, send_bucket)
    finally:
        if not cfg.keep_staging:
            staging.release()
