"""Engine failures mid-rollout: the run replaces the engine, re-syncs it, and trains every prompt exactly once.

One run of the tiny recipe (disaggregated: broadcast weight sync, two CPU engines behind sglang-router, four
steps). From outside the run, like an OOM killer or a stuck driver would:
  * during step 2's rollout, both engines' processes are SIGKILLed while they generate: no engine is left to
    finish their requests, so unfinished groups must go back to the buffer and be generated again after both
    engines were replaced;
  * during step 3's rollout, one engine is SIGSTOPped while it generates (a hung engine: it keeps its sockets
    but never answers; only the health monitor's probe timeout can find it) and the other carries on.
The run must finish, report both replacements, train each prompt the source handed out exactly once in the
step it was handed out, and every sample must come from the weights of the previous step — also the samples
of the replacement engines, which therefore got the trainer's weights before they served. Every step must
train (non-zero gradient, every weight changed) and every sync leave the engines bit-equal to the trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from learning import assert_trained_and_synced

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "tiny_cpu.yaml"
STEPS, PROMPTS = 4, 8
KEY = "fault-test-key"  # the user's --sglang-api-key; without one the job makes a random key per run
AUTH = {"Authorization": f"Bearer {KEY}"}
ARGS = [
    "--sglang-api-key",
    KEY,
    "run.mode=disaggregated",
    "rollout.num_engines=2",
    f"run.steps={STEPS}",
    f"rollout.prompts_per_step={PROMPTS}",
    "rollout.max_new_tokens=48",  # a rollout of about two seconds: long enough to strike mid-generation
    "rollout.health_check_interval_s=0.5",
    "rollout.health_timeout_s=5",
    "rollout.max_engine_restarts=3",  # exactly the three replacements below
]
ENGINE_MODULE = "portable_rl.rollout.engines.cpu_server"

pytestmark = pytest.mark.slow


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _engines(proc: subprocess.Popen) -> dict[int, tuple[psutil.Process, int]]:
    """pid -> (process, port) of every engine server the run started (they descend from the driver via Ray)."""
    found = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = p.cmdline()
            if ENGINE_MODULE in cmd and p.status() != psutil.STATUS_ZOMBIE:
                found[p.pid] = (p, int(cmd[cmd.index("--port") + 1]))
    return found


def _wait(what: str, cond, proc: subprocess.Popen, timeout_s: float = 300, poll_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g}s"
        time.sleep(poll_s)


def _generating(port: int) -> bool:
    try:
        info = requests.get(f"http://127.0.0.1:{port}/server_info", headers=AUTH, timeout=2).json()
    except (requests.RequestException, ValueError):
        return False
    return info["internal_states"][0]["running"] > 0


def _strike_during_rollout(proc, run_dir: Path, after_step: int, everyone: bool, sig: int) -> list:
    """Once ``after_step`` is logged and an engine generates for the next step, signal it (or every engine)."""
    rollouts = run_dir / "rollouts.jsonl"
    _wait(
        f"step {after_step} in rollouts.jsonl",
        lambda: any(r["step"] == after_step for r in _lines(rollouts)),
        proc,
    )
    engines = _wait("two running engines", lambda: (e := _engines(proc)) and len(e) == 2 and e, proc, 120)
    busy = _wait(
        f"an engine generating in step {after_step + 1}",
        lambda: next((p for p, port in engines.values() if _generating(port)), None),
        proc,
        120,
    )
    assert not any(r["step"] == after_step + 1 for r in _lines(rollouts)), "too late: the step already ended"
    port = next(port for p, port in engines.values() if p is busy)
    unauthenticated = requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2)
    assert unauthenticated.status_code == 401, "the run's engines must refuse requests without its key"
    victims = [p for p, _ in engines.values()] if everyone else [busy]
    for victim in victims:
        victim.send_signal(sig)
    return victims


def test_killed_and_hung_engines_are_replaced_and_no_prompt_is_lost(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PORTABLE_RL_PLATFORM": "cpu"}
    argv = [sys.executable, "-m", "portable_rl", "train", str(RECIPE), "--output-dir", str(run_dir), *ARGS]
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed: list[psutil.Process] = []
    hung: list[psutil.Process] = []
    try:
        # Step 2: both engines die mid-generation; nothing can finish their requests, so groups go back.
        killed = _strike_during_rollout(proc, run_dir, 1, True, signal.SIGKILL)
        # Step 3: one (replacement) engine stops answering while it generates.
        hung = _strike_during_rollout(proc, run_dir, 2, False, signal.SIGSTOP)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait(timeout=60)
        for p in hung:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)
                p.kill()
        log.close()
    out = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert len(killed) == 2 and len(hung) == 1

    rows = _lines(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["engine_restarts"] for r in rows] == [0, 2, 3, 3], out[-4000:]
    requeued = [r["prompts_requeued"] for r in rows]
    assert requeued[0] == 0 and requeued[1] >= 1 and requeued[3] == requeued[2], requeued
    assert all(r["num_samples"] == PROMPTS * 4 for r in rows)
    # It trained through the failures, and after every sync (also into the replacements) engines = trainer.
    assert_trained_and_synced(rows)
    assert "is hung: no answer to /health_generate within 5s" in out  # found by the probe, not by luck
    # Every prompt the source handed out is trained once, in the step it was handed out in.
    from transformers import AutoTokenizer

    from portable_rl.data.prompts import PromptSource
    from portable_rl.recipe import load_recipe

    recipe = load_recipe(RECIPE, ARGS)
    source = PromptSource(recipe.data.train, AutoTokenizer.from_pretrained(run_dir / "model"))
    expected = [item.index for item in source.next_batch(STEPS * PROMPTS)]
    trained = _lines(run_dir / "rollouts.jsonl")
    indices = [r["prompt_index"] for r in trained]
    assert len(indices) == len(set(indices)) == STEPS * PROMPTS, "a prompt was trained twice or lost"
    for step in range(1, STEPS + 1):
        got = sorted(r["prompt_index"] for r in trained if r["step"] == step)
        assert got == sorted(expected[(step - 1) * PROMPTS : step * PROMPTS]), f"step {step}"

    # Step s samples all come from the weights synced after step s-1: the replacement engines (serving half
    # the requests after they joined) had the trainer's current weights and version before their first request.
    for r in trained:
        assert r["weight_versions"] == [r["step"] - 1] * 4, r
