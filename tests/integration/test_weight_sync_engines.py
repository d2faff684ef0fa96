"""Every weight-sync strategy against real engine servers: portable_rl's CPU engine (two processes) and, under the
``sglang`` marker, the real SGLang 0.5.23 server on CPU.

After each sync the engines' weights are bit-equal to the trainer's (checksums / exact values), the weight
version moved, and the engines' greedy log-probs are what the HF model with the new weights computes.
Failure paths: a corrupted tensor fails ``check_weights`` naming it; an engine that stalls never joins the group
and the trainer's rendezvous ends with an error naming the group and ranks; an engine that refuses a bucket ends
the sync at once instead of after the collective timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file
from sglang_server import launch_sglang
from transformers import AutoModelForCausalLM

from portable_rl.platform import current_platform
from portable_rl.protocol.client import EngineClient
from portable_rl.rollout.engines.launcher import EngineSpec, launch_engine
from portable_rl.weight_sync import (
    CollectiveTimeout,
    WeightSyncConfig,
    WeightSyncError,
    check_weights,
    make_weight_sync,
)

PROMPT = [1, 17, 42, 99, 7, 3]
STRATEGIES = [
    ("shared_tensor", "colocated", {"resident_weights": "off"}),
    ("shared_tensor", "colocated", {"flatten_buckets": "off", "resident_weights": "off"}),
    ("broadcast", "disaggregated", {}),
    ("broadcast", "disaggregated", {"flatten_buckets": "off"}),
    ("disk", "colocated", {}),
    ("shared_tensor", "colocated", {"resident_weights": "on"}),
]
IDS = [
    "shared-flat",
    "shared-per-tensor",
    "broadcast-flat",
    "broadcast-per-tensor",
    "disk",
    "shared-resident",
]


@pytest.fixture(scope="module")
def cpu_engines(tiny_llama):
    spec = dict(model_path=str(tiny_llama), kind="cpu", startup_timeout_s=300)
    started = [
        launch_engine(EngineSpec(engine_args={"num_threads": 1, "weight_update_timeout": 20}, **spec))
        for _ in range(2)
    ]
    yield started
    for e in started:
        e.stop()


@pytest.fixture(scope="module")
def base_weights(tiny_llama):
    return sorted(load_file(str(Path(tiny_llama) / "model.safetensors")).items())


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def perturbed(base, seed):
    g = torch.Generator().manual_seed(seed)
    return [(n, t + 0.05 * torch.randn(t.shape, generator=g)) for n, t in base]


def greedy(url, max_new_tokens=6):
    out = asyncio.run(_generate(url, max_new_tokens))
    return out.output_ids, torch.tensor(out.output_logprobs)


async def _generate(url, max_new_tokens):
    async with EngineClient(url, timeout_s=120) as client:
        return await client.generate(
            PROMPT, {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
        )


def version_of(url):
    return requests.get(url + "/model_info", timeout=30).json()["weight_version"]


def reference_logprobs(model, weights, output_ids):
    model.load_state_dict(dict(weights), strict=True)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + output_ids])).logits[0]
    lps = torch.log_softmax(logits[len(PROMPT) - 1 : -1], dim=-1)
    return lps.gather(1, torch.tensor(output_ids)[:, None]).squeeze(1)


def run_sync(urls, strategy, mode, extra, weights, version, tmp_path):
    if strategy == "disk":
        extra = {**extra, "disk_dir": str(tmp_path / "xfer")}
    cfg = WeightSyncConfig(
        strategy=strategy, bucket_mb=0.25, timeout_s=60, master_address="127.0.0.1", **extra
    )
    sync = make_weight_sync(cfg, mode)
    sync.connect(urls)
    try:
        sync.update(iter(weights), version=version)
        # format of buckets of small tensors (all the tiny model has), of large-tensor buckets, resident writes
        return {
            "flattened": getattr(sync, "flatten_small", getattr(sync, "flattened", None)),
            "flattened_large": getattr(sync, "flattened", None),
            "resident": getattr(sync, "resident", None) is not None,
        }
    finally:
        sync.disconnect()


@pytest.mark.parametrize("strategy, mode, extra", STRATEGIES, ids=IDS)
def test_sync_makes_engines_serve_the_trainer_weights(
    cpu_engines, base_weights, hf_model, strategy, mode, extra, tmp_path, request
):
    urls = [e.url for e in cpu_engines]
    version = 100 + STRATEGIES.index((strategy, mode, extra))
    weights = perturbed(base_weights, seed=version)
    ids_before, lp_before = greedy(urls[0])
    assert not check_weights(urls, weights).ok

    used = run_sync(urls, strategy, mode, extra, weights, version, tmp_path)

    report = check_weights(urls, weights)
    assert report.ok, report.summary()
    assert [e.compared for e in report.engines] == [len(weights)] * 2
    assert [version_of(u) for u in urls] == [str(version)] * 2
    if strategy != "disk":
        assert used["flattened"] == (extra.get("flatten_buckets") != "off")
    if strategy == "broadcast":
        assert (
            used["flattened_large"] is False
        )  # the CPU engine receives large tensors straight into its parameters
    assert used["resident"] == (extra.get("resident_weights") == "on")
    for url in urls:
        ids_after, lp_after = greedy(url)
        assert ids_after != ids_before or not torch.allclose(lp_after, lp_before)
        expected = reference_logprobs(hf_model, weights, ids_after)
        torch.testing.assert_close(lp_after, expected, atol=2e-4, rtol=1e-4)


def test_corrupted_tensor_fails_check_naming_it(cpu_engines, base_weights, tmp_path):
    urls = [e.url for e in cpu_engines]
    weights = perturbed(base_weights, seed=7)
    run_sync(urls, "broadcast", "disaggregated", {}, weights, 7, tmp_path)
    assert check_weights(urls, weights).ok
    corrupted = [(n, t.clone()) for n, t in weights]
    name, tensor = corrupted[3]
    tensor.view(-1).view(torch.int32)[5] ^= 1  # one bit of one element
    report = check_weights(urls, corrupted)
    assert not report.ok
    assert [e.mismatched for e in report.engines] == [[name], [name]]
    with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
        report.raise_if_failed()


def test_engine_refusing_a_bucket_is_named_without_waiting_for_the_collective_timeout(
    cpu_engines, base_weights
):
    urls = [e.url for e in cpu_engines]
    cfg = WeightSyncConfig(
        strategy="broadcast", timeout_s=120, master_address="127.0.0.1", group_name="refusal"
    )
    sync = make_weight_sync(cfg, "disaggregated")
    sync.connect(urls)
    try:
        # The second engine loses its group (as after a restart): it answers the bucket with an error.
        r = requests.post(
            urls[1] + "/destroy_weights_update_group", json={"group_name": "refusal"}, timeout=30
        )
        assert r.status_code == 200, r.text
        start = time.monotonic()
        with pytest.raises(
            WeightSyncError, match=f"refused the bucket: {urls[1]}.*Group refusal not in"
        ) as info:
            sync.update(iter(perturbed(base_weights, 8)), version=8)
        # Detection is immediate; the teardown waits at most for the other engine's own 20 s receive timeout,
        # never for the trainer's 120 s collective timeout.
        assert time.monotonic() - start < 60
        assert f"rank 2 = {urls[1]}" in str(info.value)
        with pytest.raises(WeightSyncError, match="disconnect\\(\\) and connect\\(\\) again"):
            sync.update(iter(base_weights), version=9)
    finally:
        sync.disconnect()
    # both engines closed their update session and generate again; a fresh group works
    for url in urls:
        assert greedy(url, 2)[0]
    weights = perturbed(base_weights, 10)
    sync.connect(urls)
    try:
        sync.update(iter(weights), version=10)
    finally:
        sync.disconnect()
    assert check_weights(urls, weights).ok


def test_engine_that_never_joins_times_out_naming_group_and_ranks(cpu_engines):
    urls = [e.url for e in cpu_engines]
    sync = make_weight_sync(
        WeightSyncConfig(strategy="broadcast", timeout_s=5, master_address="127.0.0.1", group_name="stalled"),
        "disaggregated",
    )
    from portable_rl.protocol.engine_ops import EngineOps

    ops = [EngineOps(u, timeout_s=5) for u in urls]
    assert [o.tp_size for o in ops] == [1, 1]
    stalled = cpu_engines[1].proc
    os.kill(stalled.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(CollectiveTimeout) as info:
            sync.connect(ops)
        assert time.monotonic() - start < 45
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    msg = str(info.value)
    assert "'stalled'" in msg and "rank 0 of 3" in msg and "engine ranks 1, 2" in msg
    assert f"rank 2 = {urls[1]}" in msg


class _DeviceCollectivesPlatform(type(current_platform())):
    """The host's platform with a device collective backend, as a GPU trainer has (what matters here)."""

    dist_backend = "device-collectives"


def test_gpu_style_trainer_syncs_to_the_cpu_engine_over_the_host_backend(cpu_engines, base_weights):
    # A trainer whose platform backend the CPU engine cannot join (NCCL/RCCL on a GPU) broadcasts over gloo,
    # which the engine lists in /server_info; before this the engine waited out the collective timeout.
    urls = [e.url for e in cpu_engines]
    cfg = WeightSyncConfig(strategy="broadcast", timeout_s=60, master_address="127.0.0.1", group_name="host")
    sync = make_weight_sync(cfg, "disaggregated", _DeviceCollectivesPlatform())
    weights = perturbed(base_weights, 21)
    sync.connect(urls)
    try:
        assert sync.group.backend == "gloo"
        sync.update(iter(weights), version=21)
    finally:
        sync.disconnect()
    assert check_weights(urls, weights).ok


def test_engine_refuses_a_backend_it_cannot_join_at_once(cpu_engines):
    start = time.monotonic()
    r = requests.post(
        cpu_engines[0].url + "/init_weights_update_group",
        json={
            "master_address": "127.0.0.1",
            "master_port": 1,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": "x",
            "backend": "device-collectives",
        },
        timeout=30,
    )
    assert time.monotonic() - start < 10
    assert r.status_code == 400 and "'device-collectives'" in r.text and "'gloo'" in r.text
    assert requests.get(cpu_engines[0].url + "/server_info", timeout=30).json()["weight_update_backends"] == [
        "gloo"
    ]


# ---- the real SGLang server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sglang_engine(tiny_llama):
    engine = launch_sglang(tiny_llama)
    yield engine
    engine.stop()


# SGLang offers no resident weights: "auto" (the default) must fall back to buckets.
SGLANG_STRATEGIES = [*STRATEGIES[:5], ("shared_tensor", "colocated", {})]
SGLANG_IDS = [*IDS[:5], "shared-resident-auto-falls-back"]


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.parametrize("strategy, mode, extra", SGLANG_STRATEGIES, ids=SGLANG_IDS)
def test_sync_against_real_sglang(sglang_engine, base_weights, strategy, mode, extra, tmp_path):
    url = sglang_engine.url
    version = 200 + SGLANG_STRATEGIES.index((strategy, mode, extra))
    weights = perturbed(base_weights, seed=version)
    _, lp_before = greedy(url)
    used = run_sync([url], strategy, mode, extra, weights, version, tmp_path)
    flattened, flattened_large = used["flattened"], used["flattened_large"]
    assert not used["resident"]
    report = check_weights([url], weights)  # /get_weights_by_name: SGLang has no per-tensor checksum
    assert report.ok, report.summary()
    assert version_of(url) == str(version)
    if strategy != "disk":
        # SGLang 0.5.23 takes flattened buckets and declares no preference: every bucket is flattened
        assert flattened == flattened_large == (extra.get("flatten_buckets") != "off")
    _, lp_after = greedy(url)
    assert not torch.allclose(lp_after, lp_before)
    corrupted = [(n, t.clone()) for n, t in weights]
    corrupted[0][1].view(-1)[0] += 1e-3
    assert check_weights([url], corrupted).engines[0].mismatched == [corrupted[0][0]]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_resident_sync_inside_a_callers_session_moves_the_version(cpu_engines, base_weights):
    # manage_session=False: the caller opens and closes the session; the strategy still commits the version.
    from portable_rl.weight_sync.base import update_session

    urls = [e.url for e in cpu_engines]
    weights = perturbed(base_weights, seed=77)
    cfg = WeightSyncConfig(
        strategy="shared_tensor", resident_weights="on", manage_session=False, timeout_s=60
    )
    sync = make_weight_sync(cfg, "colocated")
    sync.connect(urls)
    try:
        with update_session(urls, 77, timeout_s=60):
            sync.update(iter(weights), version=77)
    finally:
        sync.disconnect()
    assert check_weights(urls, weights).ok
    assert [version_of(u) for u in urls] == ["77"] * 2
