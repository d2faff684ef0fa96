"""Engine health: probe every rollout engine, report the ones that died or hung.

Contract
--------
* ``probe_engine(url, timeout_s, process_check=None)`` returns ``None`` for a healthy engine, else a
  ``Verdict(kind, reason)``: ``kind`` is ``"dead"`` (its process exited, its Ray actor died, or the connection is
  refused), ``"hung"`` (no answer within ``timeout_s``) or ``"unhealthy"`` (it answered, but not 200).
  ``process_check(timeout_s)`` (optional) looks at the process first, so an exit is reported with its cause
  rather than as a refused connection; it returns ``None`` or a ``Verdict`` itself.
* The probe asks ``GET /health_generate``: SGLang 0.5.23 answers ``/health`` from its HTTP process without
  asking the scheduler, so only ``/health_generate`` notices a scheduler that stopped (it answers 200 while
  requests run and otherwise generates one token, giving up after 20 s). portable_rl's CPU engine serves both.
* ``EngineMonitor(urls, timeout_s=, interval_s=, on_failure=, process_checks=)``: ``check_now()`` probes
  every engine not yet known to have failed (concurrently) and returns the new ``Failure``s; as a context
  manager it also runs ``check_now()`` every ``interval_s`` on a daemon thread. Each failure is reported to
  ``on_failure`` exactly once (from whichever thread found it), which is where the owner fences the engine:
  takes it out of the router and kills it, so requests stuck on a hung engine fail instead of waiting forever.
  ``failures`` maps engine index -> ``Failure``. ``stop()`` waits for a probe in progress to finish.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

log = logging.getLogger(__name__)
HEALTH_ENDPOINT = "/health_generate"


@dataclass(frozen=True)
class Verdict:
    kind: str  # "dead" | "hung" | "unhealthy"
    reason: str


@dataclass(frozen=True)
class Failure:
    index: int
    url: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"engine {self.index} at {self.url} is {self.kind}: {self.reason}"


ProcessCheck = Callable[[float], "Verdict | None"]


def probe_engine(
    url: str,
    timeout_s: float,
    process_check: ProcessCheck | None = None,
    api_key: str | None = None,
) -> Verdict | None:
    """``None`` when the engine at ``url`` is healthy, else why not (see module docstring)."""
    # The probe paths are open on portable_rl's engine; the key is sent anyway for servers that guard them.
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if process_check is not None:
        verdict = process_check(timeout_s)
        if verdict is not None:
            return verdict
    try:
        resp = requests.get(f"{url.rstrip('/')}{HEALTH_ENDPOINT}", headers=headers, timeout=timeout_s)
    except requests.ConnectionError as exc:
        if isinstance(exc, requests.ConnectTimeout):
            return Verdict("hung", f"no connection to {HEALTH_ENDPOINT} within {timeout_s:g}s")
        return Verdict("dead", f"{HEALTH_ENDPOINT} connection failed ({_first_line(exc)})")
    except requests.Timeout:
        return Verdict("hung", f"no answer to {HEALTH_ENDPOINT} within {timeout_s:g}s")
    except requests.RequestException as exc:
        return Verdict("unhealthy", f"{HEALTH_ENDPOINT} failed: {_first_line(exc)}")
    if resp.status_code != 200:
        return Verdict("unhealthy", f"{HEALTH_ENDPOINT} answered HTTP {resp.status_code}")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class EngineMonitor:
    """Probes engines now (``check_now``) and, inside ``with``, every ``interval_s`` in the background."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float,
        interval_s: float,
        on_failure: Callable[[Failure], None] | None = None,
        process_checks: Sequence[ProcessCheck | None] | None = None,
        api_key: str | None = None,
    ) -> None:
        if not timeout_s > 0 or not interval_s > 0:
            raise ValueError(f"health timeout_s={timeout_s!r} and interval_s={interval_s!r} must be > 0")
        self.urls = list(urls)
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.on_failure = on_failure
        self.api_key = api_key
        self.process_checks = list(process_checks) if process_checks is not None else [None] * len(urls)
        if len(self.process_checks) != len(self.urls):
            raise ValueError(f"{len(self.process_checks)} process checks for {len(self.urls)} engines")
        self.failures: dict[int, Failure] = {}
        self._lock = threading.Lock()  # one check at a time: a failure is reported exactly once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_now(self) -> list[Failure]:
        """Probe every engine not yet failed; report and return the new failures."""
        with self._lock:
            todo = [i for i in range(len(self.urls)) if i not in self.failures]
            if not todo:
                return []
            with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="health-probe") as pool:
                verdicts = list(
                    pool.map(
                        lambda i: probe_engine(
                            self.urls[i], self.timeout_s, self.process_checks[i], self.api_key
                        ),
                        todo,
                    )
                )
            new = [
                Failure(i, self.urls[i], v.kind, v.reason)
                for i, v in zip(todo, verdicts, strict=True)
                if v is not None
            ]
            for failure in new:
                self.failures[failure.index] = failure
                log.warning("%s", failure)
                if self.on_failure is not None:
                    self.on_failure(failure)
            return new

    # ---- background ---------------------------------------------------------------------------------------
    def __enter__(self) -> EngineMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="engine-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if len(self.failures) == len(self.urls):
                return  # nothing left to watch
            try:
                self.check_now()
            except Exception:  # noqa: BLE001 - a crashed watcher would leave hung engines unnoticed
                log.exception("engine health check failed; retrying in %gs", self.interval_s)
