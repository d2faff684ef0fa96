"""`portable-rl train` as a subprocess, the way a user runs it: on the CPU platform, with Ray's auth off.

``train(run_dir, *overrides, recipe=TINY_RECIPE)`` runs it to the end and returns the finished process
(output captured as text, 900 s at the most); ``train_argv`` and ``train_env()`` are its command line and
environment for tests that start the run themselves (to kill it, say). ``metrics(run_dir)`` reads the run's
``metrics.jsonl``, one dict a step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_RECIPE = ROOT / "examples" / "tiny_cpu.yaml"


def train_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PORTABLE_RL_PLATFORM": "cpu"}


def train_argv(run_dir: Path, *args: str, recipe: Path = TINY_RECIPE) -> list[str]:
    return [sys.executable, "-m", "portable_rl", "train", str(recipe), "--output-dir", str(run_dir), *args]


def train(run_dir: Path, *args: str, recipe: Path = TINY_RECIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_argv(run_dir, *args, recipe=recipe),
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=900,
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
