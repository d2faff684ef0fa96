"""Trainer checkpoints (resume) and HF weights out of a sharded Megatron model (export, weight sync).

Contract
--------
* ``save_checkpoint(path, model, optimizer, step, layout, extra)`` is collective (every rank calls it). Each
  rank writes ``mp_rank_{tp}_{pp}_dp_{dp}.pt`` with its model shard, the state *and* the parameter tensors of
  every torch optimizer inside the Megatron optimizer (fp32 master copies or distributed-optimizer shards), the
  CPU and Megatron-tracker RNG states, Python/NumPy RNG state and ``step``. Rank 0 writes ``meta.json`` last,
  after a barrier: a directory without it is incomplete and is refused on load. Files are written to a
  temporary name and renamed, so an interrupted save never corrupts an earlier checkpoint of the same name.
  Saves are synchronous in the trainer's process (blocking device-to-host copies, no forked writer, no pinned
  staging buffers), so the segfault some GPU runtimes show for non_blocking pinned copies in forked writers
  cannot occur; an asynchronous writer would need a platform fact saying where that is safe.
* ``load_checkpoint(path, model, optimizer, layout)`` is collective and restores all of the above; the
  parallel layout (TP, PP, DP, distributed optimizer) must equal the saved one (``CheckpointError`` names the
  difference; to change layout, export HF weights and start from them). On CPU the restored run continues
  bitwise identically to an uninterrupted one.
* ``iter_hf_weights(model, spec, layer_offset, tp_group, pp_group, all_stages, ep_group)`` is collective over the
  TP group, the expert-parallel group (MoE) and the PP group when ``all_stages``: it yields
  ``(hf_name, full_tensor)`` for this stage's weights, gathered across TP and, for routed experts, across EP; with ``all_stages`` every stage's tensors are broadcast over the PP group so each rank
  yields the whole model in HF naming. Tied output weights are never yielded (HF ties them on load).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from portable_rl.training.convert import global_name, is_expert, megatron_to_hf, unshard
from portable_rl.training.model_builder import ModelSpec

META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or does not match the running trainer."""


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    distributed_optimizer: bool
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0

    def shape(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("tp_rank", "pp_rank", "dp_rank"):
            d.pop(k)
        return d

    def filename(self) -> str:
        return f"mp_rank_{self.tp_rank:02d}_{self.pp_rank:03d}_dp_{self.dp_rank:03d}.pt"


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (one per chained optimizer)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    wrappers = chained if chained is not None else [optimizer]
    return [w.optimizer for w in wrappers if getattr(w, "optimizer", None) is not None]


def _rng_state() -> dict[str, Any]:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu").clone()
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)
    }


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer,
    step: int,
    layout: Layout,
    extra: dict[str, Any] | None = None,
) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and (out / META).exists():
        (out / META).unlink()  # the directory is incomplete until this save's meta.json lands
    if dist.is_initialized():
        dist.barrier()
    inners = inner_optimizers(optimizer)
    payload = {
        "format": FORMAT_VERSION,
        "step": step,
        "model": _model_state(model),
        "optimizers": [opt.state_dict() for opt in inners],
        "main_params": [
            [p.detach().to("cpu").clone() for group in opt.param_groups for p in group["params"]]
            for opt in inners
        ],
        "rng": _rng_state(),
    }
    target = out / layout.filename()
    tmp = target.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, target)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        meta = {"format": FORMAT_VERSION, "step": step, "layout": layout.shape(), **(extra or {})}
        tmp_meta = out / (META + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, out / META)
    if dist.is_initialized():
        dist.barrier()
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no {META}: not a complete portable_rl checkpoint")
    return json.loads(meta_path.read_text())


@torch.no_grad()
def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, layout: Layout) -> dict[str, Any]:
    """Restore model, optimizer, RNG; return the checkpoint's meta (``meta["step"]`` is the step)."""
    meta = read_meta(path)
    if meta["layout"] != layout.shape():
        raise CheckpointError(
            f"checkpoint {path} was saved with layout {meta['layout']}, this trainer runs {layout.shape()}; "
            "resume with the same layout, or start from an exported HF checkpoint"
        )
    file = Path(path) / layout.filename()
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {file.name} for this rank")
    payload = torch.load(file, map_location="cpu", weights_only=False)
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{file.name}: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    inners = inner_optimizers(optimizer)
    if len(inners) != len(payload["optimizers"]):
        raise CheckpointError(
            f"{file.name} holds {len(payload['optimizers'])} optimizers, the trainer has {len(inners)}"
        )
    for opt, state, mains in zip(inners, payload["optimizers"], payload["main_params"], strict=True):
        params = [p for group in opt.param_groups for p in group["params"]]
        if len(params) != len(mains):
            raise CheckpointError(
                f"{file.name}: {len(mains)} optimizer parameters saved, {len(params)} present"
            )
        for p, saved in zip(params, mains, strict=True):
            p.data.copy_(saved)
        opt.load_state_dict(state)
    _set_rng_state(payload["rng"])
    if dist.is_initialized():
        dist.barrier()
    return meta


# ---- HF weights out of the sharded model -------------------------------------------------------------------
def _local_full_tensors(
    model: torch.nn.Module, spec: ModelSpec, layer_offset: int, tp_group, ep_group=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(global Megatron name, full tensor) for this stage, all-gathered over TP (and routed experts over EP)."""
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    ep = dist.get_world_size(ep_group) if ep_group is not None and dist.is_initialized() else 1
    for name, local in model.state_dict().items():
        if name.endswith("_extra_state") or not isinstance(local, torch.Tensor):
            continue
        local = local.detach()
        if tp > 1:
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.contiguous(), group=tp_group)
        else:
            parts = [local]
        gname = global_name(name, layer_offset)
        full = unshard(gname, parts, spec)
        if ep > 1 and is_expert(name):
            # every EP rank holds num_experts / ep consecutive experts under local indices from 0
            shares = [torch.empty_like(full) for _ in range(ep)]
            dist.all_gather(shares, full.contiguous(), group=ep_group)
            per = spec.num_experts // ep
            for r, share in enumerate(shares):
                yield global_name(name, layer_offset, r * per), share
            continue
        yield gname, full


def iter_hf_weights(
    model: torch.nn.Module,
    spec: ModelSpec,
    layer_offset: int,
    tp_group=None,
    pp_group=None,
    all_stages: bool = False,
    ep_group=None,
) -> Iterator[tuple[str, torch.Tensor]]:
    pp = dist.get_world_size(pp_group) if pp_group is not None and dist.is_initialized() else 1
    if not all_stages or pp == 1:
        for name, full in _local_full_tensors(model, spec, layer_offset, tp_group, ep_group):
            yield from megatron_to_hf(spec, name, full)
        return
    my_stage = dist.get_rank(pp_group)
    group_ranks = dist.get_process_group_ranks(pp_group)
    local = list(_local_full_tensors(model, spec, layer_offset, tp_group, ep_group))
    for stage in range(pp):
        # Announce names/shapes first so receivers can allocate, then broadcast tensor by tensor.
        header = [[(n, tuple(t.shape), t.dtype) for n, t in local] if stage == my_stage else None]
        dist.broadcast_object_list(header, src=group_ranks[stage], group=pp_group)
        for i, (name, shape, dtype) in enumerate(header[0]):
            tensor = (
                local[i][1].contiguous()
                if stage == my_stage
                else torch.empty(shape, dtype=dtype, device=local[0][1].device)
            )
            dist.broadcast(tensor, src=group_ranks[stage], group=pp_group)
            yield from megatron_to_hf(spec, name, tensor)
