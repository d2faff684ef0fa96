"""Trainer checkpoints (resume, on any parallel layout) and HF weights out of a sharded Megatron model.

Contract
--------
* Format (``FORMAT_VERSION`` 2): Megatron-core's distributed checkpoint (``megatron.core.dist_checkpointing``,
  the ``torch_dist`` backend: ``*.distcp`` files, ``.metadata``, ``common.pt``, Megatron's ``metadata.json``)
  plus our ``meta.json`` (step, the layout it was saved with, the model's facts), written by rank 0 last: a
  directory without it is incomplete and is refused. Every tensor is stored once, by its global shape and
  offset, so the checkpoint does not depend on the layout that wrote it.
* ``save_checkpoint(path, model, optimizer, step, layout, extra)`` is collective (every rank calls it). It saves
  the model's ``sharded_state_dict()`` and the optimizer's ``sharded_state_dict(model_state)``: Adam moments,
  fp32 master weights (bf16 training) and the step. The distributed optimizer uses Megatron's
  ``fully_reshardable`` form (its shards gathered on DP rank 0 into per-parameter tensors while saving), so
  optimizer state reshards over TP, PP and DP like the weights. Each rank's RNG states (CPU, Megatron tracker, Python, NumPy) are one
  element of an object indexed by (PP, TP, DP) rank. ``path`` is cleared first (callers keep atomicity by
  saving into a fresh directory; the run's checkpoints do). Saves are synchronous in the trainer's process
  (no forked writer, no pinned staging buffers): the segfault some GPU runtimes show for non_blocking pinned
  copies in forked writers cannot occur.
* ``load_checkpoint(path, model, optimizer, layout)`` is collective and restores all of the above onto any
  TP x PP x DP layout whose model has the same shapes, with the optimizer kind (plain or distributed) it was
  saved with (``reshard_refusal`` says why not otherwise; their saved structures differ). The RNG
  states are restored only onto the saved layout (a rank of another layout has no saved counterpart; it
  keeps the streams seeded at start-up, which training without dropout never draws from). On the same layout
  a resumed CPU run continues bitwise identically to an uninterrupted one; on another layout it continues
  within the floating-point difference between the layouts' reduction orders.
* Checkpoints of format 1 (per-rank ``.pt`` files of earlier releases) load onto their own layout only
  (``checkpoint_legacy``).
* ``file_problems(path)`` lists, without torch.distributed or Megatron and in milliseconds, what is missing
  or cut short among a checkpoint's files (every byte range its index names must exist); ``read_meta`` raises
  ``CheckpointError`` for a directory without ``meta.json``.
* ``iter_hf_weights(model, spec, layer_offset, tp_group, pp_group, all_stages, ep_group)`` is collective over
  the TP group, the expert-parallel group (MoE) and the PP group when ``all_stages``: it yields
  ``(hf_name, full_tensor)`` for this stage's weights, gathered across TP and, for routed experts, across EP;
  with ``all_stages`` every stage's tensors are broadcast over the PP group so each rank
  yields the whole model in HF naming. Tied output weights are never yielded (HF ties them on load).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from portable_rl.training.convert import global_name, is_expert, megatron_to_hf, unshard
from portable_rl.training.model_builder import ModelSpec

META = "meta.json"
FORMAT_VERSION = 2
LEGACY_FORMAT = 1
# The distributed optimizer's state as per-parameter tensors, reshardable over TP, PP and DP (Megatron's
# training default, "dp_reshardable", is keyed by its bucket layout and reshards over DP only). Saving gathers
# it on DP rank 0 only (mem_efficient), not on every DP rank.
_OPTIMIZER_FORM = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
    "chained_optim_avoid_prefix": True,
}
_RNG_KEY = "rng_state"


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


def _rng_state() -> dict[str, Any]:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _inner_optimizers(optimizer) -> list[Any]:
    wrappers = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [w.optimizer for w in wrappers if getattr(w, "optimizer", None) is not None]


def _fill_adam_state(inners: list[Any]) -> None:
    """Give parameters that have no Adam state yet the state torch's Adam creates on its first step.

    Zero moments and step 0 are exactly what a first step would start from, so training is unchanged. Needed
    because a checkpoint of an optimizer that never stepped would otherwise hold no optimizer tensors (a later
    load asks for them), and because megatron-core's DistributedOptimizer.state_dict() reads the step from
    every parameter's state when Apex and TransformerEngine are absent (torch's Adam) and asserts there is
    exactly one (the same assertion is in later megatron-core releases).
    """
    for inner in inners:
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _zero_step_where_missing(state_dict: Any) -> None:
    """Megatron's plain optimizer saves its shared step only when it is non-zero; torch's Adam refuses state
    without one. A checkpoint of an optimizer that never stepped gets its step 0 back here."""
    if not isinstance(state_dict, dict):
        return
    params = state_dict.get("state")
    if isinstance(params, dict) and "common_step" not in params:
        for one in params.values():
            if isinstance(one, dict) and one and "step" not in one:
                one["step"] = torch.tensor(0.0)
    for value in state_dict.values():
        _zero_step_where_missing(value)


def _distributed_optimizers(optimizer) -> list[Any]:
    wrappers = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [w for w in wrappers if hasattr(w, "gbuf_ranges") and getattr(w, "optimizer", None) is not None]


@contextlib.contextmanager
def _step_kept_on_load(optimizer) -> Iterator[None]:
    """Let the distributed optimizer's load restore torch Adam's state (two gaps of megatron-core 0.16.1's
    DistributedOptimizer when Apex and TransformerEngine are absent, as on every platform here).

    Megatron-core's DistributedOptimizer first restores the step into every parameter's state (from the saved
    param groups: torch's Adam keeps it per parameter), then copies the loaded tensors into that state key by
    key, and the loaded tensors never carry the step: ``KeyError: 'step'``. For the duration of the load, the
    copy also receives the step already in place (copied onto itself). Set on the instance, never the class.
    """
    patched = []
    for wrapper in _distributed_optimizers(optimizer):
        original = wrapper._set_main_param_and_optimizer_states

        def with_step(model_param, tensors, wrapper=wrapper, original=original):
            group_index, group_order = wrapper.model_param_group_index_map[model_param]
            main_param = wrapper.optimizer.param_groups[group_index]["params"][group_order]
            step = wrapper.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return original(model_param, tensors)

        wrapper._set_main_param_and_optimizer_states = with_step
        patched.append(wrapper)
    try:
        yield
    finally:
        for wrapper in patched:
            del wrapper._set_main_param_and_optimizer_states
    for wrapper in patched:
        # The same load hands every parameter one shared step tensor, which torch's Adam then increments once
        # per parameter in each step (wrong bias correction from the first resumed step on): one each.
        for state in wrapper.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _sharded_state(model, optimizer, layout: Layout, loading: bool, with_rng: bool) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # Loading: the distributed optimizer needs its state before it describes it (the others create theirs).
    _fill_adam_state(
        [w.optimizer for w in _distributed_optimizers(optimizer)] if loading else _inner_optimizers(optimizer)
    )
    model_state = model.sharded_state_dict()
    optimizer_state = optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=_OPTIMIZER_FORM)
    if (
        isinstance(optimizer_state, dict)
        and "param_state" in optimizer_state
        and optimizer_state["param_state"] is None
    ):
        del optimizer_state[
            "param_state"
        ]  # DP ranks other than 0 hold none when saving (see _OPTIMIZER_FORM)
    state = {"model": model_state, "optimizer": optimizer_state}
    if with_rng:
        state[_RNG_KEY] = ShardedObject(
            _RNG_KEY,
            _rng_state() if not loading else None,
            (layout.pipeline_parallel, layout.tensor_parallel, layout.data_parallel),
            (layout.pp_rank, layout.tp_rank, layout.dp_rank),
            replica_id=0,
        )
    return state


def _in_process_writer():
    """Megatron's torch_dist save strategy, writing from the calling process.

    megatron-core's own strategy stages tensors with non_blocking copies and writes through forked worker
    processes fed by a queue from a spawned manager process (seconds per save here, and the forked-writer
    pattern some GPU runtimes crash in). This one hands the same translated state dict to
    ``torch.distributed.checkpoint.save`` with a single-threaded FileSystemWriter: the files (``*.distcp``,
    ``.metadata``) and Megatron's ``metadata.json`` (backend ``torch_dist``) are what Megatron's loader reads.
    """
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class InProcessTorchDist(mcore_torch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            # The key translation and planner are megatron-core's (pinned release; see backends/versions.py).
            state, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            dcp_save(
                mcore_torch.mcore_to_pyt_state_dict(state, False),
                storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                planner=mcore_torch.MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica,
                    flatten_state_dict=False,
                    can_run_decentralized_global_plan=False,
                ),
            )

    return InProcessTorchDist("torch_dist", 1)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer,
    step: int,
    layout: Layout,
    extra: dict[str, Any] | None = None,
) -> Path:
    from megatron.core import dist_checkpointing

    out = Path(path)
    rank = dist.get_rank()
    if rank == 0:
        if out.exists():
            shutil.rmtree(out)  # meta.json goes first with it: the directory is incomplete until the end
        out.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(
        _sharded_state(model, optimizer, layout, False, True), str(out), sharded_strategy=_in_process_writer()
    )
    dist.barrier()
    if rank == 0:
        meta = {"format": FORMAT_VERSION, "step": step, "layout": layout.shape(), **(extra or {})}
        tmp_meta = out / (META + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        tmp_meta.replace(out / META)
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
    fmt = meta.get("format")
    if fmt == LEGACY_FORMAT:
        from portable_rl.training.checkpoint_legacy import LegacyFormatError, load_legacy

        refusal = reshard_refusal(meta.get("layout") or {}, layout.shape(), fmt=LEGACY_FORMAT)
        if refusal:
            raise CheckpointError(f"checkpoint {path} was {refusal}")
        try:
            set_rng_state(load_legacy(path, model, optimizer, layout))
        except LegacyFormatError as exc:
            raise CheckpointError(str(exc)) from None
    elif fmt == FORMAT_VERSION:
        _load_distributed(path, meta, model, optimizer, layout)
    else:
        raise CheckpointError(f"checkpoint {path} has format {fmt!r}; this release reads formats 1 and 2")
    dist.barrier()
    return meta


def _load_distributed(path, meta: dict[str, Any], model, optimizer, layout: Layout) -> None:
    from megatron.core import dist_checkpointing

    saved = meta.get("layout") or {}
    if saved.get("distributed_optimizer") != layout.distributed_optimizer:
        raise CheckpointError(f"checkpoint {path} was {reshard_refusal(saved, layout.shape())}")
    same_layout = saved == layout.shape()
    state = _sharded_state(model, optimizer, layout, True, same_layout)
    loaded = dist_checkpointing.load(state, str(path))
    result = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path}: model tensors missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    _zero_step_where_missing(loaded["optimizer"])
    with _step_kept_on_load(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        set_rng_state(loaded[_RNG_KEY])


def reshard_refusal(saved: dict[str, Any], wanted: dict[str, Any], fmt: int = FORMAT_VERSION) -> str | None:
    """Why a checkpoint saved with layout ``saved`` cannot load onto ``wanted`` (None when it can).

    Format 2 reshards over TP, PP and DP; the optimizer kind must stay (the distributed optimizer's saved
    state has another structure than the plain one's). Format 1 loads only onto its own layout.
    """

    def show(d: dict) -> str:
        return (
            f"TP {d.get('tensor_parallel')} x PP {d.get('pipeline_parallel')} x DP {d.get('data_parallel')}"
            f" (distributed_optimizer={d.get('distributed_optimizer')})"
        )

    if fmt == LEGACY_FORMAT and saved != wanted:
        return (
            f"saved with {show(saved)} in the per-rank format of earlier releases, which loads only onto that "
            f"layout, but the recipe asks for {show(wanted)}; resume once with the saved train.parallel and "
            "train.data_parallel (the next checkpoint is layout-free), or start a new run from its exported model"
        )
    if saved.get("distributed_optimizer") != wanted.get("distributed_optimizer"):
        return (
            f"saved with train.parallel.distributed_optimizer={saved.get('distributed_optimizer')} but the recipe "
            f"asks for {wanted.get('distributed_optimizer')}; the optimizer state does not convert between the "
            "two: resume with the saved setting (TP, PP and DP may change), or start a new run from its exported "
            "model"
        )
    return None


def file_problems(path: str | Path) -> list[str]:
    """Problems with a checkpoint directory's files (empty when it is whole); reads file headers and sizes only."""
    root = Path(path)
    meta = read_meta(root)
    if meta.get("format") == LEGACY_FORMAT:
        import zipfile

        # torch.save writes a zip archive; one cut short has no central directory at its end (read in ms).
        return [
            f"{f.name} is not a complete torch file"
            for f in sorted(root.glob("*.pt"))
            if not zipfile.is_zipfile(f)
        ]
    return _distributed_file_problems(root)


def _distributed_file_problems(root: Path) -> list[str]:
    import pickle

    index = root / ".metadata"
    if not index.is_file() or not (root / "common.pt").is_file():
        return [f"{index.name if not index.is_file() else 'common.pt'} is missing"]
    try:
        with index.open("rb") as fh:
            storage = pickle.load(fh).storage_data  # torch.distributed.checkpoint's index of byte ranges
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as exc:
        return [f"{index.name} is unreadable ({type(exc).__name__})"]
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        file = root / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size < size:
            problems.append(f"{name} is cut short ({file.stat().st_size} of {size} bytes)")
    return problems


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
