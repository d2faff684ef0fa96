"""The platform seam: every vendor fact portable_rl uses, behind one interface.

Contract
--------
* A ``Platform`` subclass (in ``portable_rl.backends.<name>.platform``) declares facts as class attributes
  (device type, collective backend, visibility variables, kernel choices, image, ...) and answers typed
  questions through methods (fp8 dtype for an arch, peak FLOPs, env for a worker, local ordinal of a device).
* ``detect()`` picks the platform: ``PORTABLE_RL_PLATFORM=cpu|cuda|rocm`` if set, otherwise the first backend
  whose ``probe()`` finds devices (rocm, then cuda, then cpu). Probing reads the torch build tag and the vendor
  management library (amdsmi / NVML) or sysfs; it never creates a device context.
* Asking for a platform that is not available raises ``PlatformUnavailable`` with a one-line reason.
* Nothing here mutates the process. Side effects (env rewriting for workers, compat layers) happen only in
  ``prepare_process_env()`` / ``prepare_training_runtime()``, called explicitly by orchestration.
* Code outside ``backends/`` and this module never names a vendor; it asks the platform.
* ``trainer_kernels(requested)`` is the one answer to "which Megatron layer spec and core attention does the
  trainer use here": the model builder and ``doctor`` both call it. ``"auto"`` takes the first entry of the
  platform's ``trainer_attention_order`` that this process can run; an explicit choice it cannot run raises
  ``UnsupportedKernel`` (one line naming the value and the fix).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

from portable_rl.config.training import TRAINER_ATTENTION

PLATFORM_ENV = "PORTABLE_RL_PLATFORM"

# name -> "module:Class"; imported lazily so a CPU host never imports GPU-only code paths.
REGISTRY: dict[str, str] = {
    "cpu": "portable_rl.backends.cpu.platform:CpuPlatform",
    "cuda": "portable_rl.backends.cuda.platform:CudaPlatform",
    "rocm": "portable_rl.backends.rocm.platform:RocmPlatform",
}
# Auto-detection order: most specific torch build first; cpu always succeeds.
DETECTION_ORDER: tuple[str, ...] = ("rocm", "cuda", "cpu")


class PlatformUnavailable(RuntimeError):
    """The requested platform cannot run on this host; the message is one line and names the fix."""


class UnsupportedKernel(ValueError):
    """A kernel choice this platform cannot run; the message is one line and names the fix."""


@dataclass(frozen=True)
class TrainerKernels:
    """What the Megatron trainer builds with on this platform (``Platform.trainer_kernels``)."""

    attention: str  # "transformer_engine" | "sdpa" | "local"
    layer_spec: str  # Megatron layer spec: "transformer_engine" | "local"
    packed_sequences: bool  # whether packed (token-budget) micro-batches can run on this attention
    note: str


class VisibilityError(ValueError):
    """The device-visibility environment is contradictory or would be rejected by Ray."""


@dataclass(frozen=True)
class DeviceInfo:
    """One accelerator as the management library (not the runtime) reports it."""

    index: int  # physical index as the management library numbers it
    name: str
    arch: str | None = None  # "sm90", "gfx942", ...
    memory_bytes: int | None = None
    numa_node: int | None = None


@dataclass(frozen=True)
class KernelStatus:
    """Whether an optional kernel package is present, and what is used instead when it is not."""

    name: str
    available: bool
    note: str


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    devices: tuple[DeviceInfo, ...] = ()


@dataclass
class Platform:
    """Base class: declared facts (ClassVars) + typed capability methods. Instances carry probed devices."""

    name: ClassVar[str]
    torch_device_type: ClassVar[
        str
    ]  # what torch calls the device: "cpu", or "cuda" for NVIDIA and AMD builds
    dist_backend: ClassVar[str]  # torch.distributed backend name
    comm_library: ClassVar[str]  # what actually runs the collectives ("gloo", "NCCL", "RCCL")
    visible_devices_env: ClassVar[tuple[str, ...]]  # variables that mask devices, outermost first
    ray_resource: ClassVar[str | None]  # Ray resource a worker asks for per device (None: CPUs only)
    ray_noset_env: ClassVar[tuple[str, ...]]  # RAY_EXPERIMENTAL_NOSET_* we set so we own the masks
    comm_env_defaults: ClassVar[Mapping[str, str]]  # collective-library env applied to every worker
    runtime_env_defaults: ClassVar[Mapping[str, str]]  # other vendor env for workers and engines
    # "auto" picks the first runnable entry; explicit choices outside this tuple (except "local") are refused.
    trainer_attention_order: ClassVar[tuple[str, ...]] = ("sdpa",)
    default_train_dtype: ClassVar[str] = "float32"  # what train.dtype=auto means here
    sglang_attention_backend: ClassVar[str]  # SGLang --attention-backend
    sglang_device: ClassVar[str]  # SGLang --device
    supports_numa_affinity: ClassVar[bool]  # device_cpus() can name the CPUs close to a device
    ipc_handle_carries_device: ClassVar[bool]  # IPC handle embeds the exporter's device ordinal
    memory_saver_supported: ClassVar[bool]  # SGLang release/resume_memory_occupation works
    shared_tensor_transport: ClassVar[str]  # co-located weight hand-off: "shared_memory" | "cuda_ipc"
    default_fp8_dtype: ClassVar[str | None]
    # Cluster facts (templates and `portable-rl launch`); CPU-only hosts keep these base defaults.
    k8s_gpu_resource: ClassVar[str | None] = None  # Kubernetes extended resource of one device
    container_device_mounts: ClassVar[tuple[str, ...]] = ()  # host device paths a container needs mounted
    container_supplemental_groups: ClassVar[tuple[int, ...]] = ()  # GIDs that own those device files

    devices: tuple[DeviceInfo, ...] = ()
    reason: str = ""

    # ---- detection -------------------------------------------------------------------------------------
    @classmethod
    def probe(cls) -> ProbeResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- typed capabilities ----------------------------------------------------------------------------
    def fp8_dtype(self, arch: str | None = None) -> str | None:
        """torch dtype name for fp8 e4m3 on ``arch`` (default: first device), or None if unsupported."""
        return self.default_fp8_dtype

    def peak_flops(self, dtype: str = "bf16", arch: str | None = None) -> float | None:
        """Dense peak FLOP/s of one device for ``dtype`` (None when unknown), for MFU reporting."""
        return None

    def kernels(self) -> list[KernelStatus]:
        """Optional kernel packages and what happens when each is missing."""
        return []

    def attention_unavailable(self, name: str) -> str | None:
        """Why core attention ``name`` cannot run in this process (None: it can)."""
        if name in ("sdpa", "local"):
            return None  # torch primitives: every platform
        if name not in self.trainer_attention_order:
            return f"platform {self.name!r} does not offer it (offers: {', '.join(self.trainer_attention_order)})"
        return None

    def trainer_kernels(self, requested: str = "auto") -> TrainerKernels:
        """The layer spec and core attention the trainer uses for ``train.attention=requested``."""
        if requested not in TRAINER_ATTENTION:
            raise UnsupportedKernel(
                f"train.attention={requested!r} is not one of {', '.join(TRAINER_ATTENTION)}; use auto"
            )
        if requested == "auto":
            name = next(
                a for a in (*self.trainer_attention_order, "sdpa") if not self.attention_unavailable(a)
            )
        else:
            why = self.attention_unavailable(requested)
            if why:
                auto = self.trainer_kernels("auto").attention
                raise UnsupportedKernel(
                    f"train.attention={requested!r} cannot run here: {why}; use train.attention=auto "
                    f"(here: {auto}) or sdpa"
                )
            name = requested
        notes = {
            "transformer_engine": "TransformerEngine layer spec and fused attention",
            "sdpa": "Megatron local layer spec + torch scaled_dot_product_attention (memory linear in length)",
            "local": "Megatron local layer spec + unfused DotProductAttention (s x s scores; no packing)",
        }
        return TrainerKernels(
            attention=name,
            layer_spec="transformer_engine" if name == "transformer_engine" else "local",
            packed_sequences=name != "local",
            note=notes[name],
        )

    def resolve_visible_devices(self, env: Mapping[str, str] | None = None) -> list[int]:
        """Physical device indices visible to a process with ``env``; raises VisibilityError if contradictory."""
        return []

    def local_ordinal(self, physical_index: int, env: Mapping[str, str] | None = None) -> int:
        """The torch device ordinal under which ``physical_index`` appears in a process with ``env``."""
        visible = self.resolve_visible_devices(env)
        if physical_index not in visible:
            raise VisibilityError(
                f"device {physical_index} is not visible (visible: {visible}); "
                f"fix {'/'.join(self.visible_devices_env) or 'the device mask'}"
            )
        return visible.index(physical_index)

    def check_ray_compatible(self, env: Mapping[str, str] | None = None) -> None:
        """Raise VisibilityError naming the fix when Ray would refuse ``env`` (default os.environ).

        Called before every ``ray.init`` / ``ray start`` of the project, after ``prepare_process_env``: Ray's
        accelerator manager otherwise fails inside Ray with a message that does not say what to change.
        The base has no rule; backends whose Ray accelerator manager has one override it.
        """

    def device_cpus(self, physical_index: int) -> list[int] | None:
        """The CPUs close to device ``physical_index`` (its NUMA node), or None when the platform cannot tell.

        Only platforms with ``supports_numa_affinity`` answer; the orchestration pins a trainer rank to them.
        """
        return None

    def worker_env(self, physical_devices: list[int]) -> dict[str, str]:
        """Env a worker placed on ``physical_devices`` must start with (masks, NOSET flags, comm env)."""
        env = dict(self.comm_env_defaults)
        env.update(self.runtime_env_defaults)
        env.update({k: "1" for k in self.ray_noset_env})
        return env

    def compute_threads_env(self, threads: int) -> dict[str, str]:
        """Env giving a worker ``threads`` intra-op compute threads, where the platform computes on cores.

        Ray starts actors with a fractional CPU share at OMP_NUM_THREADS=1; GPU workers keep that (their
        compute is on the device), the CPU platform overrides it.
        """
        return {}

    def prepare_process_env(self, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
        """Normalise ``env`` (default os.environ) in place for this platform; return what changed."""
        target = os.environ if env is None else env
        changes: dict[str, str] = {}
        for key, value in {**self.comm_env_defaults, **self.runtime_env_defaults}.items():
            if key not in target:
                target[key] = value
                changes[key] = value
        return changes

    def network_env(self, ifname: str) -> dict[str, str]:
        """Env that pins this platform's collective libraries to network interface ``ifname`` (multi-node)."""
        return {"GLOO_SOCKET_IFNAME": ifname}

    def prepare_training_runtime(self) -> None:
        """Make the training stack (Megatron-core) runnable in this process. Idempotent."""

    def sglang_server_args(self) -> dict[str, Any]:
        """Default SGLang server arguments for this platform (user --sglang-* flags override them)."""
        return {"device": self.sglang_device, "attention_backend": self.sglang_attention_backend}

    def megatron_overrides(self) -> dict[str, Any]:
        """TransformerConfig fields this platform must set (user --megatron-* flags override them)."""
        return {}

    def optimizer_options(self) -> dict[str, Any]:
        """Options set on the param groups of the torch optimizer Megatron steps with (only keys the group
        already has; Megatron's TE/Apex fused Adam, used where installed, is left alone)."""
        return {}

    def image_ref(self, variant: str | None = None, version: str | None = None) -> str:
        """Container image reference for this platform (variant e.g. a GPU arch)."""
        from portable_rl.backends.versions import image_ref

        return image_ref(self.name, variant=variant, version=version)

    def torch_device(self, local_index: int = 0):
        """A torch.device for local device ``local_index`` (imports torch lazily)."""
        import torch

        if self.torch_device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.torch_device_type, local_index)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU)."""

    def ipc_export_device(self, device_index: int) -> int | str:
        """What a shared-tensor handle should carry for the exporter's device ``device_index``.

        Where ``ipc_handle_carries_device`` holds, GPU backends return a stable device id (the UUID, as SGLang's
        patched torch reductions do) so an importer with another device mask can map it; the base keeps the ordinal.
        """
        return device_index

    def ipc_import_device(self, carried: int | str) -> int:
        """The local device ordinal for a value produced by ``ipc_export_device`` in another process."""
        if isinstance(carried, int):
            return carried
        raise ValueError(
            f"platform {self.name!r} cannot map shared-tensor device id {carried!r} to a local device"
        )

    def describe(self) -> dict[str, Any]:
        """All declared facts and probed devices as plain data (for doctor and conformance reports)."""
        return {
            "name": self.name,
            "reason": self.reason,
            "torch_device_type": self.torch_device_type,
            "dist_backend": self.dist_backend,
            "comm_library": self.comm_library,
            "visible_devices_env": list(self.visible_devices_env),
            "ray_resource": self.ray_resource,
            "ray_noset_env": list(self.ray_noset_env),
            "comm_env_defaults": dict(self.comm_env_defaults),
            "runtime_env_defaults": dict(self.runtime_env_defaults),
            "trainer_kernels": self.trainer_kernels().__dict__,
            "default_train_dtype": self.default_train_dtype,
            "sglang_attention_backend": self.sglang_attention_backend,
            "sglang_device": self.sglang_device,
            "supports_numa_affinity": self.supports_numa_affinity,
            "ipc_handle_carries_device": self.ipc_handle_carries_device,
            "memory_saver_supported": self.memory_saver_supported,
            "shared_tensor_transport": self.shared_tensor_transport,
            "fp8_dtype": self.fp8_dtype(),
            "peak_flops_bf16": self.peak_flops("bf16"),
            "image": self.image_ref(),
            "k8s_gpu_resource": self.k8s_gpu_resource,
            "container_device_mounts": list(self.container_device_mounts),
            "container_supplemental_groups": list(self.container_supplemental_groups),
            "devices": [d.__dict__ for d in self.devices],
        }


def platform_class(name: str) -> type[Platform]:
    if name not in REGISTRY:
        raise PlatformUnavailable(
            f"unknown platform {name!r}; set {PLATFORM_ENV} to one of: {', '.join(REGISTRY)}"
        )
    module_name, cls_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def load(name: str) -> Platform:
    """Probe platform ``name`` and return it, or raise PlatformUnavailable with the probe's reason."""
    cls = platform_class(name)
    result = cls.probe()
    if not result.ok:
        raise PlatformUnavailable(f"platform {name!r} is not available on this host: {result.reason}")
    return cls(devices=result.devices, reason=result.reason)


def detect(env: Mapping[str, str] | None = None) -> Platform:
    """The platform for this process: the override if set, else the first available in DETECTION_ORDER."""
    env = os.environ if env is None else env
    requested = env.get(PLATFORM_ENV, "").strip().lower()
    if requested and requested != "auto":
        platform = load(requested)
        platform.reason = f"{PLATFORM_ENV}={requested}; {platform.reason}"
        return platform
    skipped: list[str] = []
    for name in DETECTION_ORDER:
        cls = platform_class(name)
        result = cls.probe()
        if result.ok:
            why = result.reason if not skipped else f"{result.reason} (skipped: {'; '.join(skipped)})"
            return cls(devices=result.devices, reason=why)
        skipped.append(f"{name}: {result.reason}")
    raise PlatformUnavailable("no platform available: " + "; ".join(skipped))  # pragma: no cover


_CURRENT: Platform | None = None


def current_platform() -> Platform:
    """Process-wide detected platform (cached; ``reset_current_platform()`` clears it for tests)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = detect()
    return _CURRENT


def reset_current_platform() -> None:
    global _CURRENT
    _CURRENT = None
