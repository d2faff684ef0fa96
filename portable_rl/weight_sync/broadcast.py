"""Distributed-broadcast weight sync (disaggregated mode): trainer rank 0 -> every engine rank.

Contract
--------
* ``connect(engines)`` forms one process group: rank 0 is this trainer process (the one holding the full
  weights: rank 0 of its pipeline stage), engine i's TP ranks are ``rank_offset_i .. rank_offset_i + tp_i - 1``
  (offsets assigned in engine order from 1). Engines join through SGLang's ``/init_weights_update_group``
  (master_address, master_port, rank_offset, world_size, group_name, backend), issued concurrently while rank 0
  hosts the rendezvous. The backend is ``current_platform().dist_backend`` unless an engine lists the backends
  it can join (``EngineOps.weight_update_backends``) without it: portable_rl's CPU engine lists gloo only, so a
  GPU trainer syncing to it uses gloo and sends host copies of its tensors (``group_backend``). A rank that
  never joins ends the rendezvous after ``timeout_s`` with ``CollectiveTimeout`` naming the group, the ranks
  and the engines that own them.
* ``update(named_tensors, version)`` sends buckets of at most ``bucket_mb`` (one dtype each). Per bucket every
  engine gets ``/update_weights_from_distributed`` with names, dtypes and shapes, then rank 0 broadcasts:
    - flattened (``load_format="flattened_bucket"``): the bucket's bytes as one uint8 buffer, one broadcast;
      used when ``flatten_buckets="on"``, or ``"auto"`` and every engine supports and prefers it
      (``EngineOps.prefers_flattened_bucket``). portable_rl's CPU engine receives per-tensor broadcasts straight
      into its parameters, so for it a flat bucket only adds a copy on each side; with ``"auto"`` a bucket of
      small tensors (mean below ``SMALL_TENSOR_BYTES``) is still flattened where every engine supports it, since
      there one broadcast per tensor costs more in per-collective latency than the two copies; for such engines
      small tensors are bucketed apart from large ones (``iter_buckets(split_at=...)``);
    - per tensor (no load_format): one broadcast per tensor, in name order: what every SGLang release accepts.
  All of it runs inside ``update_session`` (pause, flush, begin/end weight update, resume, version check).
* A failed bucket (an engine refuses it, or the collective fails) ends the wait at once and names the cause;
  the group is then torn down and unusable (``disconnect()`` + ``connect()``). Engines still blocked in that
  bucket's receive stay busy until their own collective timeout; the update session's teardown waits for them
  (bounded by ``timeout_s``) so that every engine's session is closed and generation resumed.
* ``disconnect()`` destroys the group on the engines (``/destroy_weights_update_group``) and here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import torch

from portable_rl.config.weight_sync import WeightSyncConfig
from portable_rl.distributed import free_port, resolve_master_address
from portable_rl.errors import CollectiveTimeout
from portable_rl.platform import Platform, current_platform
from portable_rl.protocol.buckets import NamedTensor, Staging, dtype_name, flatten, nbytes
from portable_rl.protocol.engine_ops import EngineOps
from portable_rl.protocol.process_group import HOST_BACKEND, WeightUpdateGroup, init_weight_update_group
from portable_rl.weight_sync.base import (
    WeightSyncError,
    as_engine_ops,
    close_all,
    fan_out,
    update_in_buckets,
    wait_all,
)

log = logging.getLogger(__name__)

# With flatten_buckets="auto", buckets whose tensors average less than this are flattened for every engine that
# supports it: a collective's fixed cost (~1 ms per gloo broadcast measured on a loaded 2-core host) then
# outweighs copying the bytes twice (~0.6 ms per MiB there).
SMALL_TENSOR_BYTES = 1024 * 1024

# After a failed broadcast, how long to wait for engines' answers that explain it.
REFUSAL_GRACE_S = 2.0


class BroadcastWeightSync:
    """Bucketed broadcast over a trainer->engines process group (see module docstring)."""

    def __init__(self, cfg: WeightSyncConfig, platform: Platform | None = None) -> None:
        self.cfg = cfg
        self.platform = platform or current_platform()
        self.engines: list[EngineOps] = []
        self.group: WeightUpdateGroup | None = None
        self.flattened = False  # the format of buckets of large tensors
        self.flatten_small = False  # the format of buckets of small tensors (SMALL_TENSOR_BYTES)
        self.rank_offsets: list[int] = []
        self.staging = Staging()
        self.broken: str | None = None  # why the group cannot be used again, after a failed sync

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
        self.engines = as_engine_ops(engines, self.cfg.timeout_s, self.cfg.pause_mode)
        self.rank_offsets = []
        offset = 1
        for engine in self.engines:
            self.rank_offsets.append(offset)
            offset += engine.tp_size
        world_size = offset
        address = resolve_master_address(self.cfg.master_address)
        port = self.cfg.master_port or free_port()
        try:
            backend = group_backend(self.platform.dist_backend, self.engines)
        except WeightSyncError:
            close_all(self.engines)
            raise
        name = self.cfg.group_name

        joins = [
            e.init_weights_update_group(
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
            message = (
                f"{exc} Engine ranks: {self._owner_description()}.{_settled_errors(self.engines, joins)}"
            )
            close_all(self.engines)
            raise CollectiveTimeout(message) from exc
        try:
            wait_all(self.engines, joins, self.cfg.timeout_s, "init_weights_update_group")
        except WeightSyncError:
            group.destroy()
            close_all(self.engines)
            raise
        self.group = group
        self.broken = None
        if self.cfg.flatten_buckets == "auto":
            self.flattened = all(e.prefers_flattened_bucket() for e in self.engines)
            self.flatten_small = all(e.supports_flattened_bucket() for e in self.engines)
        else:
            self.flattened = self.flatten_small = self.cfg.flatten_buckets == "on"

    def disconnect(self) -> None:
        """Destroy the group on the engines and here. Best effort: an engine that lost the group is logged."""
        if self.group is None:
            return
        group, self.group = self.group, None
        try:
            fan_out(
                self.engines,
                lambda e: e.destroy_weights_update_group(group.group_name),
                "destroy_weights_update_group",
            )
        except WeightSyncError as exc:
            log.warning("%s", exc)
        finally:
            group.destroy()
            self.staging.release()
            close_all(self.engines)

    # ---- update -----------------------------------------------------------------------------------------
    def update(self, named_tensors: Iterable[NamedTensor], version: int) -> None:
        if self.group is None:
            raise RuntimeError("BroadcastWeightSync.update() before connect(); call connect(engines) first")
        if self.broken is not None:
            raise WeightSyncError(
                f"the weight-update group is unusable after a failed sync ({self.broken}); "
                "call disconnect() and connect() again"
            )
        # Mixed formats: small tensors (norms, biases) ride together in flattened buckets instead of costing one
        # collective each among the large ones.
        split = SMALL_TENSOR_BYTES if self.flatten_small and not self.flattened else None
        update_in_buckets(
            self.engines, self.cfg, self.staging, named_tensors, version, self._send_bucket, split
        )

    def _send_bucket(self, bucket: list[NamedTensor], weight_version: str | None, flush_cache: bool) -> None:
        assert self.group is not None
        group = self.group
        small = sum(nbytes(t) for _, t in bucket) < SMALL_TENSOR_BYTES * len(bucket)
        flattened = self.flatten_small if small else self.flattened
        request = dict(
            names=[n for n, _ in bucket],
            dtypes=[dtype_name(t.dtype) for _, t in bucket],
            shapes=[list(t.shape) for _, t in bucket],
            group_name=group.group_name,
            load_format="flattened_bucket" if flattened else None,
            weight_version=weight_version,
            flush_cache=flush_cache,
        )
        calls = [e.update_weights_from_distributed(**request) for e in self.engines]

        # A host-backend group with a trainer on an accelerator (a GPU trainer and the CPU engine) sends host
        # copies: the backend's device-tensor support is not something to rely on for a debugging layout.
        to_host = group.backend == HOST_BACKEND and bucket[0][1].device.type != "cpu"

        def send() -> None:
            if flattened:
                flat = _as_flat_bytes(bucket, self.staging)
                flat = flat.cpu() if to_host else flat
                group.broadcast(flat, what=f"bucket broadcast ({flat.numel()} bytes, {len(bucket)} tensors)")
            else:
                for name, tensor in bucket:
                    t = tensor.detach().contiguous()
                    group.broadcast(t.cpu() if to_host else t, what=f"broadcast of {name!r}")

        self._send_watching(send, calls)
        wait_all(self.engines, calls, self.cfg.timeout_s, "update_weights_from_distributed")

    def _send_watching(self, send: Callable[[], None], calls: list[Future]) -> None:
        """Run the collective in a helper thread; an engine that answers with an error ends the wait at once.

        On any failure the group is torn down here, which also ends the receives of engines still blocked in it
        (they would otherwise hold their weight-update session until their own collective timeout). An engine's
        refusal is the root cause and is raised as WeightSyncError; a collective failure without one as
        CollectiveTimeout. Either way the group cannot be used again.
        """
        sent: Future[None] = Future()

        def run() -> None:
            try:
                send()
            except BaseException as exc:  # handed to the waiting thread, which re-raises it
                sent.set_exception(exc)
            else:
                sent.set_result(None)

        threading.Thread(target=run, name="weight-sync-broadcast", daemon=True).start()
        pending: set[Future] = {sent, *calls}
        while not sent.done():
            _, pending = wait(pending, return_when=FIRST_COMPLETED)
            if any(f.done() and f.exception() is not None for f in calls):
                break
        if sent.done() and sent.exception() is None:
            return
        # Failed: give the other side a moment to answer, so the message can name the engine that caused it.
        wait(calls, timeout=REFUSAL_GRACE_S)
        refusals = [str(f.exception()) for f in calls if f.done() and f.exception() is not None]
        collective = sent.exception() if sent.done() else None
        self.broken = "a bucket failed" + (f": {refusals[0]}" if refusals else "")
        assert self.group is not None
        self.group.destroy()
        owners = f" Engine ranks: {self._owner_description()}."
        if refusals:
            also = f" The broadcast then failed too: {collective}" if collective is not None else ""
            raise WeightSyncError(
                "update_weights_from_distributed failed; an engine refused the bucket: "
                + "; ".join(refusals)
                + "."
                + owners
                + also
            )
        assert collective is not None
        raise CollectiveTimeout(f"{collective}{owners}{_settled_errors(self.engines, calls)}") from collective


def group_backend(platform_backend: str, engines: Sequence[EngineOps]) -> str:
    """The weight-update group's backend: the platform's, unless an engine lists backends without it."""
    listed = [(e, e.weight_update_backends()) for e in engines]
    limits = [(e, b) for e, b in listed if b is not None]
    if all(platform_backend in b for _, b in limits):
        return platform_backend
    if all(HOST_BACKEND in b for _, b in limits):
        return HOST_BACKEND
    e, b = next((e, b) for e, b in limits if HOST_BACKEND not in b)
    raise WeightSyncError(
        f"no weight-update backend every engine can join: the platform's is {platform_backend!r}, "
        f"{e.label} lists {b}; use weight_sync.strategy=disk for this engine mix"
    )


def _as_flat_bytes(bucket: list[NamedTensor], staging: Staging) -> torch.Tensor:
    """The bucket's bytes in SGLang's flattened layout; a lone contiguous tensor is sent as is, without a copy."""
    if len(bucket) == 1 and bucket[0][1].is_contiguous():
        return bucket[0][1].detach().reshape(-1).view(torch.uint8)
    size = sum(nbytes(t) for _, t in bucket)
    flat, _ = flatten(bucket, staging.get(size, bucket[0][1].device))
    return flat


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
