"""The trainer as a group of Ray actors (one per rank), with weight sync run inside the weight-source rank.

* ``TrainerWorker`` is ``MegatronActor`` plus the weight-sync endpoint of the trainer side: the rank that
  holds the full model (``is_weight_source``) owns a ``WeightSync`` and pushes ``named_hf_weights()`` to the
  engines; every other rank still iterates the generator because the gathers inside it are collective.
* ``TrainerWorker.train_rl_step(groups, algo)`` is one RL step inside the trainer process: the reference (and,
  for a KL penalty in the reward, the old-policy) log-probs are computed there and go straight into the
  advantages and the loss; only the groups go in and only float metrics come out. ``algo.ppo_epochs`` x
  ``algo.num_mini_batches`` optimizer steps are taken (old log-probs computed before the first); with GAE the
  co-located critic (``ActorConfig.critic_checkpoint``) gives the values and then takes as many steps on its
  clipped value loss (metrics ``critic/*``). With the run's
  ``check_weight_update`` it also reports ``weights_changed_frac`` (parameter checksums before and after the
  step; one step's "after" is the next one's "before" unless a checkpoint was loaded in between), and every
  sync compares the engines' weight checksums with the trainer's (the run fails otherwise).
* ``TrainerGroup`` creates the ranks on their placement-group bundles (rank r on ``plan.trainer[r]``, with the
  device Ray gave that bundle: ``devices[r]``, see ``orchestration.devices``), finds
  the rendezvous address on rank 0's node, and fans every call out to all ranks (Megatron calls are collective).
  Its methods are typed (``train_rl_step``, ``sync_weights``, ``save_checkpoint``, ...), one per worker method,
  each returning rank 0's answer where the ranks agree. Calls are serialized: a call from another thread (an
  async rollout replacing an engine) waits for the one running, so every rank sees the same call order.
* It is the engines' ``WeightSource``: ``push_weights_to(urls)`` reconnects weight sync to a new engine list
  (with the arguments of ``connect_weight_sync``) and pushes the current weights under the current step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from portable_rl.config.algo import AlgoConfig
from portable_rl.data.types import Group
from portable_rl.distributed import free_port
from portable_rl.orchestration.devices import TrainerDevice, pin_to_device_cpus
from portable_rl.orchestration.placement import Plan, actor_options
from portable_rl.platform import Platform, current_platform
from portable_rl.rollout_to_train import make_loss_fn, make_value_loss_fn, prepare_train_batch
from portable_rl.training.actor import ActorConfig, MegatronActor
from portable_rl.weight_sync import (
    WeightCheckReport,
    WeightSyncConfig,
    check_weights,
    make_weight_sync,
    tensor_checksum,
    while_closing,
)


class TrainerWorker(MegatronActor):
    """One trainer rank; adds the trainer side of weight sync to the Megatron actor."""

    _sync = None
    _checksums_after: tuple[int, dict[str, str]] | None = None  # (step, parameter checksums after that step)

    def __init__(
        self,
        config: ActorConfig,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        physical_device: int | None = None,
    ) -> None:
        # The device Ray reserved for this rank's bundle, as the torch ordinal it has under this process's mask.
        platform = current_platform()
        local = 0 if physical_device is None else platform.local_ordinal(physical_device)
        # Before any compute thread starts, so every thread inherits the device's NUMA-local CPUs.
        self.cpu_affinity = pin_to_device_cpus(platform, physical_device)
        super().__init__(config, rank, world_size, master_addr, master_port, local)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "cpu_affinity": self.cpu_affinity}

    def train_rl_step(self, groups: list[Group], algo: AlgoConfig, check: bool = False) -> dict[str, float]:
        """Advantages (with in-process reference/old log-probs and critic values where ``algo`` needs them), then
        ``train_step`` with ``algo``'s epochs and mini-batches, then the critic's steps (GAE only).

        With ``check`` it also reports ``weights_changed_frac``: the fraction of this rank's parameter tensors
        whose bits the optimizer step changed (0 means the step changed nothing: a no-op optimizer, zero
        advantages, a zero learning rate)."""
        before = self._checksums_before_step() if check else None
        if algo.uses_critic and self.critic is None:
            raise ValueError(
                "algo.advantage_estimator='gae' needs the trainer built with a critic_checkpoint"
            )
        values_fn = self.critic.compute_values if algo.uses_critic else None
        batch, adv_metrics = prepare_train_batch(groups, algo, self.compute_logprobs, values_fn)
        metrics = self.train_step(batch, make_loss_fn(algo), algo.num_mini_batches, algo.ppo_epochs)
        if algo.uses_critic:
            metrics.update(
                self.critic.train_step(
                    batch, make_value_loss_fn(algo), algo.num_mini_batches, algo.ppo_epochs
                )
            )
        out = {**{k: v for k, v in metrics.items() if isinstance(v, int | float)}, **adv_metrics}
        if before is not None:
            after = self._param_checksums()
            out["weights_changed_frac"] = sum(after[n] != d for n, d in before.items()) / max(len(before), 1)
            self._checksums_after = (self.step, after)
        return out

    def _param_checksums(self) -> dict[str, str]:
        # Checksums, not copies: a check must not double the trainer's memory.
        return {name: tensor_checksum(p) for name, p in self.model.named_parameters()}

    def _checksums_before_step(self) -> dict[str, str]:
        # Only an optimizer step or a checkpoint load changes the parameters between two steps, so the previous
        # step's "after" checksums are this step's "before" unless a load came in between (it clears them).
        if self._checksums_after is not None and self._checksums_after[0] == self.step:
            return self._checksums_after[1]
        return self._param_checksums()

    def load_checkpoint(self, path: str) -> int:
        self._checksums_after = None
        return super().load_checkpoint(path)

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
        if not check:
            self._sync.update(weights, version)
            return {"weight_sync_s": time.perf_counter() - t0}
        # The weights are kept for the comparison as the update consumes them (gathered while the engines open
        # their sessions), and compared while the engines close them: the check adds no round trip of its own.
        source, kept = iter(weights), []

        def keep() -> Iterator[tuple[str, Any]]:
            for item in source:
                kept.append(item)
                yield item

        def compare() -> WeightCheckReport:
            kept.extend(source)  # whatever the strategy did not consume
            return check_weights(self._sync.engines, kept)

        with while_closing(compare) as reports:
            self._sync.update(keep(), version)
        out = {"weight_sync_s": time.perf_counter() - t0}
        report = reports[0] if reports else compare()  # no session closed here: compare now
        if not report.ok:
            raise RuntimeError(
                f"--check-weight-update: engine weights differ from the trainer's after sync {version}: "
                + report.summary().replace("\n", "; ")
            )
        return {**out, "weight_check_ok": float(report.ok)}

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
        devices: Sequence[TrainerDevice],
        extra_env: dict[str, str] | None = None,
        check_weight_update: bool = False,
    ):
        import ray

        self.check_weight_update = check_weight_update  # compare checksums after every push
        if not world_size == len(plan.trainer) == len(devices):
            raise ValueError(
                f"trainer world size {world_size}: {len(plan.trainer)} placement slots, {len(devices)} devices"
            )
        first = actor_options(plan, plan.trainer[0], pg)
        addr, port = ray.get(
            ray.remote(_rendezvous)
            .options(num_cpus=0, scheduling_strategy=first["scheduling_strategy"])
            .remote()
        )
        cls = ray.remote(TrainerWorker)
        self._lock = threading.RLock()
        self.actors = []
        self.devices = list(devices)
        for rank, (slot, device) in enumerate(zip(plan.trainer, devices, strict=True)):
            opts = actor_options(plan, slot, pg)
            # A rank sees the job's devices on its node (the platform's mask, NOSET so Ray keeps it) and
            # uses the one Ray reserved for its bundle, under the ordinal the platform maps it to.
            env = {"env_vars": {**device.env, **(extra_env or {})}}
            self.actors.append(
                cls.options(runtime_env=env, **opts).remote(
                    cfg, rank, world_size, addr, port, device.physical
                )
            )
        self._connection: tuple[WeightSyncConfig, str, str | None] | None = None
        self._all(lambda a: a.info)  # surface construction errors now

    def _all(self, method: Any, *args: Any, **kwargs: Any) -> list[Any]:
        """``method(actor)`` (a bound remote method) called on every rank, collectively; every rank's answer."""
        import ray

        with self._lock:
            return ray.get([method(a).remote(*args, **kwargs) for a in self.actors])

    # ---- typed calls: one per worker method, rank 0's answer ---------------------------------------------
    def info(self) -> dict[str, Any]:
        return self._all(lambda a: a.info)[0]

    def train_rl_step(self, groups: list[Group], algo: AlgoConfig) -> dict[str, float]:
        return self._all(lambda a: a.train_rl_step, groups, algo, self.check_weight_update)[0]

    def connect_weight_sync(
        self, engine_urls: list[str], cfg: WeightSyncConfig, mode: str, api_key: str | None = None
    ) -> None:
        self._all(lambda a: a.connect_weight_sync, engine_urls, cfg, mode, api_key)
        self._connection = (cfg, mode, api_key)

    def disconnect_weight_sync(self) -> None:
        self._all(lambda a: a.disconnect_weight_sync)

    def sync_weights(self, version: int, check: bool = False) -> dict[str, float]:
        return self._all(lambda a: a.sync_weights, version, check)[0]

    def push_weights_to(self, engine_urls: list[str]) -> None:
        """Weight sync reconnected to ``engine_urls`` and the current weights pushed (replaced engines)."""
        if self._connection is None:
            raise RuntimeError(
                "push_weights_to before connect_weight_sync: nothing says how to reach engines"
            )
        with self._lock:  # one unit: no other call between the reconnect and the push
            self.disconnect_weight_sync()
            self.connect_weight_sync(engine_urls, *self._connection)
            self.sync_weights(self.info()["step"], self.check_weight_update)

    def save_checkpoint(self, path: str) -> None:
        self._all(lambda a: a.save_checkpoint, path)

    def load_checkpoint(self, path: str) -> int:
        return self._all(lambda a: a.load_checkpoint, path)[0]

    def export_hf(self, path: str) -> str:
        return self._all(lambda a: a.export_hf, path)[0]

    def shutdown(self) -> None:
        import ray

        try:
            self.disconnect_weight_sync()
            self._all(lambda a: a.shutdown)
        finally:
            for a in self.actors:
                ray.kill(a)
