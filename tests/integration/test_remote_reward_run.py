"""Remote reward in the real job, and the generative-RM pattern with a real judge engine.

1. The tiny recipe trains a step with its reward served by the reward server (a real process on loopback);
   the server is then stopped and ``--resume`` fails at run time with one line naming the reward server's URL,
   exit 1, and the step-1 checkpoint exactly as it was.
2. A judge: the project's CPU engine serves a (tiny) judge model, the reward server fronts it with
   ``portable_rl.rollout.judge:judge_reward``, and the job's remote reward reads a grade in [0, 1] back.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from train_cli import ROOT, train

from portable_rl.config.reward import RemoteRewardConfig
from portable_rl.distributed import free_port
from portable_rl.rollout.reward_client import RemoteReward

pytestmark = pytest.mark.slow


def _start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PORTABLE_RL_PLATFORM": "cpu"},
    )


def _reward_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port("127.0.0.1")
    proc = _start("portable_rl.rollout.reward_server", "--port", str(port), *args)
    line = proc.stdout.readline()
    assert line.startswith("reward server listening on"), (line, proc.stderr.read())
    return proc, f"http://127.0.0.1:{port}/score"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_down_reward_server_fails_the_run_and_keeps_the_checkpoint(tmp_path):
    server, url = _reward_server("--reward", "portable_rl.rollout.rewards:even_token_fraction")
    remote = ["rollout.reward=remote", f"rollout.reward_options={{url: '{url}', retries: 2, backoff_s: 0.2}}"]
    run = tmp_path / "run"
    try:
        first = train(run, "run.steps=1", *remote)
        assert first.returncode == 0, first.stderr[-3000:]
        scored = requests.get(url.replace("/score", "/stats"), timeout=5).json()["scored"]
        assert scored >= 8  # every sample of the step was scored by the server
    finally:
        _stop(server)
    checkpoint = run / "checkpoints" / "step_1"
    before = _files(checkpoint)
    again = train(run, "run.steps=2", *remote, "--resume")
    assert again.returncode == 1, again.stderr[-3000:]
    lines = again.stderr.strip().splitlines()
    assert any("does not answer now" in line for line in lines[:-1]), lines  # preflight's warning
    assert "RemoteRewardError" in lines[-1] and url in lines[-1] and "3 attempt(s)" in lines[-1]
    assert "the last checkpoint is step 1" in lines[-1]
    assert _files(checkpoint) == before, "the checkpoint changed"


def test_judge_engine_behind_the_reward_server(tmp_path, tiny_llama):
    port = free_port("127.0.0.1")
    engine = _start(
        "portable_rl.rollout.engines.cpu_server", "--model-path", str(tiny_llama), "--port", str(port)
    )
    server = None
    try:
        deadline = time.monotonic() + 300
        while True:
            assert engine.poll() is None, engine.stderr.read()[-2000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the judge engine did not start"
            time.sleep(0.5)
        options = f'{{"engine_url": "http://127.0.0.1:{port}", "tokenizer_path": "{tiny_llama}", "max_new_tokens": 4}}'
        server, url = _reward_server(
            "--reward", "portable_rl.rollout.judge:judge_reward", "--reward-options", options
        )
        reward = RemoteReward(RemoteRewardConfig(url=url, retries=0, timeout_s=120))
        values = asyncio.run(reward("The answer is \\boxed{4}.", "4"))
        assert 0.0 <= values <= 1.0
        stats = requests.get(url.replace("/score", "/stats"), timeout=5).json()
        assert stats["scored"] == 1 and stats["errors"] == 0
    finally:
        if server is not None:
            _stop(server)
        _stop(engine)
