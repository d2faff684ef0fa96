"""The trainer->engine process group, created the way SGLang's engines create their side of it.

Contract
--------
* ``init_weight_update_group(...)`` joins a torch.distributed group that is separate from any default group
  the process may have (Megatron's): a ``tcp://`` rendezvous on (master_address, master_port), rank 0 hosting
  the store, every key under a ``PrefixStore(group_name)``, a backend named by the caller
  (``current_platform().dist_backend``). This is the same rendezvous SGLang performs for
  ``/init_weights_update_group`` (rank = rank_offset + tp_rank on the engine side), so both sides meet.
  portable_rl's CPU engine calls the same function for its side.
* ``WeightUpdateGroup`` wraps the group with its name, rank, world size and timeout. Every collective goes
  through ``broadcast``/``barrier`` and a failure or timeout raises ``CollectiveTimeout`` naming the group,
  this rank, the ranks it waited for and what it was doing. (gloo enforces the timeout per operation; NCCL and
  RCCL report timeouts through their watchdog, which the platform's comm env configures.)
* ``HOST_BACKEND`` ("gloo") is the backend every process can join with host tensors: the one an engine whose
  weights live in host memory (portable_rl's CPU engine) accepts, whatever the trainer's device.
* The same naming for any other group (``collective_errors``), free ports and the rendezvous address
  (``free_port``, ``resolve_master_address``) live in ``portable_rl.distributed``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from portable_rl.distributed import describe_ranks, first_line
from portable_rl.errors import CollectiveTimeout

HOST_BACKEND = "gloo"


@dataclass
class WeightUpdateGroup:
    """One process's membership of a weight-update group."""

    pg: Any
    group_name: str
    rank: int
    world_size: int
    backend: str
    timeout_s: float
    master: str

    @property
    def peer_ranks(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def _fail(self, what: str, exc: BaseException) -> CollectiveTimeout:
        return CollectiveTimeout(
            f"weight-update group {self.group_name!r} ({self.backend}, {self.master}): rank {self.rank} of "
            f"{self.world_size} {what} did not complete with ranks {describe_ranks(self.peer_ranks)} within "
            f"{self.timeout_s:g}s: {first_line(exc)}. "
            "Check that every engine received the matching /update_weights_from_distributed request and is alive."
        )

    def broadcast(self, tensor: torch.Tensor, src: int = 0, what: str = "broadcast") -> None:
        try:
            dist.broadcast(tensor, src=src, group=self.pg)
        except (RuntimeError, dist.DistError) as exc:
            raise self._fail(f"{what} of {tuple(tensor.shape)} {tensor.dtype}", exc) from exc

    def barrier(self) -> None:
        # A one-element broadcast from rank 0 doubles as a barrier that every backend supports.
        self.broadcast(torch.zeros(1), what="barrier")

    def destroy(self) -> None:
        if self.pg is None:
            return
        pg, self.pg = self.pg, None
        try:
            dist.destroy_process_group(pg)
        except (RuntimeError, ValueError, AssertionError):
            # Destroying a group whose peers already went away must not mask the caller's own error.
            pass


def init_weight_update_group(
    *,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float,
    join_timeout_s: float | None = None,
) -> WeightUpdateGroup:
    """Join (rank 0: host) the rendezvous and build the group; raises CollectiveTimeout naming missing ranks.

    ``timeout_s`` bounds every later collective; ``join_timeout_s`` (default: the same) bounds the rendezvous.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    if world_size < 2:
        raise ValueError(
            f"a weight-update group needs the trainer and at least one engine rank; world_size={world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group's world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    join_s = timeout_s if join_timeout_s is None else join_timeout_s
    join_timeout = datetime.timedelta(seconds=join_s)
    master = f"{master_address}:{master_port}"
    try:
        store, rank, world_size = next(rendezvous(f"tcp://{master}", rank, world_size, timeout=join_timeout))
        store.set_timeout(join_timeout)
        store = PrefixStore(group_name, store)
        pg, _ = _new_process_group_helper(
            world_size,
            rank,
            [],
            Backend(backend),
            store,
            group_name=group_name,
            timeout=timeout,
        )
    except (RuntimeError, dist.DistError, OSError, ValueError) as exc:
        others = [r for r in range(world_size) if r != rank]
        waited_for = "engine ranks" if rank == 0 else "ranks"
        raise CollectiveTimeout(
            f"weight-update group {group_name!r} ({backend}, {master}): rank {rank} of {world_size} could not "
            f"form the group with {waited_for} {describe_ranks(others)} within {join_s:g}s: "
            f"{first_line(exc)}. "
            "An engine that never joins is unreachable, stalled, or was given another address/port."
        ) from exc
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return WeightUpdateGroup(
        pg=pg,
        group_name=group_name,
        rank=rank,
        world_size=world_size,
        backend=backend,
        timeout_s=timeout_s,
        master=master,
    )
