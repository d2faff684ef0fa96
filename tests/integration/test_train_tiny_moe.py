"""The tiny MoE recipe end to end through `portable-rl train`: a random-init Qwen3-MoE trained by two ranks
with expert parallelism 2, served by the CPU engine. Every step must train and every sync must leave the
engine bit-equal to the trainer (per-expert names into the engine's fused experts), with the router's
load-balancing loss logged and the engine's log-probs equal to the trainer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from learning import assert_trained_and_synced

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_tiny_moe_recipe_trains_with_expert_parallelism(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PORTABLE_RL_PLATFORM": "cpu"}
    run = tmp_path / "run"
    recipe = ROOT / "examples" / "tiny_moe_cpu.yaml"
    cmd = [sys.executable, "-m", "portable_rl", "train", str(recipe), "--output-dir", str(run), "run.steps=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert_trained_and_synced(rows)
    for r in rows:
        assert r["moe_aux_loss"] > 0, r
        assert r["logp_abs_diff"] < 1e-4, r  # engine and trainer score the samples alike
    assert len(json.loads((run / "layout.json").read_text())["trainer"]) == 2  # EP2 over two DP ranks
    from safetensors import safe_open

    # the final export gathered every expert of both ranks under the checkpoint's own names
    with safe_open(str(run / "hf" / "model.safetensors"), "pt") as exported:
        with safe_open(str(run / "model" / "model.safetensors"), "pt") as source:
            assert set(exported.keys()) == set(source.keys())
