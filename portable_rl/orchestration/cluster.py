"""Multi-node facts: what a node advertises to Ray, the env it starts with, and the mixed-vendor check.

Contract
--------
* Every node started by ``portable-rl launch head|worker`` advertises the custom Ray resource
  ``portable_rl_platform:<name>`` (value 1) and, when started with ``--role``, ``portable_rl_role:<role>``
  (``trainer`` or ``engine``). ``node_resources()`` builds that dict; device counts travel as Ray's own
  resource (``--num-gpus``), never as a custom one.
* ``node_env(platform, ...)`` is the env a node's Ray processes start with: the platform's process env
  without device masks (the launcher folds the masks it finds on the host), the platform's network env for
  an interface, and ``PORTABLE_RL_PLATFORM`` so every worker on the node detects the same platform.
* ``check_cluster_platforms(nodes, weight_sync_strategy)`` reads the platform resource of every alive node of
  ``ray.nodes()`` and raises ``ClusterPlatformError`` (one line) for a training group that spans vendors, or
  for engines on another vendor unless weights travel by disk. It is pure; ``check_live_cluster`` calls it
  on the connected cluster.
* ``default_route_interface()`` names the interface of the default IPv4 route (``/proc/net/route``).
Nothing here names a vendor: platform names and env come from the platform objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_rl.errors import UserError
from portable_rl.platform import PLATFORM_ENV, Platform

PLATFORM_RESOURCE_PREFIX = "portable_rl_platform:"
ROLE_RESOURCE_PREFIX = "portable_rl_role:"
ROLES = ("trainer", "engine")
# The only weight-sync strategy that needs no collective between trainer and engines (safetensors on disk).
CROSS_VENDOR_STRATEGY = "disk"


class ClusterPlatformError(UserError):
    """The cluster's nodes cannot run this job together; the message is one line and names the fix."""


def platform_resource(platform_name: str) -> str:
    return f"{PLATFORM_RESOURCE_PREFIX}{platform_name}"


def node_resources(
    platform: Platform, role: str | None = None, extra: Mapping[str, float] | None = None
) -> dict:
    """Custom Ray resources a node of ``platform`` advertises (merged over ``extra``)."""
    if role is not None and role not in ROLES:
        raise UserError(
            f"--role {role!r} is not one of {', '.join(ROLES)}; omit it for a node that does both"
        )
    out: dict[str, float] = dict(extra or {})
    for reserved in ("CPU", "GPU", "memory", "object_store_memory"):
        if reserved in out:
            raise UserError(
                f"resource {reserved!r} cannot be set through --resources; use ray's own flag for it"
            )
    out[platform_resource(platform.name)] = 1
    if role is not None:
        out[f"{ROLE_RESOURCE_PREFIX}{role}"] = 1
    return out


def node_env(platform: Platform, ifname: str | None = None) -> dict[str, str]:
    """Static env for every Ray process of a node: the platform's process env, network env, platform name.

    It is what ``platform.prepare_process_env`` gives a process that starts with no device masks (collective
    and runtime defaults, Ray NOSET flags where the platform sets them node-wide); the masks themselves are
    per host and per worker (``launch`` folds what it finds; orchestration gives each worker its
    ``worker_env``).
    """
    env: dict[str, str] = {}
    platform.prepare_process_env(env)
    env = {k: v for k, v in env.items() if k not in platform.visible_devices_env}
    if ifname:
        env.update(platform.network_env(ifname))
    env[PLATFORM_ENV] = platform.name
    return env


def default_route_interface(route_table: str | Path = "/proc/net/route") -> str | None:
    """Interface of the default IPv4 route, or None when there is none (or no procfs)."""
    try:
        lines = Path(route_table).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines[1:]:
        cols = line.split()
        # Columns: Iface Destination Gateway Flags ...; destination 00000000 with mask 00000000 is the default.
        if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
            return cols[0]
    return None


# ---- the mixed-vendor check -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePlatform:
    address: str
    platform: str
    role: str | None  # None: the node may host trainer ranks and engines


@dataclass
class ClusterPlatforms:
    """What the check found: the training vendor and every node's platform and role."""

    trainer_platform: str
    engine_platforms: tuple[str, ...]
    nodes: list[NodePlatform] = field(default_factory=list)


def _node_platform(node: Mapping[str, Any], default_platform: str | None) -> NodePlatform:
    resources = node.get("Resources") or {}
    address = str(node.get("NodeManagerAddress") or node.get("NodeID") or "?")
    names = sorted(
        k[len(PLATFORM_RESOURCE_PREFIX) :] for k in resources if k.startswith(PLATFORM_RESOURCE_PREFIX)
    )
    roles = sorted(k[len(ROLE_RESOURCE_PREFIX) :] for k in resources if k.startswith(ROLE_RESOURCE_PREFIX))
    if len(names) > 1:
        raise ClusterPlatformError(
            f"node {address} advertises several platforms ({', '.join(names)}); restart it with portable-rl launch"
        )
    if not names:
        if default_platform is None:
            raise ClusterPlatformError(
                f"node {address} has no {PLATFORM_RESOURCE_PREFIX}* resource; "
                "start every node with `portable-rl launch head|worker`"
            )
        names = [default_platform]
    if len(roles) > 1:
        raise ClusterPlatformError(
            f"node {address} advertises several roles ({', '.join(roles)}); give it one --role"
        )
    return NodePlatform(address=address, platform=names[0], role=roles[0] if roles else None)


def _where(nodes: Iterable[NodePlatform]) -> str:
    by: dict[str, list[str]] = {}
    for n in nodes:
        by.setdefault(n.platform, []).append(n.address)
    return "; ".join(f"{name} on {', '.join(addrs)}" for name, addrs in sorted(by.items()))


def check_cluster_platforms(
    nodes: Sequence[Mapping[str, Any]],
    weight_sync_strategy: str,
    default_platform: str | None = None,
) -> ClusterPlatforms:
    """Refuse a cluster whose training group spans vendors, or cross-vendor engines without disk sync.

    ``nodes`` is ``ray.nodes()``; dead nodes are ignored. Nodes started with ``--role engine`` host engines
    only; every other node may host trainer ranks. ``default_platform`` stands in for nodes that carry no
    platform resource (a local ``ray.init()``); without it such nodes are an error.
    """
    alive = [_node_platform(n, default_platform) for n in nodes if n.get("Alive", True)]
    if not alive:
        raise ClusterPlatformError("the cluster has no alive node; start one with `portable-rl launch head`")
    trainers = [n for n in alive if n.role != "engine"]
    engines = [n for n in alive if n.role == "engine"]
    if not trainers:
        raise ClusterPlatformError(
            "every node was started with --role engine, so no node can host the trainer; "
            "start one with --role trainer (or no --role)"
        )
    trainer_names = {n.platform for n in trainers}
    if len(trainer_names) > 1:
        raise ClusterPlatformError(
            f"mixed-vendor training group ({_where(trainers)}): one collective cannot span vendors; "
            "start the other vendor's nodes with `--role engine` and use weight_sync.strategy=disk"
        )
    trainer_platform = trainer_names.pop()
    foreign = [n for n in engines if n.platform != trainer_platform]
    if foreign and weight_sync_strategy != CROSS_VENDOR_STRATEGY:
        raise ClusterPlatformError(
            f"engines on another vendor than the trainer ({trainer_platform}) need "
            f"weight_sync.strategy={CROSS_VENDOR_STRATEGY}, got {weight_sync_strategy!r} ({_where(foreign)}); "
            f"set weight_sync.strategy={CROSS_VENDOR_STRATEGY} or use {trainer_platform} engines"
        )
    return ClusterPlatforms(
        trainer_platform=trainer_platform,
        engine_platforms=tuple(sorted({n.platform for n in engines} or {trainer_platform})),
        nodes=alive,
    )


def check_live_cluster(weight_sync_strategy: str, default_platform: str | None = None) -> ClusterPlatforms:
    """``check_cluster_platforms`` over the nodes of the Ray cluster this process is connected to."""
    import ray

    return check_cluster_platforms(ray.nodes(), weight_sync_strategy, default_platform=default_platform)
