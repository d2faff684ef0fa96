"""The algorithms beyond GRPO through `portable-rl train` on the tiny recipe: PPO with the co-located critic (GAE),
GSPO's sequence-level ratio and 2 epochs x 2 mini-batches per rollout, in one 2-step run that is then resumed for
a third step; and the bad inputs of a value model, refused before anything is written."""

from __future__ import annotations

import math

import pytest
from train_cli import ROOT, metrics, train

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

PPO_RECIPE = ROOT / "examples" / "tiny_ppo_cpu.yaml"  # gae, critic, 2 epochs x 2 mini-batches
PPO = ("algo.policy_loss=gspo", "run.save_every=1")


@pytest.mark.slow
def test_ppo_with_critic_gspo_and_mini_batches_trains_and_resumes(tmp_path):
    run = tmp_path / "ppo"
    out = train(run, *PPO, "run.steps=2", recipe=PPO_RECIPE)
    assert out.returncode == 0, out.stderr[-3000:]
    out = train(run, *PPO, "run.steps=3", "--resume", recipe=PPO_RECIPE)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["optimizer_steps"] == 4.0  # 2 epochs x 2 mini-batches
        for key in (
            "loss",
            "grad_norm",
            "pg_clipfrac",
            "gspo_seq_ratio_mean",
            "critic/value_loss",
            "critic/grad_norm",
            "critic/vf_clipfrac",
            "critic/value_mean",
        ):
            assert math.isfinite(row[key]), (row["step"], key, row.get(key))
        assert row["critic/value_loss"] > 0 and row["critic/lr"] == 1e-4
        assert row["weights_changed_frac"] == 1.0 and row["weight_check_ok"] == 1.0
    for step in (1, 2, 3):
        assert (run / "checkpoints" / f"step_{step}" / "trainer" / "critic" / "meta.json").is_file()


def test_a_value_model_of_another_size_is_refused_before_anything_is_written(tmp_path):
    other = build_tiny_checkpoint(tmp_path / "wide", TinySpec(hidden_size=96))
    run = tmp_path / "run"
    out = train(run, "algo.advantage_estimator=gae", f"train.critic.path={other}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "hidden_size=96" in lines[0] and "train.critic.path" in lines[0], lines
    assert not run.exists()
