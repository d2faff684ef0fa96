"""Saved rollouts (the format train_only reads), and the recipe and preflight checks of the debug modes and the
named eval sets: one line naming the value, exit 2, before the run directory exists."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from portable_rl.cli import main
from portable_rl.data.saved_rollouts import (
    SavedRolloutError,
    read_step,
    rollouts_dir,
    saved_steps,
    write_step,
)
from portable_rl.data.types import Group, Sample, SampleStatus

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "tiny_cpu.yaml"


def _groups(seed: int = 0) -> list[Group]:
    rng = random.Random(seed)
    groups = []
    for gid in range(3):
        samples = []
        for _ in range(2):
            n = rng.randint(1, 6)
            samples.append(
                Sample(
                    prompt_index=10 + gid,
                    group_id=gid,
                    prompt_tokens=[rng.randrange(1000) for _ in range(4)],
                    response_tokens=[rng.randrange(1000) for _ in range(n)],
                    rollout_logprobs=[-rng.random() * 7 for _ in range(n)],  # full float64 mantissas
                    loss_mask=[rng.randint(0, 1) for _ in range(n)],
                    reward=rng.random() / 3,
                    status=rng.choice(list(SampleStatus)),
                    weight_version=4,
                    response_text="ünïcode \\boxed{3}",
                    label={"answer": "3"},
                    metadata={"rid": "x-1", "finish_reason": "stop"},
                )
            )
        groups.append(Group(group_id=gid, prompt_index=10 + gid, samples=samples))
    return groups


def test_saved_rollout_reads_back_bit_equal(tmp_path):
    groups = _groups()
    path = write_step(tmp_path / "rollouts", 3, groups)
    assert path.name == "step_3.jsonl" and not list((tmp_path / "rollouts").glob("*.partial"))
    assert read_step(tmp_path / "rollouts", 3) == groups  # dataclass equality: every float bit-equal
    assert saved_steps(tmp_path / "rollouts") == [3]
    assert rollouts_dir(tmp_path) == tmp_path / "rollouts"  # a run directory names its rollouts/
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first["step"] == 3 and first["status"] in {"completed", "truncated", "aborted"}


def test_saved_rollout_errors_name_the_file_and_line(tmp_path):
    write_step(tmp_path, 1, _groups())
    with pytest.raises(SavedRolloutError, match=r"no saved rollout for step 2 .*holds steps \[1\]"):
        read_step(tmp_path, 2)
    bad = tmp_path / "step_1.jsonl"
    lines = bad.read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[1])
    row["rollout_logprobs"] = row["rollout_logprobs"][:-1]  # one short
    bad.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n", encoding="utf-8")
    with pytest.raises(SavedRolloutError, match=r"step_1\.jsonl line 2 .*rollout_logprobs"):
        read_step(tmp_path, 1)


def _cli(capsys, tmp_path, *overrides: str) -> tuple[int, str]:
    out = tmp_path / "run"
    code = main(["train", str(RECIPE), "--output-dir", str(out), *overrides])
    err = capsys.readouterr().err
    assert not out.exists(), "a run directory was created for a bad recipe"
    return code, err


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["run.debug_mode=replay"], ("run.debug_mode='replay'", "rollout_only")),
        (["run.debug_mode=train_only"], ("needs run.rollout_source",)),
        (["run.rollout_source=somewhere"], ("run.rollout_source='somewhere'", "train_only")),
        (
            ["run.debug_mode=rollout_only", "run.mode=disaggregated", "run.async_rollout=true"],
            ("run.async_rollout=true", "run.async_rollout=false"),
        ),
        (["run.debug_mode=train_only", "run.rollout_source=/no/such/dir"], ("is not a directory",)),
        (["data.eval_sets=[{name: a}]"], ("data.eval_sets[a].path is empty",)),
        (["data.eval_sets=[{name: 'a b', path: x.jsonl}]"], ("name='a b'",)),
        (
            ["data.eval_sets=[{name: a, path: data/tiny_eval.jsonl}, {name: a, path: data/tiny_eval.jsonl}]"],
            ("['a'] appear more than once",),
        ),
        (["data.eval_sets=[{name: a, path: data/tiny_eval.jsonl, size: 0}]"], ("size=0",)),
        (["data.eval_sets=[{name: a, path: data/tiny_eval.jsonl, temperature: -1}]"], ("temperature=-1",)),
        (["data.eval_sets=[{name: a, path: data/missing.jsonl}]"], ("missing.jsonl",)),
        (["data.eval_sets=[{name: a, path: data/tiny_eval.jsonl, sise: 2}]"], ("did you mean 'size'",)),
    ],
)
def test_bad_debug_mode_and_eval_set_settings_are_one_line_exit_2(capsys, tmp_path, overrides, needles):
    code, err = _cli(capsys, tmp_path, *overrides)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_train_only_refuses_a_source_missing_steps_or_not_splitting(capsys, tmp_path):
    source = tmp_path / "saved"
    write_step(source / "rollouts", 1, _groups())  # 6 samples
    code, err = _cli(
        capsys, tmp_path, "run.debug_mode=train_only", f"run.rollout_source={source}", "run.steps=2"
    )
    assert code == 2 and "no saved rollout for step 2" in err and len(err.strip().splitlines()) == 1
    code, err = _cli(
        capsys,
        tmp_path,
        "run.debug_mode=train_only",
        f"run.rollout_source={source}",
        "run.steps=1",
        "train.data_parallel=4",
        "rollout.prompts_per_step=4",
    )
    assert code == 2 and "6 samples" in err and "train.data_parallel=4" in err


def test_valid_debug_and_eval_settings_reach_the_plan(capsys, tmp_path):
    source = tmp_path / "saved"
    write_step(source / "rollouts", 1, _groups())
    code = main(
        [
            "train",
            str(RECIPE),
            "--output-dir",
            str(tmp_path / "run"),
            "--dry-run",
            "run.steps=1",
            "run.debug_mode=train_only",
            f"run.rollout_source={source}",
            "data.eval_sets=[{name: held_out, path: data/tiny_eval.jsonl}]",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "eval_sets[held_out]" in out
    assert not (tmp_path / "run").exists()
