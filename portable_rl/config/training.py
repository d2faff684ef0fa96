"""Trainer configuration: Megatron parallelism and the optimizer (recipe section ``train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from portable_rl.config import refuse_non_finite

# Trainer core-attention choices (``train.attention``):
#   transformer_engine  Megatron's TE layer spec (fused kernels; packed sequences through TE's own attention)
#   sdpa                Megatron's local layer spec with portable_rl's torch scaled_dot_product_attention core
#                       attention (memory linear in the sequence; packed samples attend only to themselves)
#   local               Megatron's own unfused DotProductAttention (materialises the s x s scores; no packing)
TRAINER_ATTENTION = ("auto", "transformer_engine", "sdpa", "local")


def share_prompt_prefix_refusal(
    attention: str,
    pipeline_parallel: int,
    critic: bool,
    sequence_parallel: bool = False,
    position_embedding: str = "rope",
    moe: bool = False,
) -> str | None:
    """Why ``train.share_prompt_prefix`` cannot run with these settings (one line), or None.

    ``attention`` may be the requested ``train.attention`` ("auto" passes here: the trainer checks what it
    resolves to) or the resolved kernel. The shared layout's masks live in portable_rl's SDPA core attention;
    pipeline stages would need one row shape for every micro-batch and the critic's value head reads per-sample
    positions the shared row does not have. The model facts (sequence parallelism, Megatron's position
    embedding type, MoE) are known to the trainer only: positions come from plain RoPE's table, and a MoE
    router's load-balancing loss counts tokens, so counting a prompt once would change it.
    """
    if attention not in ("auto", "sdpa"):
        return (
            f"train.share_prompt_prefix needs train.attention=sdpa (its masks live in the SDPA core attention), "
            f"not {attention!r}; set train.attention: sdpa or turn share_prompt_prefix off"
        )
    if pipeline_parallel > 1:
        return (
            f"train.share_prompt_prefix does not support pipeline parallelism (pipeline_parallel="
            f"{pipeline_parallel}); turn one of them off"
        )
    if critic:
        return "train.share_prompt_prefix does not support a critic (algo gae); turn share_prompt_prefix off"
    if sequence_parallel:
        return "train.share_prompt_prefix does not support sequence parallelism; turn one of them off"
    if position_embedding != "rope":
        return f"train.share_prompt_prefix needs plain rotary position embeddings; this model has {position_embedding!r}"
    if moe:
        return "train.share_prompt_prefix does not support MoE models (it would change the router's balance loss)"
    return None


@dataclass
class ParallelConfig:
    """Megatron parallelism of the trainer (recipe ``train.parallel``).

    tensor_parallel:        tensor-parallel size
    pipeline_parallel:      pipeline-parallel size
    expert_parallel:        expert-parallel size of a MoE model: each of these ranks holds num_experts /
                            expert_parallel of the experts and tokens travel to them (all-to-all). The
                            ranks are data-parallel ranks (as in Megatron), so it must divide
                            train.data_parallel and the model's num_experts
    distributed_optimizer:  shard optimizer state across data-parallel ranks
    collective_timeout_s:   timeout of every trainer collective (world and Megatron groups)
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    distributed_optimizer: bool = False
    collective_timeout_s: float = 1800.0  # every trainer collective (world and Megatron groups)

    def __post_init__(self) -> None:
        refuse_non_finite(self, "train.parallel.")
        for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        t = self.collective_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"collective_timeout_s={t!r} must be a positive number of seconds")


@dataclass
class OptimConfig:
    """Adam optimizer and learning-rate schedule of the trainer (recipe ``train.optim``).

    lr:                   peak learning rate
    weight_decay:         decoupled weight decay
    adam_beta1 / adam_beta2 / adam_eps: Adam's coefficients
    clip_grad:            global gradient-norm clip (0 disables clipping)
    warmup_steps:         linear warm-up steps to ``lr``
    """

    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        refuse_non_finite(self, "train.optim.")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")

    def lr_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr


@dataclass
class CriticConfig:
    """PPO's value model (recipe ``train.critic``), built and trained only with ``algo.advantage_estimator: gae``.

    path:   HF checkpoint of the critic's trunk; unset (default) = the actor's model. Its vocabulary and hidden
            size must equal the actor's (refused before the run starts otherwise). The critic runs on the
            trainer's ranks with the trainer's layout (``train.parallel``, ``train.data_parallel``), micro-batches
            and dtype; its output layer is a scalar value head initialised to zero (see
            ``portable_rl.training.critic``).
    optim:  the critic's own optimizer (``OptimConfig`` fields: ``lr``, ``weight_decay``, Adam's coefficients,
            ``clip_grad``, ``warmup_steps``), independent of ``train.optim``
    """

    path: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.path is not None and (
            not isinstance(self.path, str) or not (Path(self.path) / "config.json").is_file()
        ):
            raise ValueError(
                f"train.critic.path={self.path!r} is not a HF checkpoint directory (no config.json); point it at "
                "one, or leave it unset for the actor's model"
            )
