"""The trainer as a group of Ray actors (one per rank), with weight sync run inside the weight-source rank.

* ``TrainerWorker`` is ``MegatronActor`` plus the weight-sync endpoint of the trainer side: the rank that
  holds the full model (``is_weight_source``) owns a ``WeightSync`` and pushes ``named_hf_weights()`` to the
  engines; every other rank still iterates the generator because the gathers inside it are collective.
* ``TrainerGroup`` creates the ranks on their placement-group bundles (rank order == bundle order), finds
  the rendezvous address on rank 0's node, and fans every call out to all ranks (Megatron calls are collective).
  Calls are serialized: a call from another thread (an async rollout replacing an engine) waits for the one
  running, so every rank sees the same call order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from portable_rl.distributed import free_port
from portable_rl.orchestration.placement import Plan, actor_options
from portable_rl.platform import Platform
from portable_rl.training.actor import ActorConfig, MegatronActor
from portable_rl.weight_sync import WeightSyncConfig, check_weights, make_weight_sync


class TrainerWorker(MegatronActor):
    """One trainer rank; adds the trainer side of weight sync to the Megatron actor."""

    _sync = None

    def connect_weight_sync(
        self, engine_urls: Sequence[str], cfg: WeightSyncConfig, mode: str, api_key: str | None = None
    ) -> None:
        if self.is_weight_source:
            from portable_rl.protocol.client import EngineClient

            self._sync = make_weight_sync(cfg, mode, self.platform)
            self._sync.connect([EngineClient(url, api_key=api_key) for url in engine_urls])

    def sync_weights(self, version: int, check: bool = False) -> dict[str, float]:
        """Push the current weights to every engine as ``version``; returns timing (and check) metrics."""
        t0 = time.perf_counter()
        weights = self.named_hf_weights(all_stages=True)
        if self._sync is None:
            for _ in weights:  # take part in the TP/PP gathers; the source rank sends
                pass
            return {}
        if check:
            weights = list(weights)  # kept for the checksum comparison below
        self._sync.update(weights, version)
        out = {"weight_sync_s": time.perf_counter() - t0}
        if check:
            report = check_weights(self._sync.engines, weights)
            out["weight_check_ok"] = float(report.ok)
            if not report.ok:
                raise RuntimeError(
                    f"--check-weight-update: engine weights differ from the trainer's: {report}"
                )
        return out

    def disconnect_weight_sync(self) -> None:
        if self._sync is not None:
            self._sync.disconnect()
            self._sync = None


def _rendezvous():
    """(ip, free port) on the node this task runs on: rank 0's node."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


class TrainerGroup:
    def __init__(
        self,
        cfg: ActorConfig,
        world_size: int,
        plan: Plan,
        pg: Any,
        platform: Platform,
        extra_env: dict[str, str] | None = None,
    ):
        import ray

        if world_size != len(plan.trainer):
            raise ValueError(f"trainer world size {world_size} != {len(plan.trainer)} placement slots")
        first = actor_options(plan, plan.trainer[0], pg)
        addr, port = ray.get(
            ray.remote(_rendezvous)
            .options(num_cpus=0, scheduling_strategy=first["scheduling_strategy"])
            .remote()
        )
        env = {"env_vars": {**platform.worker_env(list(range(len(platform.devices)))), **(extra_env or {})}}
        cls = ray.remote(TrainerWorker)
        self._lock = threading.RLock()
        self.actors = []
        for rank, slot in enumerate(plan.trainer):
            opts = actor_options(plan, slot, pg)
            # On GPUs every rank sees all node devices (NOSET) and picks its own by local index.
            local = rank % max(len(platform.devices), 1)
            self.actors.append(
                cls.options(runtime_env=env, **opts).remote(cfg, rank, world_size, addr, port, local)
            )
        ray.get([a.info.remote() for a in self.actors])  # surface construction errors now

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        import ray

        with self._lock:
            return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def first(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call on all ranks (collective) and return rank 0's result."""
        return self.call(method, *args, **kwargs)[0]

    def shutdown(self) -> None:
        import ray

        try:
            self.call("disconnect_weight_sync")
            self.call("shutdown")
        finally:
            for a in self.actors:
                ray.kill(a)
