"""The real SGLang server for the ``sglang``-marked tests: started by portable_rl's own launcher on CPU.

``sglang_python()`` is the interpreter of the separate SGLang venv (``make sglang-venv``; ``SGLANG_VENV``
overrides its path); without one the test fails with that fix. ``launch_sglang(model_path, api_key)`` starts a
server on that checkpoint with the CPU platform's SGLang arguments and returns it once healthy (the caller
stops it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from portable_rl.rollout.engines.launcher import EngineProcess, EngineSpec, launch_engine


def sglang_python() -> str:
    repo = Path(__file__).resolve().parents[2]
    venv = Path(os.environ.get("SGLANG_VENV") or repo / ".venv-sglang")
    python = venv / "bin" / "python"
    if not python.is_file():
        pytest.fail(
            f"no SGLang venv at {venv}: run `make sglang-venv` (or point SGLANG_VENV at one)", pytrace=False
        )
    return str(python)


def launch_sglang(model_path: str | Path, api_key: str | None = None) -> EngineProcess:
    start = time.monotonic()
    proc = launch_engine(
        EngineSpec(
            model_path=str(model_path),
            kind="sglang",
            python=sglang_python(),
            api_key=api_key,
            env={"SGLANG_USE_CPU_ENGINE": "1", "HF_HUB_OFFLINE": "1"},
            engine_args={"max_total_tokens": 4096, "skip_server_warmup": True},
            startup_timeout_s=600,
        )
    )
    print(f"\nSGLang server healthy after {time.monotonic() - start:.1f} s at {proc.url}")
    return proc
