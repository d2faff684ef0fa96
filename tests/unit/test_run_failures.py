"""A run that fails after it started: one line on stderr, the traceback in RUN_DIR/train.log, a usable run dir.

The training job itself is replaced by stand-ins (``portable_rl.train.train``) that write what a real run writes
and then fail the way a worker, an engine or Ctrl-C does; everything before it (recipe, preflight, run
directory, log file) is the real command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from portable_rl.cli import main
from portable_rl.run_dir import RunDir


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"prompt": "1 + 1?", "label": "2"}) + "\n", encoding="utf-8"
    )
    body = {
        "model": {"path": "tiny"},
        "data": {"train": {"path": "train.jsonl"}},
        "rollout": {"prompts_per_step": 1, "samples_per_prompt": 2, "max_new_tokens": 8},
        "run": {"steps": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


class RemoteError(Exception):
    """What a remote-call wrapper looks like (Ray's task error): a long text and the worker's error as cause."""

    def __init__(self, cause: BaseException):
        super().__init__("ray::MegatronActor.train_rl_step() (pid=1234)\n  File ...\n" * 20)
        self.cause = cause


def fake_train(fail: BaseException | None, checkpoint_step: int | None = None):
    def train(recipe, run_dir, resume=False):
        (run_dir.path / "layout.json").write_text("{}", encoding="utf-8")
        (run_dir.path / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
        if checkpoint_step is not None:
            done = run_dir.checkpoint_dir(checkpoint_step)
            done.mkdir(parents=True)
            (done / "COMPLETE").write_text(str(checkpoint_step), encoding="utf-8")
        if fail is not None:
            raise fail
        (run_dir.path / "summary.json").write_text('{"steps": 2}', encoding="utf-8")
        return [{"step": 1}, {"step": 2}]

    return train


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_failure_before_a_checkpoint_then_the_same_command_starts_over(recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    argv = ["train", str(recipe), "--output-dir", str(run)]
    boom = RuntimeError("engine 0 exited with code -9 (killed)\nsecond line of detail")
    monkeypatch.setattr("portable_rl.train.train", fake_train(boom))
    assert main(argv) == 1
    out, err = capsys.readouterr()
    line = one_line(err)
    assert line.startswith(
        "portable-rl train: error: the run failed: RuntimeError: engine 0 exited with code -9"
    )
    assert str(run / "train.log") in line and "the same command starts the run over" in line
    assert "second line" not in line
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "Traceback" in log and "second line of detail" in log and "attempt: portable-rl train" in log
    assert not RunDir(run).in_use()  # the lock went with the command

    def check_replaced(recipe_, run_dir, resume=False):
        assert not (run_dir.path / "layout.json").exists() and not (run_dir.path / "metrics.jsonl").exists()
        return fake_train(None)(recipe_, run_dir, resume)

    monkeypatch.setattr("portable_rl.train.train", check_replaced)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "starting it over" in err and json.loads(out)["steps"] == 2
    assert (run / "train.log").read_text(encoding="utf-8").count("attempt: portable-rl train") == 2


def test_failure_after_a_checkpoint_names_the_worker_error_and_resume(recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    inner = ValueError("loss is nan at step 2")
    monkeypatch.setattr("portable_rl.train.train", fake_train(RemoteError(inner), checkpoint_step=1))
    assert main(["train", str(recipe), "--output-dir", str(run)]) == 1
    line = one_line(capsys.readouterr().err)
    assert "ValueError: loss is nan at step 2" in line and "ray::" not in line
    assert "the last checkpoint is step 1; continue with --resume" in line
    assert (run / "checkpoints" / "step_1" / "COMPLETE").is_file()
    # Without --resume the run with a checkpoint is protected, not replaced.
    assert main(["train", str(recipe), "--output-dir", str(run)]) == 2
    assert "already holds a run; pass --resume" in one_line(capsys.readouterr().err)


class ActorDied(Exception):
    """An actor that died in its constructor: no cause, the worker's traceback inside the text, colour codes."""


def test_an_actor_that_died_is_named_by_its_own_error(recipe, tmp_path, capsys, monkeypatch):
    text = (
        "The actor died because of an error raised in its creation task, \x1b[36mray::TrainerWorker.__init__()"
        '\x1b[39m (pid=1, ip=10.0.0.1)\n  File "actor.py", line 238, in _build\n    tconfig = ...\n'
        '  File "transformer_config.py", line 1156, in __post_init__\n    raise ValueError(\n'
        'ValueError: When using recompute_granuarlity: bogus must be "full"or "selective".'
    )
    monkeypatch.setattr("portable_rl.train.train", fake_train(ActorDied(text)))
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "run")]) == 1
    line = one_line(capsys.readouterr().err)
    assert "the run failed: ValueError: When using recompute_granuarlity: bogus" in line, line
    assert "\x1b" not in line and "ray::" not in line


def test_interrupt_is_one_line_and_exit_130(recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr("portable_rl.train.train", fake_train(KeyboardInterrupt()))
    assert main(["train", str(recipe), "--output-dir", str(run)]) == 130
    line = one_line(capsys.readouterr().err)
    assert "the run was interrupted" in line and "train.log" in line
    assert "KeyboardInterrupt" in (run / "train.log").read_text(encoding="utf-8")
