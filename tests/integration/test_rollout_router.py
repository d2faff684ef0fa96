"""Rollouts through the real sglang-router in front of two CPU engine servers."""

from __future__ import annotations

import pytest
import requests
from transformers import AutoTokenizer

from portable_rl.config.rollout import RolloutConfig
from portable_rl.data.types import SampleStatus
from portable_rl.rollout.engines.launcher import EngineProcess, EngineSpec
from portable_rl.rollout.manager import RolloutManager
from portable_rl.rollout.rewards import MathReward
from portable_rl.rollout.router import Router, RouterConfig

TOKEN = "router-test-token"


@pytest.fixture(scope="module")
def cluster(tiny_qwen2):
    engines = [
        EngineProcess(
            EngineSpec(
                model_path=str(tiny_qwen2),
                kind="cpu",
                api_key=TOKEN,
                engine_args={"num_threads": 1},
                startup_timeout_s=300,
            )
        ).start()
        for _ in range(2)
    ]
    router = None
    try:
        for e in engines:
            e.wait_ready()
        router = Router(RouterConfig(policy="round_robin", api_key=TOKEN)).start([e.url for e in engines])
        yield router, engines
    finally:
        if router is not None:
            router.stop()
        for e in engines:
            e.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2):
    return AutoTokenizer.from_pretrained(tiny_qwen2)


def _prompts(tokenizer, n):
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + 3?"}], tokenize=False, add_generation_prompt=True
        )
        out.append((i, tokenizer(text, add_special_tokens=False)["input_ids"], str(i + 3)))
    return out


def test_rollout_of_8_prompts_x_4_samples_through_the_router(cluster, tokenizer):
    router, engines = cluster
    cfg = RolloutConfig(prompts_per_step=8, samples_per_prompt=4, max_new_tokens=24, temperature=1.0)
    mgr = RolloutManager(cfg, router.url, tokenizer, engine_urls=[e.url for e in engines], api_key=TOKEN)
    result = mgr.rollout(_prompts(tokenizer, 8), step=3, seed=1, num_groups=8)

    assert len(result.groups) == 8 and not result.aborted and not result.filtered
    samples = [s for g in result.groups for s in g.samples]
    assert len(samples) == 32
    assert sorted(g.prompt_index for g in result.groups) == list(range(8))
    math = MathReward()
    for g in result.groups:
        assert len(g.samples) == 4 and {s.group_id for s in g.samples} == {g.group_id}
        for s in g.samples:
            assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED)
            assert 1 <= len(s.response_tokens) <= 24
            assert len(s.rollout_logprobs) == len(s.response_tokens) == len(s.loss_mask)
            assert all(lp <= 0.0 for lp in s.rollout_logprobs)
            assert s.reward == math(s.response_text, s.label)
            assert s.metadata["weight_version"] == "default"
    # both engines served part of the rollout (round robin through the router)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    infos = [requests.get(e.url + "/server_info", headers=auth, timeout=10).json() for e in engines]
    assert all(info["internal_states"][0]["decode_steps"] > 0 for info in infos)

    # seeded sampling: the same (seed, step, prompt, sample) gives the same tokens, whatever engine serves it
    again = mgr.rollout(_prompts(tokenizer, 8), step=3, seed=1, num_groups=8)
    first = {(g.prompt_index, i): s.response_tokens for g in result.groups for i, s in enumerate(g.samples)}
    second = {(g.prompt_index, i): s.response_tokens for g in again.groups for i, s in enumerate(g.samples)}
    assert first == second


def test_dynamic_sampling_keeps_informative_groups_and_aborts_leftovers(cluster, tokenizer):
    router, engines = cluster
    cfg = RolloutConfig(
        samples_per_prompt=4,
        max_new_tokens=40,
        temperature=1.0,
        filter="nonzero_std",
        over_sample_factor=2.0,
        max_prompts_factor=4.0,
    )

    def parity(response, label, sample):  # informative for some groups, constant for others
        return float(len(sample.response_tokens) % 2)

    mgr = RolloutManager(
        cfg, router.url, tokenizer, api_key=TOKEN, reward_fn=parity
    )  # workers from the router
    prompts = iter(_prompts(tokenizer, 32))
    result = mgr.rollout(prompts, step=0, seed=5, num_groups=3)
    groups = result.groups
    assert len(groups) <= 3
    assert all(max(g.rewards) != min(g.rewards) for g in groups)
    assert all(max(g.rewards) == min(g.rewards) for g in result.filtered)
    for g in result.aborted:
        assert any(s.status == SampleStatus.ABORTED for s in g.samples)
    total = len(groups) + len(result.filtered) + len(result.surplus) + len(result.aborted)
    assert total == result.metrics["rollout/prompts_launched"] <= 12
    if len(groups) < 3:  # only when the prompt budget ran out
        assert result.metrics["rollout/prompts_launched"] == 12
    assert len(list(prompts)) == 32 - total  # the prompt iterable is consumed lazily


def test_router_adds_and_removes_workers(cluster):
    router, engines = cluster
    assert sorted(router.workers()) == sorted(e.url for e in engines)
    router.remove_worker(engines[1].url)
    assert router.workers() == [engines[0].url]
    router.add_worker(engines[1].url)
    assert sorted(router.workers()) == sorted(e.url for e in engines)
