"""Run megatron-core on a CPU-only torch build.

Megatron-core assumes a CUDA device: it calls ``torch.cuda.current_device()`` to place buffers, creates tensors
with ``device="cuda"``, keeps its RNG tracker in CUDA generator states, and asserts parameter types such as
``torch.cuda.FloatTensor``. On a CPU-only torch every one of those raises. This module makes the same Megatron
code paths run on the CPU, unchanged:

* the handful of ``torch.cuda`` functions Megatron calls on its training path (current_device, synchronize,
  RNG state, streams, events, memory queries, empty_cache) are replaced by CPU equivalents or no-ops;
* a ``torch.overrides.TorchFunctionMode`` rewrites any accelerator device argument (``"cuda"``, ``"cuda:0"``,
  an integer ordinal, ``torch.device("cuda", i)``) in factory functions and ``Tensor.to/.cuda/.new_*`` to the
  CPU, and reports ``torch.cuda.*Tensor`` from ``Tensor.type()`` so Megatron's dtype checks pass;
* Megatron's RNG-tracker helpers read and write the CPU generator, so ``get_cuda_rng_tracker().fork()`` keeps
  its per-rank seeding semantics;
* ``torch.distributed.all_to_all_single`` gets its split sizes as lists: the MoE token dispatcher moves them to
  the host only from a CUDA tensor (``is_cuda``), so on the CPU they arrive as tensors, which the process
  group's binding refuses; and the backward of Megatron's all-to-all (which allocates on
  ``torch.cuda.current_device()``) runs under the device mode too: the autograd engine calls a custom
  Function's backward without the thread's torch-function modes;
* gradient clipping scales the gradients with torch's in-place multi-tensor multiply: without TE or Apex,
  Megatron falls back to allocating ``grad * scale`` and copying it back tensor by tensor, which cost ~0.18 s
  of a SmolLM2-135M step on 2 cores (the multiply is the same, so the gradients are bit-identical).

Contract
--------
``install()`` is idempotent and thread-aware (the mode is pushed once per thread that calls it; process-wide
patches happen once). It does nothing on a torch build with an accelerator, and raises
``MegatronVersionError`` when the installed megatron-core is not the pinned version
(``versions.COMMON["megatron-core"]``): the patches target that release and must be re-verified on upgrade.
The version is checked once per process, before the patches (later calls find them applied).
``installed()`` reports whether the calling thread runs under the compat mode. Only the CPU platform's
``prepare_training_runtime()`` calls this module.
"""

from __future__ import annotations

import contextlib
import threading
from importlib import metadata

import torch
from torch.overrides import TorchFunctionMode

from portable_rl.backends.versions import COMMON


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not the release this compat layer was verified against."""


_LOCK = threading.Lock()
_PATCHED = False
_THREAD = threading.local()

# Tensor.type() names Megatron compares against (optimizer.py, distrib_optimizer.py, clip_grads.py).
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}
_CPU = torch.device("cpu")


def _is_accelerator(device) -> bool:
    if device is None:
        return False
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare ordinal means an accelerator; a CPU-only build has none
    if isinstance(device, str):
        return not device.startswith(("cpu", "meta"))
    if isinstance(device, torch.device):
        return device.type not in ("cpu", "meta")
    return False


def _tensor_to_args(args: tuple) -> tuple:
    # Tensor.to(device, dtype=None, non_blocking=False, copy=False) or Tensor.to(dtype) or Tensor.to(other)
    if len(args) > 1 and _is_accelerator(args[1]):
        return (args[0], _CPU, *args[2:])
    return args


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites accelerator device arguments to the CPU; answers Tensor.type() with CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_accelerator(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to:
            args = _tensor_to_args(args)
        elif func is torch.Tensor.cuda:
            return args[0]
        elif func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        elif func is torch.Tensor.pin_memory:
            return args[0]  # no pinned memory without an accelerator driver; a plain CPU tensor does
        elif func is torch.distributed.all_to_all_single:
            kwargs = {k: _as_int_list(v) if k.endswith("split_sizes") else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _as_int_list(sizes):
    if isinstance(sizes, torch.Tensor):
        return [int(x) for x in sizes.tolist()]
    return sizes


class _NullStream:
    """Stands in for torch.cuda.Stream / current_stream(): CPU work is already ordered."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _NullEvent:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _null_stream_ctx(stream=None):
    return contextlib.nullcontext()


def _cpu_rng_get(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _check_version() -> str:
    pinned = COMMON["megatron-core"]
    try:
        found = metadata.version("megatron-core")
    except metadata.PackageNotFoundError as exc:
        raise MegatronVersionError(
            f"megatron-core is not installed; install megatron-core=={pinned}"
        ) from exc
    if found != pinned:
        raise MegatronVersionError(
            f"megatron-core {found} is installed but the CPU compat layer is verified for {pinned}; "
            f"install megatron-core=={pinned} (or re-verify backends/cpu/megatron_compat.py and bump the pin)"
        )
    return found


def needed() -> bool:
    """True on a CPU-only torch build (the only case where the layer does anything)."""
    return not torch.backends.cuda.is_built() and not torch.cuda.is_available()


def _patch_process() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so only the single-device seed is redirected.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = _null_stream_ctx

    # Megatron's tracker copies the "device" generator in and out around fork(); on CPU that generator is
    # the CPU default generator, so forked regions (dropout, init) still get per-TP-rank streams.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_rng_get
    mp_random._set_cuda_rng_state = _cpu_rng_set

    from megatron.core.tensor_parallel import mappings

    all_to_all_backward = mappings._AllToAll.backward

    def backward_on_cpu(ctx, *grad_output):
        with _CpuDeviceMode():
            return all_to_all_backward(ctx, *grad_output)

    mappings._AllToAll.backward = staticmethod(backward_on_cpu)

    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.multi_tensor_scale_impl is mcore_utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _multi_tensor_scale


def _multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale) -> None:
    """Megatron's ``multi_tensor_scale`` signature: ``dst[i] = src[i] * scale`` for the lists' tensors."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)  # clipping scales the gradients in place
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install() -> bool:
    """Make megatron-core runnable in this process (CPU-only torch); return whether the layer is active."""
    global _PATCHED
    if not needed():
        return False
    with _LOCK:
        if not _PATCHED:
            # Once per process, with the patches it guards: reading the package metadata costs ~1 ms, and the
            # trainer calls this before every step, log-prob pass and weight export.
            _check_version()
            _patch_process()
            _PATCHED = True
    if getattr(_THREAD, "mode", None) is None:
        mode = _CpuDeviceMode()
        mode.__enter__()  # stays on this thread's mode stack for the life of the thread
        _THREAD.mode = mode
    return True


def installed() -> bool:
    """Whether the calling thread runs under the compat mode."""
    return getattr(_THREAD, "mode", None) is not None
