"""Trainer -> rollout-engine weight synchronisation.

One small interface (``WeightSync``: connect, update, disconnect) and three strategies, picked by deployment
mode and config with ``make_weight_sync(cfg, mode)``:
  * ``shared_tensor`` (co-located default): engines map the trainer's memory (CPU shared memory or GPU IPC
    handles, a platform fact) through ``/update_weights_from_tensor``;
  * ``broadcast`` (disaggregated default): a process group with the engines (gloo/NCCL/RCCL per platform),
    bucketed broadcasts announced through ``/update_weights_from_distributed``;
  * ``disk``: sharded safetensors + ``/update_weights_from_disk`` (engines on another vendor or outside the job).
``check_weights(engines, named_tensors)`` verifies bit-equality of engine and trainer weights afterwards.
"""

from __future__ import annotations

from portable_rl.config.weight_sync import WeightSyncConfig, resolve_strategy
from portable_rl.errors import CollectiveTimeout
from portable_rl.platform import Platform
from portable_rl.protocol.checksum import (
    WeightCheckReport,
    WeightMismatch,
    check_weights,
    tensor_checksum,
)
from portable_rl.protocol.engine_ops import EngineCallError
from portable_rl.weight_sync.base import WeightSync, WeightSyncError, update_session, while_closing


def make_weight_sync(cfg: WeightSyncConfig, mode: str, platform: Platform | None = None) -> WeightSync:
    """The strategy for ``cfg`` in deployment ``mode`` ("colocated" | "disaggregated"); auto picks by mode."""
    strategy = resolve_strategy(cfg, mode)
    if strategy == "shared_tensor":
        from portable_rl.weight_sync.shared_tensor import SharedTensorWeightSync

        return SharedTensorWeightSync(cfg, platform)
    if strategy == "broadcast":
        from portable_rl.weight_sync.broadcast import BroadcastWeightSync

        return BroadcastWeightSync(cfg, platform)
    from portable_rl.weight_sync.disk import DiskWeightSync

    return DiskWeightSync(cfg, platform)


__all__ = [
    "CollectiveTimeout",
    "EngineCallError",
    "WeightCheckReport",
    "WeightMismatch",
    "WeightSync",
    "WeightSyncConfig",
    "WeightSyncError",
    "check_weights",
    "make_weight_sync",
    "resolve_strategy",
    "tensor_checksum",
    "update_session",
    "while_closing",
]
