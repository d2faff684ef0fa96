"""The memory saver: co-located SGLang engines free their KV cache while the trainer computes, only where the
platform supports it; the job releases after each rollout and resumes before generating or syncing weights."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from fake_hosts import simulate_cuda

from portable_rl import platform as plat
from portable_rl.orchestration.job import Job
from portable_rl.orchestration.memory_saver import TAGS, EngineMemorySaver


@pytest.fixture
def cuda(monkeypatch):
    simulate_cuda(monkeypatch, [(9, 0)])
    return plat.load("cuda")


def test_enabled_only_for_colocated_sglang_on_a_platform_that_supports_it(cuda):
    cpu = plat.load("cpu")
    assert cuda.memory_saver_supported and not cpu.memory_saver_supported
    assert EngineMemorySaver(cuda, "colocated", "sglang").enabled
    assert not EngineMemorySaver(cuda, "disaggregated", "sglang").enabled
    assert not EngineMemorySaver(cuda, "colocated", "cpu").enabled
    assert not EngineMemorySaver(cpu, "colocated", "sglang").enabled


def test_engine_args_turn_the_saver_on_unless_the_user_says_otherwise(cuda):
    on = EngineMemorySaver(cuda, "colocated", "sglang")
    assert on.engine_args({"mem_fraction_static": 0.5}) == {
        "enable_memory_saver": True,
        "mem_fraction_static": 0.5,
    }
    assert on.engine_args({"enable_memory_saver": False}) == {"enable_memory_saver": False}
    assert EngineMemorySaver(plat.load("cpu"), "colocated", "sglang").engine_args({"a": 1}) == {"a": 1}


class _Recorder(BaseHTTPRequestHandler):
    calls: list[tuple[str, dict, str | None]] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.calls.append((self.path, body, self.headers.get("Authorization")))
        out = json.dumps({"success": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def engine_url():
    _Recorder.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_release_and_resume_call_every_engine_once_each(cuda, engine_url):
    saver = EngineMemorySaver(cuda, "colocated", "sglang", api_key="k")
    saver.resume([engine_url])  # nothing released yet: no call
    saver.release([engine_url])
    saver.release([engine_url])  # already released: no second call
    saver.resume([engine_url])
    assert _Recorder.calls == [
        ("/release_memory_occupation", {"tags": TAGS}, "Bearer k"),
        ("/resume_memory_occupation", {"tags": TAGS}, "Bearer k"),
    ]
    assert TAGS == ["kv_cache"]  # weights stay: the first rollout of a run has no weight sync before it


def test_disabled_saver_never_calls_the_engines(engine_url):
    saver = EngineMemorySaver(plat.load("cpu"), "colocated", "sglang")
    saver.release([engine_url])
    saver.resume([engine_url])
    assert _Recorder.calls == []


def test_the_job_releases_after_rollout_and_resumes_before_generating_or_syncing(cuda, monkeypatch):
    events: list[str] = []
    saver = EngineMemorySaver(cuda, "colocated", "sglang")
    monkeypatch.setattr(saver, "_call", lambda urls, method: events.append(method.split("_")[0]))
    job = Job.__new__(Job)
    job.memory_saver = saver
    job.recipe = SimpleNamespace(run=SimpleNamespace(seed=0, check_weight_update=False, save_rollouts=False))
    job.buffer = job.tokenizer = None
    job.prompts = SimpleNamespace(skipped_too_long=0, oversized=[])
    job.engines = SimpleNamespace(
        urls=["http://engine"],
        rollout=lambda *a, **k: events.append("generate") or (["groups"], {}),
        restarts=0,
        requeued=0,
    )
    job.trainer = SimpleNamespace(sync_weights=lambda *a: events.append("sync_weights") or {})

    saver.release(job.engines.urls)  # what entering the job does before the trainer is built
    assert job.rollout(1)[0] == ["groups"]
    job.sync_weights(version=1)
    job.rollout(2)
    assert events == [
        "release",
        "resume",
        "generate",
        "release",
        "resume",
        "sync_weights",
        "generate",
        "release",
    ]
