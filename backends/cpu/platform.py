"""CPU platform: the embedded default. gloo collectives, torch SDPA (also the trainer's core attention), Megatron via the CPU compat layer.

Always available. Megatron-core is made to run on a CPU-only torch by ``megatron_compat`` (installed by
``prepare_training_runtime``); the rollout default is portable_rl's own torch engine server, and the real
SGLang server runs with ``--device cpu --attention-backend torch_native``.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from portable_rl.platform import KernelStatus, Platform, ProbeResult


class CpuPlatform(Platform):
    name: ClassVar[str] = "cpu"
    torch_device_type: ClassVar[str] = "cpu"
    dist_backend: ClassVar[str] = "gloo"
    comm_library: ClassVar[str] = "gloo"
    visible_devices_env: ClassVar[tuple[str, ...]] = ()
    ray_resource: ClassVar[str | None] = None
    ray_noset_env: ClassVar[tuple[str, ...]] = ()
    comm_env_defaults: ClassVar[dict[str, str]] = {}
    runtime_env_defaults: ClassVar[dict[str, str]] = {"TOKENIZERS_PARALLELISM": "false"}
    # TransformerEngine is GPU-only; torch's SDPA has fused CPU kernels (flash-style, memory linear in length).
    trainer_attention_order: ClassVar[tuple[str, ...]] = ("sdpa",)
    sglang_attention_backend: ClassVar[str] = "torch_native"
    sglang_device: ClassVar[str] = "cpu"
    supports_numa_affinity: ClassVar[bool] = False
    ipc_handle_carries_device: ClassVar[bool] = False
    memory_saver_supported: ClassVar[bool] = False
    shared_tensor_transport: ClassVar[str] = "shared_memory"
    default_fp8_dtype: ClassVar[str | None] = None

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(ok=True, reason=f"CPU fallback ({os.cpu_count()} cores)")

    def kernels(self) -> list[KernelStatus]:
        return [
            KernelStatus("torch SDPA", True, "attention in the CPU engine and HF reference"),
            KernelStatus(
                "megatron local spec",
                True,
                "TransformerEngine is GPU-only; the trainer uses Megatron's local spec + torch SDPA",
            ),
        ]

    def prepare_training_runtime(self) -> None:
        from portable_rl.backends.cpu import megatron_compat

        megatron_compat.install()

    def sglang_server_args(self) -> dict[str, Any]:
        args = super().sglang_server_args()
        # The CPU SGLang path needs fp32 and the pure-torch sampler; grammar backends pull GPU kernels.
        args.update({"sampling_backend": "pytorch", "dtype": "float32", "grammar_backend": "none"})
        return args

    def compute_threads_env(self, threads: int) -> dict[str, str]:
        # torch sizes its intra-op pool from OMP_NUM_THREADS at import; Ray's default of 1 for a fractional
        # CPU share would leave every other core idle while the trainer or an engine computes.
        return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def megatron_overrides(self) -> dict[str, Any]:
        # No precision flags here: train.dtype decides (bf16 runs on CPU through the compat layer too).
        return {"use_cpu_initialization": True, "gradient_accumulation_fusion": False}

    def optimizer_options(self) -> dict[str, Any]:
        # Without TE/Apex Megatron steps with torch's AdamW, which on CPU tensors defaults to one loop per
        # tensor. torch's fused CPU kernel makes one pass over each tensor (Adam is memory-bound: SmolLM2-135M's
        # step 0.60 s with the multi-tensor path, 0.14 s fused). Its arithmetic order differs from the loop's,
        # so parameters and moments may differ in the last bit (float rounding, as a different matmul blocking
        # would); tests/unit/test_training_updates.py bounds the difference.
        return {"fused": True}
