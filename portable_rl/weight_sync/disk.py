"""Disk weight sync: safetensors shards in a directory, loaded by the engines through /update_weights_from_disk.

For engines that share no device or process group with the trainer: another vendor's GPUs, another job, a
remote cluster reading a shared filesystem.

Contract
--------
* ``update(named_tensors, version)`` writes ``<disk_dir>/weights_v<version>/`` as a Hugging Face weight
  directory: ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``disk_shard_mb`` (a larger tensor gets a
  shard of its own) and ``model.safetensors.index.json``. It is written under a temporary name and renamed
  when complete, so an engine never sees a half-written version. Writing happens while the engines keep
  generating; then each engine is paused, flushed, pointed at the directory (``model_path``,
  ``weight_version``), resumed, and its version checked. (No begin/end session: SGLang's disk loader restores
  and post-processes weights itself.)
* Directories of older versions written by this object are removed once a newer one is loaded; the newest
  always stays; a ``weights_v<version>`` directory left by an earlier attempt at the same version is replaced.
  Nothing else under ``disk_dir`` is touched.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from portable_rl.config.weight_sync import WeightSyncConfig
from portable_rl.platform import Platform, current_platform
from portable_rl.protocol.buckets import NamedTensor, nbytes
from portable_rl.protocol.engine_ops import EngineOps
from portable_rl.weight_sync.base import as_engine_ops, close_all, fan_out, update_session

INDEX_NAME = "model.safetensors.index.json"


def _shards(named_tensors: Iterable[NamedTensor], max_bytes: int) -> Iterator[list[NamedTensor]]:
    shard: list[NamedTensor] = []
    used = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one update; names must be unique")
        seen.add(name)
        size = nbytes(tensor)
        if shard and used + size > max_bytes:
            yield shard
            shard, used = [], 0
        shard.append((name, tensor))
        used += size
    if shard:
        yield shard


def write_safetensors_dir(
    named_tensors: Iterable[NamedTensor],
    target: Path,
    shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``named_tensors`` as a sharded HF weight directory at ``target`` (atomically, via a temp dir)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous attempt of ours that died midway
    tmp.mkdir(parents=True)
    files: list[tuple[str, list[str]]] = []
    total = 0
    try:
        for i, shard in enumerate(_shards(named_tensors, shard_bytes)):
            fname = f"model-{i + 1:05d}.safetensors"
            tensors = {n: t.detach().to("cpu").contiguous() for n, t in shard}
            total += sum(nbytes(t) for t in tensors.values())
            save_file(tensors, str(tmp / fname), metadata={"format": "pt", **(metadata or {})})
            files.append((fname, [n for n, _ in shard]))
        if not files:
            raise ValueError("update() got no tensors; pass the model's named weights")
        weight_map: dict[str, str] = {}
        for i, (fname, names) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            (tmp / fname).rename(tmp / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)  # same version written again (a retried step): replace our own copy
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class DiskWeightSync:
    """Sharded safetensors + /update_weights_from_disk (see module docstring)."""

    def __init__(self, cfg: WeightSyncConfig, platform: Platform | None = None) -> None:
        if not cfg.disk_dir:
            raise ValueError(
                "the disk strategy needs weight_sync.disk_dir (a directory the engines can read)"
            )
        self.cfg = cfg
        self.platform = platform or current_platform()
        self.root = Path(cfg.disk_dir).expanduser().resolve()
        self.engines: list[EngineOps] = []
        self.written: list[Path] = []

    def connect(self, engines: Sequence[Any]) -> None:
        self.engines = as_engine_ops(engines, self.cfg.timeout_s, self.cfg.pause_mode)
        self.root.mkdir(parents=True, exist_ok=True)

    def disconnect(self) -> None:
        close_all(self.engines)
        self.engines = []

    def version_dir(self, version: int) -> Path:
        return self.root / f"weights_v{version}"

    def update(self, named_tensors: Iterable[NamedTensor], version: int) -> None:
        if not self.engines:
            raise RuntimeError("DiskWeightSync.update() before connect(); call connect(engines) first")
        target = write_safetensors_dir(
            named_tensors,
            self.version_dir(version),
            self.cfg.disk_shard_bytes,
            {"weight_version": str(version)},
        )
        with update_session(
            self.engines,
            version,
            verify_version=self.cfg.verify_version,
            open_session=False,
            enabled=self.cfg.manage_session,
        ):
            fan_out(
                self.engines,
                lambda e: e.update_weights_from_disk(str(target), str(version)),
                "update_weights_from_disk",
            )
        for old in [p for p in self.written if p != target]:
            shutil.rmtree(old, ignore_errors=True)
        self.written = [target]
