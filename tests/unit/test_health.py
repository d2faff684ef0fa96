"""Engine health probes and the monitor, against small local HTTP servers: healthy, hung, refusing, failing."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from portable_rl.config.rollout import RolloutConfig
from portable_rl.orchestration.health import HEALTH_ENDPOINT, EngineMonitor, Verdict, probe_engine


class _Server:
    """An HTTP server on a free port whose /health_generate answers with ``status`` or, when hung, never."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.hung = threading.Event()
        self.release = threading.Event()
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.hits += 1
                if outer.hung.is_set():
                    outer.release.wait(30)  # a stopped scheduler: the connection is accepted, no answer comes
                    return
                code = outer.status if self.path == HEALTH_ENDPOINT else 404
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made: list[_Server] = []

    def make(status: int = 200) -> _Server:
        made.append(_Server(status))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def refused_url():
    """A URL whose port this test holds bound but never listens on: connections are refused, and no other
    process (a parallel test worker) can take the port meanwhile, as it could after a bind-then-close."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _wait_for(what: str, cond, deadline_s: float = 30.0) -> None:
    """Poll ``cond`` until it holds; a deadline, not a measurement (fails naming ``what``)."""
    deadline = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not happen within {deadline_s:g}s"
        time.sleep(0.02)


def test_probe_classifies_healthy_hung_refused_and_failing(servers, refused_url):
    ok, hung, failing = servers(), servers(), servers(503)
    hung.hung.set()
    assert probe_engine(ok.url, timeout_s=2) is None
    verdict = probe_engine(hung.url, timeout_s=0.5)
    # The hung server answers only when released (at teardown): a verdict now means the probe's own timeout.
    assert not hung.release.is_set()
    assert verdict is not None and verdict.kind == "hung" and "0.5s" in verdict.reason
    verdict = probe_engine(refused_url, timeout_s=2)
    assert verdict is not None and verdict.kind == "dead"
    verdict = probe_engine(failing.url, timeout_s=2)
    assert verdict == Verdict("unhealthy", f"{HEALTH_ENDPOINT} answered HTTP 503")


def test_process_check_comes_first_and_names_the_exit(servers):
    ok = servers()
    dead = Verdict("dead", "its process (pid 7) exited with code -9")
    assert probe_engine(ok.url, 2, process_check=lambda t: dead) == dead
    assert ok.hits == 0  # no HTTP probe once the process is known dead
    assert probe_engine(ok.url, 2, process_check=lambda t: None) is None
    assert ok.hits == 1


def test_monitor_reports_each_failure_once_and_skips_failed_engines(servers):
    a, b, c = servers(), servers(), servers()
    seen = []
    mon = EngineMonitor([a.url, b.url, c.url], timeout_s=0.5, interval_s=1.0, on_failure=seen.append)
    assert mon.check_now() == []
    b.hung.set()
    new = mon.check_now()
    assert [(f.index, f.url, f.kind) for f in new] == [(1, b.url, "hung")]
    hits = b.hits
    assert mon.check_now() == []  # known failures are not probed or reported again
    assert b.hits == hits
    assert [f.index for f in seen] == [1]
    assert set(mon.failures) == {1}
    assert "engine 1" in str(new[0]) and b.url in str(new[0]) and "hung" in str(new[0])


def test_background_monitor_finds_a_hang_by_its_probe_timeout(servers):
    a, b = servers(), servers()
    found = threading.Event()
    failures = []

    def on_failure(f):
        failures.append(f)
        found.set()

    with EngineMonitor([a.url, b.url], timeout_s=0.5, interval_s=0.2, on_failure=on_failure) as mon:
        # Two rounds of probes answered: healthy engines are probed and left alone.
        _wait_for("two rounds of probes", lambda: a.hits >= 2 and b.hits >= 2)
        assert not failures
        a.hung.set()
        assert found.wait(60), "the hung engine was not reported"  # a deadline against a hang, not a timing
    assert [f.index for f in failures] == [0] and failures[0].kind == "hung"
    assert "0.5s" in failures[0].reason  # found by the probe's timeout (the server never answered)
    assert not a.release.is_set()
    assert mon._thread is None  # stopped on exit


def test_monitor_keeps_watching_after_a_failing_callback(servers):
    a = servers()
    a.hung.set()
    calls = []

    def on_failure(f):
        calls.append(f)
        raise RuntimeError("fencing failed")

    with EngineMonitor([a.url], timeout_s=0.3, interval_s=0.1, on_failure=on_failure) as mon:
        _wait_for("the failure callback", lambda: calls)
        assert mon._thread is not None and mon._thread.is_alive()
    assert len(calls) == 1


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("health_check_interval_s", -1, "health_check_interval_s=-1 must be >= 0"),
        ("health_timeout_s", 0, "health_timeout_s=0 must be > 0"),
        ("health_timeout_s", "10", "must be a number of seconds"),
        ("max_engine_restarts", -1, "max_engine_restarts=-1 must be an integer >= 0"),
        ("max_engine_restarts", 1.5, "max_engine_restarts=1.5"),
    ],
)
def test_health_config_is_validated(field, value, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        RolloutConfig(**{field: value})


def test_monitor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be > 0"):
        EngineMonitor(["http://x"], timeout_s=0, interval_s=1)
    with pytest.raises(ValueError, match="1 process checks for 2 engines"):
        EngineMonitor(["http://x", "http://y"], timeout_s=1, interval_s=1, process_checks=[None])
