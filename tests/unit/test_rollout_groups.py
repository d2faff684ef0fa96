"""GRPO groups never mix prompts: a group's identity is unique for the run, across rounds, steps and resume.

A step may need several rollout rounds (a strict dynamic-sampling filter, aborted groups generated again) and
may train on surplus groups kept in the buffer from the previous step. The trainer's batch groups samples by
``group_id``, so two groups of different prompts sharing an id would share one GRPO baseline.

The rollouts below run the real ``EngineGroup.rollout`` and ``RolloutManager`` over HTTP against a stand-in
engine (``stub_engine.LoopbackEngine``, a plain http.server in this process) that answers ``/generate`` like
SGLang does and follows a script per prompt: answer at once, abort the first hand-out's requests, or hold its
requests until an ``/abort_request`` arrives (a request that finishes just as the abort is sent: the group
ends as surplus).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import torch
from stub_engine import TOKEN0, TOKENIZER, LoopbackEngine, Prompts, engine_group, sglang_answer

from portable_rl.algo.objective import compute_advantages
from portable_rl.config.algo import AlgoConfig
from portable_rl.config.rollout import RolloutConfig
from portable_rl.data.buffer import DataBuffer
from portable_rl.data.types import Group
from portable_rl.orchestration.engine_group import EngineGroup
from portable_rl.rollout_to_train import build_train_batch

SAMPLES = 3


def reward(response: str, label: Any, sample: Any) -> float:
    """10 x prompt + sample index: groups of one prompt have spread, mixed prompts a large one."""
    return float(10 * sample.prompt_index + sample.response_tokens[-1])


def keep_even(group: Group) -> bool:
    return group.prompt_index % 2 == 0


def keep_every(group: Group) -> bool:
    """Keeps every group, but as a filter: the rollout over-samples and aborts what it does not need."""
    return True


class FakeEngine(LoopbackEngine):
    """``/generate`` answers ``[prompt, sample]`` token ids; scripted per prompt by ``abort_first`` and ``hold``."""

    def __init__(self) -> None:
        super().__init__()
        self.abort_first: set[int] = set()  # prompts whose first hand-out's requests end aborted
        self.hold: set[int] = set()  # prompts whose requests wait for an /abort_request, then finish
        self.seen: Counter[int] = Counter()

    def arm_hold(self, prompts: set[int]) -> None:
        self.hold = set(prompts)
        self.released.clear()

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        prompt = payload["input_ids"][0] - TOKEN0
        sample = int(payload["rid"].rsplit("-", 1)[1])
        with self.lock:
            self.seen[prompt] += 1
            aborted = prompt in self.abort_first and self.seen[prompt] <= SAMPLES
        if prompt in self.hold:
            self.released.wait(timeout=60)
        if aborted:
            return {"output_ids": [], "meta_info": {"id": payload["rid"], "finish_reason": {"type": "abort"}}}
        return sglang_answer(payload["rid"], [prompt, sample], "stop", lambda t: -0.5, "0")


@pytest.fixture
def engine():
    e = FakeEngine()
    yield e
    e.close()


def _group(engine: FakeEngine, **cfg: Any) -> EngineGroup:
    return engine_group(
        engine, samples_per_prompt=SAMPLES, max_new_tokens=4, reward=f"{__name__}:reward", **cfg
    )


def _rollout(group: EngineGroup, buffer: DataBuffer, step: int) -> list[Group]:
    groups, metrics = group.rollout(buffer, step=step, seed=0, tokenizer=TOKENIZER)
    assert metrics["rollout/groups"] <= len(groups)  # the rounds' counts (carried groups are not counted)
    return groups


def _assert_groups_are_prompts(groups: list[Group]) -> None:
    """Every group id names one prompt, and each sample's advantage is computed within its own group."""
    batch, _ = build_train_batch(groups, AlgoConfig())
    samples = [s for g in groups for s in g.samples]
    prompts_of: dict[int, set[int]] = {}
    for s in samples:
        prompts_of.setdefault(s.group_id, set()).add(s.prompt_index)
    mixed = {gid: sorted(p) for gid, p in prompts_of.items() if len(p) > 1}
    assert not mixed, f"group ids shared by several prompts: {mixed}"
    row = 0
    for g in groups:
        rewards = torch.tensor(g.rewards)
        mask = torch.ones(len(g.samples), 2)
        expected, _, _ = compute_advantages(
            AlgoConfig(), rewards, mask, torch.zeros(len(g.samples), dtype=torch.long)
        )
        for i in range(len(g.samples)):
            got = batch.token_fields["advantages"][row + i]
            assert got == pytest.approx(expected[i].tolist(), abs=1e-5), f"prompt {g.prompt_index}"
        row += len(g.samples)


def test_a_strict_filter_needs_two_rounds_and_keeps_groups_apart(engine):
    group = _group(
        engine,
        prompts_per_step=2,
        filter=f"{__name__}:keep_even",
        over_sample_factor=1.0,
        max_prompts_factor=1.0,
    )
    buffer = DataBuffer(Prompts())
    groups = _rollout(group, buffer, step=1)
    # round 1 hands out prompts 0 and 1 and keeps 0; round 2 hands out prompt 2
    assert sorted(g.prompt_index for g in groups) == [0, 2]
    _assert_groups_are_prompts(groups)


def test_a_group_aborted_mid_round_is_generated_again_under_its_own_id(engine):
    engine.abort_first = {1}
    group = _group(engine, prompts_per_step=2)
    buffer = DataBuffer(Prompts())
    groups = _rollout(group, buffer, step=1)
    assert sorted(g.prompt_index for g in groups) == [0, 1]
    assert group.requeued == 1 and engine.seen[1] == 2 * SAMPLES  # prompt 1 ran twice
    _assert_groups_are_prompts(groups)


def test_surplus_groups_carried_into_the_next_step_keep_their_ids_across_resume(engine):
    group = _group(
        engine,
        prompts_per_step=2,
        filter=f"{__name__}:keep_every",
        over_sample_factor=1.5,
        max_prompts_factor=1.5,
    )
    buffer = DataBuffer(Prompts())
    engine.arm_hold({0})  # prompt 0 finishes only once the rollout aborts its leftovers: surplus
    step1 = _rollout(group, buffer, step=1)
    assert sorted(g.prompt_index for g in step1) == [1, 2]
    assert buffer.num_ready == 1  # prompt 0, carried into step 2
    _assert_groups_are_prompts(step1)

    # The run stops here and resumes from the checkpointed buffer state.
    state = json.loads(json.dumps(buffer.state_dict()))
    resumed = DataBuffer(Prompts())
    resumed.load_state_dict(state)
    engine.arm_hold({4})  # step 2 needs one group: prompt 3 is it, prompt 4 ends as surplus again
    step2 = _rollout(group, resumed, step=2)
    assert [g.prompt_index for g in step2] == [0, 3]  # the carried group first, then the new ones
    _assert_groups_are_prompts(step2)
    _assert_groups_are_prompts(step1 + step2)


def test_rounds_merge_their_counts_and_rates():
    from portable_rl.rollout.manager import merge_metrics, prompt_budget

    a = {
        "rollout/groups": 1.0,
        "rollout/reward_sum": 3.0,
        "rollout/rewarded_samples": 3.0,
        "rollout/time_s": 1.0,
    }
    b = {
        "rollout/groups": 1.0,
        "rollout/reward_sum": 0.0,
        "rollout/rewarded_samples": 1.0,
        "rollout/time_s": 1.0,
    }
    b["rollout/generated_tokens"] = 8.0
    merged = merge_metrics([a, b])
    assert merged["rollout/groups"] == 2.0 and merged["rollout/reward_mean"] == 0.75
    assert merged["rollout/generated_tokens_per_s"] == 4.0
    assert merge_metrics([merged]) == merged  # merged metrics merge again
    cfg = RolloutConfig(filter="nonzero_std", max_prompts_factor=1.5)
    assert prompt_budget(cfg, 3) == 5 and prompt_budget(RolloutConfig(), 3) == 3  # rounded up, not down
