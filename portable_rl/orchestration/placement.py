"""Ray placement for the trainer and the rollout engines: co-located and disaggregated layouts.

Contract
--------
* ``PlacementConfig`` says how many trainer ranks and engines there are, how many devices each uses and
  whether they share devices (``colocated``) or not (``disaggregated``).
* ``plan(cfg, platform)`` is pure: it returns the bundles a placement group must reserve and which bundle each
  trainer rank / engine lands on. Devices are the platform's Ray resource ("GPU" on NVIDIA and AMD); on the
  CPU platform a "device" is a share of CPU cores, so both layouts run on one machine.
* ``reserve(plan)`` creates the Ray placement group (STRICT_PACK on one node when it fits, PACK otherwise)
  and returns scheduling strategies in stable rank order (bundle index order == rank order).
* Worker env comes from ``platform.worker_env`` — this module never names a vendor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from portable_rl.platform import Platform

Mode = Literal["colocated", "disaggregated"]


@dataclass
class PlacementConfig:
    mode: Mode = "colocated"
    trainer_ranks: int = 1  # TP x PP x DP of the trainer
    num_engines: int = 1
    devices_per_engine: int = 1  # SGLang TP size of one engine
    cpus_per_device: float = 1.0  # on the CPU platform: cores that make one "device"

    def __post_init__(self) -> None:
        if self.mode not in ("colocated", "disaggregated"):
            raise ValueError(f"mode={self.mode!r} is not one of 'colocated', 'disaggregated'")
        for name in ("trainer_ranks", "num_engines", "devices_per_engine"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.cpus_per_device <= 0:
            raise ValueError(f"cpus_per_device={self.cpus_per_device} must be > 0")
        if self.mode == "colocated" and self.num_engines * self.devices_per_engine > self.trainer_ranks:
            raise ValueError(
                f"colocated mode needs engines x devices_per_engine ({self.num_engines}x{self.devices_per_engine}) "
                f"<= trainer_ranks ({self.trainer_ranks}) so engines share the trainer's devices; "
                "lower num_engines or use mode=disaggregated"
            )

    @property
    def total_devices(self) -> int:
        engine_devices = self.num_engines * self.devices_per_engine
        if self.mode == "colocated":
            return self.trainer_ranks
        return self.trainer_ranks + engine_devices


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
    return Plan(bundles=bundles, trainer=trainer, engines=engines, resource=resource)


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


def reserve(p: Plan, timeout_s: float = 60.0) -> Any:
    """Create and wait for the placement group of plan ``p``; a clear error if the cluster cannot fit it."""
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(p.bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        available = ray.available_resources()
        ray.util.remove_placement_group(pg)
        need = {k: sum(b.get(k, 0) for b in p.bundles) for k in p.bundles[0]}
        raise RuntimeError(
            f"placement group {need} did not fit within {timeout_s:.0f}s (cluster has {available}); "
            "lower trainer ranks / engines or add nodes"
        )
    return pg
