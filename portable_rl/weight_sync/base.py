"""The weight-sync interface and what every strategy shares.

Contract
--------
* ``WeightSync``: ``connect(engines)`` once, ``update(named_tensors, version)`` after every optimizer step,
  ``disconnect()`` at the end. ``named_tensors`` are HF-named full (unsharded) weights, consumed once, lazily;
  ``version`` becomes the engines' weight version (sent as SGLang's ``weight_version`` string).
* An update runs inside ``update_session``: generation is paused and the KV cache flushed on every engine,
  a weight-update session is opened (``/begin_weight_update``, required by SGLang 0.5.23 for tensor and
  distributed updates), the strategy moves the weights, the session is closed and generation resumed
  (resumed even when the update failed or the session could only be opened on some engines, so engines never
  stay paused). ``weight_version`` rides on the last request of a sync only, so an engine never claims a
  version whose weights arrived partially. Once the session is closed, the engines' version is read back
  (issued together with the resume) and must equal ``str(version)`` (``WeightSyncError`` otherwise).
* Per engine, the opening calls (pause -> flush -> begin) and the closing calls (end -> resume + version)
  each run as one sequence on the HTTP loop (``EngineOps.run_steps``): the order each engine sees is SGLang's,
  without a thread hop and a wait for every engine between calls; an engine that offers ``/session_batch``
  (portable_rl's CPU engine) gets each sequence in one request. A bucketed update gathers its first bucket
  (``named_tensors`` is lazy) while the opening calls are in flight.
* ``while_closing(fn)``: the next update session entered in this context runs ``fn`` (in the caller's thread)
  while its closing calls are in flight, once every bucket was answered (the engines hold the new weights),
  e.g. the trainer's ``--check-weight-update`` comparison, which then costs no round trip of its own. Without a session
  to close (``manage_session=False`` inside a caller's session) ``fn`` is not run there and the caller runs it.
* Engine calls fan out concurrently; any failure raises ``WeightSyncError`` naming the step and the engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from portable_rl.protocol.engine_ops import EngineCallError, EngineOps, step_names

T = TypeVar("T")
log = logging.getLogger(__name__)


# Work to run while the next update session closes (``while_closing``): the callable and its results.
_WHILE_CLOSING: ContextVar[tuple[Callable[[], Any], list[Any]] | None] = ContextVar(
    "weight_sync_while_closing", default=None
)


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
    overlap: Callable[[], Any] | None = None,
    commit: str | None = None,
) -> Iterator[Any]:
    """Pause + flush, open the weight-update session, yield, close it, resume; then check the version.

    ``engines`` are EngineOps, engine clients or URLs. ``enabled=False`` yields without touching the engines: a
    strategy configured with ``manage_session=False`` leaves the session to a caller that wraps several syncs
    (e.g. one per pipeline stage, each with its own group) in one ``update_session``.

    Each engine's opening calls (pause -> flush -> begin) run as one sequence on the HTTP loop, and so do its
    closing calls (end, then continue and the version read-back together: the version was set by the last
    update request, so reading it needs no wait for the resume). An engine whose opening failed midway is put
    back as it was (its session ended if it was opened, generation resumed if it was paused).

    ``overlap`` (optional) runs in this thread while the opening calls are in flight, e.g. the trainer gathering
    the first bucket; the ``with`` statement binds its result. If it raises, the session is closed again.
    ``commit`` (optional) is a session step that carries the weight version (``commit_resident_weights``): it
    opens the closing sequence after a body that did not raise, so the version moves in the same round trip
    that closes the session.
    """
    if not enabled:
        yield overlap() if overlap is not None else None
        return
    ops = as_engine_ops(engines, timeout_s)
    created = [o for o, e in zip(ops, engines, strict=True) if o is not e]
    opening: tuple[str, ...] = ("pause_generation", "flush_cache")
    if open_session:
        opening += ("begin_weight_update",)
    try:
        started = _start_each([(e, opening) for e in ops], stop_on_error=True)
        try:
            prepared = overlap() if overlap is not None else None
        except BaseException:
            _undo_opening(ops, open_session, _finish_each(started))
            raise
        progress = _finish_each(started)
        if any(failed for _, failed in progress):
            _undo_opening(ops, open_session, progress)
            raise_failures(ops, opening, progress)
        try:
            yield prepared
        except BaseException:
            closing = _closing(open_session, read_version=False)
            raise_failures(ops, closing, run_sequences(ops, closing, stop_on_error=False))
            raise
        closing = ((commit,) if commit else ()) + _closing(open_session, read_version=verify_version)
        started = _start_each([(e, closing) for e in ops], stop_on_error=False, weight_version=str(version))
        try:
            _run_while_closing()
        finally:  # the engines are resumed whatever the overlapped work did
            progress = _finish_each(started)
        raise_failures(ops, closing, progress)
        if verify_version:
            stale = [
                f"{e.label} reports {done['get_weight_version']!r}"
                for e, (done, _) in zip(ops, progress, strict=True)
                if done["get_weight_version"] != str(version)
            ]
            if stale:
                raise WeightSyncError(f"weight version did not move to {str(version)!r}: " + "; ".join(stale))
    finally:
        close_all(created)


@contextmanager
def while_closing(fn: Callable[[], T]) -> Iterator[list[T]]:
    """Run ``fn`` while the next update session in this context closes (see the module docstring).

    The ``with`` statement binds a list that holds ``fn``'s result once it ran (empty if no session closed, or
    if the update failed before its closing). An exception from ``fn`` propagates out of the update, after the
    engines were resumed.
    """
    results: list[T] = []
    token = _WHILE_CLOSING.set((fn, results))
    try:
        yield results
    finally:
        _WHILE_CLOSING.reset(token)


def _run_while_closing() -> None:
    pending = _WHILE_CLOSING.get()
    if pending is None:
        return
    _WHILE_CLOSING.set(None)  # once: a later session in this context closes without it
    fn, results = pending
    results.append(fn())


Steps = Sequence[str | tuple[str, ...]]
Progress = tuple[dict[str, Any], dict[str, BaseException]]
Started = list[tuple[EngineOps, Steps, Future[None], Progress]]


def _undo_opening(ops: Sequence[EngineOps], open_session: bool, progress: Sequence[Progress]) -> None:
    """Best effort: end the session where it was opened and resume generation where it was paused."""
    undo = [
        (e, _closing(open_session and "begin_weight_update" in done, read_version=False))
        for e, (done, _) in zip(ops, progress, strict=True)
        if "pause_generation" in done
    ]
    for e, (_, failed) in zip([e for e, _ in undo], _run_each(undo), strict=True):
        for step, exc in failed.items():
            log.warning("putting %s back after a failed weight update: %s failed: %s", e.label, step, exc)


def _closing(end_session: bool, read_version: bool) -> tuple[str | tuple[str, ...], ...]:
    resume: str | tuple[str, ...] = (
        ("continue_generation", "get_weight_version") if read_version else "continue_generation"
    )
    return ("end_weight_update", resume) if end_session else (resume,)


def run_sequences(
    ops: Sequence[EngineOps], steps: Steps, stop_on_error: bool, weight_version: str | None = None
) -> list[Progress]:
    """Run ``steps`` on every engine at once (``EngineOps.run_steps``); (done, failed) per engine.

    An engine that does not finish within its timeout has its sequence cancelled and its next step marked
    failed with "no answer".
    """
    return _finish_each(_start_each([(e, steps) for e in ops], stop_on_error, weight_version))


def _run_each(jobs: Sequence[tuple[EngineOps, Steps]], stop_on_error: bool = False) -> list[Progress]:
    return _finish_each(_start_each(jobs, stop_on_error))


def _start_each(
    jobs: Sequence[tuple[EngineOps, Steps]], stop_on_error: bool, weight_version: str | None = None
) -> Started:
    started: Started = []
    for e, steps in jobs:
        progress: Progress = ({}, {})
        future = e.run_steps(steps, *progress, stop_on_error=stop_on_error, weight_version=weight_version)
        started.append((e, steps, future, progress))
    return started


def _finish_each(started: Started) -> list[Progress]:
    deadline = time.monotonic() + max((e.timeout_s for e, *_ in started), default=0.0)
    for engine, steps, fut, (done, failed) in started:
        try:
            fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            fut.cancel()
            _mark_hung(steps, done, failed, f"{engine.label}: no answer within {engine.timeout_s:g}s")
        except (OSError, RuntimeError, ValueError) as exc:
            # not an engine's answer: a transport-level failure
            _mark_hung(steps, done, failed, f"{engine.label}: {type(exc).__name__}: {exc}")
    return [progress for *_, progress in started]


def _mark_hung(steps: Steps, done: dict[str, Any], failed: dict[str, BaseException], why: str) -> None:
    hung = next((s for s in step_names(steps) if s not in done and s not in failed), step_names(steps)[-1])
    failed.setdefault(hung, EngineCallError(why))


def raise_failures(ops: Sequence[EngineOps], steps: Steps, progress: Sequence[Progress]) -> None:
    """One WeightSyncError naming, per failed step (in step order), every engine it failed on."""
    parts = []
    for step in step_names(steps):
        errors = [
            str(failed[step]) if e.label in str(failed[step]) else f"{e.label}: {failed[step]}"
            for e, (_, failed) in zip(ops, progress, strict=True)
            if step in failed
        ]
        if errors:
            parts.append(f"{step} failed on {len(errors)} of {len(ops)} engine(s): " + "; ".join(errors))
    if parts:
        raise WeightSyncError("; ".join(parts))


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


Bucket = list[tuple[str, torch.Tensor]]


def send_buckets(
    buckets: Iterable[tuple[Bucket, bool]],
    version: int,
    send_bucket: Callable[[Bucket, str | None, bool], None],
) -> None:
    """Send (bucket, is_last) pairs in order; only the last carries the version and flushes the cache."""
    sent = 0
    for bucket, last in buckets:
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
    split_small_at: int | None = None,
) -> None:
    """One bucketed update inside ``update_session``; staging buffers are released unless ``cfg.keep_staging``.

    The first bucket is gathered (``named_tensors`` is lazy: a trainer gathers its weights as they are consumed)
    while the engines pause and open their sessions.
    """
    from portable_rl.protocol.buckets import iter_buckets

    buckets = mark_last(iter_buckets(named_tensors, cfg.bucket_bytes, split_small_at))
    try:
        with update_session(
            engines,
            version,
            verify_version=cfg.verify_version,
            enabled=cfg.manage_session,
            overlap=lambda: next(buckets, None),
        ) as first:
            send_buckets(itertools.chain([first] if first is not None else [], buckets), version, send_bucket)
    finally:
        if not cfg.keep_staging:
            staging.release()
