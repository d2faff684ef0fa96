"""Debug modes and eval sets end to end through `portable-rl train` with the tiny recipe.

1. A normal run saves its samples (``run.save_rollouts``) and evaluates two named eval sets each step.
2. ``train_only`` from those saves (no engines) must reproduce the normal run's training bit for bit: every
   trainer metric of every step equal, and the final weights equal. The comparison can fail: a sample read
   back differently, a different reward or log-prob, a different step order or a different initial model all
   change the loss.
3. ``rollout_only`` (no trainer) saves a step from the initial weights: the same tokens the normal run's first
   step sampled (sampling is seeded per sample), and no trainer checkpoint or final model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_cli import ROOT, metrics, train

from portable_rl.data.saved_rollouts import read_step, saved_steps

NOT_REPRODUCED = ("time_", "tokens_per_s", "rollout/", "prompts_skipped_too_long", "prompt_lines_too_long")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("debug") / "normal"
    eval_sets = (
        "data.eval_sets=[{name: tiny, path: "
        + str(ROOT / "examples/data/tiny_eval.jsonl")
        + ", size: 2}, {name: arith, path: "
        + str(ROOT / "examples/data/arithmetic_eval.jsonl")
        + ", size: 2, samples_per_prompt: 2, temperature: 1.0}]"
    )
    out = train(run, "run.steps=2", "run.save_rollouts=true", "run.eval_every=1", eval_sets)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_normal_run_saves_rollouts_and_logs_each_eval_set(normal_run):
    assert saved_steps(normal_run / "rollouts") == [1, 2]
    rows = metrics(normal_run)
    for row in rows:
        assert "eval_reward_mean" in row  # the single data.eval set still logs as before
        assert row["eval/tiny/samples"] == 2.0  # 2 prompts x 1 sample
        assert row["eval/arith/samples"] == 4.0  # 2 prompts x 2 samples
        for name in ("tiny", "arith"):
            assert 0.0 <= row[f"eval/{name}/reward_mean"] <= 1.0
            assert row[f"eval/{name}/response_length_mean"] > 0
    groups = read_step(normal_run / "rollouts", 1)
    samples = [s for g in groups for s in g.samples]
    assert len(samples) == rows[0]["num_samples"] == 8
    for s in samples:
        assert s.response_tokens and len(s.rollout_logprobs) == len(s.response_tokens)
        assert s.weight_version == 0  # step 1 generates from the initial weights
    assert {s.weight_version for g in read_step(normal_run / "rollouts", 2) for s in g.samples} == {1}


def test_train_only_reproduces_the_normal_runs_training_bit_for_bit(normal_run, tmp_path):
    replay = tmp_path / "replay"
    out = train(replay, "run.steps=2", "run.debug_mode=train_only", f"run.rollout_source={normal_run}")
    assert out.returncode == 0, out.stderr[-3000:]
    want, got = metrics(normal_run), metrics(replay)
    assert [r["step"] for r in got] == [1, 2]
    for w, g in zip(want, got, strict=True):
        keys = {k for k in g if not k.startswith(NOT_REPRODUCED)}
        assert {"loss", "grad_norm", "reward_mean"} <= keys
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, f"step {g['step']} differs"
    a, b = load_file(normal_run / "hf" / "model.safetensors"), load_file(replay / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), "train_only ended on other weights than the run it replays"
    layout = json.loads((replay / "layout.json").read_text())
    assert layout["engines"] == [] and layout["trainer"]  # no engine was started


def test_rollout_only_saves_samples_without_a_trainer(normal_run, tmp_path):
    run = tmp_path / "gen"
    out = train(run, "run.steps=1", "run.debug_mode=rollout_only")
    assert out.returncode == 0, out.stderr[-3000:]
    layout = json.loads((run / "layout.json").read_text())
    assert layout["trainer"] == [] and layout["engines"]
    assert not (run / "hf").exists() and not (run / "checkpoints" / "step_1" / "trainer").exists()
    assert (run / "checkpoints" / "step_1" / "COMPLETE").is_file()
    row = metrics(run)[0]
    assert "loss" not in row and row["num_samples"] == 8
    mine = [s for g in read_step(run / "rollouts", 1) for s in g.samples]
    theirs = [s for g in read_step(normal_run / "rollouts", 1) for s in g.samples]
    assert [s.response_tokens for s in mine] == [s.response_tokens for s in theirs]
    assert [s.reward for s in mine] == [s.reward for s in theirs]
    # --resume needs a trainer checkpoint: one line, exit 2, before anything is touched
    again = train(run, "run.steps=2", "run.debug_mode=rollout_only", "--resume")
    assert again.returncode == 2 and "rollout_only" in again.stderr
