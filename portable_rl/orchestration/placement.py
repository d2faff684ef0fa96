"""Ray placement for the trainer and the rollout engines: co-located and disaggregated layouts.

Contract
--------
* ``PlacementConfig`` and ``NodePlacementConfig`` are defined in ``portable_rl.config.placement``.
  ``PlacementConfig`` says how many trainer ranks and engines there are, how many devices each uses, whether
  they share devices (``colocated``) or not (``disaggregated``), and optionally which nodes each side may use.
* ``NodePlacementConfig`` is the recipe's ``placement:`` section: the custom Ray resource a node must advertise
  to host trainer bundles (``trainer_resource``) or engine bundles (``engine_resource``). Nodes advertise one
  with ``portable-rl launch head|worker --resources '{"NAME": 1}'``; ``--role trainer|engine`` advertises
  ``portable_rl_role:trainer|engine``. Unset: any node.
* ``plan(cfg, platform)`` is pure: it returns the bundles a placement group must reserve and which bundle each
  trainer rank / engine lands on. Devices are the platform's Ray resource ("GPU" on NVIDIA and AMD); on the
  CPU platform a "device" is a share of CPU cores, so both layouts run on one machine. A pinned side's
  bundles also ask for ``PIN_AMOUNT`` of its node resource, so Ray puts them only on nodes that have it.
* ``reserve(plan)`` refuses a pin resource no alive node advertises, then creates one placement group with
  the PACK strategy (Ray fills as few nodes as the bundles' resources allow, one node when everything fits
  there) and returns it; bundle index order == rank order.
* ``layout(plan, pg, trainer_actors, engine_actors, engine_urls=None)`` reads back where every worker actually
  runs (node id and address, asked of the actor itself) and, given ``engine_urls``, the URL each engine serves
  on; ``write_layout`` adds the job's extras (weight-sync strategy) and writes it as JSON — the job's
  ``layout.json`` in the run directory.
* ``compute_threads(cfg, cores)`` sizes each worker's intra-op thread pool (applied through
  ``platform.compute_threads_env``, which only the CPU platform fills).
* Worker env comes from ``platform.worker_env`` — this module never names a vendor.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_rl.config.placement import PlacementConfig
from portable_rl.errors import UserError
from portable_rl.platform import Platform

# What one bundle asks of a pin resource: any node advertising a positive amount (e.g. 1) admits up to
# 1/PIN_AMOUNT bundles, and Ray's resource granularity (1e-4) represents it exactly.
PIN_AMOUNT = 0.001
PG_STRATEGY = "PACK"


class PlacementError(UserError):
    """The cluster cannot host the plan as pinned; one line naming the resource and the fix."""


def compute_threads(cfg: PlacementConfig, cores: int) -> tuple[int, int]:
    """Compute threads for (each trainer rank, each engine) on a machine of ``cores`` cores.

    Co-located workers take turns (generate, then train), so each side may use every core while it runs;
    disaggregated workers run at the same time and split the cores between them.
    """
    if cores < 1:
        raise ValueError(f"cores={cores} must be >= 1")
    if cfg.mode == "colocated":
        return max(1, cores // cfg.trainer_ranks), max(1, cores // cfg.num_engines)
    each = max(1, cores // (cfg.trainer_ranks + cfg.num_engines))
    return each, each


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: a bundle index and the fraction of that bundle's device it takes."""

    bundle: int
    device_share: float


@dataclass
class Plan:
    bundles: list[dict[str, float]]
    trainer: list[Slot]
    engines: list[list[Slot]]  # one list of slots (one per engine device) per engine
    resource: str  # "CPU" or the platform's accelerator resource
    extras: dict[str, Any] = field(default_factory=dict)
    strategy: str = PG_STRATEGY
    # side ("trainer" | "engine") -> the node resource its bundles ask for; only the pinned sides
    pins: dict[str, str] = field(default_factory=dict)


def plan(cfg: PlacementConfig, platform: Platform) -> Plan:
    """Bundles and slots for ``cfg`` on ``platform`` (pure; no Ray calls)."""
    resource = platform.ray_resource or "CPU"
    per_device: dict[str, float]
    if platform.ray_resource:
        per_device = {resource: 1.0, "CPU": 1.0}
    else:
        per_device = {"CPU": cfg.cpus_per_device}
    bundles = [dict(per_device) for _ in range(cfg.total_devices)]
    # Co-located workers on one device each take half of it, so Ray admits both on the same bundle.
    share = 0.5 if cfg.mode == "colocated" else 1.0
    trainer = [Slot(bundle=i, device_share=share) for i in range(cfg.trainer_ranks)]
    first_engine_bundle = 0 if cfg.mode == "colocated" else cfg.trainer_ranks
    engines = []
    for e in range(cfg.num_engines):
        start = first_engine_bundle + e * cfg.devices_per_engine
        engines.append([Slot(bundle=start + d, device_share=share) for d in range(cfg.devices_per_engine)])
    pins = {
        side: name
        for side, name in (("trainer", cfg.trainer_resource), ("engine", cfg.engine_resource))
        if name
    }
    if "trainer" in pins:
        for slot in trainer:
            bundles[slot.bundle][pins["trainer"]] = PIN_AMOUNT
    if "engine" in pins:
        for slots in engines:
            for slot in slots:
                bundles[slot.bundle][pins["engine"]] = PIN_AMOUNT
    return Plan(bundles=bundles, trainer=trainer, engines=engines, resource=resource, pins=pins)


def actor_options(p: Plan, slot: Slot, pg: Any) -> dict[str, Any]:
    """``.options(...)`` kwargs placing an actor on ``slot`` of placement group ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    amount = p.bundles[slot.bundle][p.resource] * slot.device_share
    opts: dict[str, Any] = {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=slot.bundle
        )
    }
    if p.resource == "CPU":
        opts["num_cpus"] = amount
    else:
        opts["num_cpus"] = p.bundles[slot.bundle]["CPU"] * slot.device_share
        opts["resources"] = {} if p.resource == "GPU" else {p.resource: amount}
        if p.resource == "GPU":
            opts["num_gpus"] = amount
    return opts


def check_pins(p: Plan, nodes: Sequence[dict[str, Any]]) -> None:
    """Refuse a pin resource that no alive node of ``nodes`` (``ray.nodes()``) advertises."""
    alive = [n for n in nodes if n.get("Alive", True)]
    for side, name in p.pins.items():
        if not any((n.get("Resources") or {}).get(name, 0) > 0 for n in alive):
            raise PlacementError(
                f"placement.{side}_resource={name!r}: no alive node advertises it; start the {side} node(s) "
                f"with `portable-rl launch ... --resources '{{\"{name}\": 1}}'` or change the recipe"
            )


def reserve(p: Plan, timeout_s: float = 60.0) -> Any:
    """Create and wait for the placement group of plan ``p``; a clear error if the cluster cannot fit it."""
    import ray
    from ray.util.placement_group import placement_group

    if p.pins:
        check_pins(p, ray.nodes())
    pg = placement_group(p.bundles, strategy=p.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        available = ray.available_resources()
        ray.util.remove_placement_group(pg)
        keys = sorted({k for b in p.bundles for k in b})
        need = {k: round(sum(b.get(k, 0) for b in p.bundles), 4) for k in keys}
        raise RuntimeError(
            f"placement group {need} did not fit within {timeout_s:.0f}s (cluster has {available}); "
            "lower trainer ranks / engines or add nodes"
        )
    return pg


def _where_am_i(actor_self: Any, threads: bool = False) -> dict[str, Any]:
    """Run inside an actor through ``__ray_call__``: the node this actor process runs on."""
    import ray

    where: dict[str, Any] = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
    }
    if threads and "torch" in sys.modules:  # a worker computing in this process: its intra-op threads
        where["torch_threads"] = sys.modules["torch"].get_num_threads()
    return where


def layout(
    p: Plan,
    pg: Any,
    trainer_actors: Sequence[Any],
    engine_actors: Sequence[Any],
    timeout_s: float = 60.0,
    engine_urls: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Where the job runs: per trainer rank and engine its bundle(s), node id and node address (and URL).

    Node ids come from the actors themselves (not from the plan), so the record shows where work really ran.
    ``engine_urls`` (one per engine, in order) adds each engine's ``url``: the address its clients dial.
    """
    import ray
    from ray.util.placement_group import placement_group_table

    trainer_where = ray.get(
        [a.__ray_call__.remote(_where_am_i, True) for a in trainer_actors], timeout=timeout_s
    )
    engine_where = ray.get([a.__ray_call__.remote(_where_am_i) for a in engine_actors], timeout=timeout_s)
    bundle_nodes = placement_group_table(pg).get("bundles_to_node_id", {})
    if engine_urls is not None and len(engine_urls) != len(engine_actors):
        raise ValueError(
            f"{len(engine_urls)} engine URLs for {len(engine_actors)} engines; pass one per engine"
        )
    urls = [{"url": u} for u in engine_urls] if engine_urls is not None else [{} for _ in engine_actors]
    return {
        "strategy": p.strategy,
        "pins": dict(p.pins),
        "bundles": [
            {"index": i, "resources": b, "node_id": bundle_nodes.get(i)} for i, b in enumerate(p.bundles)
        ],
        "trainer": [
            {"rank": r, "bundle": s.bundle, **w}
            for r, (s, w) in enumerate(zip(p.trainer, trainer_where, strict=True))
        ],
        "engines": [
            {"index": e, "bundles": [s.bundle for s in slots], **w, **u}
            for e, (slots, w, u) in enumerate(zip(p.engines, engine_where, urls, strict=True))
        ],
    }


def write_layout(
    path: str | Path,
    p: Plan,
    pg: Any,
    trainer_actors: Sequence[Any],
    engine_actors: Sequence[Any],
    engine_urls: Sequence[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``layout(...)`` plus ``extra`` (e.g. the weight-sync strategy), written to ``path`` as JSON."""
    record = {**layout(p, pg, trainer_actors, engine_actors, engine_urls=engine_urls), **extra}
    Path(path).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
