"""Weight-update process group and shared-tensor codec across real processes (gloo, shared memory)."""

from __future__ import annotations

import base64
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from portable_rl.distributed import free_port
from portable_rl.protocol.buckets import flatten
from portable_rl.protocol.process_group import init_weight_update_group
from portable_rl.protocol.tensor_codec import (
    deserialize_tensors,
    flattened_payload,
    named_tensors_from_payload,
    serialize_tensors,
    share_memory_buffer,
)
from portable_rl.weight_sync import CollectiveTimeout, tensor_checksum

RECEIVER = textwrap.dedent(
    """
    import json, sys, time
    from portable_rl.protocol.buckets import metas_from_lists, empty_flat, unflatten
    from portable_rl.protocol.checksum import tensor_checksum
    from portable_rl.protocol.process_group import init_weight_update_group
    port, mode, spec = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    group = init_weight_update_group(master_address="127.0.0.1", master_port=port, rank=1, world_size=2,
                                     group_name="unit_group", backend="gloo", timeout_s=20)
    if mode == "idle":
        time.sleep(6)
    else:
        metas = metas_from_lists(spec["names"], spec["dtypes"], spec["shapes"])
        flat = empty_flat(metas)
        group.broadcast(flat, src=0)
        print(json.dumps({n: tensor_checksum(t) for n, t in unflatten(flat, metas)}))
    group.destroy()
    """
)


def _spawn_receiver(port: int, mode: str, spec: dict) -> subprocess.Popen:
    import json

    return subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(port), mode, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_rendezvous_without_peers_times_out_naming_group_and_ranks():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(CollectiveTimeout) as info:
        init_weight_update_group(
            master_address="127.0.0.1",
            master_port=port,
            rank=0,
            world_size=3,
            group_name="lonely_group",
            backend="gloo",
            timeout_s=2,
        )
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert "'lonely_group'" in msg and "rank 0 of 3" in msg and "engine ranks 1, 2" in msg
    assert f"127.0.0.1:{port}" in msg
    assert elapsed < 15


def test_flattened_bucket_broadcast_reaches_another_process_bit_exact():
    bucket = [("w.a", torch.randn(7, 3)), ("w.b", torch.randn(11)), ("w.c", torch.randn(2, 2, 2))]
    spec = {
        "names": [n for n, _ in bucket],
        "dtypes": ["float32"] * 3,
        "shapes": [list(t.shape) for _, t in bucket],
    }
    port = free_port()
    proc = _spawn_receiver(port, "receive", spec)
    try:
        group = init_weight_update_group(
            master_address="127.0.0.1",
            master_port=port,
            rank=0,
            world_size=2,
            group_name="unit_group",
            backend="gloo",
            timeout_s=20,
        )
        flat, _ = flatten(bucket)
        group.broadcast(flat)
        group.destroy()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    import json

    assert proc.returncode == 0, err
    received = json.loads(out.strip().splitlines()[-1])
    assert received == {n: tensor_checksum(t) for n, t in bucket}


def test_broadcast_to_a_rank_that_never_receives_times_out_naming_group_and_ranks():
    port = free_port()
    proc = _spawn_receiver(port, "idle", {})
    try:
        group = init_weight_update_group(
            master_address="127.0.0.1",
            master_port=port,
            rank=0,
            world_size=2,
            group_name="unit_group",
            backend="gloo",
            timeout_s=1.5,
            join_timeout_s=60,
        )
        start = time.monotonic()
        with pytest.raises(CollectiveTimeout) as info:
            group.broadcast(torch.zeros(1 << 16), what="broadcast of 'w'")
        assert time.monotonic() - start < 10
        group.destroy()
    finally:
        proc.kill()
        proc.wait()
    msg = str(info.value)
    assert "'unit_group'" in msg and "rank 0 of 2" in msg and "ranks 1" in msg and "'w'" in msg


IMPORTER = textwrap.dedent(
    """
    import json, sys
    from portable_rl.protocol.checksum import tensor_checksum
    from portable_rl.protocol.tensor_codec import deserialize_tensors, named_tensors_from_payload
    for line, fmt in zip(sys.stdin.read().split(), ["flattened_bucket", "none"]):
        obj = deserialize_tensors(line)
        pairs = named_tensors_from_payload(obj, None if fmt == "none" else fmt)
        print(json.dumps({n: tensor_checksum(t) for n, t in pairs}))
    """
)


def test_shared_memory_payload_opens_in_an_unrelated_process():
    bucket = [("x", torch.randn(5, 5)), ("y", torch.randn(3))]
    staging = share_memory_buffer(sum(t.numel() * 4 for _, t in bucket), torch.device("cpu"))
    flat, metas = flatten(bucket, staging)
    flat_payload = serialize_tensors(flattened_payload(flat, metas))
    list_payload = serialize_tensors([("x", bucket[0][1].clone()), ("y", bucket[1][1].clone())])
    env = {k: v for k, v in os.environ.items()}
    done = subprocess.run(
        [sys.executable, "-c", IMPORTER],
        input=f"{flat_payload}\n{list_payload}\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    import json

    expected = {n: tensor_checksum(t) for n, t in bucket}
    results = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert results == [expected, expected]


def test_payload_carries_handles_not_data():
    big = torch.randn(256, 1024)  # 1 MiB
    payload = serialize_tensors([("big", big.clone())])
    assert len(payload) < 4096


def test_importer_refuses_anything_but_tensor_rebuilds():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    payload = base64.b64encode(pickle.dumps([("w", Evil())])).decode()
    with pytest.raises(pickle.UnpicklingError, match="system"):
        deserialize_tensors(payload)
    with pytest.raises(ValueError, match="base64"):
        deserialize_tensors("not base64!!")
    with pytest.raises(ValueError, match="flattened_tensor"):
        named_tensors_from_payload([("w", torch.zeros(1))], "flattened_bucket")
