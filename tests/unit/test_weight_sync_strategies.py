"""Strategy sequencing against a stand-in engine process that speaks SGLang's weight-update protocol.

The stand-in (a plain http.server in a subprocess, written below) keeps a dict of tensors, records every call,
and declares per run whether it takes flattened buckets. It checks what SGLang 0.5.23 checks (updates only
inside begin/end) and joins the trainer's group with portable_rl's own group code, so these tests pin the
protocol: call order, bucket formats, weight_version only on the last request, errors that name the engine.
The real engines are exercised in tests/integration/test_weight_sync_engines.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import requests
import torch

from portable_rl.distributed import free_port
from portable_rl.protocol.engine_ops import EngineOps
from portable_rl.weight_sync import (
    CollectiveTimeout,
    WeightSyncConfig,
    WeightSyncError,
    check_weights,
    make_weight_sync,
)
from portable_rl.weight_sync.base import update_session

STAND_IN = textwrap.dedent(
    r"""
    import json, sys
    from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
    import torch
    from safetensors.torch import load_file
    from pathlib import Path
    from portable_rl.protocol.buckets import empty_flat, metas_from_lists, unflatten, dtype_from_name
    from portable_rl.protocol.checksum import tensor_checksum
    from portable_rl.protocol.process_group import init_weight_update_group
    from portable_rl.protocol.tensor_codec import deserialize_tensors, named_tensors_from_payload

    port = int(sys.argv[1])
    state = {"weights": {}, "version": "0", "session": False, "groups": {}, "calls": [], "formats": [],
             "prefers_per_tensor": False}

    def handle(path, body):
        if path == "/reset":
            for g in state["groups"].values():
                g.destroy()
            state.update(weights={}, version="0", session=False, groups={}, calls=[], formats=body["formats"],
                         prefers_per_tensor=body.get("prefers_per_tensor", False))
            return {"success": True}
        state["calls"].append([path, {k: v for k, v in body.items() if k != "serialized_named_tensors"}])
        if path in ("/server_info", "/get_server_info"):
            return {"tp_size": 1, "weight_update_load_formats": state["formats"], "weights_checksum": True,
                    "weight_update_prefers_per_tensor": state["prefers_per_tensor"]}
        if path in ("/pause_generation", "/continue_generation", "/flush_cache"):
            return {"success": True}
        if path == "/begin_weight_update":
            if state["session"]:
                return {"success": False, "message": "session already open"}
            state["session"] = True
            return {"success": True}
        if path == "/end_weight_update":
            state["session"] = False
            return {"success": True}
        if path == "/model_info":
            return {"weight_version": state["version"]}
        if path == "/init_weights_update_group":
            state["groups"][body["group_name"]] = init_weight_update_group(rank=body["rank_offset"], timeout_s=20, **{
                k: body[k] for k in ("master_address", "master_port", "world_size", "group_name", "backend")})
            return {"success": True}
        if path == "/destroy_weights_update_group":
            state["groups"].pop(body["group_name"]).destroy()
            return {"success": True}
        if path.startswith("/update_weights_from") and path != "/update_weights_from_disk" and not state["session"]:
            return {"success": False, "message": path[1:] + " must run between begin and end"}
        if path == "/update_weights_from_distributed":
            if body.get("load_format") == "flattened_bucket":
                metas = metas_from_lists(body["names"], body["dtypes"], body["shapes"])
                flat = empty_flat(metas)
                state["groups"][body["group_name"]].broadcast(flat)
                pairs = unflatten(flat, metas)
            else:
                pairs = []
                for n, d, s in zip(body["names"], body["dtypes"], body["shapes"]):
                    t = torch.empty(s, dtype=dtype_from_name(d))
                    state["groups"][body["group_name"]].broadcast(t)
                    pairs.append((n, t))
        elif path == "/update_weights_from_tensor":
            obj = deserialize_tensors(body["serialized_named_tensors"][0])
            pairs = named_tensors_from_payload(obj, body.get("load_format"))
        elif path == "/update_weights_from_disk":
            pairs = []
            for f in sorted(Path(body["model_path"]).glob("*.safetensors")):
                pairs += list(load_file(str(f)).items())
        elif path == "/get_weights_checksum":
            return {"checksums": {n: (tensor_checksum(state["weights"][n]) if n in state["weights"] else None)
                                  for n in body["names"]}}
        elif path == "/calls":
            return {"calls": state["calls"][:-1]}
        else:
            return None
        for n, t in pairs:
            state["weights"][n] = t.clone()
        if body.get("weight_version") is not None:
            state["version"] = body["weight_version"]
        return {"success": True, "message": "ok"}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def _do(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}") if n else {}
            out = handle(self.path, body)
            code = 404 if out is None else (200 if out.get("success", True) else 400)
            data = json.dumps(out or {"detail": "Not Found"}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        do_GET = do_POST = _do

    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


class StandIn:
    def __init__(self, script):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.formats: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.port)])

    def wait_ready(self):
        deadline = time.monotonic() + 180
        while True:
            try:
                requests.get(self.base_url + "/get_server_info", timeout=1)
                return
            except requests.RequestException:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("stand-in engine did not start") from None
                time.sleep(0.2)

    def reset(self, formats, prefers_per_tensor=False):
        self.formats = formats
        body = {"formats": formats, "prefers_per_tensor": prefers_per_tensor}
        requests.post(self.base_url + "/reset", json=body, timeout=30).raise_for_status()

    def calls(self):
        return requests.post(self.base_url + "/calls", json={}, timeout=5).json()["calls"]

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    script = tmp_path_factory.mktemp("stand_in") / "stand_in.py"
    script.write_text(STAND_IN)
    started = [StandIn(script), StandIn(script)]  # both start in parallel
    try:
        for e in started:
            e.wait_ready()
        yield started
    finally:
        for e in started:
            e.stop()


@pytest.fixture
def engines(stand_ins, request):
    for e in stand_ins:
        e.reset(getattr(request, "param", ["flattened_bucket"]))
    return stand_ins


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        ("layer.0.w", torch.randn(64, 32, generator=g)),
        ("layer.0.b", torch.randn(64, generator=g).to(torch.bfloat16)),
        ("layer.1.w", torch.randn(32, 64, generator=g)),
        ("norm", torch.randn(32, generator=g)),
    ]


def _paths(calls, prefix):
    return [c for c in calls if c[0].startswith(prefix)]


@pytest.mark.parametrize(
    "engines", [["flattened_bucket"], []], indirect=True, ids=["flattened", "per-tensor"]
)
def test_broadcast_syncs_two_engines_in_buckets(engines):
    cfg = WeightSyncConfig(
        bucket_mb=8 * 1024 / 1024 / 1024, timeout_s=30
    )  # 8 KiB buckets -> several per sync
    sync = make_weight_sync(cfg, "disaggregated")
    sync.connect([e.base_url for e in engines])
    try:
        weights = _weights(1)
        sync.update(iter(weights), version=7)
        check_weights([e.base_url for e in engines], weights).raise_if_failed()
        flattened = sync.flattened
    finally:
        sync.disconnect()
    assert flattened == ("flattened_bucket" in engines[0].formats)
    for engine in engines:
        calls = engine.calls()
        order = [c[0] for c in calls if c[0] != "/server_info"]
        updates = _paths(calls, "/update_weights_from_distributed")
        assert len(updates) >= 3  # 8 KiB buckets
        first, last = order.index(updates[0][0]), len(order) - 1 - order[::-1].index(updates[0][0])
        assert order[:first] == [
            "/init_weights_update_group",
            "/pause_generation",
            "/flush_cache",
            "/begin_weight_update",
        ]
        assert order[last + 1] == "/end_weight_update"
        # the resume and the version read-back are issued together once the session is closed
        assert sorted(order[last + 2 : last + 4]) == ["/continue_generation", "/model_info"]
        assert [u[1].get("weight_version") for u in updates] == [None] * (len(updates) - 1) + ["7"]
        assert [u[1]["flush_cache"] for u in updates] == [False] * (len(updates) - 1) + [True]
        assert {u[1].get("load_format") for u in updates} == ({"flattened_bucket"} if flattened else {None})
        for u in updates:
            assert len({d for d in u[1]["dtypes"]}) == 1


def test_auto_sends_large_tensors_per_tensor_to_engines_that_prefer_it(engines):
    """An engine that declares per-tensor updates faster gets them for large tensors, small ones still flattened."""
    for e in engines:
        e.reset(["direct", "flattened_bucket"], prefers_per_tensor=True)
    g = torch.Generator().manual_seed(3)
    weights = [
        ("big.0", torch.randn(1024, 512, generator=g)),  # 2 MiB each: two fill a 4 MiB bucket
        ("small.a", torch.randn(64, 32, generator=g)),
        ("big.1", torch.randn(1024, 512, generator=g)),
        ("small.b", torch.randn(32, generator=g)),
    ]
    sync = make_weight_sync(WeightSyncConfig(bucket_mb=4, timeout_s=30), "disaggregated")
    sync.connect([e.base_url for e in engines])
    try:
        sync.update(iter(weights), version=2)
        check_weights([e.base_url for e in engines], weights).raise_if_failed()
    finally:
        sync.disconnect()
    for e in engines:
        updates = _paths(e.calls(), "/update_weights_from_d")
        formats = {tuple(u[1]["names"]): u[1].get("load_format") for u in updates}
        # small tensors are bucketed apart from the large ones, which go one broadcast each
        assert formats == {("big.0", "big.1"): None, ("small.a", "small.b"): "flattened_bucket"}
        assert updates[-1][1]["weight_version"] == "2"


def test_broadcast_reports_the_engine_that_refuses(engines):
    cfg = WeightSyncConfig(timeout_s=3, verify_version=True)
    sync = make_weight_sync(cfg, "disaggregated")
    sync.connect([e.base_url for e in engines])
    # An engine with a session already open (left over from a crashed sync) refuses begin_weight_update.
    requests.post(engines[1].base_url + "/begin_weight_update", json={}, timeout=5)
    try:
        with pytest.raises(
            WeightSyncError, match=f"begin_weight_update failed.*{engines[1].port}.*already open"
        ):
            sync.update(iter(_weights(2)), version=1)
        # generation was resumed on both engines even though the update failed
        for e in engines:
            assert e.calls()[-1][0] == "/continue_generation"
    finally:
        sync.disconnect()


def test_broadcast_to_an_engine_that_never_joins_names_group_and_ranks(engines):
    ops = [EngineOps(e.base_url, timeout_s=4) for e in engines]
    assert [o.tp_size for o in ops] == [1, 1]  # server info is read (and cached) while both engines answer
    engines[1].proc.send_signal(signal.SIGSTOP)  # then engine 1 stalls: it takes no request and never joins
    try:
        sync = make_weight_sync(WeightSyncConfig(timeout_s=4, group_name="ws_unit"), "disaggregated")
        start = time.monotonic()
        with pytest.raises(CollectiveTimeout) as info:
            sync.connect(ops)
        assert time.monotonic() - start < 30
    finally:
        engines[1].proc.send_signal(signal.SIGCONT)
    msg = str(info.value)
    assert "'ws_unit'" in msg and "rank 0 of 3" in msg and "engine ranks 1, 2" in msg
    assert f"rank 1 = {engines[0].base_url}" in msg and f"rank 2 = {engines[1].base_url}" in msg
    assert f"{engines[1].base_url}: no answer" in msg


def test_shared_tensor_and_disk_sync_and_version(engines, tmp_path):
    urls = [e.base_url for e in engines]
    shared = make_weight_sync(WeightSyncConfig(bucket_mb=0.004), "colocated")
    shared.connect(urls)
    shared.update(iter(_weights(3)), version=11)
    check_weights(urls, _weights(3)).raise_if_failed()
    assert check_weights(urls, _weights(4)).ok is False
    calls = engines[0].calls()
    updates = _paths(calls, "/update_weights_from_tensor")
    assert len(updates) >= 2 and {u[1].get("load_format") for u in updates} == {"flattened_bucket"}
    assert [u[1].get("weight_version") for u in updates][-1] == "11"
    # The staging segment is reused by later syncs and opened by both engines every time.
    for version in (12, 13):
        shared.update(iter(_weights(version)), version=version)
        check_weights(urls, _weights(version)).raise_if_failed()
    shared.disconnect()

    disk = make_weight_sync(
        WeightSyncConfig(strategy="disk", disk_dir=str(tmp_path / "xfer"), disk_shard_mb=0.004), "colocated"
    )
    disk.connect(urls)
    disk.update(iter(_weights(5)), version=14)
    disk.update(iter(_weights(6)), version=15)
    check_weights(urls, _weights(6)).raise_if_failed()
    assert [p.name for p in (tmp_path / "xfer").iterdir()] == ["weights_v15"]
    disk_calls = _paths(engines[1].calls(), "/update_weights_from_disk")
    assert [c[1]["weight_version"] for c in disk_calls] == ["14", "15"]
    assert "/begin_weight_update" not in [c[0] for c in engines[1].calls()[-6:]]


def test_version_check_catches_an_engine_that_did_not_move(engines):
    sync = make_weight_sync(WeightSyncConfig(), "colocated")
    sync.connect([e.base_url for e in engines])
    sync.update(iter(_weights(7)), version=3)
    with pytest.raises(WeightSyncError, match=f"did not move to '4'.*{engines[0].port} reports '3'") as info:
        with update_session(sync.engines, 4, verify_version=True):
            # only engine 1 receives the new version
            requests.post(
                engines[1].base_url + "/update_weights_from_disk",
                json={"model_path": "/none", "weight_version": "4"},
                timeout=5,
            )
    assert str(engines[1].port) not in str(info.value)
    sync.disconnect()


def test_pipeline_stages_sync_through_their_own_groups_inside_one_session(engines):
    """Each stage's rank 0 owns a group; one caller opens the session around both (manage_session=False)."""
    urls = [e.base_url for e in engines]
    weights = _weights(21)
    stages = [weights[:2], weights[2:]]
    syncs = []
    for i in range(2):
        cfg = WeightSyncConfig(group_name=f"weight_update_group_pp{i}", manage_session=False, timeout_s=30)
        sync = make_weight_sync(cfg, "disaggregated")
        sync.connect(urls)
        syncs.append(sync)
    try:
        with update_session(urls, 5, timeout_s=30):
            for sync, part in zip(syncs, stages, strict=True):
                sync.update(iter(part), version=5)
        check_weights(urls, weights).raise_if_failed()
    finally:
        for sync in syncs:
            sync.disconnect()
    order = [c[0] for c in engines[0].calls() if c[0] != "/server_info"]
    assert order.count("/begin_weight_update") == 1 and order.count("/pause_generation") == 1
    updates = [i for i, p in enumerate(order) if p == "/update_weights_from_distributed"]
    assert order.index("/begin_weight_update") < updates[0] and updates[-1] < order.index(
        "/end_weight_update"
    )
