"""Generate hooks: the contract between the rollout manager and a user's (possibly multi-turn) generation.

The rollouts below run the real ``RolloutManager`` / ``EngineGroup.rollout`` over HTTP against a scripted
stand-in engine (``stub_engine.StubEngine``). Checked: a two-turn hook's tokens, engine log-probs, loss mask
and weight spans reach the sample; each engine call gets its own request id and seed; the default hook makes
exactly the request portable_rl always made; a hook that raises, or returns lengths that differ, ends the
rollout with one error naming the hook, the prompt and the field; bad hooks are refused when loaded.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import pytest
from stub_engine import StubEngine

from portable_rl.config.rollout import RolloutConfig
from portable_rl.data.types import SampleStatus
from portable_rl.rollout.generate_hook import (
    GenerateHookError,
    GenerateHookLoadError,
    HookOutput,
    Transcript,
    load_generate_hook,
    single_turn,
)
from portable_rl.rollout.manager import RolloutManager, sample_seed

TOKENIZER = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))
ENV = [901, 902]  # what the two-turn hook's "environment" inserts between the turns


def reward(response: str, label: Any, sample: Any) -> float:
    return float(len(sample.response_tokens))


async def two_turns(sample, sampling_params, engine) -> HookOutput:
    """Turn 1, two environment tokens, turn 2 (on the whole conversation so far)."""
    done = Transcript()
    first = await engine.generate(sample.prompt_tokens, sampling_params)
    done.add_model(first)
    done.add_env(ENV)
    second = await engine.generate(sample.prompt_tokens + done.tokens, sampling_params)
    done.add_model(second)
    return done.output(second.finish_reason, {"turns": 2})


async def raises(sample, sampling_params, engine) -> HookOutput:
    if sample.prompt_index == 1:
        raise KeyError("no tool named 'search'")
    return await single_turn(sample, sampling_params, engine)


async def short_logprobs(sample, sampling_params, engine) -> HookOutput:
    out = await single_turn(sample, sampling_params, engine)
    out.logprobs = out.logprobs[:-1]
    return out


@pytest.fixture
def engine():
    e = StubEngine()
    yield e
    e.close()


def _manager(engine: StubEngine, hook=None, **cfg: Any) -> RolloutManager:
    cfg.setdefault("samples_per_prompt", 2)
    rollout = RolloutConfig(max_new_tokens=3, reward=f"{__name__}:reward", **cfg)
    return RolloutManager(rollout, engine.url, TOKENIZER, engine_urls=[engine.url], generate_hook=hook)


PROMPTS = [(0, [11, 12], None), (1, [21, 22, 23], None)]


def test_a_two_turn_hook_masks_what_the_environment_inserted(engine):
    result = _manager(engine, two_turns).rollout(PROMPTS, step=3, seed=7)
    samples = [s for g in result.groups for s in g.samples]
    assert len(samples) == 4 and all(s.status == SampleStatus.TRUNCATED for s in samples)
    for s in samples:
        assert s.response_tokens == [201, 202, 203, *ENV, 201, 202, 203]
        assert s.loss_mask == [1, 1, 1, 0, 0, 1, 1, 1]
        assert s.rollout_logprobs == pytest.approx([-2.01, -2.02, -2.03, 0, 0, -2.01, -2.02, -2.03])
        assert s.metadata["weight_spans"] == [[0, 3, 0], [5, 8, 0]] and s.metadata["turns"] == 2
        assert s.reward == 8.0
    # The second turn saw the whole conversation; every call had its own request id and seed.
    by_rid = {r["rid"]: r for r in engine.requests}
    assert len(by_rid) == 8
    for g in result.groups:
        for j in range(2):
            rid = next(r for r in by_rid if r.endswith(f"-{g.group_id}-{j}"))
            first, second = by_rid[rid], by_rid[f"{rid}-c1"]
            prompt = dict((i, p) for i, p, _ in PROMPTS)[g.prompt_index]
            assert second["input_ids"] == prompt + [201, 202, 203, *ENV]
            assert first["sampling_params"]["sampling_seed"] == sample_seed(7, 3, g.prompt_index, j)
            assert second["sampling_params"]["sampling_seed"] != first["sampling_params"]["sampling_seed"]
    assert result.metrics["rollout/generated_tokens"] == 4 * 6  # model tokens only


def test_the_default_hook_makes_the_request_portable_rl_always_made(engine):
    result = _manager(engine).rollout(PROMPTS, step=1, seed=0)
    assert len(engine.requests) == 4
    for r in engine.requests:
        gid, j = map(int, r["rid"].rsplit("-", 2)[1:])
        prompt_index = next(g.prompt_index for g in result.groups if g.group_id == gid)
        assert r["sampling_params"] == {
            **RolloutConfig(max_new_tokens=3).sampling_params(),
            "sampling_seed": sample_seed(0, 1, prompt_index, j),
        }
        assert r["return_logprob"] is True
    s = result.groups[0].samples[0]
    assert s.loss_mask == [1, 1, 1] and s.metadata["weight_spans"] == [[0, 3, 0]]
    assert s.metadata["weight_version"] == "0" and s.metadata["finish_reason"] == "length"


def test_a_hook_that_raises_names_itself_and_the_prompt(engine):
    with pytest.raises(GenerateHookError) as err:
        _manager(engine, raises).rollout(PROMPTS)
    msg = str(err.value)
    assert f"{__name__}:raises" in msg and "on prompt 1" in msg
    assert "KeyError" in msg and "no tool named 'search'" in msg


def test_a_hook_returning_mismatched_lengths_is_refused_naming_the_field(engine):
    with pytest.raises(GenerateHookError, match=r"returned 2 logprobs for 3 tokens; return one per token"):
        _manager(engine, short_logprobs).rollout(PROMPTS[:1])

    async def bad_mask(sample, sampling_params, engine) -> HookOutput:
        out = await single_turn(sample, sampling_params, engine)
        out.loss_mask = [1]
        return out

    with pytest.raises(GenerateHookError, match=r"returned 1 loss_mask for 3 tokens"):
        _manager(engine, bad_mask).rollout(PROMPTS[:1])


def test_loading_refuses_unknown_paths_sync_functions_and_wrong_signatures():
    with pytest.raises(GenerateHookLoadError, match="cannot import 'no_such_mod_xyz'"):
        load_generate_hook("no_such_mod_xyz:hook")
    with pytest.raises(GenerateHookLoadError, match="is not an async function"):
        load_generate_hook("json:dumps")
    with pytest.raises(GenerateHookLoadError, match=r"does not take \(sample, sampling_params, engine\)"):
        load_generate_hook("asyncio:sleep")
    with pytest.raises(GenerateHookLoadError, match="bogus="):
        load_generate_hook(f"{__name__}:two_turns", {"bogus": 1})
    with pytest.raises(GenerateHookLoadError, match="need rollout.generate"):
        load_generate_hook(None, {"max_tool_calls": 2})
    assert load_generate_hook(None) is single_turn
    assert load_generate_hook(f"{__name__}:two_turns") is two_turns


def test_generate_options_reach_the_hook_and_max_turns_is_given(engine):
    seen: list[tuple[int, str]] = []

    async def with_option(sample, sampling_params, engine, *, greeting: str = "") -> HookOutput:
        seen.append((sample.max_turns, greeting))
        return await single_turn(sample, sampling_params, engine)

    _manager(engine, functools.partial(with_option, greeting="hi"), max_turns=5).rollout(PROMPTS[:1])
    assert seen == [(5, "hi"), (5, "hi")]


def test_config_refuses_max_turns_and_over_sampling_out_of_range():
    with pytest.raises(ValueError, match=r"rollout.max_turns=0 must be an integer >= 1"):
        RolloutConfig(max_turns=0)
    with pytest.raises(ValueError, match=r"rollout.over_sampling_factor=0.9 must be a number >= 1"):
        RolloutConfig(over_sampling_factor=0.9)
    with pytest.raises(ValueError, match="rollout.generate='nohook'"):
        RolloutConfig(generate="nohook")
