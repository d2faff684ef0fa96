"""The shipped multi-turn tool-calling example: the calculator tool and the ``calculator_agent`` hook.

The agent runs through the real ``RolloutManager`` against a scripted engine (``stub_engine.StubEngine``) that
writes, as token ids of the tiny model's tokenizer, a calculator call in the first turn and an answer once it
sees the tool's message. Checked: the conversation's tokens are what the chat template renders for the same
messages turn by turn, only the model's turns have loss mask 1, a failing tool call puts its error text in the
observation, ``max_turns`` bounds the episode, and a cut episode continues where it stopped.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from stub_engine import StubEngine

from portable_rl.config.rollout import RolloutConfig
from portable_rl.data.types import Sample
from portable_rl.models.tiny import train_tokenizer
from portable_rl.rollout.examples import tool_calling
from portable_rl.rollout.examples.calculator import CalculatorError, calculate
from portable_rl.rollout.generate_hook import Transcript
from portable_rl.rollout.manager import RolloutManager

TOK = train_tokenizer(512)
EOS = TOK.eos_token_id
QUESTION = [{"role": "user", "content": "What is 2 + 3 * 4?"}]


@pytest.mark.parametrize(
    ("expr", "value"),
    [("2+3*4", "14"), ("(1 + 2) / 4", "0.75"), ("-7 // 2", "-4"), ("2 ** 10", "1024"), ("10 % 4", "2")],
)
def test_the_calculator_evaluates_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("__import__('os').system('true')", "unsupported syntax: Call"),
        ("x + 1", "unsupported syntax: Name"),
        ("(1).real", "unsupported syntax: Attribute"),
        ("'a' * 3", "unsupported syntax: Constant"),
        ("1 < 2", "unsupported syntax: Compare"),
        ("2 ** 1000", "exponent 1000 is larger than 64"),
        ("9 ** 40", "result out of range"),
        ("1 / 0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 201, "longer than 200 characters"),
        ("", "empty expression"),
    ],
)
def test_the_calculator_refuses_anything_else(expr, why):
    with pytest.raises(CalculatorError, match=why.replace("(", r"\(").replace("*", r"\*")):
        calculate(expr)


def _ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def scripted(first: str, answer: str = "The answer is 14"):
    """Turn 1 writes ``first``; once the conversation holds a tool message, the model writes ``answer``."""

    def script(payload: dict[str, Any]) -> tuple[list[int], str]:
        seen = TOK.decode(payload["input_ids"], skip_special_tokens=False)
        text = answer if "<|im_start|>tool" in seen else first
        ids, limit = _ids(text) + [EOS], payload["sampling_params"]["max_new_tokens"]
        return (ids, "stop") if len(ids) <= limit else (ids[:limit], "length")

    return script


def reward(response: str, label: Any, sample: Any) -> float:
    return tool_calling.calculator_reward(response, label, sample, tool_bonus=0.5)


def _rollout(engine: StubEngine, max_turns: int = 3, **options: Any) -> list[Sample]:
    cfg = RolloutConfig(
        samples_per_prompt=1, max_new_tokens=24, max_turns=max_turns, reward=f"{__name__}:reward"
    )
    hook = functools.partial(tool_calling.calculator_agent, **options)
    mgr = RolloutManager(cfg, engine.url, TOK, engine_urls=[engine.url], generate_hook=hook)
    prompt = TOK.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"]) if hasattr(prompt, "keys") else list(prompt)
    return [s for g in mgr.rollout([(0, prompt, "14")]).groups for s in g.samples]


def test_two_turns_follow_the_chat_template_and_mask_the_tool_message():
    engine = StubEngine(scripted("<calc>2+3*4</calc>"))
    try:
        (s,) = _rollout(engine)
    finally:
        engine.close()
    turn1, turn2 = _ids("<calc>2+3*4</calc>") + [EOS], _ids("The answer is 14") + [EOS]
    glue = s.response_tokens[len(turn1) : len(s.response_tokens) - len(turn2)]
    assert s.response_tokens == turn1 + glue + turn2
    assert s.loss_mask == [1] * len(turn1) + [0] * len(glue) + [1] * len(turn2)
    assert (
        TOK.decode(glue, skip_special_tokens=False)
        == "\n<|im_start|>tool\n14<|im_end|>\n<|im_start|>assistant\n"
    )
    # Per-turn templating: the whole sequence is what the template renders for these messages.
    messages = [
        *QUESTION,
        {"role": "assistant", "content": "<calc>2+3*4</calc>"},
        {"role": "tool", "content": "14"},
        {"role": "assistant", "content": "The answer is 14"},
    ]
    rendered = TOK.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith(TOK.decode(s.prompt_tokens + s.response_tokens, skip_special_tokens=False))
    assert s.metadata["turns"] == 2 and s.metadata["tool_calls"] == 1 and s.metadata["tool_errors"] == 0
    assert s.metadata["final_text"] == "The answer is 14"
    assert s.reward == 1.5  # right answer + a tool call that worked
    assert len(engine.requests) == 2 and engine.requests[0]["sampling_params"]["stop"] == ["</calc>"]


def test_a_failing_tool_call_puts_its_error_in_the_observation():
    engine = StubEngine(scripted("<calc>2+x</calc>", answer="I do not know"))
    try:
        (s,) = _rollout(engine)
    finally:
        engine.close()
    text = TOK.decode(s.response_tokens, skip_special_tokens=False)
    assert "<|im_start|>tool\nerror: unsupported syntax: Name<|im_end|>" in text
    assert s.metadata["tool_errors"] == 1 and s.reward == 0.0


def test_max_turns_bounds_an_episode_that_always_calls_the_tool():
    engine = StubEngine(scripted("<calc>1+1</calc>", answer="<calc>2+2</calc>"))
    try:
        (s,) = _rollout(engine, max_turns=3)
    finally:
        engine.close()
    assert len(engine.requests) == 3 and s.metadata["turns"] == 3 and s.metadata["tool_calls"] == 2
    runs = sum(1 for i, m in enumerate(s.loss_mask) if m and (i == 0 or not s.loss_mask[i - 1]))
    assert runs == 3


def test_empty_markers_make_every_turn_a_call():
    assert tool_calling.parse_call("3 + 4", "", "") == "3 + 4"
    assert tool_calling.parse_call("so <calc>3+4</calc>", "<calc>", "</calc>") == "3+4"
    assert tool_calling.parse_call("no call here", "<calc>", "</calc>") is None
    assert tool_calling.parse_call("<calc>3+4 never closed", "<calc>", "</calc>") is None


def test_a_cut_episode_knows_its_turns_and_its_unfinished_turn():
    done = Transcript([1, 2, 9, 9, 3], [0.0] * 5, [1, 1, 0, 0, 1], [0] * 5)
    assert tool_calling._turns_so_far(done) == (2, [3])  # cut mid-turn 2: continue it
    done = Transcript([1, 2, 9, 9], [0.0] * 4, [1, 1, 0, 0], [0] * 4)
    assert tool_calling._turns_so_far(done) == (1, [])  # cut after the observation: turn 2 starts


def test_max_response_tokens_bounds_the_whole_episode():
    engine = StubEngine(scripted("<calc>1+1</calc>", answer="<calc>2+2</calc>"))
    try:
        (s,) = _rollout(engine, max_turns=5, max_response_tokens=40)
    finally:
        engine.close()
    # Turn 1 (17 tokens) and its observation (15) leave 8 tokens: turn 2 is cut there and the episode ends.
    asked = [r["sampling_params"]["max_new_tokens"] for r in engine.requests]
    assert asked == [24, 8] and s.response_length == 40
    assert s.metadata["turns"] == 2 and s.metadata["tool_calls"] == 1
