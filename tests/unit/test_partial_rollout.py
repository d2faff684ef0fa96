"""Over-sampling and partial rollouts through the real ``EngineGroup.rollout`` and ``RolloutManager``.

A stand-in engine (``stub_engine.StubEngine``) holds the requests of one prompt until the rollout aborts its
leftovers, then answers "abort" with the tokens generated so far, as SGLang does. With
``rollout.over_sampling_factor`` the rollout launches more prompts than it needs and cuts the rest at the
target; with ``rollout.partial_rollout`` the cut group keeps its finished sample and the cut one's tokens,
travels with its prompt through the data buffer (and a checkpoint of it), and continues after a weight update
under a new version: the continued sample shows one weight span per version, with each span's engine log-probs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from stub_engine import TOKEN0, TOKENIZER, Prompts, StubEngine, engine_group

from portable_rl.config.algo import AlgoConfig
from portable_rl.data.buffer import DataBuffer
from portable_rl.data.types import Group, SampleStatus
from portable_rl.orchestration.engine_group import EngineGroup
from portable_rl.rollout.manager import PARTIAL_KEY
from portable_rl.rollout_to_train import build_train_batch


def reward(response: str, label: Any, sample: Any) -> float:
    return float(sample.response_tokens[-1] % 7 + sample.prompt_index)


@pytest.fixture
def engine():
    e = StubEngine()
    yield e
    e.close()


def _group(engine: StubEngine, **cfg: Any) -> EngineGroup:
    return engine_group(
        engine, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=3, reward=f"{__name__}:reward", **cfg
    )


def _prompt0(groups: list[Group]) -> Group:
    return next(g for g in groups if g.prompt_index == 0)


def test_over_sampling_launches_more_and_cuts_the_rest_at_the_target(engine):
    engine.hold = {TOKEN0}  # prompt 0 finishes only when aborted
    group = _group(engine, over_sampling_factor=1.5)
    buffer = DataBuffer(Prompts())
    groups, metrics = group.rollout(buffer, step=1, seed=0, tokenizer=TOKENIZER)
    assert sorted(g.prompt_index for g in groups) == [1, 2]
    assert metrics["rollout/prompts_launched"] == 3 and metrics["rollout/groups_aborted"] == 1
    # Without partial rollouts the cut prompt starts over: first in the next step, from its prompt alone.
    assert buffer.num_pending == 1 and PARTIAL_KEY not in buffer.get_prompts(1)[0].metadata


def test_a_cut_group_keeps_its_tokens_and_continues_after_a_weight_update(engine):
    engine.hold, engine.hold_sample = {TOKEN0}, 0  # prompt 0: sample 1 finishes, sample 0 is cut
    group = _group(engine, over_sampling_factor=1.5, partial_rollout=True)
    buffer = DataBuffer(Prompts())
    step1, _ = group.rollout(buffer, step=1, seed=0, tokenizer=TOKENIZER)
    assert sorted(g.prompt_index for g in step1) == [1, 2]

    # A checkpoint of the buffer carries the cut group; the run resumes from it.
    state = json.loads(json.dumps(buffer.state_dict()))
    (kept,) = [p for p in state["pending"] if p["index"] == 0]
    cut, finished = kept["metadata"][PARTIAL_KEY]
    assert cut["status"] == "aborted" and cut["response_tokens"] == [201, 202]
    assert finished["status"] == "truncated" and finished["response_tokens"] == [201, 202, 203]
    buffer = DataBuffer(Prompts())
    buffer.load_state_dict(state)

    engine.version, engine.hold = "1", set()  # the trainer's step 1 reached the engine
    before = len(engine.requests)
    step2, metrics = group.rollout(buffer, step=2, seed=0, tokenizer=TOKENIZER)
    g = _prompt0(step2 + buffer.pop_groups(8))
    cont = [r for r in engine.requests[before:] if r["input_ids"][0] == TOKEN0]
    assert len(cont) == 1, "the finished sample is reused, only the cut one is continued"
    assert (
        cont[0]["input_ids"] == [TOKEN0, 5, 6, 201, 202] and cont[0]["sampling_params"]["max_new_tokens"] == 1
    )
    s0, s1 = g.samples
    assert s0.status == SampleStatus.TRUNCATED and s0.response_tokens == [201, 202, 201]
    assert s0.metadata["weight_spans"] == [[0, 2, 0], [2, 3, 1]] and s0.weight_version == 1
    assert s0.rollout_logprobs == pytest.approx([-2.01, -2.02, -2.01])  # each span's engine log-probs
    assert s1.response_tokens == [201, 202, 203] and s1.metadata["weight_spans"] == [[0, 3, 0]]
    assert {s.group_id for s in g.samples} == {g.group_id} and PARTIAL_KEY not in s0.metadata
    assert metrics["rollout/samples_resumed"] >= 2
    # TIS sees each token's own engine log-prob (from the version that sampled it).
    batch, _ = build_train_batch([g], AlgoConfig(tis_cap=2.0))
    assert batch.token_fields["rollout_logprobs"][0] == pytest.approx([-2.01, -2.02, -2.01])


def test_an_async_rollout_cut_for_a_weight_update_continues_under_the_new_weights(engine):
    """``EngineGroup.cut`` from another thread (what the training loop does before an async weight sync)."""
    import threading

    engine.hold = {TOKEN0}  # prompt 0 generates until the cut
    group = _group(engine, partial_rollout=True)
    buffer = DataBuffer(Prompts())
    out: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: out.update(groups=group.rollout(buffer, step=2, seed=0, tokenizer=TOKENIZER)[0])
    )
    thread.start()
    while not any(r["input_ids"][0] == TOKEN0 for r in engine.requests):
        threading.Event().wait(0.01)
    group.cut()
    assert group.paused.wait(30), "the cut rollout did not pause"
    assert thread.is_alive() and "groups" not in out
    engine.version, engine.hold = "1", set()  # the weight update, while nothing runs on the engine
    group.resume()
    thread.join(30)
    g = _prompt0(out["groups"])
    assert [s.metadata["weight_spans"] for s in g.samples] == [[[0, 2, 0], [2, 3, 1]]] * 2
    assert all(s.response_tokens == [201, 202, 201] for s in g.samples)
