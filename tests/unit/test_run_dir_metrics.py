"""Run directory protection and metrics files (JSONL, curves PNG, resume truncation)."""

from __future__ import annotations

import pytest

from portable_rl.metrics import MetricsLogger, read_metrics
from portable_rl.run_dir import RunDir, RunDirError


def test_fresh_run_refuses_existing_run(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.check(resume=False)
    rd.prepare({"run": {"steps": 1}})
    rd.checkpoint_dir(1).mkdir()
    (rd.checkpoint_dir(1) / "COMPLETE").write_text("1")
    rd.release()
    before = sorted(p.name for p in rd.path.iterdir())
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        rd.check(resume=False)
    assert sorted(p.name for p in rd.path.iterdir()) == before


def test_a_live_run_holds_its_directory(tmp_path):
    """While a run holds the lock neither a fresh run nor a resume may use the directory; death releases it."""
    rd = RunDir(tmp_path / "run")
    rd.prepare({"run": {"steps": 1}})
    other = RunDir(tmp_path / "run")
    for resume in (False, True):
        with pytest.raises(RunDirError, match="in use by a running portable-rl train"):
            other.check(resume=resume)
    rd.release()
    assert not other.in_use()
    other.check(resume=False)  # no checkpoint yet and nobody holds it: a failed start, replaceable


def test_a_failed_start_is_replaced_but_foreign_files_stay(tmp_path):
    """A run that ended before its first checkpoint: the same command replaces only the run's own files."""
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    (rd.path / "notes.txt").write_text("the user's file")
    rd.prepare({"run": {"steps": 1}})
    (rd.path / "layout.json").write_text("{}")
    (rd.path / "metrics.jsonl").write_text('{"step": 1}\n')
    (rd.path / "model").mkdir()
    (rd.path / "model" / "config.json").write_text("{}")
    rd.log_path.write_text("attempt 1 failed\n")
    rd.checkpoint_dir(1).mkdir()  # an incomplete checkpoint: no COMPLETE
    rd.release()  # the process ended (a kill releases the lock the same way)

    again = RunDir(tmp_path / "run")
    assert again.failed_start()
    again.check(resume=False)
    assert again.prepare({"run": {"steps": 2}}) is True
    names = sorted(p.name for p in again.path.iterdir())
    assert names == [".lock", "checkpoints", "config.yaml", "notes.txt", "train.log"], names
    assert (again.path / "notes.txt").read_text() == "the user's file"
    assert again.log_path.read_text() == "attempt 1 failed\n"  # the earlier attempt's log is kept
    assert "steps: 2" in again.config_path.read_text()
    assert list(again.checkpoints.iterdir()) == []
    again.release()


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
