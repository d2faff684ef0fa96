"""Placement configuration: which nodes, how many devices, shared or not (``portable_rl.orchestration.placement``
turns it into Ray placement groups).

* ``NodePlacementConfig`` is the recipe's ``placement:`` section: the custom Ray resource a node must advertise
  to host trainer bundles (``trainer_resource``) or engine bundles (``engine_resource``).
* ``PlacementConfig`` is what the job derives from the whole recipe: ranks, engines, devices and mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from portable_rl.config import refuse_non_finite

Mode = Literal["colocated", "disaggregated"]
_RAY_OWN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_resource_name(key: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(
            f"{key}={value!r} must be the name of a custom Ray resource (e.g. node_trainer), or null"
        )
    if value in _RAY_OWN_RESOURCES:
        raise ValueError(
            f"{key}={value!r} is one of Ray's own resources; name a custom resource the nodes advertise "
            "with `portable-rl launch ... --resources '{\"NAME\": 1}'`"
        )


@dataclass
class NodePlacementConfig:
    """The recipe's ``placement:`` section: which cluster nodes the trainer and the engines may use.

    trainer_resource:  custom Ray resource a node must advertise to host trainer ranks (null: any node);
                       e.g. ``portable_rl_role:trainer`` for nodes started with ``launch ... --role trainer``
    engine_resource:   the same for rollout engines (e.g. ``portable_rl_role:engine``)
    """

    trainer_resource: str | None = None
    engine_resource: str | None = None

    def __post_init__(self) -> None:
        _check_resource_name("placement.trainer_resource", self.trainer_resource)
        _check_resource_name("placement.engine_resource", self.engine_resource)

    def check_mode(self, mode: str) -> None:
        """Co-located trainer and engines share bundles, so they cannot be pinned to different nodes."""
        _check_colocated_pins(mode, self.trainer_resource, self.engine_resource)


def _check_colocated_pins(mode: str, trainer: str | None, engine: str | None) -> None:
    if mode == "colocated" and trainer and engine and trainer != engine:
        raise ValueError(
            f"colocated mode shares devices, so trainer and engines run on the same nodes: "
            f"placement.trainer_resource={trainer!r} and placement.engine_resource={engine!r} must be "
            "equal (or set only one), or use run.mode=disaggregated"
        )


@dataclass
class PlacementConfig:
    """How many trainer ranks and engines a job places, on how many devices, sharing them or not.

    Built by the job from the recipe (not a recipe section itself).
    mode:                "colocated" (engines share the trainer's devices, taking turns) or "disaggregated"
    trainer_ranks:       TP x PP x DP of the trainer
    num_engines:         rollout engines
    devices_per_engine:  SGLang tensor-parallel size of one engine
    cpus_per_device:     on the CPU platform, cores that make one "device"
    trainer_resource / engine_resource: the custom node resource each side's bundles ask for (null: any node)
    """

    mode: Mode = "colocated"
    trainer_ranks: int = 1  # TP x PP x DP of the trainer
    num_engines: int = 1
    devices_per_engine: int = 1  # SGLang TP size of one engine
    cpus_per_device: float = 1.0  # on the CPU platform: cores that make one "device"
    trainer_resource: str | None = None  # custom node resource the trainer's bundles ask for
    engine_resource: str | None = None  # custom node resource the engines' bundles ask for

    def __post_init__(self) -> None:
        refuse_non_finite(self, "")
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
        _check_resource_name("placement.trainer_resource", self.trainer_resource)
        _check_resource_name("placement.engine_resource", self.engine_resource)
        _check_colocated_pins(self.mode, self.trainer_resource, self.engine_resource)

    @property
    def total_devices(self) -> int:
        engine_devices = self.num_engines * self.devices_per_engine
        if self.mode == "colocated":
            return self.trainer_ranks
        return self.trainer_ranks + engine_devices
