"""Run directory protection and metrics files (JSONL, curves PNG, resume truncation)."""

from __future__ import annotations

import pytest

from portable_rl.metrics import MetricsLogger, read_metrics
from portable_rl.run_dir import RunDir, RunDirError


def test_fresh_run_refuses_existing_run(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.check(resume=False)
    rd.prepare({"run": {"steps": 1}})
    before = sorted(p.name for p in rd.path.iterdir())
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        rd.check(resume=False)
    assert sorted(p.name for p in rd.path.iterdir()) == before


def test_resume_requires_a_run(tmp_path):
    with pytest.raises(RunDirError, match="holds no run"):
        RunDir(tmp_path / "none").check(resume=True)
    assert not (tmp_path / "none").exists()


def test_last_checkpoint_ignores_incomplete(tmp_path):
    rd = RunDir(tmp_path)
    rd.prepare({})
    for step, complete in ((2, True), (4, True), (6, False)):
        d = rd.checkpoint_dir(step)
        d.mkdir()
        if complete:
            (d / "COMPLETE").write_text("")
    assert rd.last_checkpoint()[0] == 4


def test_metrics_log_plot_and_resume_truncation(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 5):
        log.log(step, {"reward_mean": step / 10, "loss": 1.0 / step})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert any((tmp_path / "tb").iterdir())
    resumed = MetricsLogger(tmp_path, resume_after_step=2)
    resumed.log(3, {"reward_mean": 0.9})
    resumed.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward_mean"] == 0.9


def test_rollout_log_one_line_per_group_and_resume_truncation(tmp_path):
    from portable_rl.data.types import Group, Sample

    def group(step: int, index: int) -> Group:
        samples = [
            Sample(index, step * 10 + index, [1, 2], [3] * (k + 1), reward=float(k), weight_version=step - 1)
            for k in range(2)
        ]
        return Group(step * 10 + index, index, samples)

    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log_rollout(step, [group(step, 2 * step), group(step, 2 * step + 1)])
    rows = read_metrics(tmp_path / "rollouts.jsonl")
    assert [(r["step"], r["prompt_index"]) for r in rows] == [(1, 2), (1, 3), (2, 4), (2, 5), (3, 6), (3, 7)]
    assert rows[0]["rewards"] == [0.0, 1.0] and rows[0]["response_lengths"] == [1, 2]
    assert rows[-1]["weight_versions"] == [2, 2]
    MetricsLogger(tmp_path, resume_after_step=1)
    assert [r["step"] for r in read_metrics(tmp_path / "rollouts.jsonl")] == [1, 1]
