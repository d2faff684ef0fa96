"""The CPU engine server speaks SGLang's protocol and generates what the HF model computes.

Two engine processes (tiny random Llama, bearer token set): ``engine`` serves the tests that only read it
(generation, log-probs, auth, the client), ``mutable_engine`` the tests that change its state (weights, pause,
abort). Those also put the original checkpoint back before they end, so they do not depend on their order
either, and a failed restore cannot leak into a reading test.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from portable_rl.distributed import free_port
from portable_rl.protocol.checksum import tensor_checksum
from portable_rl.protocol.client import EngineClient
from portable_rl.protocol.process_group import init_weight_update_group
from portable_rl.protocol.tensor_codec import serialize_tensors
from portable_rl.rollout.engines.launcher import EngineSpec, launch_engine

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [[1, 17, 42, 99, 7], [3, 250, 11], [5, 6, 7, 8, 9, 10, 11, 12, 13], [400]]


def _launch(tiny_llama):
    return launch_engine(
        EngineSpec(
            model_path=str(tiny_llama),
            kind="cpu",
            api_key=TOKEN,
            engine_args={"num_threads": 1, "max_running_requests": 8},
            startup_timeout_s=300,
        )
    )


@pytest.fixture(scope="module")
def engine(tiny_llama):
    proc = _launch(tiny_llama)
    yield proc
    assert proc.stop() is not None


@pytest.fixture(scope="module")
def mutable_engine(tiny_llama):
    proc = _launch(tiny_llama)
    yield proc
    assert proc.stop() is not None


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def post(engine, path, body=None, auth=True, timeout=120):
    return requests.post(engine.url + path, json=body or {}, headers=AUTH if auth else {}, timeout=timeout)


def generate(engine, prompt, **params):
    params.setdefault("max_new_tokens", 8)
    r = post(engine, "/generate", {"input_ids": prompt, "sampling_params": params, "return_logprob": True})
    assert r.status_code == 200, r.text
    return r.json()


def reference_logprobs(model, prompt, output, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    lps = torch.log_softmax(logits[len(prompt) - 1 : -1] / scale, dim=-1)
    return lps.gather(1, torch.tensor(output)[:, None]).squeeze(1)


def served_logprobs(out):
    triples = out["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in triples] == out["output_ids"]
    return torch.tensor([t[0] for t in triples])


def restore(engine, path):
    r = post(engine, "/update_weights_from_disk", {"model_path": str(path), "weight_version": "default"})
    assert r.status_code == 200, r.text


def test_auth_refuses_requests_without_the_token(engine):
    assert requests.get(engine.url + "/health", timeout=10).status_code == 200
    no_token = post(
        engine, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}, auth=False
    )
    assert no_token.status_code == 401
    assert (
        post(engine, "/update_weights_from_disk", {"model_path": "/nowhere"}, auth=False).status_code == 401
    )
    wrong = requests.post(engine.url + "/flush_cache", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    assert post(engine, "/flush_cache").status_code == 200


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_match_a_hf_forward_pass_under_concurrent_batching(engine, hf, temperature):
    outs: dict[int, dict] = {}

    def run(i, prompt):
        outs[i] = generate(engine, prompt, max_new_tokens=12, temperature=temperature, sampling_seed=i)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outs) == list(range(len(PROMPTS)))
    for i, prompt in enumerate(PROMPTS):
        out = outs[i]
        assert out["output_ids"], out
        assert out["meta_info"]["prompt_tokens"] == len(prompt)
        assert out["meta_info"]["completion_tokens"] == len(out["output_ids"])
        ref = reference_logprobs(hf, prompt, out["output_ids"], temperature)
        torch.testing.assert_close(served_logprobs(out), ref, atol=1e-4, rtol=0)
        if temperature == 0.0:  # greedy picks the argmax of the reference logits
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + out["output_ids"]])).logits[0]
            assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == out["output_ids"]


def test_max_new_tokens_stop_tokens_and_seeds(engine):
    prompt = PROMPTS[0]
    full = generate(engine, prompt, max_new_tokens=10, temperature=0.0, ignore_eos=True)
    assert len(full["output_ids"]) == 10
    assert full["meta_info"]["finish_reason"] == {"type": "length", "length": 10}

    stop_tok = full["output_ids"][3]
    first = full["output_ids"].index(stop_tok)
    stopped = generate(
        engine, prompt, max_new_tokens=10, temperature=0.0, stop_token_ids=[stop_tok], ignore_eos=True
    )
    assert stopped["output_ids"] == full["output_ids"][: first + 1]  # the stop token is part of the output
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}

    a = generate(engine, prompt, max_new_tokens=16, temperature=1.0, sampling_seed=123, ignore_eos=True)
    b = generate(engine, prompt, max_new_tokens=16, temperature=1.0, sampling_seed=123, ignore_eos=True)
    c = generate(engine, prompt, max_new_tokens=16, temperature=1.0, sampling_seed=124, ignore_eos=True)
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]

    bad = post(engine, "/generate", {"input_ids": prompt, "sampling_params": {"temperature": -1}})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]


def test_a_prompt_beyond_the_context_is_refused_with_both_numbers(engine):
    """As SGLang does: HTTP 400 naming the prompt's length and the context; the engine keeps serving."""
    context = requests.get(engine.url + "/server_info", headers=AUTH, timeout=30).json()["context_length"]
    too_long = [7] * context
    bad = post(engine, "/generate", {"input_ids": too_long, "sampling_params": {"max_new_tokens": 4}})
    assert bad.status_code == 400, bad.text
    message = bad.json()["error"]["message"]
    assert f"({context} tokens)" in message and f"input ({context} tokens)" in message, message
    batch = post(engine, "/generate", {"input_ids": [PROMPTS[0], too_long], "sampling_params": {}})
    assert batch.status_code == 400
    assert generate(engine, PROMPTS[0], max_new_tokens=2)["output_ids"]  # still serving


def test_abort_and_pause_continue(mutable_engine):
    results: dict[str, dict] = {}

    def long(rid):
        r = post(
            mutable_engine,
            "/generate",
            {
                "input_ids": [1, 2, 3],
                "rid": rid,
                "sampling_params": {"max_new_tokens": 450, "ignore_eos": True},
            },
        )
        results[rid] = r.json()

    t = threading.Thread(target=long, args=("job-7-a",))
    t.start()
    # The exact rid, repeated until the request ends: an abort that arrives before the request is registered
    # is a no-op (as in SGLang), and a fixed sleep races with a fast machine finishing all 450 tokens.
    deadline = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < deadline:
        assert post(mutable_engine, "/abort_request", {"rid": "job-7-a"}).status_code == 200
        time.sleep(0.05)
    t.join(60)
    out = results["job-7-a"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(out["output_ids"]) < 450

    assert post(mutable_engine, "/pause_generation", {"mode": "in_place"}).json()["status"] == "ok"
    t = threading.Thread(target=lambda: results.update(p=generate(mutable_engine, [4, 5], max_new_tokens=3)))
    t.start()

    def state():
        return requests.get(f"{mutable_engine.url}/server_info", headers=AUTH, timeout=60).json()[
            "internal_states"
        ][0]

    # Until the mutable_engine holds the request (a poll with a deadline, not a sleep), then: it waits, undecoded.
    deadline = time.monotonic() + 60
    while (now := state())["waiting"] < 1:
        assert time.monotonic() < deadline, f"the request never reached the paused mutable_engine: {now}"
        time.sleep(0.02)
    assert now["paused"] and now["running"] == 0
    steps = now["decode_steps"]
    assert state()["decode_steps"] == steps and "p" not in results  # queued while paused
    assert post(mutable_engine, "/continue_generation").status_code == 200
    t.join(60)
    assert len(results["p"]["output_ids"]) >= 1


def _perturbed(path, tmp_path, scale):
    state = load_file(str(next(path.glob("*.safetensors"))))
    g = torch.Generator().manual_seed(int(scale * 1000))
    new = {k: (v + scale * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}
    out = tmp_path / f"ckpt_{scale}"
    out.mkdir()
    save_file(new, str(out / "model.safetensors"))
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    return out, new


def _engine_checksums(engine, names):
    return post(engine, "/get_weights_checksum", {"names": names}).json()["checksums"]


def test_update_weights_from_disk_takes_effect(mutable_engine, tiny_llama, tmp_path):
    new_dir, new = _perturbed(tiny_llama, tmp_path, 0.05)
    try:
        before = generate(mutable_engine, PROMPTS[1], temperature=0.0)
        r = post(
            mutable_engine, "/update_weights_from_disk", {"model_path": str(new_dir), "weight_version": "7"}
        )
        assert r.status_code == 200 and r.json()["success"], r.text
        assert (
            requests.get(mutable_engine.url + "/model_info", headers=AUTH, timeout=10).json()[
                "weight_version"
            ]
            == "7"
        )
        assert _engine_checksums(mutable_engine, list(new)) == {k: tensor_checksum(v) for k, v in new.items()}
        after = generate(mutable_engine, PROMPTS[1], temperature=0.0)
        assert after["meta_info"]["weight_version"] == "7"
        ref_model = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32).eval()
        ref = reference_logprobs(ref_model, PROMPTS[1], after["output_ids"], 0.0)
        torch.testing.assert_close(served_logprobs(after), ref, atol=1e-4, rtol=0)
        assert not torch.allclose(served_logprobs(before)[:1], served_logprobs(after)[:1])
        bad = post(mutable_engine, "/update_weights_from_disk", {"model_path": str(tmp_path / "missing")})
        assert bad.status_code == 400 and "safetensors" in bad.json()["message"]
    finally:
        restore(mutable_engine, tiny_llama)


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_update_weights_from_distributed_over_gloo(mutable_engine, tiny_llama, tmp_path, load_format):
    _, new = _perturbed(tiny_llama, tmp_path, 0.03)
    names = sorted(new)
    port, group_name = free_port(), f"test_group_{load_format}"
    joined: dict = {}
    t = threading.Thread(
        target=lambda: joined.update(
            r=post(
                mutable_engine,
                "/init_weights_update_group",
                {
                    "master_address": "127.0.0.1",
                    "master_port": port,
                    "rank_offset": 1,
                    "world_size": 2,
                    "group_name": group_name,
                    "backend": "gloo",
                },
            )
        )
    )
    t.start()
    group = init_weight_update_group(
        master_address="127.0.0.1",
        master_port=port,
        rank=0,
        world_size=2,
        group_name=group_name,
        backend="gloo",
        timeout_s=120,
    )
    t.join(60)
    assert joined["r"].status_code == 200, joined["r"].text
    request = {
        "names": names,
        "dtypes": [str(new[n].dtype).removeprefix("torch.") for n in names],
        "shapes": [list(new[n].shape) for n in names],
        "group_name": group_name,
        "weight_version": "11",
    }
    if load_format:
        request["load_format"] = load_format
    try:
        refused = post(mutable_engine, "/update_weights_from_distributed", request)
        assert refused.status_code == 400 and "begin_weight_update" in refused.json()["message"]
        assert post(mutable_engine, "/begin_weight_update").status_code == 200
        answer: dict = {}
        t = threading.Thread(
            target=lambda: answer.update(r=post(mutable_engine, "/update_weights_from_distributed", request))
        )
        t.start()
        if load_format:
            flat = torch.cat([new[n].reshape(-1).view(torch.uint8) for n in names])
            group.broadcast(flat)
        else:
            for n in names:
                group.broadcast(new[n].contiguous())
        t.join(60)
        assert answer["r"].status_code == 200, answer["r"].text
        assert post(mutable_engine, "/end_weight_update").status_code == 200
        assert requests.get(mutable_engine.url + "/get_weight_version", headers=AUTH, timeout=10).json() == {
            "weight_version": "11"
        }
        assert _engine_checksums(mutable_engine, names) == {n: tensor_checksum(new[n]) for n in names}
    finally:
        post(mutable_engine, "/destroy_weights_update_group", {"group_name": group_name})
        group.destroy()
        restore(mutable_engine, tiny_llama)


def test_update_weights_from_tensor_shared_memory(mutable_engine, tiny_llama, tmp_path):
    _, new = _perturbed(tiny_llama, tmp_path, 0.02)
    pairs = sorted(new.items())
    payload = serialize_tensors(pairs)
    try:
        assert post(mutable_engine, "/begin_weight_update").status_code == 200
        r = post(
            mutable_engine,
            "/update_weights_from_tensor",
            {"serialized_named_tensors": [payload], "weight_version": "12"},
        )
        assert r.status_code == 200, r.text
        assert post(mutable_engine, "/end_weight_update").status_code == 200
        assert _engine_checksums(mutable_engine, list(new)) == {k: tensor_checksum(v) for k, v in new.items()}
        unknown = serialize_tensors([("not.a.weight", torch.zeros(2))])
        post(mutable_engine, "/begin_weight_update")
        bad = post(mutable_engine, "/update_weights_from_tensor", {"serialized_named_tensors": [unknown]})
        post(mutable_engine, "/end_weight_update")
        assert bad.status_code == 400 and "not.a.weight" in bad.json()["message"]
    finally:
        restore(mutable_engine, tiny_llama)


def test_async_client_reads_the_protocol(engine):
    async def run():
        async with EngineClient(engine.url, api_key=TOKEN) as client:
            assert await client.health()
            out = await client.generate(
                PROMPTS[2], {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}
            )
            version = await client.get_weight_version()
            info = await client.get_server_info()
            await client.pause_generation()
            await client.flush_cache()
            await client.continue_generation()
            return out, version, info

    out, version, info = asyncio.run(run())
    assert len(out.output_ids) == len(out.output_logprobs) == 5
    assert out.finish_reason == "length" and out.weight_version == version == "default"
    assert info["tp_size"] == 1 and "flattened_bucket" in info["weight_update_load_formats"]
    # per-tensor receives land straight in the parameters: flatten_buckets="auto" sends per tensor to it
    assert info["weight_update_prefers_per_tensor"] is True


def test_engine_threads_follow_its_env(engine, tiny_llama):
    """The job sizes an engine's compute threads through EngineSpec.env (Ray's actor default is 1)."""
    info = requests.get(f"{engine.url}/server_info", headers=AUTH, timeout=30).json()
    assert info["num_threads"] == 1  # the explicit engine arg
    proc = launch_engine(
        EngineSpec(
            model_path=str(tiny_llama), kind="cpu", env={"OMP_NUM_THREADS": "2"}, startup_timeout_s=300
        )
    )
    try:
        info = requests.get(f"{proc.url}/server_info", timeout=30).json()
    finally:
        proc.stop()
    assert info["num_threads"] == 2


def test_session_batch_runs_session_calls_in_order_as_lone_requests_would(mutable_engine):
    def batch(*calls, stop_on_error=True, auth=True):
        body = {
            "calls": [{"method": m, "path": p, "body": b} for m, p, b in calls],
            "stop_on_error": stop_on_error,
        }
        return post(mutable_engine, "/session_batch", body, auth=auth)

    info = requests.get(f"{mutable_engine.url}/server_info", headers=AUTH, timeout=60).json()
    assert "/begin_weight_update" in info["session_batch"]
    assert batch(("POST", "/pause_generation", {}), auth=False).status_code == 401
    refused = batch(("POST", "/pause_generation", {}), ("POST", "/generate", {"input_ids": [1]}))
    assert refused.status_code == 400 and "POST /generate" in refused.text
    opening = (
        ("POST", "/pause_generation", {"mode": "abort"}),
        ("POST", "/flush_cache", {}),
        ("POST", "/begin_weight_update", {}),
    )
    try:
        first = batch(*opening).json()["results"]
        assert [r["status"] for r in first] == [200, 200, 200]
        # A second opening stops at the refused begin, which answers as it would alone; nothing runs after it.
        again = batch(*opening, ("POST", "/end_weight_update", {})).json()["results"]
        assert [r["status"] for r in again] == [200, 200, 400]
        assert again[2]["body"]["success"] is False and "already open" in again[2]["body"]["message"]
    finally:
        closing = batch(
            ("POST", "/end_weight_update", {}),
            ("POST", "/continue_generation", {}),
            ("GET", "/model_info", None),
            stop_on_error=False,
        ).json()["results"]
    assert [r["status"] for r in closing] == [200, 200, 200]
    assert closing[2]["body"]["weight_version"] == info_version(mutable_engine)
    assert (
        generate(mutable_engine, [4, 5], max_new_tokens=2)["meta_info"]["finish_reason"]["type"] == "length"
    )


def info_version(engine) -> str:
    return requests.get(f"{engine.url}/model_info", headers=AUTH, timeout=10).json()["weight_version"]
