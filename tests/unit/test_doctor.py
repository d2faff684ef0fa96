"""`portable-rl doctor` on this host, and on simulated ROCm / CUDA hosts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fake_hosts import simulate_cuda, simulate_rocm

from portable_rl.cli import main


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "portable_rl.cli", *args], capture_output=True, text=True, env=full_env
    )


def test_doctor_json_on_cpu_host():
    env = {k: v for k, v in os.environ.items() if k != "PORTABLE_RL_PLATFORM"}
    out = subprocess.run(
        [sys.executable, "-m", "portable_rl.cli", "doctor", "--json"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["name"] == "cpu" and facts["dist_backend"] == "gloo"
    assert facts["versions"]["megatron-core"] == "0.16.1"


def test_unavailable_platform_is_one_line_exit_2():
    out = _cli("doctor", PORTABLE_RL_PLATFORM="rocm")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "rocm" in lines[0] and "not available" in lines[0]


def test_doctor_simulated_rocm(monkeypatch, capsys):
    simulate_rocm(monkeypatch, ["gfx942"] * 8)
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "auto")
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "platform: rocm" in text
    assert "RCCL" in text and "float8_e4m3fnuz" in text
    assert "HIP_VISIBLE_DEVICES" in text and "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES" in text
    assert "amd-aiter: not installed: SGLang uses 'triton'" in text
    assert "0.1.0-rocm-gfx942" in text


def test_doctor_simulated_cuda_json(monkeypatch, capsys):
    simulate_cuda(monkeypatch, [(9, 0)] * 2)
    monkeypatch.delenv("PORTABLE_RL_PLATFORM", raising=False)
    assert main(["doctor", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["name"] == "cuda" and facts["comm_library"] == "NCCL"
    assert facts["sglang_server_args"]["attention_backend"] == "fa3"
    assert facts["worker_env_example"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert any(m.startswith("flash-attn: not installed") for m in facts["missing"])


def test_help_lists_doctor():
    out = _cli("--help")
    assert out.returncode == 0 and "doctor" in out.stdout
    out = _cli("doctor", "--help")
    assert "--json" in out.stdout


def test_no_command_exits_2():
    assert _cli().returncode == 2
