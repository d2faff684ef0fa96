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
  (name, tensor) views into the staging buffer, serialized once per importer (see ``tensor_codec``). The
  buffer is overwritten only after every engine answered (they copy before answering) and kept between syncs
  unless ``keep_staging`` is False.
  Runs inside ``update_session`` (pause, flush, begin/end weight update, resume, version check).
* Resident weights (``resident_weights``, see ``weight_sync.resident``): when every engine keeps its weights in
  a shared-memory segment this process can map, ``connect`` maps them and ``update`` writes each weight straight
  into every engine's served tensor inside the session, then ``/commit_resident_weights`` carries the version:
  no staging buffer, no per-bucket request, no engine-side copy. ``resident`` says whether it is in use.
* No process group; ``connect`` only records the engines, ``disconnect`` forgets them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from portable_rl.config.weight_sync import WeightSyncConfig
from portable_rl.platform import Platform, current_platform
from portable_rl.protocol.buckets import NamedTensor, Staging, flatten, nbytes, unflatten
from portable_rl.protocol.engine_ops import EngineOps
from portable_rl.protocol.tensor_codec import flattened_payload, serialize_tensors, share_memory_buffer
from portable_rl.weight_sync.base import (
    WeightSyncError,
    as_engine_ops,
    close_all,
    fan_out,
    raise_failures,
    run_sequences,
    update_in_buckets,
    update_session,
)
from portable_rl.weight_sync.resident import ResidentTargets, ResidentUnavailable

log = logging.getLogger(__name__)


class SharedTensorWeightSync:
    """Co-located hand-off by shared memory / IPC handle (see module docstring)."""

    def __init__(self, cfg: WeightSyncConfig, platform: Platform | None = None) -> None:
        self.cfg = cfg
        self.platform = platform or current_platform()
        self.engines: list[EngineOps] = []
        self.flattened = False
        self.staging = Staging(lambda n, device: share_memory_buffer(n, device, self.platform))
        self.resident: ResidentTargets | None = None

    def connect(self, engines: Sequence[Any]) -> None:
        self.engines = as_engine_ops(engines, self.cfg.timeout_s, self.cfg.pause_mode)
        if self.cfg.flatten_buckets == "auto":
            self.flattened = all(e.supports_flattened_bucket() for e in self.engines)
        else:
            self.flattened = self.cfg.flatten_buckets == "on"
        self.resident = self._open_resident()

    def _open_resident(self) -> ResidentTargets | None:
        mode = self.cfg.resident_weights
        if mode == "off":
            return None
        lacking = [e.label for e in self.engines if not e.supports_resident_weights()]
        try:
            if lacking:
                raise ResidentUnavailable(f"{', '.join(lacking)} do(es) not offer /resident_weights")
            return ResidentTargets.open(self.engines)
        except ResidentUnavailable as exc:
            if mode == "on":
                raise WeightSyncError(
                    f"weight_sync.resident_weights=on, but {exc}; use resident_weights=auto or off"
                ) from exc
            log.info("resident weights not used (%s); weights travel in buckets", exc)
            return None

    def disconnect(self) -> None:
        if self.resident is not None:
            self.resident.close()
            self.resident = None
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
        if self.resident is not None:
            self._update_resident(self.resident, named_tensors, version)
            return
        update_in_buckets(self.engines, self.cfg, self.staging, named_tensors, version, self._send_bucket)

    def _update_resident(
        self, resident: ResidentTargets, named_tensors: Iterable[NamedTensor], version: int
    ) -> None:
        tensors = iter(named_tensors)
        with update_session(
            self.engines,
            version,
            verify_version=self.cfg.verify_version,
            enabled=self.cfg.manage_session,
            overlap=lambda: next(tensors, None),  # the trainer gathers its first weight while engines pause
            commit="commit_resident_weights",  # carries the version in the request that closes the session
        ) as first:
            resident.write(itertools.chain([first] if first is not None else [], tensors))
        if not self.cfg.manage_session:  # the caller closes the session: the version moves here
            progress = run_sequences(self.engines, ("commit_resident_weights",), True, str(version))
            raise_failures(self.engines, ("commit_resident_weights",), progress)

    def _send_bucket(self, bucket: list[NamedTensor], weight_version: str | None, flush_cache: bool) -> None:
        size = sum(nbytes(t) for _, t in bucket)
        staging = self.staging.get(size, self._staging_device(bucket[0][1]))
        flat, metas = flatten(bucket, staging)
        if self.flattened:
            payload, load_format = flattened_payload(flat, metas), "flattened_bucket"
        else:
            payload, load_format = unflatten(flat, metas), None
        self.platform.synchronize()  # the copies into the staging buffer must land before an importer reads it
        # One serialization per importer (engine x TP rank): each pickle takes one reference on the shared memory
        # and each unpickle gives one back, so a payload opened twice would free the segment under its exporter.
        fan_out(
            self.engines,
            lambda e: e.update_weights_from_tensor(
                serialized_named_tensors=[
                    serialize_tensors(payload, self.platform) for _ in range(e.tp_size)
                ],
                load_format=load_format,
                weight_version=weight_version,
                flush_cache=flush_cache,
            ),
            "update_weights_from_tensor",
        )
        # Every engine answered, so it has copied the bucket: the staging buffer may be overwritten now.
