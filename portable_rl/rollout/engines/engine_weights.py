"""Weight reads and writes of the CPU engine's HF model, by HF parameter name.

Every function runs on the engine thread (no forward pass is in flight while weights change):
  * ``load_named_tensors(model, pairs)``: copy (name, tensor) pairs into the model's parameters/buffers,
    casting to the model's dtype; an unknown name or a shape mismatch raises ``ValueError`` naming it, and
    nothing is copied unless every pair is valid (an engine never serves half an update from one request);
  * ``read_checkpoint_dir(path)``: every tensor of a HF safetensors directory (what /update_weights_from_disk
    loads); ``receive_distributed(model, group, ...)``: the tensors one /update_weights_from_distributed
    request announces, received from rank 0 of the weight-update group and loaded: one broadcast per tensor,
    straight into the served parameter when its dtype matches (no staging copy), or one flat uint8 broadcast
    for ``load_format="flattened_bucket"`` (the layout of ``portable_rl.protocol.buckets``) into a receive
    buffer the caller keeps between requests (a fresh one per bucket pays first-touch page faults on every
    byte), then copied into the parameters. Names and shapes are checked before anything is received. A
    transfer that fails midway may leave some parameters updated; the request then fails, the engine's
    weight version stays the old one and the sender's group is unusable (its next sync pushes every weight);
  * ``checksums`` / ``weight_by_name``: read-back for bit-exact verification.

Names are the checkpoint's (what SGLang loads). transformers 5 keeps a MoE layer's experts fused in memory
(``mlp.experts.gate_up_proj`` [experts, 2 x width, hidden] with gate rows first, ``mlp.experts.down_proj``
[experts, hidden, width]) while checkpoints and the trainer name each expert
(``mlp.experts.{j}.gate_proj.weight``, ``up_proj``, ``down_proj``): ``named_state`` adds those per-expert names
as views of the fused parameters, so loads write into them and checksums read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from portable_rl.protocol.buckets import (
    NamedTensor,
    Staging,
    TensorMeta,
    metas_from_lists,
    unflatten,
)
from portable_rl.protocol.checksum import tensor_checksum
from portable_rl.protocol.process_group import WeightUpdateGroup


def named_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, tied weights under every name they are reachable by."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = p
    for name, b in model.named_buffers(remove_duplicate=False):
        out.setdefault(name, b)
    out.update(_per_expert_views(out))
    return out


def _per_expert_views(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    views: dict[str, torch.Tensor] = {}
    for name, fused in state.items():
        if not name.endswith(".experts.gate_up_proj") or fused.dim() != 3:
            continue
        prefix = name.removesuffix("gate_up_proj")
        down = state.get(prefix + "down_proj")
        width = fused.shape[1] // 2
        for j in range(fused.shape[0]):
            views[f"{prefix}{j}.gate_proj.weight"] = fused[j, :width]
            views[f"{prefix}{j}.up_proj.weight"] = fused[j, width:]
            if down is not None and down.dim() == 3:
                views[f"{prefix}{j}.down_proj.weight"] = down[j]
    return views


def load_named_tensors(model: torch.nn.Module, pairs: Iterable[NamedTensor]) -> int:
    targets = named_state(model)
    checked: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, tensor in pairs:
        checked.append((_target(targets, name, tensor.shape), tensor))
    with torch.no_grad():
        for target, tensor in checked:
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return len(checked)


def read_checkpoint_dir(path: str | Path) -> list[NamedTensor]:
    from safetensors.torch import load_file

    root = Path(path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        raise ValueError(
            f"model_path {str(path)!r} has no *.safetensors files; pass a HF checkpoint directory"
        )
    pairs: list[NamedTensor] = []
    for f in files:
        pairs.extend(load_file(str(f)).items())
    return pairs


def _target(targets: dict[str, torch.Tensor], name: str, shape: Sequence[int]) -> torch.Tensor:
    """The served model's tensor ``name``, refused unless it exists with ``shape``."""
    target = targets.get(name)
    if target is None:
        raise ValueError(f"weight {name!r} is not a parameter of the served model; send HF parameter names")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(
            f"weight {name!r} has shape {tuple(shape)}, the served model expects {tuple(target.shape)}"
        )
    return target


def _checked_targets(model: torch.nn.Module, metas: Sequence[TensorMeta]) -> list[torch.Tensor]:
    targets = named_state(model)
    return [_target(targets, m.name, m.shape) for m in metas]


def receive_distributed(
    model: torch.nn.Module,
    group: WeightUpdateGroup,
    names: Sequence[str],
    dtypes: Sequence[str],
    shapes: Sequence[Sequence[int]],
    load_format: str | None,
    staging: Staging,
) -> int:
    """Receive one announced bucket from rank 0 and load it into ``model``; returns the number of tensors."""
    if load_format not in (None, "direct", "flattened_bucket"):
        raise ValueError(f"unsupported load_format={load_format!r}; use null or 'flattened_bucket'")
    metas = metas_from_lists(names, dtypes, shapes)
    targets = _checked_targets(model, metas)
    with torch.no_grad():
        if load_format == "flattened_bucket":
            flat = staging.get(metas[-1].end_idx if metas else 0, torch.device("cpu"))
            group.broadcast(flat, what=f"bucket receive ({flat.numel()} bytes, {len(metas)} tensors)")
            for target, (_, tensor) in zip(targets, unflatten(flat, metas), strict=True):
                target.copy_(tensor)
            return len(metas)
        for m, target in zip(metas, targets, strict=True):
            direct = target.dtype == m.dtype and target.is_contiguous() and target.device.type == "cpu"
            buf = target.detach() if direct else torch.empty(m.shape, dtype=m.dtype)
            group.broadcast(buf, what=f"receive of {m.name!r}")
            if not direct:
                target.copy_(buf)
    return len(metas)


def checksums(model: torch.nn.Module, names: Sequence[str] | None) -> dict[str, str | None]:
    state = named_state(model)
    wanted = list(state) if names is None else list(names)
    return {n: (tensor_checksum(state[n]) if n in state else None) for n in wanted}


def weight_by_name(model: torch.nn.Module, name: str, truncate_size: int) -> list | None:
    tensor = named_state(model).get(name)
    if tensor is None:
        return None
    return tensor.detach().float()[: max(1, truncate_size)].tolist()
