"""Tensors passed by reference for /update_weights_from_tensor (co-located trainer and engine).

Wire format (SGLang's): ``serialized_named_tensors`` is a list with one base64 string per engine TP rank, each a
``ForkingPickler`` pickle (torch.multiprocessing reductions) of either
  * a list of (name, tensor) pairs (``load_format`` None), or
  * ``{"flattened_tensor": uint8 tensor, "metadata": [SimpleNamespace(name, shape, dtype, start_idx, end_idx,
    numel)]}`` (``load_format="flattened_bucket"``; byte offsets as in ``buckets.flatten``).
The pickle carries handles, not data:
  * ``shared_memory`` transport (CPU): storages are exported with torch's ``file_system`` sharing strategy, i.e.
    named shared-memory segments that an unrelated process can open by name (the default ``file_descriptor``
    strategy needs a fork-inherited authkey, so it only works between a parent and its children);
  * ``cuda_ipc`` transport (GPUs): CUDA/HIP IPC handles. Where the handle embeds the exporter's device ordinal
    (``ipc_handle_carries_device``), ``platform.ipc_export_device`` replaces it by a stable id and the importer
    maps it back with ``platform.ipc_import_device`` (SGLang's patched reductions accept the same form).
The exporter must keep the tensors alive until the engine has answered; the engine copies them into its weights.
Each payload may be opened exactly once: pickling takes one reference on the shared memory (or IPC ref counter)
and unpickling gives one back, so a payload opened by two importers frees the segment under its exporter (a
third importer then finds no segment). Serialize once per importer: per engine and per TP rank.

``deserialize_tensors`` is the importer: an allow-list unpickler (only torch rebuild functions, storages, dtypes
and plain containers), because the payload arrives over HTTP.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import pickle
import types
from collections.abc import Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing as torch_mp
from torch.multiprocessing import reductions

from portable_rl.platform import Platform, current_platform
from portable_rl.protocol.buckets import NamedTensor, TensorMeta

_DEVICE_ARG = 6  # position of the storage device in the argument tuple of torch's GPU tensor rebuild function


@contextlib.contextmanager
def _sharing_strategy(platform: Platform) -> Iterator[None]:
    if platform.shared_tensor_transport != "shared_memory":
        yield
        return
    previous = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(previous)


class _HandlePickler(ForkingPickler):
    """ForkingPickler whose tensor reducer rewrites the device a GPU handle carries (no global patching)."""

    def __init__(self, file: io.BytesIO, platform: Platform) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        if not platform.ipc_handle_carries_device:
            return

        def reduce(tensor: torch.Tensor) -> tuple[Any, tuple]:
            rebuild, args = reductions.reduce_tensor(tensor)
            if rebuild is reductions.rebuild_cuda_tensor:
                args = (
                    *args[:_DEVICE_ARG],
                    platform.ipc_export_device(args[_DEVICE_ARG]),
                    *args[_DEVICE_ARG + 1 :],
                )
            return rebuild, args

        for cls, reducer in list(self.dispatch_table.items()):
            if reducer is reductions.reduce_tensor:
                self.dispatch_table[cls] = reduce


def share_memory_buffer(nbytes: int, device: torch.device, platform: Platform | None = None) -> torch.Tensor:
    """An uninitialised flat uint8 buffer another process can map (on CPU: a named shared-memory segment)."""
    platform = platform or current_platform()
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if buf.device.type == "cpu":
        with _sharing_strategy(platform):
            buf.share_memory_()
    return buf


def serialize_tensors(obj: Any, platform: Platform | None = None) -> str:
    """Base64 ForkingPickler payload of ``obj`` (tensors by handle) as /update_weights_from_tensor expects."""
    platform = platform or current_platform()
    buf = io.BytesIO()
    with _sharing_strategy(platform):
        _HandlePickler(buf, platform).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def flattened_payload(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> dict[str, Any]:
    """The object SGLang unpickles for load_format="flattened_bucket"."""
    return {
        "flattened_tensor": flat,
        "metadata": [
            types.SimpleNamespace(
                name=m.name,
                shape=torch.Size(m.shape),
                dtype=m.dtype,
                start_idx=m.start_idx,
                end_idx=m.end_idx,
                numel=m.numel,
            )
            for m in metas
        ],
    }


# ---- importer ---------------------------------------------------------------------------------------------

_ALLOWED: dict[str, set[str]] = {
    "builtins": {
        "bool",
        "bytes",
        "bytearray",
        "dict",
        "float",
        "frozenset",
        "int",
        "list",
        "set",
        "slice",
        "str",
        "tuple",
    },
    "collections": {"OrderedDict"},
    "copyreg": {"__newobj__", "__newobj_ex__", "_reconstructor"},
    "types": {"SimpleNamespace"},
    "torch": {"Size", "device", "dtype", "Tensor", "UntypedStorage", "TypedStorage"},
    "torch.storage": {"UntypedStorage", "TypedStorage", "_UntypedStorage"},
    "torch.nn.parameter": {"Parameter"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.multiprocessing.reductions": {
        "rebuild_tensor",
        "rebuild_storage_filename",
        "rebuild_storage_fd",
        "rebuild_storage_empty",
        "rebuild_typed_storage",
        "rebuild_typed_storage_child",
        "rebuild_meta_tensor",
    },
    "multiprocessing.resource_sharer": {"DupFd"},
}
# GPU handles: torch's own rebuild function, and the name SGLang's patched reductions pickle.
_GPU_REBUILD = {
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),
}


class _HandleUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, platform: Platform) -> None:
        super().__init__(file)
        self._platform = platform

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GPU_REBUILD:
            platform = self._platform

            def rebuild(*args: Any) -> torch.Tensor:
                args = (
                    *args[:_DEVICE_ARG],
                    platform.ipc_import_device(args[_DEVICE_ARG]),
                    *args[_DEVICE_ARG + 1 :],
                )
                return reductions.rebuild_cuda_tensor(*args)

            return rebuild
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"shared-tensor payload references {module}.{name}, which is not a tensor rebuild function; refused"
        )


def deserialize_tensors(payload: str | bytes, platform: Platform | None = None) -> Any:
    """Inverse of ``serialize_tensors``: open the handles in this process (the result shares the exporter's memory)."""
    platform = platform or current_platform()
    if isinstance(payload, str):
        try:
            payload = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"serialized_named_tensors entry is not valid base64: {exc}") from exc
    return _HandleUnpickler(io.BytesIO(payload), platform).load()


def named_tensors_from_payload(obj: Any, load_format: str | None) -> list[NamedTensor]:
    """(name, tensor) pairs from an unpickled payload in either of the two formats above."""
    if load_format == "flattened_bucket":
        if not isinstance(obj, dict) or "flattened_tensor" not in obj or "metadata" not in obj:
            raise ValueError(
                "load_format='flattened_bucket' needs a dict with 'flattened_tensor' and 'metadata'"
            )
        flat = obj["flattened_tensor"]
        return [
            (m.name, flat[m.start_idx : m.end_idx].view(m.dtype).reshape(tuple(m.shape)))
            for m in obj["metadata"]
        ]
    if load_format not in (None, "direct"):
        raise ValueError(f"unsupported load_format={load_format!r}; use None or 'flattened_bucket'")
    items = list(obj.items()) if isinstance(obj, dict) else list(obj)
    out: list[NamedTensor] = []
    for item in items:
        name, tensor = item
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"payload entry {item!r:.80} is not a (name, tensor) pair")
        out.append((name, tensor))
    return out
