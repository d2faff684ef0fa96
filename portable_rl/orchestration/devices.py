"""Which devices each placement-group bundle holds, as Ray assigned them — never computed from bundle indexes.

Contract
--------
* ``probe_bundles(plan, pg, platform)`` places one short task on every bundle of ``pg``, asking for a small
  share of the bundle's resources, and returns one ``BundleDevices`` per bundle (index order): the node it is
  on (id and address) and the accelerator ids Ray reserved for it
  (``ray.get_runtime_context().get_accelerator_ids()[platform.ray_resource]``) — node-local physical ids, as
  the node's own device mask numbers them. A platform without a Ray device resource (CPU) gets no ids.
* ``order_trainer_slots(plan, found)`` puts trainer ranks in (node, device id) order: ranks of one node are
  consecutive (Megatron's tensor-parallel groups stay inside a node) and take that node's devices in order.
  Nodes keep the order of their first bundle, so rank 0 stays on the first bundle's node.
* ``node_devices(found, node_id)``: the devices of every bundle on one node (the mask a trainer rank gets:
  it sees the job's devices on its node, so co-located engines' devices keep their ordinals).
* ``TrainerDevice`` is what a trainer rank is told: the physical id and the env (device mask) it starts with.
  The rank maps the id to its torch ordinal itself (``platform.local_ordinal`` in its own process: the
  platform there knows its node's devices, which the driver's platform — maybe on a CPU-only head — does not).

* ``pin_to_device_cpus(platform, physical)`` (run inside a trainer rank): where the platform
  ``supports_numa_affinity``, restrict this process to the CPUs close to its device (``platform.device_cpus``)
  that it may use at all; returns the CPUs set, or None (no answer, or none of them allowed: left as is).
  Host-to-device copies and the data loader then stay on the device's NUMA node.

Why: Ray's bundle index says nothing about which device a bundle got — on a cluster, bundle 9 may be the
second GPU of the second node (an index used as a mask there would name a device that does not exist).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from portable_rl.orchestration.placement import Plan
from portable_rl.platform import Platform

PROBE_SHARE = 0.01  # of each resource in a bundle: the probe runs before the job's actors take the rest


@dataclass(frozen=True)
class BundleDevices:
    bundle: int
    node_id: str
    node_ip: str
    devices: tuple[int, ...]  # physical ids on the node (empty on the CPU platform)


@dataclass(frozen=True)
class TrainerDevice:
    physical: int | None  # None: the platform has no Ray device resource (CPU)
    env: dict[str, str]


def _probe(resource: str) -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "devices": [int(i) for i in ctx.get_accelerator_ids().get(resource, [])] if resource else [],
    }


def probe_bundles(plan: Plan, pg: Any, platform: Platform, timeout_s: float = 120.0) -> list[BundleDevices]:
    """One ``BundleDevices`` per bundle of ``pg`` (reserved for ``plan``), from Ray itself."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    resource = platform.ray_resource or ""
    probe = ray.remote(_probe)
    refs = []
    for i, bundle in enumerate(plan.bundles):
        opts: dict[str, Any] = {
            "num_cpus": bundle.get("CPU", 0) * PROBE_SHARE,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i
            ),
        }
        if resource == "GPU":
            opts["num_gpus"] = bundle[resource] * PROBE_SHARE
        elif resource:
            opts["resources"] = {resource: bundle[resource] * PROBE_SHARE}
        refs.append(probe.options(**opts).remote(resource))
    found = ray.get(refs, timeout=timeout_s)
    out = [
        BundleDevices(i, f["node_id"], f["node_ip"], tuple(sorted(f["devices"]))) for i, f in enumerate(found)
    ]
    if resource:
        for b in out:
            if not b.devices:
                raise RuntimeError(
                    f"Ray reserved no {resource} ids for bundle {b.bundle} on node {b.node_ip}; the node "
                    f"advertises {resource} without devices Ray can name — check its device mask"
                )
    return out


def _node_rank(found: Sequence[BundleDevices]) -> dict[str, int]:
    """Nodes numbered by their first bundle."""
    order: dict[str, int] = {}
    for b in found:
        order.setdefault(b.node_id, len(order))
    return order


def order_trainer_slots(plan: Plan, found: Sequence[BundleDevices]) -> Plan:
    """``plan`` with its trainer ranks in (node, device id) order (see the module docstring)."""
    nodes = _node_rank(found)

    def key(slot: Any) -> tuple[int, tuple[int, ...], int]:
        b = found[slot.bundle]
        return nodes[b.node_id], b.devices, slot.bundle

    return replace(plan, trainer=sorted(plan.trainer, key=key))


def node_devices(found: Sequence[BundleDevices], node_id: str) -> list[int]:
    return sorted({d for b in found if b.node_id == node_id for d in b.devices})


def engine_devices(plan: Plan, found: Sequence[BundleDevices]) -> list[list[int]]:
    """Per engine, the physical devices of its bundles (what its device mask names)."""
    return [[d for s in slots for d in found[s.bundle].devices] for slots in plan.engines]


def trainer_devices(plan: Plan, found: Sequence[BundleDevices], platform: Platform) -> list[TrainerDevice]:
    """Per trainer rank (in ``plan.trainer`` order): its device and its env."""
    out = []
    for slot in plan.trainer:
        b = found[slot.bundle]
        if not b.devices:
            out.append(TrainerDevice(None, platform.worker_env([])))
        else:
            out.append(TrainerDevice(b.devices[0], platform.worker_env(node_devices(found, b.node_id))))
    return out


def pin_to_device_cpus(platform: Platform, physical: int | None) -> list[int] | None:
    """Pin this process to the CPUs close to device ``physical`` where the platform can name them."""
    import os

    if physical is None or not platform.supports_numa_affinity:
        return None
    close = platform.device_cpus(physical)
    if not close:
        return None
    cpus = sorted(set(close) & os.sched_getaffinity(0))  # a container may allow only some of them
    if not cpus:
        return None
    os.sched_setaffinity(0, cpus)
    return cpus
