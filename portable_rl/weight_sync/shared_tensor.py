"""Shared-tensor weight sync (co-located mode): engines map the trainer's memory instead of receiving copies.

Contract
--------
* Transport is a platform fact, ``current_platform().shared_tensor_transport``:
    - ``"shared_memory"`` (CPU): each bucket is staged in a named shared-memory segment;
    - ``"cuda_ipc"`` (NVIDIA and AMD GPUs): each bucket is staged on the tensors' device and passed as an IPC
      handle; the device id inside the handle is made importer-safe by the platform (see ``tensor_codec``).
* ``update(named_tensors, version)``: per bucket (``bucket_mb``, one dtype) the tensors are copied into one flat
  staging buffer and every engine gets ``/update_weights_from_tensor`` with ``serialized_named_tensors`` =
  one payload per engine TP rank (``tensor_codec.serialize_tensors``): SGLang's ``flattened_bucket`` form when
  ``flatten_buckets`` is "on" or ("auto" and every engine declares support), otherwise a list of
  (name, tensor) views into the staging buffer, serialized once per importer (see ``tensor_codec``). A
  buffer is overwritten only after every engine answered for it (they copy before answering), and buffers are
  kept between syncs unless ``keep_staging`` is False. With the ``shared_memory`` transport there are two
  buffers used in turn: the trainer copies bucket k+1 into one while the engines copy bucket k out of the
  other (two processes, two memory copies at once), and bucket k+1's request goes out once bucket k's answers
  are in, so the engines still see one bucket at a time, in order, the last (version, cache flush) after all
  the others. Device IPC keeps one buffer (no second bucket-sized allocation on the accelerator) and waits
  for each bucket's answers before the next copy.
  Runs inside ``update_session`` (pause, flush, begin/end weight update, resume, version check).
* No process group; ``connect`` only records the engines, ``disconnect`` forgets them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from portable_rl.config.weight_sync import WeightSyncConfig
from portable_rl.platform import Platform, current_platform
from portable_rl.protocol.buckets import NamedTensor, Staging, flatten, nbytes, unflatten
from portable_rl.protocol.engine_ops import EngineOps
from portable_rl.protocol.tensor_codec import flattened_payload, serialize_tensors, share_memory_buffer
from portable_rl.weight_sync.base import as_engine_ops, close_all, update_in_buckets, wait_all


class StagingTurns:
    """``count`` staging buffers handed out in turn (``next``); ``release`` drops them all."""

    def __init__(self, allocate: Callable[[int, torch.device], torch.Tensor], count: int) -> None:
        self.slots = [Staging(allocate) for _ in range(count)]
        self.turn = 0

    def next(self, nbytes: int, device: torch.device) -> torch.Tensor:
        slot = self.slots[self.turn]
        self.turn = (self.turn + 1) % len(self.slots)
        return slot.get(nbytes, device)

    def release(self) -> None:
        for slot in self.slots:
            slot.release()
        self.turn = 0


class SharedTensorWeightSync:
    """Co-located hand-off by shared memory / IPC handle (see module docstring)."""

    def __init__(self, cfg: WeightSyncConfig, platform: Platform | None = None) -> None:
        self.cfg = cfg
        self.platform = platform or current_platform()
        self.engines: list[EngineOps] = []
        self.flattened = False
        host = self.platform.shared_tensor_transport == "shared_memory"
        self.staging = StagingTurns(
            lambda n, device: share_memory_buffer(n, device, self.platform), 2 if host else 1
        )
        self.pending: list[Future] | None = None  # the last bucket's requests, not yet answered

    def connect(self, engines: Sequence[Any]) -> None:
        self.engines = as_engine_ops(engines, self.cfg.timeout_s, self.cfg.pause_mode)
        if self.cfg.flatten_buckets == "auto":
            self.flattened = all(e.supports_flattened_bucket() for e in self.engines)
        else:
            self.flattened = self.cfg.flatten_buckets == "on"

    def disconnect(self) -> None:
        self.staging.release()
        close_all(self.engines)
        self.engines = []

    def _staging_device(self, tensor: torch.Tensor) -> torch.device:
        if self.platform.shared_tensor_transport == "shared_memory":
            return torch.device("cpu")
        # IPC handles exist for device memory; a CPU-resident tensor still travels through shared memory.
        return tensor.device

    def update(self, named_tensors: Iterable[NamedTensor], version: int) -> None:
        if not self.engines:
            raise RuntimeError(
                "SharedTensorWeightSync.update() before connect(); call connect(engines) first"
            )
        self.pending = None
        try:
            update_in_buckets(self.engines, self.cfg, self.staging, named_tensors, version, self._send_bucket)
        finally:
            self.pending = None

    def _send_bucket(self, bucket: list[NamedTensor], weight_version: str | None, flush_cache: bool) -> None:
        size = sum(nbytes(t) for _, t in bucket)
        if len(self.staging.slots) == 1:
            self._wait_pending()  # the one buffer is about to be overwritten
        staging = self.staging.next(size, self._staging_device(bucket[0][1]))
        flat, metas = flatten(bucket, staging)  # meanwhile the engines load the previous bucket
        if self.flattened:
            payload, load_format = flattened_payload(flat, metas), "flattened_bucket"
        else:
            payload, load_format = unflatten(flat, metas), None
        self.platform.synchronize()  # the copies into the staging buffer must land before an importer reads it
        # One bucket at a time on the engines, in order: the last one sets the version after all the others.
        self._wait_pending()
        # One serialization per importer (engine x TP rank): each pickle takes one reference on the shared memory
        # and each unpickle gives one back, so a payload opened twice would free the segment under its exporter.
        self.pending = [
            e.update_weights_from_tensor(
                serialized_named_tensors=[
                    serialize_tensors(payload, self.platform) for _ in range(e.tp_size)
                ],
                load_format=load_format,
                weight_version=weight_version,
                flush_cache=flush_cache,
            )
            for e in self.engines
        ]
        if weight_version is not None or flush_cache:  # the last bucket: answered before the session closes
            self._wait_pending()

    def _wait_pending(self) -> None:
        """Every engine answered the last bucket, so it has copied it: its staging buffer may be reused."""
        pending, self.pending = self.pending, None
        if pending:
            timeout = max(e.timeout_s for e in self.engines)
            wait_all(self.engines, pending, timeout, "update_weights_from_tensor")
