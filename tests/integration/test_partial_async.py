"""Partial rollouts in async mode, end to end: ``portable-rl train`` on the tiny recipe, disaggregated, with
``run.async_rollout`` and ``rollout.partial_rollout``.

The rollout of step n+1 runs while step n trains (long responses, so it is still running when training ends);
the weight sync of step n cuts it, and its samples finish under the new weights. ``rollouts.jsonl`` must show
each sample's model tokens as spans of at most two consecutive weight versions, in order; some samples must
have been resumed; the run must train and sync as any run does.
"""

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


def test_async_weight_updates_cut_the_rollout_and_its_samples_continue(tmp_path):
    run = tmp_path / "run"
    argv = [
        *(sys.executable, "-m", "portable_rl", "train", str(ROOT / "examples" / "tiny_cpu.yaml")),
        *("--output-dir", str(run), "run.mode=disaggregated", "run.async_rollout=true"),
        *("rollout.partial_rollout=true", "rollout.max_new_tokens=160", "algo.tis_cap=2.0", "run.steps=3"),
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PORTABLE_RL_PLATFORM": "cpu"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_trained_and_synced(rows)
    assert sum(r["rollout/samples_resumed"] for r in rows) > 0, "no rollout was cut"
    for g in map(json.loads, (run / "rollouts.jsonl").read_text().splitlines()):
        for spans, length in zip(g["weight_spans"], g["response_lengths"], strict=True):
            assert spans[0][0] == 0 and spans[-1][1] == length  # the spans cover the response
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            versions = [v for _, _, v in spans]
            # Begun under the weights of two steps back while the last step trained, then (if cut) continued
            # under the weights that step produced.
            assert versions == sorted(versions) and set(versions) <= {g["step"] - 2, g["step"] - 1}
