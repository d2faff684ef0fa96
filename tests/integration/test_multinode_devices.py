"""Devices on a multi-node cluster come from Ray: two GPU nodes that each number their devices from 0.

The loopback cluster of ``test_multinode`` (``portable-rl launch head|worker`` processes on this host), with
two worker nodes that advertise four GPU resources each behind the device mask "0,1,2,3" — a simulated GPU
host: Ray's own accelerator manager reads the mask and hands out those ids, as on a real node. A job of 8
bundles spans both nodes, so bundle indexes run to 7 while no node has a device above 3.

Checks: the probe reports, per bundle, a node and a device that node has, each (node, device) once; engine
masks and trainer devices are those ids; and actors started the way the trainer group starts its ranks
(the trainer env mask, the local ordinal) each find, at that ordinal, the device Ray reserved for them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import pytest
from test_multinode import (
    START_TIMEOUT_S,
    LocalCluster,
    _cluster_env,
    _start_node,
    _teardown,
    _wait_port,
)

from portable_rl import platform as plat
from portable_rl.distributed import free_port
from portable_rl.orchestration.devices import (
    engine_devices,
    order_trainer_slots,
    probe_bundles,
    trainer_devices,
)
from portable_rl.orchestration.placement import PlacementConfig, actor_options, plan, reserve
from portable_rl.platform import DeviceInfo

pytestmark = pytest.mark.slow

MASK = "0,1,2,3"
GPU_NODES = ("gpu_a", "gpu_b")


def _report_fn():
    """Defined in a function, using no module globals, so Ray ships it by value (nodes cannot import tests/)."""

    def report(mask_key: str) -> dict:
        """Inside a worker: its node, Ray's device ids for it, and the mask its process sees."""
        import os

        import ray

        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "ray_ids": [int(i) for i in ctx.get_accelerator_ids().get("GPU", [])],
            "mask": os.environ.get(mask_key),
        }

    return report


def test_two_gpu_nodes_numbering_from_zero():
    import ray

    # The GPU platform as a rank on one of these nodes sees it: four devices (fake device info, no probe).
    gpu_platform = plat.platform_class("cuda")(devices=tuple(DeviceInfo(i, "GPU") for i in range(4)))

    temp_dir = tempfile.mkdtemp(prefix="prl", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port("127.0.0.1")
    names = ("head", *GPU_NODES)
    c = LocalCluster(
        kind="loopback",
        address=f"127.0.0.1:{port}",
        temp_dir=temp_dir,
        env=_cluster_env(),
        ifname="lo",
        node_ips=dict.fromkeys(names, "127.0.0.1"),
    )
    base_env = dict(c.env)
    mask_key = gpu_platform.visible_devices_env[0]
    try:
        _start_node(c, "head", ["head", "--port", str(port)], {}, cpus=0)
        _wait_port(c, port)
        if ray.is_initialized():  # another module of this xdist worker left its local Ray up
            ray.shutdown()
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        for n, name in enumerate(GPU_NODES, start=2):
            # Each node: four GPU resources behind the mask "0,1,2,3" (one at a time: see test_multinode).
            c.env = {**base_env, mask_key: MASK, "RAY_OVERRIDE_RESOURCES": json.dumps({"GPU": 4})}
            _start_node(c, name, ["worker", "--address", c.address], {}, cpus=4)
            deadline = time.monotonic() + START_TIMEOUT_S
            while sum(1 for x in ray.nodes() if x["Alive"]) < n:
                assert c.procs[-1].poll() is None, f"node {name} exited:\n{c.log(name)}"
                assert time.monotonic() < deadline, f"node {name} did not join:\n{c.log(name)}"
                time.sleep(0.5)
        gpu_nodes = {x["NodeID"] for x in ray.nodes() if x["Alive"] and x["Resources"].get("GPU")}
        assert len(gpu_nodes) == 2

        p = plan(
            PlacementConfig(mode="disaggregated", trainer_ranks=4, num_engines=2, devices_per_engine=2),
            gpu_platform,
        )
        pg = reserve(p, timeout_s=120)
        found = probe_bundles(p, pg, gpu_platform)
        assert {b.node_id for b in found} == gpu_nodes  # the job spans both nodes
        pairs = [(b.node_id, d) for b in found for d in b.devices]
        assert len(pairs) == len(set(pairs)) == 8
        assert all(0 <= d <= 3 for _, d in pairs)  # never a bundle index such as 7
        # (the bundle indexes the engines' masks used to be: devices neither node has)
        assert max(s.bundle for slots in p.engines for s in slots) == 7
        for e, devices in enumerate(engine_devices(p, found)):
            assert devices == [d for s in p.engines[e] for d in found[s.bundle].devices]

        ordered = order_trainer_slots(p, found)
        devices = trainer_devices(ordered, found, gpu_platform)
        probe = ray.remote(_report_fn())
        reports = ray.get(
            [
                probe.options(runtime_env={"env_vars": d.env}, **actor_options(ordered, slot, pg)).remote(
                    mask_key
                )
                for slot, d in zip(ordered.trainer, devices, strict=True)
            ],
            timeout=120,
        )
        for slot, d, r in zip(ordered.trainer, devices, reports, strict=True):
            assert r["node_id"] == found[slot.bundle].node_id
            assert r["ray_ids"] == [d.physical]  # Ray's id for this rank's bundle ...
            visible = [int(x) for x in r["mask"].split(",")]
            ordinal = gpu_platform.local_ordinal(d.physical, {mask_key: r["mask"]})
            assert visible[ordinal] == d.physical  # ... is the device at the rank's ordinal
        ray.util.remove_placement_group(pg)
    finally:
        ray.shutdown()
        _teardown(c)
        shutil.rmtree(temp_dir, ignore_errors=True)
