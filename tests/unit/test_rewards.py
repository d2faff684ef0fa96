"""Reward hub, dynamic-sampling filters and RolloutConfig validation."""

from __future__ import annotations

import asyncio
import textwrap

import pytest
import torch

from portable_rl.config.rollout import RolloutConfig
from portable_rl.data.types import Group, Sample
from portable_rl.rollout.filters import keep_all, load_filter, nonzero_reward_std
from portable_rl.rollout.rewards import (
    MathReward,
    MathRewardConfig,
    RewardLoadError,
    call_reward,
    last_boxed,
    last_number,
    load_reward_fn,
)


def test_boxed_extraction_takes_the_last_balanced_box():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("no box here 42") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 3 + 4 = 7.", "7"),
        ("It costs 1,250 dollars", "1,250"),
        ("x = -3", "-3"),
        ("ratio 3/4", "3/4"),
        ("pi is 3.14", "3.14"),
        ("no digits", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_math_reward_scores_boxed_and_last_number_answers():
    reward = MathReward(MathRewardConfig(format_bonus=0.1))
    assert reward(r"The answer is \boxed{11}.", "11") == pytest.approx(1.1)
    assert reward(r"The answer is \boxed{12}.", "11") == pytest.approx(0.1)  # format bonus only
    assert reward("4 + 7 gives 11", "11") == pytest.approx(1.0)  # last number, no bonus
    assert reward("11 is wrong, it is 12", "11") == 0.0
    assert reward(r"\boxed{0.5}", r"\frac{1}{2}") == pytest.approx(1.1)  # math-verify equivalence
    assert reward("total: 1,000", "1000") == 1.0
    strict = MathReward(MathRewardConfig(accept_last_number=False))
    assert strict("4 + 7 gives 11", "11") == 0.0
    with pytest.raises(ValueError, match="label"):
        reward("11", None)


def test_math_reward_config_rejects_bad_values():
    with pytest.raises(ValueError, match="format_bonus"):
        MathRewardConfig(format_bonus="big")


def test_user_reward_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_reward(response, label, sample, scale=1.0):
                return scale * len(response)

            async def async_reward(response, label, sample):
                return 2.0

            not_callable = 3
            """
        )
    )
    (tmp_path / "broken_rewards.py").write_text("import module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("my_rewards:length_reward", scale=0.5)
    assert asyncio.run(call_reward(fn, "abcd", None, None)) == 2.0
    assert asyncio.run(call_reward(load_reward_fn("my_rewards:async_reward"), "x", None, None)) == 2.0
    assert asyncio.run(call_reward(load_reward_fn("math"), r"\boxed{3}", "3", None)) == 1.0

    with pytest.raises(RewardLoadError) as err:
        load_reward_fn("broken_rewards:f")
    message = str(err.value)
    assert "\n" not in message and "broken_rewards" in message and "module_that_does_not_exist" in message
    with pytest.raises(RewardLoadError, match="no callable 'not_callable'"):
        load_reward_fn("my_rewards:not_callable")
    with pytest.raises(RewardLoadError, match="package.module:function"):
        load_reward_fn("my_rewards.length_reward")


def test_even_token_fraction_scores_the_generated_token_ids():
    fn = load_reward_fn("portable_rl.rollout.rewards:even_token_fraction")

    def sample(tokens):
        return Sample(prompt_index=0, group_id=0, prompt_tokens=[1, 2], response_tokens=tokens)

    score = lambda tokens: asyncio.run(call_reward(fn, "text", None, sample(tokens)))  # noqa: E731
    assert score([2, 4, 6, 8]) == 1.0
    assert score([1, 3, 5, 7]) == 0.0
    assert score([2, 3, 4, 5, 7]) == 0.4  # prompt tokens do not count
    assert score([]) == 0.0
    # A uniform random policy earns about half of it, and four samples of 16 tokens rarely tie.
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randint(0, 512, (16,), generator=gen).tolist() for _ in range(400)]
    rewards = [fn("text", None, sample(d)) for d in draws]
    assert 0.45 < sum(rewards) / len(rewards) < 0.55
    ties = sum(len(set(rewards[i : i + 4])) == 1 for i in range(0, len(rewards), 4))
    assert ties <= 2
    with pytest.raises(ValueError, match="needs the Sample|with the Sample"):
        fn("text", None, None)


def test_reward_must_return_a_number():
    with pytest.raises(TypeError, match="not a number"):
        asyncio.run(call_reward(lambda response, label, sample: "high", "x", None, None))


def _group(rewards):
    samples = [
        Sample(prompt_index=0, group_id=0, prompt_tokens=[1], response_tokens=[2], reward=r) for r in rewards
    ]
    return Group(group_id=0, prompt_index=0, samples=samples)


def test_filters():
    assert nonzero_reward_std(_group([0.0, 1.0, 0.0]))
    assert not nonzero_reward_std(_group([1.0, 1.0, 1.0]))
    assert not nonzero_reward_std(_group([0.5]))
    assert load_filter(None) is keep_all
    assert load_filter("nonzero_std") is nonzero_reward_std
    with pytest.raises(RewardLoadError, match="group filter"):
        load_filter("no_such_module_xyz:keep")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("samples_per_prompt", 0, "samples_per_prompt"),
        ("top_p", 0.0, "top_p"),
        ("top_k", 0, "top_k"),
        ("temperature", -0.1, "temperature"),
        ("reward", "my_reward", "reward"),
        ("filter", "std", "filter"),
        ("engine", "vllm", "engine"),
        ("router_policy", "fastest", "router_policy"),
        ("over_sample_factor", 0.5, "over_sample_factor"),
    ],
)
def test_rollout_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**{field: value})


def test_rollout_config_sampling_params():
    cfg = RolloutConfig(temperature=0.8, top_k=20, stop_token_ids=[5], eval_temperature=0.0)
    assert cfg.sampling_params() == {
        "max_new_tokens": 256,
        "temperature": 0.8,
        "top_p": 1.0,
        "top_k": 20,
        "stop_token_ids": [5],
    }
    assert cfg.sampling_params(eval_mode=True)["temperature"] == 0.0


def test_math_verify_output_under_the_progress_bar_is_warnings_once_and_errors(monkeypatch, caplog):
    """math-verify's timeouts-off notice never reaches the terminal; other warnings once; errors always."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import math_verify.grader
    import math_verify.parser

    from portable_rl.rollout.rewards import _parsed

    # math-verify prints its notice once per module and process (racy across threads): make it due again.
    monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False)
    monkeypatch.setattr(math_verify.grader, "TIMEOUT_WARNING_SHOWN", False)
    _parsed.cache_clear()
    reward = MathReward()
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(4) as pool:
        scores = list(pool.map(lambda i: reward(f"so \\boxed{{{i}}}", str(i % 3)), range(12)))
    assert scores == [1.0 if i == i % 3 else 0.0 for i in range(12)]
    assert not [r for r in caplog.records if r.name.startswith("math_verify")]

    log = logging.getLogger("math_verify.parser")
    with caplog.at_level(logging.WARNING):
        log.warning("odd input")
        log.warning("odd input")
        log.error("parser failed")
        log.error("parser failed")
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "math_verify.parser"] == [
        ("WARNING", "odd input"),
        ("ERROR", "parser failed"),
        ("ERROR", "parser failed"),
    ]
