"""Arithmetic word-problem generator: deterministic, correct labels, readable by the prompt source."""

from __future__ import annotations

import json
import re

import pytest

from portable_rl.data.arithmetic import generate_problems, main, write_jsonl
from portable_rl.data.prompts import PromptConfig, PromptSource


def test_deterministic_per_seed_and_varied():
    a = generate_problems(50, seed=1, ops=("add", "sub"))
    assert a == generate_problems(50, seed=1, ops=("add", "sub"))
    assert a != generate_problems(50, seed=2, ops=("add", "sub"))
    assert len({p["prompt"] for p in a}) > 40
    assert {p["op"] for p in a} == {"add", "sub"}


def test_labels_are_the_right_answers():
    for p in generate_problems(200, seed=0, min_operand=0, max_operand=20, ops=("add", "sub")):
        a, b = (int(x) for x in re.findall(r"\d+", p["prompt"])[:2])
        assert (a, b) == (p["a"], p["b"])
        expected = a + b if p["op"] == "add" else a - b
        assert p["label"] == str(expected) and expected >= 0
        assert p["prompt"].endswith("Put the final answer in \\boxed{}.")


def test_example_wording_and_singular():
    texts = [p["prompt"] for p in generate_problems(300, seed=0, min_operand=1, max_operand=2)]
    assert any(
        re.match(r"\w+ has \d \w+ and gets \d more\. How many \w+ does \w+ have now\?", t) for t in texts
    )
    assert not any(
        re.search(r"\b1 (apples|pencils|marbles|books|cookies|stickers|shells|cards)\b", t) for t in texts
    )


def test_jsonl_round_trip_through_prompt_source(tmp_path):
    from portable_rl.models.tiny import train_tokenizer

    path = write_jsonl(tmp_path / "sub" / "arith.jsonl", 8, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == generate_problems(8, seed=3)
    src = PromptSource(PromptConfig(path=str(path), shuffle=False), train_tokenizer(512))
    item = src.next_batch(1)[0]
    assert item.label == rows[0]["label"] and item.metadata == {
        "a": rows[0]["a"],
        "b": rows[0]["b"],
        "op": "add",
    }


def test_errors_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"ops=\['mul'\] must be a non-empty subset of add, sub"):
        generate_problems(3, ops=("mul",))
    with pytest.raises(ValueError, match=r"operand range \[5, 2\] must satisfy 0 <= min <= max"):
        generate_problems(3, min_operand=5, max_operand=2)
    assert main([str(tmp_path / "o.jsonl"), "--n", "4", "--ops", "add,sub"]) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 4
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "x.jsonl"), "--ops", "mul"])
    assert info.value.code == 2
    assert "arithmetic: error: ops=['mul']" in capsys.readouterr().err
