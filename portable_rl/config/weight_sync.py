"""Configuration of trainer -> engine weight synchronisation.

Contract: ``WeightSyncConfig`` is validated when built (one line per bad value, naming the fix);
``resolve_strategy(cfg, mode)`` turns ``strategy="auto"`` into the concrete strategy for a deployment mode:
co-located (trainer and engines share devices) -> ``shared_tensor``; disaggregated -> ``broadcast``.
"""

from __future__ import annotations

from dataclasses import dataclass

from portable_rl.config import refuse_non_finite

STRATEGIES = ("auto", "shared_tensor", "broadcast", "disk")
MODES = ("colocated", "disaggregated")
FLATTEN_CHOICES = ("auto", "on", "off")
RESIDENT_CHOICES = ("auto", "on", "off")
PAUSE_MODES = ("abort", "retract")

# SGLang's default name for the trainer->engine group (InitWeightsUpdateGroupReqInput.group_name).
DEFAULT_GROUP_NAME = "weight_update_group"


@dataclass
class WeightSyncConfig:
    """How weights travel from the trainer to the rollout engines.

    strategy:        auto | shared_tensor | broadcast | disk
    bucket_mb:       tensors are grouped into buckets of at most this many MiB (one HTTP call + one
                     collective per bucket); a single larger tensor gets a bucket of its own
    disk_dir:        where the disk strategy writes safetensors shards (required for strategy=disk)
    disk_shard_mb:   maximum size of one safetensors shard written by the disk strategy
    timeout_s:       limit for every collective, rendezvous and engine HTTP call of a sync
    flatten_buckets: auto | on | off. "on" sends each bucket as one flat byte buffer (SGLang's
                     load_format="flattened_bucket"); "auto" does so only where every engine declares support,
                     otherwise one broadcast per tensor (the format every SGLang release accepts); for
                     broadcasts "auto" also sends per tensor to engines that declare it faster (portable_rl's
                     CPU engine: per-tensor receives land straight in its parameters)
    group_name:      name of the trainer->engine process group
    master_address:  address engines use to reach the trainer's rendezvous (None: this host's address;
                     "node": its Ray node address, what a job on a multi-node cluster uses)
    master_port:     rendezvous port (0: pick a free one)
    verify_version:  after each sync read the engines' weight version back and fail if it did not move
    manage_session:  wrap every update() in pause/flush/begin/end/resume/version check (False: the caller does,
                     with ``update_session``; for several syncs that together make one update, e.g. one per
                     pipeline stage, each from that stage's rank 0 with its own group_name)
    keep_staging:    keep the flat staging buffer (one bucket, on the weights' device) between syncs:
                     faster (no page faults / allocation per sync) at the cost of that memory; False frees it
                     at the end of every update
    resident_weights: auto | on | off (shared_tensor strategy). Engines that offer it (portable_rl's CPU engine)
                     keep their weights in one shared-memory segment that the trainer maps once and writes each
                     weight into during the update session: one copy and two requests per sync instead of a
                     staging copy, a request and an engine-side copy per bucket. "auto" uses it when every
                     engine offers it and its segment opens in this process (same host), else buckets; "on"
                     fails at connect when it cannot
    pause_mode:      how /pause_generation treats running requests: "abort" (SGLang's default; the rollout
                     resubmits them) or "retract" (requests wait in the engine and are recomputed after the sync)
    """

    strategy: str = "auto"
    bucket_mb: float = 512.0
    disk_dir: str | None = None
    disk_shard_mb: float = 2048.0
    timeout_s: float = 600.0
    flatten_buckets: str = "auto"
    group_name: str = DEFAULT_GROUP_NAME
    master_address: str | None = None
    master_port: int = 0
    verify_version: bool = True
    pause_mode: str = "abort"
    keep_staging: bool = True
    manage_session: bool = True
    resident_weights: str = "auto"

    def __post_init__(self) -> None:
        refuse_non_finite(self, "weight_sync.")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"weight_sync.strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}; pick one of them"
            )
        for name in ("bucket_mb", "disk_shard_mb", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"weight_sync.{name}={value!r} must be a positive number")
        if self.flatten_buckets not in FLATTEN_CHOICES:
            raise ValueError(
                f"weight_sync.flatten_buckets={self.flatten_buckets!r} is not one of "
                f"{', '.join(FLATTEN_CHOICES)}"
            )
        if self.strategy == "disk" and not self.disk_dir:
            raise ValueError(
                "weight_sync.strategy='disk' needs weight_sync.disk_dir (a directory engines can read)"
            )
        if self.resident_weights not in RESIDENT_CHOICES:
            raise ValueError(
                f"weight_sync.resident_weights={self.resident_weights!r} is not one of {', '.join(RESIDENT_CHOICES)}"
            )
        if self.pause_mode not in PAUSE_MODES:
            raise ValueError(
                f"weight_sync.pause_mode={self.pause_mode!r} is not one of {', '.join(PAUSE_MODES)}"
            )
        if not self.group_name:
            raise ValueError("weight_sync.group_name must be a non-empty string")
        if isinstance(self.master_port, bool) or not isinstance(self.master_port, int):
            raise ValueError(
                f"weight_sync.master_port={self.master_port!r} must be an integer (0: pick a free port)"
            )
        if not 0 <= self.master_port <= 65535:
            raise ValueError(
                f"weight_sync.master_port={self.master_port} must be in 0..65535 (0: pick a free port)"
            )

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_mb * 1024 * 1024))

    @property
    def disk_shard_bytes(self) -> int:
        return max(1, int(self.disk_shard_mb * 1024 * 1024))


def resolve_strategy(cfg: WeightSyncConfig, mode: str) -> str:
    """The concrete strategy for ``mode`` ("colocated" | "disaggregated")."""
    if mode not in MODES:
        raise ValueError(f"deployment mode {mode!r} is not one of {', '.join(MODES)}")
    if cfg.strategy != "auto":
        return cfg.strategy
    return "shared_tensor" if mode == "colocated" else "broadcast"
