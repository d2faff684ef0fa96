"""Devices come from Ray's assignment to each bundle, not from bundle-index arithmetic.

Pure checks on a simulated two-node, 8-device-per-node GPU cluster, and a real local Ray whose node offers four
GPU resources behind a device mask that does not start at 0 (a simulated host: Ray's own accelerator manager
reads the mask, as it does on a GPU node).
"""

from __future__ import annotations

import pytest
from fake_hosts import simulate_cuda

from portable_rl import platform as plat
from portable_rl.orchestration.devices import (
    BundleDevices,
    engine_devices,
    order_trainer_slots,
    pin_to_device_cpus,
    probe_bundles,
    trainer_devices,
)
from portable_rl.orchestration.placement import PlacementConfig, plan, reserve


@pytest.fixture
def gpu_platform(monkeypatch):
    simulate_cuda(monkeypatch, [(9, 0)] * 8)
    return plat.load("cuda")


def _two_nodes(n_bundles: int) -> list[BundleDevices]:
    """Bundles alternate between node A and node B (as PACK may place them); each node numbers from 0."""
    per_node: dict[str, int] = {}
    found = []
    for i in range(n_bundles):
        node = "A" if i % 2 == 0 else "B"
        device = per_node.setdefault(node, 0)
        per_node[node] += 1
        found.append(BundleDevices(i, node, f"10.0.0.{ord(node)}", (device,)))
    return found


def test_masks_and_ordinals_on_two_8_device_nodes_come_from_ray_ids(gpu_platform):
    p = plan(PlacementConfig(mode="disaggregated", trainer_ranks=8, num_engines=8), gpu_platform)
    found = _two_nodes(16)
    # Bundle indexes go up to 15; every node has devices 0..7 only.
    assert [d for e in engine_devices(p, found) for d in e] == [found[8 + e].devices[0] for e in range(8)]
    assert all(0 <= d < 8 for e in engine_devices(p, found) for d in e)

    ordered = order_trainer_slots(p, found)
    nodes = [found[s.bundle].node_id for s in ordered.trainer]
    assert nodes == ["A"] * 4 + ["B"] * 4  # ranks of a node are consecutive (TP groups inside a node)
    devices = trainer_devices(ordered, found, gpu_platform)
    assert [d.physical for d in devices] == [0, 1, 2, 3] * 2  # each node's devices in order
    for d, slot in zip(devices, ordered.trainer, strict=True):
        visible = gpu_platform.resolve_visible_devices(d.env)
        # the rank sees its node's job devices (node A: 0..7, the trainer's and the engines') ...
        assert visible == list(range(8))
        # ... and uses the one Ray gave its bundle, under the ordinal the platform maps it to
        assert visible[gpu_platform.local_ordinal(d.physical, d.env)] == found[slot.bundle].devices[0]


def test_cpu_bundles_have_no_device_ids_and_keep_their_order():
    cpu = plat.load("cpu")
    p = plan(PlacementConfig(mode="colocated", trainer_ranks=2, num_engines=1), cpu)
    found = [BundleDevices(i, "A", "127.0.0.1", ()) for i in range(2)]
    assert order_trainer_slots(p, found).trainer == p.trainer
    assert engine_devices(p, found) == [[]]
    assert [d.physical for d in trainer_devices(p, found, cpu)] == [None, None]


@pytest.fixture
def ray_with_masked_gpus(monkeypatch, gpu_platform):
    import ray

    if ray.is_initialized():  # another module of this worker left its Ray up; this test needs its own node
        ray.shutdown()
    # The node's device mask names devices 4..7: Ray numbers its GPU resources by it, like on a GPU host.
    monkeypatch.setenv(gpu_platform.visible_devices_env[0], "4,5,6,7")
    ray.init(
        num_cpus=4, num_gpus=4, object_store_memory=80 * 1024**2, include_dashboard=False, log_to_driver=False
    )
    yield ray
    ray.shutdown()


def test_probe_asks_ray_which_devices_each_bundle_holds(ray_with_masked_gpus, gpu_platform):
    ray = ray_with_masked_gpus
    p = plan(
        PlacementConfig(mode="colocated", trainer_ranks=4, num_engines=2, devices_per_engine=2), gpu_platform
    )
    pg = reserve(p, timeout_s=60)
    try:
        found = probe_bundles(p, pg, gpu_platform)
    finally:
        ray.util.remove_placement_group(pg)
    here = ray.get_runtime_context().get_node_id()
    assert {b.node_id for b in found} == {here}
    assert sorted(d for b in found for d in b.devices) == [4, 5, 6, 7]  # not the bundle indexes 0..3
    assert sorted(d for e in engine_devices(p, found) for d in e) == [4, 5, 6, 7]
    devices = trainer_devices(order_trainer_slots(p, found), found, gpu_platform)
    assert [d.physical for d in devices] == [4, 5, 6, 7]
    # positions in the mask "4,5,6,7", as a rank's platform maps them
    assert [gpu_platform.local_ordinal(d.physical, d.env) for d in devices] == [0, 1, 2, 3]


# ---- NUMA affinity of trainer ranks -----------------------------------------------------------------------


def test_the_gpu_platform_names_the_cpus_close_to_a_device(monkeypatch):
    simulate_cuda(monkeypatch, [(9, 0)] * 2, cpu_affinity={0: [0, 1, 2, 3], 1: [64, 65, 70]})
    gpu = plat.load("cuda")
    monkeypatch.setattr("os.cpu_count", lambda: 128)
    assert gpu.supports_numa_affinity
    assert gpu.device_cpus(0) == [0, 1, 2, 3]
    assert gpu.device_cpus(1) == [64, 65, 70]  # CPUs beyond the first 64-bit word


def test_platforms_without_the_fact_do_not_answer():
    for name in ("cpu", "rocm"):
        cls = plat.platform_class(name)
        assert not cls.supports_numa_affinity
        assert cls().device_cpus(0) is None


class _NumaHost(plat.platform_class("cpu")):
    """A platform with NUMA answers from fake device info: device -> CPUs close to it."""

    supports_numa_affinity = True
    close: dict[int, list[int]] = {}

    def device_cpus(self, physical_index: int) -> list[int] | None:
        return self.close.get(physical_index)


@pytest.fixture
def restore_affinity():
    import os

    before = os.sched_getaffinity(0)
    yield before
    os.sched_setaffinity(0, before)


def test_a_rank_is_pinned_to_the_allowed_cpus_of_its_device(restore_affinity):
    import os

    allowed = sorted(restore_affinity)
    host = _NumaHost()
    host.close = {3: [allowed[-1], 4096]}  # one CPU this process may use, one it may not
    assert pin_to_device_cpus(host, 3) == [allowed[-1]]
    assert os.sched_getaffinity(0) == {allowed[-1]}


def test_no_pinning_without_an_answer_or_an_allowed_cpu(restore_affinity):
    import os

    host = _NumaHost()
    host.close = {0: [4096]}
    assert pin_to_device_cpus(host, 0) is None  # none of its CPUs is allowed here: left as is
    assert pin_to_device_cpus(host, 1) is None  # the platform has no answer for the device
    assert pin_to_device_cpus(host, None) is None  # the CPU platform's ranks have no device
    assert pin_to_device_cpus(plat.load("cpu"), 0) is None  # the platform does not support it
    assert os.sched_getaffinity(0) == restore_affinity
