"""Distributed-broadcast weight sync (disaggregated mode): trainer rank 0 -> every engine rank.

Contract
--------
* ``connect(engines)`` forms one process group: rank 0 is this trainer process (the one holding the full
  weights: rank 0 of its pipeline stage), engine i's TP ranks are ``rank_offset_i .. rank_offset_i + tp_i - 1``
  (offsets assigned in engine order from 1). Engines join through SGLang's ``/init_weights_update_group``
  (master_address, master_port, rank_offset, world_size, group_name, backend = ``current_platform().dist_backend``),
  issued concurrently while rank 0 hosts the rendezvous. A rank that never joins ends the rendezvous after
  ``timeout_s`` with ``CollectiveTimeout`` naming the group, the ranks and the engines that own them.
* ``update(named_tensors, version)`` sends buckets of at most ``bucket_mb`` (one dtype each). Per bucket every
  engine gets ``/update_weights_from_distributed`` with names, dtypes and shapes, then rank 0 broadcasts:
    - flattened (``load_format="flattened_bucket"``): the bucket's bytes as one uint8 buffer, one broadcast;
      used when ``flatten_buckets="on"``, or ``"auto"`` and every engine declares support;
    - per tensor (no load_format): one broadcast per tensor, in name order: what every SGLang release accepts.
  All of it runs inside ``update_session`` (pause, flush, begin/end weight update, resume, version check).
* ``disconnect()`` destroys the group on the engines (``/destroy_weights_update_group``) and here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from portable_rl.platform import Platform, current_platform
from portable_rl.weight_sync.base import WeightSyncError, as_engine_ops, fan_out, mark_last, update_session
from portable_rl.weight_sync.buckets import NamedTensor, dtype_name, flatten, iter_buckets
from portable_rl.weight_sync.config import WeightSyncConfig
from portable_rl.weight_sync.engine_ops import EngineCallError, EngineOps
from portable_rl.weight_sync.process_group import (
    CollectiveTimeout,
    WeightUpdateGroup,
    default_master_address,
    free_port,
    init_weight_update_group,
)


class BroadcastWeightSync:
    """Bucketed broadcast over a trainer->engines process group (see module docstring)."""

    def __init__(self, cfg: WeightSyncConfig, platform: Platform | None = None) -> None:
        self.cfg = cfg
        self.platform = platform or current_platform()
        self.engines: list[EngineOps] = []
        self.group: WeightUpdateGroup | None = None
        self.flattened = False
        self.rank_offsets: list[int] = []
        self._pool: ThreadPoolExecutor | None = None

    # ---- connect / disconnect ----------------------------------------------------------------------------
    def _owner_description(self) -> str:
        parts = []
        for engine, offset in zip(self.engines, self.rank_offsets, strict=True):
            last = offset + engine.tp_size - 1
            ranks = str(offset) if last == offset else f"{offset}..{last}"
            parts.append(f"rank {ranks} = {engine.label}")
        return "; ".join(parts)

    def connect(self, engines: Sequence[Any]) -> None:
        if self.group is not None:
            raise RuntimeError("BroadcastWeightSync is already connected; call disconnect() first")
        self.engines = as_engine_ops(engines, self.cfg.timeout_s)
        self.rank_offsets = []
        offset = 1
        for engine in self.engines:
            self.rank_offsets.append(offset)
            offset += engine.tp_size
        world_size = offset
        address = self.cfg.master_address or default_master_address()
        port = self.cfg.master_port or free_port()
        backend = self.platform.dist_backend
        name = self.cfg.group_name

        pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="weight-sync-join")
        joins = [
            pool.submit(
                e.init_weights_update_group,
                master_address=address,
                master_port=port,
                rank_offset=off,
                world_size=world_size,
                group_name=name,
                backend=backend,
            )
            for e, off in zip(self.engines, self.rank_offsets, strict=True)
        ]
        try:
            group = init_weight_update_group(
                master_address=address,
                master_port=port,
                rank=0,
                world_size=world_size,
                group_name=name,
                backend=backend,
                timeout_s=self.cfg.timeout_s,
            )
        except CollectiveTimeout as exc:
            # Engines that answered with an error explain why they never joined; stalled ones are still waiting.
            answers = _settled_errors(self.engines, joins)
            pool.shutdown(wait=False, cancel_futures=True)
            raise CollectiveTimeout(f"{exc} Engine ranks: {self._owner_description()}.{answers}") from exc
        try:
            _wait_all(self.engines, joins, self.cfg.timeout_s, "init_weights_update_group")
        except WeightSyncError:
            group.destroy()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        self.group = group
        self._pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="weight-sync")
        if self.cfg.flatten_buckets == "on":
            self.flattened = True
        elif self.cfg.flatten_buckets == "off":
            self.flattened = False
        else:
            self.flattened = all(e.supports_flattened_bucket() for e in self.engines)

    def disconnect(self) -> None:
        if self.group is None:
            return
        group, self.group = self.group, None
        try:
            fan_out(
                self.engines,
                lambda e: e.destroy_weights_update_group(group_name=group.group_name),
                "destroy_weights_update_group",
            )
        finally:
            group.destroy()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    # ---- update -----------------------------------------------------------------------------------------
    def update(self, named_tensors: Iterable[NamedTensor], version: int) -> None:
        if self.group is None:
            raise RuntimeError("BroadcastWeightSync.update() before connect(); call connect(engines) first")
        with update_session(self.engines, version, verify_version=self.cfg.verify_version):
            sent = 0
            for bucket, last in mark_last(iter_buckets(named_tensors, self.cfg.bucket_bytes)):
                self._send_bucket(bucket, str(version) if last else None, flush_cache=last)
                sent += 1
            if not sent:
                raise ValueError("update() got no tensors; pass the model's named weights")

    def _send_bucket(self, bucket: list[NamedTensor], weight_version: str | None, flush_cache: bool) -> None:
        assert self.group is not None and self._pool is not None
        request = dict(
            names=[n for n, _ in bucket],
            dtypes=[dtype_name(t.dtype) for _, t in bucket],
            shapes=[list(t.shape) for _, t in bucket],
            group_name=self.group.group_name,
            load_format="flattened_bucket" if self.flattened else None,
            weight_version=weight_version,
            flush_cache=flush_cache,
        )
        calls = [
            self._pool.submit(lambda e=e: e.update_weights_from_distributed(**request)) for e in self.engines
        ]
        try:
            if self.flattened:
                flat, _ = flatten(bucket)
                self.group.broadcast(
                    flat, what=f"bucket broadcast ({flat.numel()} bytes, {len(bucket)} tensors)"
                )
            else:
                for name, tensor in bucket:
                    self.group.broadcast(tensor.detach().contiguous(), what=f"broadcast of {name!r}")
        except CollectiveTimeout as exc:
            raise CollectiveTimeout(
                f"{exc} Engine ranks: {self._owner_description()}.{_settled_errors(self.engines, calls)}"
            ) from exc
        _wait_all(self.engines, calls, self.cfg.timeout_s, "update_weights_from_distributed")


def _settled_errors(engines: Sequence[EngineOps], futures: Sequence[Future]) -> str:
    notes = []
    for engine, fut in zip(engines, futures, strict=True):
        if fut.cancelled():
            continue
        if fut.done() and fut.exception() is not None:
            notes.append(str(fut.exception()))
        elif not fut.done():
            notes.append(f"{engine.label}: no answer yet")
    return (" " + "; ".join(notes) + ".") if notes else ""


def _wait_all(engines: Sequence[EngineOps], futures: Sequence[Future], timeout_s: float, what: str) -> None:
    errors = []
    for engine, fut in zip(engines, futures, strict=True):
        try:
            fut.result(timeout=timeout_s)
        except FutureTimeout:
            errors.append(f"{engine.label}: no answer within {timeout_s:g}s")
        except (EngineCallError, OSError, RuntimeError) as exc:
            errors.append(f"{engine.label}: {exc}")
    if errors:
        raise WeightSyncError(f"{what} failed: " + "; ".join(errors))
