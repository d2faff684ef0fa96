"""portable_rl's SGLang adapter against the real SGLang 0.5.23 server on CPU (marker ``sglang``).

Needs the separate SGLang venv (``make sglang-venv``; ``SGLANG_VENV`` overrides its path). One server serves
the whole module: a tiny random Llama checkpoint, started by portable_rl's launcher with that venv's interpreter,
the CPU platform's SGLang arguments and a bearer token. Checked through portable_rl's own client and weight sync:
  * auth, finish reasons, abort, pause/continue, bad-input errors: the protocol checks the CPU engine passes;
  * ``/generate`` log-probs (prompt and sampled tokens) equal a Hugging Face forward pass of the same tokens;
  * weight updates over gloo (``/init_weights_update_group`` + ``/update_weights_from_distributed`` inside
    ``/begin_weight_update`` ... ``/end_weight_update``, per tensor and as flattened buckets) and from disk
    take effect: the server's log-probs then match the new weights' forward pass, no longer the old ones, and
    the weight version moved.
Tests that change weights load the original checkpoint back before they end, so their order does not matter.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file
from sglang_server import launch_sglang
from transformers import AutoModelForCausalLM

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.protocol.client import EngineClient, EngineError
from portable_rl.weight_sync import WeightSyncConfig, make_weight_sync

pytestmark = pytest.mark.sglang

TOKEN = "sglang-test-token"
PROMPTS = [[1, 17, 42, 99, 7], [3, 250, 11], [5, 6, 7, 8, 9, 10, 11, 12, 13], [400]]
# A fixed sequence whose per-token log-probs fingerprint the served weights.
PROBE = [5, 6, 7, 8, 9, 10, 11, 40, 41, 42, 100, 200, 300]
ATOL = 1e-4  # fp32 on both sides; differences seen are ~1e-6
CHANGED = 0.05  # another checkpoint moves some probe log-prob by far more than this


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    """The served checkpoint (seed 0) and two others of the same shape for weight updates."""
    root = tmp_path_factory.mktemp("sglang-ckpts")
    other = {s: build_tiny_checkpoint(root / f"seed{s}", TinySpec(arch="llama", seed=s)) for s in (1, 2)}
    return {"base": Path(tiny_llama), "b": other[1], "c": other[2]}


@pytest.fixture(scope="module")
def hf(checkpoints):
    return {
        k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for k, p in checkpoints.items()
    }


@pytest.fixture(scope="module")
def engine(checkpoints):
    proc = launch_sglang(checkpoints["base"], api_key=TOKEN)
    yield proc
    assert proc.stop() is not None


def call(engine, fn, api_key=TOKEN):
    """Run ``fn(client)`` (a coroutine function) on a fresh portable_rl client of ``engine``."""

    async def go():
        async with EngineClient(engine.url, api_key=api_key, timeout_s=120) as client:
            return await fn(client)

    return asyncio.run(go())


def probe_logprobs(engine, ids=PROBE):
    """The server's log-prob of every token of ``ids`` after the first (prompt log-probs, one decode step)."""

    async def fn(client):
        return await client.post(
            "/generate",
            {
                "input_ids": ids,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                "return_logprob": True,
                "logprob_start_len": 0,
            },
        )

    body = call(engine, fn)
    triples = body["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in triples] == ids
    assert triples[0][0] is None  # the first token has no context
    return torch.tensor([t[0] for t in triples[1:]]), body["meta_info"]["weight_version"]


def hf_token_logprobs(model, ids, start, temperature=0.0):
    """log p(ids[i] | ids[:i]) for i >= start, from a HF forward pass (scaled like the sampler when T > 0)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    lps = torch.log_softmax(logits[start - 1 : -1] / scale, dim=-1)
    return lps.gather(1, torch.tensor(ids[start:])[:, None]).squeeze(1)


def assert_serves(engine, model, version):
    served, served_version = probe_logprobs(engine)
    torch.testing.assert_close(served, hf_token_logprobs(model, PROBE, 1), atol=ATOL, rtol=0)
    assert served_version == version
    assert call(engine, lambda c: c.get_weight_version()) == version
    return served


def restore_base(engine, checkpoints):
    call(engine, lambda c: c.update_weights_from_disk(str(checkpoints["base"]), weight_version="default"))


# ---- protocol ------------------------------------------------------------------------------------------------
def test_auth_refuses_requests_without_the_token(engine):
    assert requests.get(engine.url + "/health", timeout=10).status_code == 200  # probes stay open
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
    assert requests.post(engine.url + "/generate", json=body, timeout=30).status_code == 401
    assert (
        requests.post(
            engine.url + "/update_weights_from_disk", json={"model_path": "/x"}, timeout=30
        ).status_code
        == 401
    )
    wrong = requests.post(engine.url + "/flush_cache", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    with pytest.raises(EngineError) as info:
        call(engine, lambda c: c.flush_cache(), api_key=None)
    assert info.value.status == 401
    call(engine, lambda c: c.flush_cache())


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_match_a_hf_forward_pass_under_concurrent_batching(engine, hf, temperature):
    async def fn(client):
        params = {"max_new_tokens": 12, "temperature": temperature, "ignore_eos": True}
        return await asyncio.gather(*(client.generate(p, params) for p in PROMPTS))

    outs = call(engine, fn)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert len(out.output_ids) == 12 and out.finish_reason == "length"
        assert out.prompt_tokens == len(prompt)
        assert out.weight_version == "default"
        full = prompt + out.output_ids
        ref = hf_token_logprobs(hf["base"], full, len(prompt), temperature)
        torch.testing.assert_close(torch.tensor(out.output_logprobs), ref, atol=ATOL, rtol=0)
        if temperature == 0.0:  # greedy picks the argmax of the reference logits
            with torch.no_grad():
                logits = hf["base"](torch.tensor([full])).logits[0]
            assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == out.output_ids


def test_prompt_logprobs_match_a_hf_forward_pass(engine, hf):
    served, version = probe_logprobs(engine)
    assert version == "default"
    torch.testing.assert_close(served, hf_token_logprobs(hf["base"], PROBE, 1), atol=ATOL, rtol=0)


def test_max_new_tokens_stop_tokens_and_bad_input(engine):
    prompt = PROMPTS[0]
    greedy = {"temperature": 0.0, "max_new_tokens": 10}
    full = call(engine, lambda c: c.generate(prompt, {**greedy, "ignore_eos": True}))
    assert len(full.output_ids) == 10
    assert full.finish_detail == {"type": "length", "length": 10}

    stop_tok = full.output_ids[3]
    first = full.output_ids.index(stop_tok)
    # SGLang's ignore_eos also switches stop_token_ids off, so this request leaves it unset.
    stopped = call(engine, lambda c: c.generate(prompt, {**greedy, "stop_token_ids": [stop_tok]}))
    assert stopped.output_ids == full.output_ids[: first + 1]  # the stop token is part of the output
    assert stopped.finish_detail == {"type": "stop", "matched": stop_tok}
    assert stopped.output_logprobs == pytest.approx(full.output_logprobs[: first + 1], abs=ATOL)

    with pytest.raises(EngineError) as info:
        call(engine, lambda c: c.generate(prompt, {"temperature": -1}))
    assert info.value.status == 400 and "temperature" in str(info.value)


def test_abort_and_pause_continue(engine):
    async def abort(client):
        params = {"max_new_tokens": 450, "ignore_eos": True}
        task = asyncio.create_task(client.generate([1, 2, 3], params, rid="job-7-a"))
        # SGLang drops an abort for a rid it has not registered yet, so repeat it until the request ends.
        while not task.done():
            await asyncio.sleep(0.3)
            await client.abort_request(rid="job-7-a")
        return await task

    out = call(engine, abort)
    assert out.finish_reason == "abort"
    assert len(out.output_ids) < 450

    async def pause(client):
        await client.pause_generation(mode="in_place")
        task = asyncio.create_task(client.generate([4, 5], {"max_new_tokens": 3, "temperature": 0.0}))
        await asyncio.sleep(1.5)
        queued = not task.done()  # nothing runs while paused
        await client.continue_generation()
        return queued, await asyncio.wait_for(task, 60)

    queued, out = call(engine, pause)
    assert queued
    assert out.finish_reason == "length" and len(out.output_ids) == 3


# ---- weight updates ------------------------------------------------------------------------------------------
def test_update_weights_from_disk_takes_effect(engine, checkpoints, hf):
    before = assert_serves(engine, hf["base"], "default")
    try:
        call(engine, lambda c: c.update_weights_from_disk(str(checkpoints["b"]), weight_version="7"))
        after = assert_serves(engine, hf["b"], "7")
        assert (after - before).abs().max() > CHANGED
        greedy = call(engine, lambda c: c.generate(PROMPTS[1], {"max_new_tokens": 6, "temperature": 0.0}))
        assert greedy.weight_version == "7"
        ref = hf_token_logprobs(hf["b"], PROMPTS[1] + greedy.output_ids, len(PROMPTS[1]))
        torch.testing.assert_close(torch.tensor(greedy.output_logprobs), ref, atol=ATOL, rtol=0)

        with pytest.raises(EngineError) as info:
            call(engine, lambda c: c.update_weights_from_disk(str(checkpoints["b"] / "missing")))
        assert info.value.status == 400
        assert_serves(engine, hf["b"], "7")  # a failed load keeps the weights it had
    finally:
        restore_base(engine, checkpoints)
    assert_serves(engine, hf["base"], "default")


def test_distributed_update_needs_a_begin_weight_update_session(engine):
    request = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]]}
    with pytest.raises(EngineError) as info:
        call(engine, lambda c: c.update_weights_from_distributed(**request))
    assert info.value.status == 400 and "begin_weight_update" in str(info.value)


@pytest.mark.parametrize("flatten", ["off", "on"])
def test_broadcast_weight_sync_over_gloo_takes_effect(engine, checkpoints, hf, flatten):
    before = assert_serves(engine, hf["base"], "default")
    new = sorted(load_file(str(checkpoints["c"] / "model.safetensors")).items())
    version = 21 if flatten == "off" else 22
    cfg = WeightSyncConfig(
        strategy="broadcast",
        master_address="127.0.0.1",
        bucket_mb=0.1,  # several buckets: version and cache flush ride on the last one only
        flatten_buckets=flatten,
        timeout_s=120,
        group_name=f"sglang_test_{flatten}",
    )
    sync = make_weight_sync(cfg, "disaggregated")
    client = EngineClient(engine.url, api_key=TOKEN, timeout_s=120)
    sync.connect([client])
    try:
        assert sync.flattened == (flatten == "on")
        sync.update(iter(new), version=version)
        after = assert_serves(engine, hf["c"], str(version))
        assert (after - before).abs().max() > CHANGED
    finally:
        sync.disconnect()
        restore_base(engine, checkpoints)
    assert_serves(engine, hf["base"], "default")


def test_disk_weight_sync_takes_effect(engine, checkpoints, hf, tmp_path):
    before = assert_serves(engine, hf["base"], "default")
    new = sorted(load_file(str(checkpoints["b"] / "model.safetensors")).items())
    cfg = WeightSyncConfig(strategy="disk", disk_dir=str(tmp_path / "xfer"), disk_shard_mb=0.1, timeout_s=120)
    sync = make_weight_sync(cfg, "disaggregated")
    sync.connect([EngineClient(engine.url, api_key=TOKEN, timeout_s=120)])
    try:
        sync.update(iter(new), version=31)
        after = assert_serves(engine, hf["b"], "31")
        assert (after - before).abs().max() > CHANGED
    finally:
        sync.disconnect()
        restore_base(engine, checkpoints)
    assert_serves(engine, hf["base"], "default")
