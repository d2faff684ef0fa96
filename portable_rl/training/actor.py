"""The Megatron training actor: one per rank, driven by the orchestration (as a Ray actor or in-process).

Public interface
----------------
``ActorConfig`` (with ``ParallelConfig`` and ``OptimConfig``) — typed, validated in ``__post_init__``.

``MegatronActor(config, rank, world_size, master_addr, master_port, local_device=0)``
    Prepares the platform's training runtime, joins ``torch.distributed`` with
    ``current_platform().dist_backend``, initialises Megatron ``parallel_state`` (TP x PP x DP with
    DP = world_size / (TP * PP); a MoE model's experts split over ``parallel.expert_parallel`` of the DP ranks),
    builds this rank's GPTModel stage from ``config.hf_checkpoint``, loads the HF
    weights, and wraps it in Megatron DDP + the Megatron optimizer. With ``config.ref_checkpoint`` set, a frozen
    reference model with the same layout is built too. Every method below is collective: call it on every rank
    with the same arguments (Ray: ``ray.get([a.method.remote(...) for a in actors])``).

``train_step(batch: TrainBatch, loss_fn, mini_batches=1, epochs=1) -> dict[str, float]``
    One training step on ``batch``: ``epochs`` passes, each cutting ``batch`` into ``mini_batches`` consecutive
    mini-batches (``updates.split_mini_batches``) with one optimizer step per mini-batch (default: one optimizer
    step over the whole batch); ``step`` advances by one and the learning rate is ``lr_at(step)`` for all of its
    optimizer steps. The metrics of several optimizer steps are their means (``updates.mean_over_updates``,
    plus ``optimizer_steps``). Per optimizer step: each DP rank takes its contiguous shard; the shard is cut into
    micro-batches of ``micro_batch_size`` samples, all padded to one sequence length, or, with
    ``max_tokens_per_micro_batch`` set, packed: consecutive samples laid end to end without padding up to that
    many tokens (``TrainBatch.pack``; a longer sample gets a micro-batch of its own), attention kept inside each
    sample and positions restarting per sample. With ``share_prompt_prefix`` each micro-batch, cut as without
    sharing, is one row where samples with identical prompts share one copy of it
    (``batch.shared_micro_batches``; a forward hook gives the rotary embedding each token's own position). With
    pipeline parallelism every packed micro-batch of a step is padded to the step's longest (Megatron's
    pipeline sends one tensor shape). For every micro-batch
    ``loss_fn(logprobs, entropy, mb) -> (loss, metrics)`` is called, where ``logprobs``/``entropy`` are
    ``[b, L]`` over response tokens (differentiable) and ``mb`` is ``MicroBatch.as_loss_batch()`` plus
    ``global_num_samples`` and ``global_num_tokens`` (whole batch, all DP ranks). With
    ``loss_scaling="sample_share"`` (default) ``loss`` is a mean over its micro-batch and the actor weights
    micro-batches by sample count, so the step minimises the sample-weighted mean over the batch whatever the
    micro-batch size. With ``loss_scaling="global_sum"`` ``loss`` is the micro-batch's contribution to a global
    sum (e.g. ``(l * mask).sum() / mb["global_num_tokens"]``) and is used as is. Returned metrics (identical on
    all ranks): ``loss``, ``grad_norm``, ``lr``, ``entropy`` (token mean), ``logp_abs_diff`` (mean
    |logp_train - rollout_logprobs| when the batch has ``rollout_logprobs``), ``num_samples``, ``num_tokens``,
    ``step``, for a MoE model ``moe_aux_loss`` (the router load-balancing loss, Megatron's definition without its
    coefficient, mean over MoE layers and micro-batches, averaged over data-parallel ranks) and every key of
    ``loss_fn``'s metrics, averaged over micro-batches by sample count (so report
    per-micro-batch means such as ``kl`` or ``clip_fraction``; a key that clashes with one of the actor's
    becomes ``loss_fn/<key>``). ``loss`` is always the objective actually minimised.
    ``mb`` keys: ``loss_mask`` [b, L], ``response_lengths`` [b], every token field [b, L] (``advantages``,
    ``old_logprobs``, ``ref_logprobs``, ``rollout_logprobs``, ...), every sample field [b] (``rewards``, ...),
    ``global_num_samples``, ``global_num_tokens``. ``portable_rl.algo``'s losses take the global counts
    (``global_tokens=mb["global_num_tokens"], global_seqs=mb["global_num_samples"]``): use them with
    ``loss_scaling="global_sum"``.

``forward_backward(batch, loss_fn)``
    The gradient half of ``train_step`` (no optimizer step), for benchmarks and gradient checks.

Critic (PPO): with ``config.critic_checkpoint`` set, ``self.critic`` is a ``critic.ValueModel`` on the same ranks
and layout: a second GPTModel with a scalar value head, its own DDP and optimizer (``config.critic_optim``),
saved under ``<checkpoint>/critic`` by ``save_checkpoint`` and restored by ``load_checkpoint``.

``compute_logprobs(batch, model="policy" | "ref") -> list[list[float]]``
    Forward only; per-sample log-probs of the response tokens (at ``config.temperature``), on every rank.

``save_checkpoint(path) / load_checkpoint(path) -> int``
    Model + optimizer + RNG + step (see ``checkpoint.py``), in Megatron's distributed checkpoint format: a
    checkpoint saved on one TP/PP/DP layout loads on another. Load returns the restored step.

``export_hf(path, dtype=None) -> str``
    Writes a HF checkpoint (safetensors + the source config/tokenizer) from rank 0; returns the path. The
    tensors are the master weights cast to ``dtype`` (default: the training dtype); a dtype wider than the
    training dtype (fp32 from a bf16 trainer) reads the optimizer's fp32 masters themselves.

``named_hf_weights(all_stages=True) -> Iterator[(hf_name, full_tensor)]``
    For weight sync inside the actor process; collective over TP (and PP when ``all_stages``). Use it on the
    rank(s) where ``is_weight_source`` is true; the other ranks must still iterate it to take part.

Kernels and precision: ``config.attention`` goes through ``Platform.trainer_kernels`` (the answer ``doctor``
prints) and picks the layer spec and core attention. ``config.dtype`` ("auto" = the platform's
``default_train_dtype``) is the compute and parameter dtype; in bf16 Megatron's mixed-precision optimizer keeps
fp32 master weights and copies them, cast to bf16, into the parameters after every step, so the weights this
actor exports or sends (its parameters) are the master weights cast to the training dtype.

Collectives: the world group and Megatron's groups time out after ``parallel.collective_timeout_s``; a
collective that times out or loses a peer inside one of the methods above raises ``CollectiveTimeout`` naming
the trainer world, this rank and the ranks it waited for.

``remote_class(**ray_options)`` returns ``ray.remote(**ray_options)(MegatronActor)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from portable_rl.config.training import (
    TRAINER_ATTENTION,
    OptimConfig,
    ParallelConfig,
    share_prompt_prefix_refusal,
)
from portable_rl.distributed import collective_errors
from portable_rl.platform import current_platform
from portable_rl.training.batch import (
    MicroBatch,
    TrainBatch,
    shared_micro_batches,
    to_micro_batch,
    to_packed_micro_batch,
)
from portable_rl.training.checkpoint import (
    CheckpointError,
    Layout,
    iter_hf_weights,
    load_checkpoint,
    save_checkpoint,
)
from portable_rl.training.convert import HFWeights, load_hf_into_model, save_hf_checkpoint
from portable_rl.training.critic import ValueModel
from portable_rl.training.logprobs import (
    response_positions,
    response_view,
    token_logprobs_and_entropy,
)
from portable_rl.training.model_builder import (
    ModelSpec,
    build_gpt_model,
    check_parallel_layout,
    local_layer_range,
    transformer_config,
)
from portable_rl.training.updates import (
    mean_over_updates,
    optimizer_step,
    set_lr,
    set_optimizer_options,
    split_mini_batches,
)

# Metrics train_step computes itself; loss_fn metrics with these names are reported as "loss_fn/<name>".
_ACTOR_METRICS = frozenset(
    {
        "loss",
        "grad_norm",
        "lr",
        "entropy",
        "logp_abs_diff",
        "num_samples",
        "num_tokens",
        "step",
        "moe_aux_loss",
    }
)
LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ActorConfig:
    hf_checkpoint: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_size: int = 1
    temperature: float = 1.0
    seed: int = 1234
    dtype: str = "auto"  # "float32" | "bfloat16" | "auto" (the platform's default_train_dtype)
    ref_checkpoint: str | None = None
    loss_scaling: str = "sample_share"  # or "global_sum"
    seq_length_multiple: int = 8  # pad sequences to a multiple (one shape per step; PP needs one anyway)
    megatron_overrides: dict[str, Any] = field(default_factory=dict)  # user --megatron-* flags
    attention: str = "auto"  # Platform.trainer_kernels: auto | transformer_engine | sdpa | local
    # Set: packed micro-batches of at most this many prompt+response tokens (a longer sample alone); the packed
    # row is then zero-padded up to a multiple of seq_length_multiple (pipeline parallelism: the step's longest).
    max_tokens_per_micro_batch: int | None = None
    # PPO's value model: a HF checkpoint (usually the actor's own) the critic is built from; None = no critic.
    critic_checkpoint: str | None = None
    critic_optim: OptimConfig = field(default_factory=OptimConfig)  # the critic's own optimizer
    # Samples of a micro-batch with identical prompts share one copy of it (sdpa; no PP/SP/critic/MoE).
    share_prompt_prefix: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        if self.attention not in TRAINER_ATTENTION:
            raise ValueError(f"attention={self.attention!r} is not one of {', '.join(TRAINER_ATTENTION)}")
        budget = self.max_tokens_per_micro_batch
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(
                    f"max_tokens_per_micro_batch={budget!r} must be an integer >= 1 (or unset for "
                    "micro-batches of micro_batch_size samples)"
                )
            if self.attention == "local":
                raise ValueError(
                    "max_tokens_per_micro_batch needs packed-sequence attention; attention='local' (Megatron's "
                    "unfused DotProductAttention) has none: use attention=auto"
                )
        if self.share_prompt_prefix:
            why = share_prompt_prefix_refusal(
                self.attention, self.parallel.pipeline_parallel, self.critic_checkpoint is not None
            )
            if why:
                raise ValueError(why)
        if self.loss_scaling not in ("sample_share", "global_sum"):
            raise ValueError(f"loss_scaling={self.loss_scaling!r} must be 'sample_share' or 'global_sum'")
        if self.seq_length_multiple < 1:
            raise ValueError(f"seq_length_multiple={self.seq_length_multiple} must be >= 1")
        for name in ("hf_checkpoint", "critic_checkpoint"):
            path = getattr(self, name)
            if path is not None and not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"{name}={path!r} has no config.json")


def _names_collective_failures(method: Callable) -> Callable:
    """A timed-out or peer-less collective inside ``method`` raises CollectiveTimeout naming rank and world."""

    @functools.wraps(method)
    def wrapper(self: MegatronActor, *args: Any, **kwargs: Any) -> Any:
        with self._collectives(method.__name__):
            return method(self, *args, **kwargs)

    return wrapper


class MegatronActor:
    def __init__(
        self,
        config: ActorConfig,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        local_device: int = 0,
    ) -> None:
        self.config = config
        self.platform = current_platform()
        self.platform.prepare_training_runtime()
        self.kernels = self.platform.trainer_kernels(config.attention)
        self.dtype = _DTYPES[self.platform.default_train_dtype if config.dtype == "auto" else config.dtype]
        tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
        ep = config.parallel.expert_parallel
        if world_size % (tp * pp):
            raise ValueError(f"world_size={world_size} is not a multiple of TP*PP={tp * pp}")
        if (world_size // (tp * pp)) % ep:
            raise ValueError(
                f"expert_parallel={ep} does not divide the {world_size // (tp * pp)} data-parallel rank(s)"
            )
        self.device = self.platform.torch_device(local_device)
        if self.device.type != "cpu":
            torch.accelerator.set_device_index(self.device.index or 0)
        if not dist.is_initialized():
            dist.init_process_group(
                backend=self.platform.dist_backend,
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=config.parallel.collective_timeout_s),
            )
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                expert_model_parallel_size=ep,
                distributed_timeout_minutes=config.parallel.collective_timeout_s / 60,
            )
        self.ps = ps
        torch.manual_seed(config.seed)
        model_parallel_cuda_manual_seed(config.seed)

        self.spec = ModelSpec.from_hf(config.hf_checkpoint)
        check_parallel_layout(self.spec, tp, pp, ep)
        self.layout = Layout(
            tensor_parallel=tp,
            pipeline_parallel=pp,
            data_parallel=ps.get_data_parallel_world_size(),
            distributed_optimizer=config.parallel.distributed_optimizer,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
        )
        self.layers = local_layer_range(self.spec, pp, self.layout.pp_rank)
        per = self.spec.num_experts // ep
        ep_rank = ps.get_expert_model_parallel_rank() if self.spec.is_moe else 0
        self.experts = range(ep_rank * per, (ep_rank + 1) * per)  # global indices of this rank's experts
        self.step = 0
        # The running micro-batch's logit positions (see _keep_rows).
        self._logit_rows: torch.Tensor | None = None
        self._rope_rows: torch.Tensor | None = None  # shared-prompt row's positions (see _rope_positions)
        self.model, self.tconfig = self._build(config.hf_checkpoint)
        if config.share_prompt_prefix:  # what only the built model knows
            why = share_prompt_prefix_refusal(
                self.kernels.attention,
                pp,
                False,
                sequence_parallel=self.tconfig.sequence_parallel,
                position_embedding=str(getattr(self.model, "position_embedding_type", None)),
                moe=self.spec.is_moe,
            )
            if why:
                raise ValueError(why)
        self.ddp, self.optimizer = self._wrap(self.model, self.tconfig)
        self.ref_model = None
        if config.ref_checkpoint:
            self.ref_model, _ = self._build(config.ref_checkpoint)
            self.ref_model.eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.critic = None
        if config.critic_checkpoint:
            self.critic = ValueModel(self, config.critic_checkpoint, config.critic_optim)

    # ---- construction --------------------------------------------------------------------------------------
    def _overrides(self) -> dict[str, Any]:
        return {**self.platform.megatron_overrides(), **self.config.megatron_overrides}

    def _build(self, checkpoint: str):
        ModelSpec.from_hf(checkpoint)  # fail early with a clear message on an unsupported config
        tp, pp = self.layout.tensor_parallel, self.layout.pipeline_parallel
        ep = self.config.parallel.expert_parallel
        tconfig = transformer_config(self.spec, tp, pp, self.dtype, self._overrides(), ep=ep)
        model = build_gpt_model(self.spec, tconfig, self.kernels)
        if self.device.type != "cpu":
            model = model.to(self.device)
        load_hf_into_model(
            model,
            self.spec,
            HFWeights(checkpoint),
            tp_rank=self.layout.tp_rank,
            tp=tp,
            layers=self.layers,
            pre_process=self.ps.is_pipeline_first_stage(),
            post_process=self.ps.is_pipeline_last_stage(),
            experts=self.experts,
        )
        if getattr(model, "output_layer", None) is not None:
            model.output_layer.register_forward_pre_hook(self._keep_rows, with_kwargs=True)
        if getattr(model, "rotary_pos_emb", None) is not None:
            model.rotary_pos_emb.register_forward_hook(self._rope_positions)
        return model, tconfig

    def _rope_positions(self, module, args, output):
        """Rotary-embedding hook, shared-prompt rows: one table row per packed token, at its own position
        (Megatron's ``thd`` RoPE maps a table as long as the row one to one onto its tokens)."""
        if self._rope_rows is None:
            return None
        return output.index_select(0, self._rope_rows)

    def _keep_rows(self, module, args, kwargs):
        """Output-layer pre-hook: only the positions that score response tokens go through the vocabulary
        projection (hidden states are [s, b, h]); other positions' logits would be computed and thrown away."""
        if self._logit_rows is None:
            return None
        return (args[0].index_select(0, self._logit_rows), *args[1:]), kwargs

    def _wrap(self, model, tconfig, optim: OptimConfig | None = None):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        distopt = self.config.parallel.distributed_optimizer
        ddp = DistributedDataParallel(
            tconfig,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distopt),
            model,
        )
        o = optim or self.config.optim
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=tconfig.bf16,
            params_dtype=tconfig.params_dtype,
            use_distributed_optimizer=distopt,
        )
        optimizer = get_megatron_optimizer(opt_config, [ddp])
        set_optimizer_options(optimizer, self.platform.optimizer_options())
        tconfig.finalize_model_grads_func = finalize_model_grads
        return ddp, optimizer

    # ---- facts ---------------------------------------------------------------------------------------------
    @property
    def is_weight_source(self) -> bool:
        """The rank that holds the whole model after ``named_hf_weights(all_stages=True)`` and sends it."""
        return self.layout.tp_rank == 0 and self.layout.dp_rank == 0 and self.layout.pp_rank == 0

    def info(self) -> dict[str, Any]:
        return {"layout": self.layout, "step": self.step, "spec": self.spec, "device": str(self.device)}

    def _collectives(self, what: str):
        lay = self.layout
        return collective_errors(
            group=(
                f"the trainer's world group (Megatron TP={lay.tensor_parallel} PP={lay.pipeline_parallel} "
                f"DP={lay.data_parallel})"
            ),
            backend=self.platform.dist_backend,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            timeout_s=self.config.parallel.collective_timeout_s,
            what=what,
        )

    # ---- forward/backward ----------------------------------------------------------------------------------
    def _seq_len(self, batch: TrainBatch) -> int:
        m = self.config.seq_length_multiple
        return max(m, math.ceil(batch.max_length() / m) * m)

    def _micro_batches(self, batch: TrainBatch) -> tuple[list[MicroBatch], int]:
        local = batch.shard(self.layout.dp_rank, self.layout.data_parallel)
        if self.config.share_prompt_prefix:
            c = self.config
            return shared_micro_batches(
                local, c.micro_batch_size, c.max_tokens_per_micro_batch, c.seq_length_multiple, self.device
            )
        if self.config.max_tokens_per_micro_batch is not None:
            return self._packed_micro_batches(local)
        chunks = local.micro_batches(self.config.micro_batch_size)
        if self.layout.pipeline_parallel > 1 and len(local) % self.config.micro_batch_size:
            raise ValueError(
                f"{len(local)} samples per data-parallel rank do not split into micro-batches of "
                f"{self.config.micro_batch_size}; pipeline parallelism needs equal micro-batches"
            )
        seq_len = self._seq_len(batch)
        return [self._with_logit_positions(to_micro_batch(c, seq_len, self.device)) for c in chunks], seq_len

    def _packed_micro_batches(self, local: TrainBatch) -> tuple[list[MicroBatch], int]:
        packs = local.pack(self.config.max_tokens_per_micro_batch)
        m = self.config.seq_length_multiple
        lengths = [max(m, math.ceil(p.num_tokens() / m) * m) for p in packs]
        if self.layout.pipeline_parallel > 1:
            # Every pipeline stage holds the same shard, so this maximum is the same on all of them.
            lengths = [max(lengths)] * len(lengths)
        mbs = [
            self._with_logit_positions(to_packed_micro_batch(p, n, self.device))
            for p, n in zip(packs, lengths, strict=True)
        ]
        return mbs, max(lengths)

    def _with_logit_positions(self, mb: MicroBatch) -> MicroBatch:
        # Sequence parallelism shards the output layer's input along the sequence: positions cannot be picked
        # before its gather, so that layout computes every position's logits.
        if self.tconfig.sequence_parallel or not any(mb.response_lengths):
            return mb
        kept, offsets = response_positions(mb.prompt_lengths, mb.response_lengths, mb.sample_starts)
        mb.logit_positions = torch.tensor(kept, dtype=torch.long, device=mb.tokens.device)
        mb.logit_offsets = offsets
        return mb

    def _packed_seq_params(self, mb: MicroBatch):
        if mb.cu_seqlens is None:
            return None
        from megatron.core.packed_seq_params import PackedSeqParams

        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=mb.cu_seqlens,
            cu_seqlens_kv=mb.cu_seqlens,
            max_seqlen_q=mb.max_seqlen,
            max_seqlen_kv=mb.max_seqlen,
        )
        params.host_cu_seqlens = mb.segment_bounds  # read by SdpaCoreAttention without a device sync
        params.host_branches = mb.branches  # shared-prompt segments (SdpaCoreAttention's masks), or None
        return params

    def _logprobs(self, output: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        kept = mb.logit_positions
        # ``output`` has one column per kept position (position t scores token t + 1), or every position.
        if kept is None:
            targets = mb.tokens[:, 1:]
        else:
            targets = mb.tokens.index_select(1, kept + 1 if mb.logit_targets is None else mb.logit_targets)
        logp, ent = token_logprobs_and_entropy(
            output[:, :-1] if kept is None else output,
            targets,
            self.spec.vocab_size,
            tp_group=self.ps.get_tensor_model_parallel_group(),
            temperature=self.config.temperature,
        )
        args = (mb.prompt_lengths, mb.response_lengths, mb.sample_starts, mb.logit_offsets)
        return response_view(logp, *args), response_view(ent, *args)

    def _run(self, model, micro_batches: list[MicroBatch], seq_len: int, loss_func_for, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, chunk):
            mb = next(data_iterator)
            self._logit_rows = mb.logit_positions
            self._rope_rows = mb.position_ids[0] if mb.branches is not None else None
            try:
                output = chunk(
                    mb.tokens, mb.position_ids, None, packed_seq_params=self._packed_seq_params(mb)
                )
            finally:
                self._logit_rows = None
                self._rope_rows = None
            return output, loss_func_for(mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=micro_batches[0].tokens.shape[0],
            forward_only=forward_only,
        )

    def forward_backward(self, batch: TrainBatch, loss_fn: LossFn) -> list[dict[str, torch.Tensor]]:
        """Gradients of ``loss_fn`` over ``batch`` into the DDP buffers (zeroed first); no optimizer step.

        Returns the raw per-micro-batch reports (last pipeline stage only). ``train_step`` is this plus the
        optimizer step and metric reduction; benchmarks and gradient checks call it alone.
        """
        self.platform.prepare_training_runtime()
        micro_batches, seq_len = self._micro_batches(batch)
        n_local = sum(len(mb.prompt_lengths) for mb in micro_batches)
        n_mb = len(micro_batches)
        global_tokens = float(sum(sum(m) for m in batch.loss_masks))
        dp = self.layout.data_parallel
        scaling = self.config.loss_scaling

        def loss_func_for(mb: MicroBatch):
            share = len(mb.prompt_lengths) / n_local

            def loss_func(output):
                logp, ent = self._logprobs(output, mb)
                loss_batch = mb.as_loss_batch()
                loss_batch["global_num_samples"] = len(batch)
                loss_batch["global_num_tokens"] = global_tokens
                loss, metrics = loss_fn(logp, ent, loss_batch)
                mask = mb.loss_mask
                report = {
                    f"user/{k}": torch.as_tensor(v, dtype=torch.float32).detach() * share
                    for k, v in metrics.items()
                }
                report["loss"] = loss.detach().float() * (share if scaling == "sample_share" else 1.0)
                report["entropy_sum"] = (ent.detach() * mask).sum()
                report["mask_sum"] = mask.sum()
                if "rollout_logprobs" in mb.token_fields:
                    diff = (logp.detach() - mb.token_fields["rollout_logprobs"]).abs()
                    report["logp_abs_diff_sum"] = (diff * mask).sum()
                # Megatron divides by the micro-batch count and DDP averages over DP; undo what the
                # chosen convention does not want.
                scale = n_mb * share if scaling == "sample_share" else n_mb * dp
                return loss * scale, report

            return loss_func

        return self._backward(self.ddp, self.optimizer, micro_batches, seq_len, loss_func_for)

    def _backward(self, ddp, optimizer, micro_batches: list[MicroBatch], seq_len: int, loss_func_for):
        """Forward and backward over ``micro_batches`` into ``ddp``'s gradient buffers, zeroed first: one
        procedure for the policy and the critic (which runs its own model and optimizer on this actor's
        process groups)."""
        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        return self._run(ddp, micro_batches, seq_len, loss_func_for, forward_only=False)

    @_names_collective_failures
    def train_step(
        self, batch: TrainBatch, loss_fn: LossFn, mini_batches: int = 1, epochs: int = 1
    ) -> dict[str, float]:
        lr = self.config.optim.lr_at(self.step)
        set_lr(self.optimizer, lr)
        parts = split_mini_batches(batch, mini_batches, self.layout.data_parallel)
        updates = []
        for _ in range(epochs):
            for part in parts:
                if self.spec.is_moe:  # the load-balancing loss of this update only (other forwards add to it)
                    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

                    clear_aux_losses_tracker()
                reports = self.forward_backward(part, loss_fn)
                aux = self._moe_aux_loss(len(reports) if reports else None)
                grad_norm = optimizer_step(self.optimizer, f"optimizer step {self.step}")
                update = self._reduce_reports(reports, self.config.loss_scaling)
                update["grad_norm"] = grad_norm
                if aux is not None:
                    update["moe_aux_loss"] = aux
                updates.append(update)
        self.step += 1
        metrics = mean_over_updates(updates, len(parts))
        metrics.update(lr=lr, step=self.step, num_samples=len(batch))
        return metrics

    def _moe_aux_loss(self, num_micro_batches: int | None) -> float | None:
        """Router load-balancing loss of the last forward_backward (Megatron's tracker, reduced and cleared)."""
        if not self.spec.is_moe:
            return None
        from megatron.core.transformer.moe import moe_utils

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if "load_balancing_loss" not in tracker:
            return None  # coefficient 0: Megatron computes no load-balancing loss
        values = tracker["load_balancing_loss"]["values"]  # per layer, summed over this rank's micro-batches
        n_mb = torch.tensor([float(num_micro_batches or 0)], device=values.device)
        if self.layout.pipeline_parallel > 1:  # only the last stage returned reports
            dist.all_reduce(n_mb, op=dist.ReduceOp.MAX, group=self.ps.get_pipeline_model_parallel_group())
        values.div_(n_mb.clamp(min=1.0))  # a mean per rank first: packed DP ranks may hold unequal counts
        # collective: sums the layers over PP stages, averages over DP ranks
        moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
        value = float(values.sum()) / self.spec.num_layers
        moe_utils.clear_aux_losses_tracker()
        return value

    def _reduce_reports(self, reports: list[dict[str, torch.Tensor]], scaling: str) -> dict[str, float]:
        """Sum micro-batch reports, combine DP ranks, and hand the result from the last stage to all ranks."""
        ps = self.ps
        out: list[dict[str, float] | None] = [None]
        if ps.is_pipeline_last_stage():
            keys = sorted(reports[0])
            vec = torch.stack([sum(r[k] for r in reports).float().reshape(()) for k in keys]).cpu()
            if self.layout.data_parallel > 1:
                vec = vec.to(self.device)
                dist.all_reduce(vec, group=ps.get_data_parallel_group())
                vec = vec.cpu()
            total = dict(zip(keys, vec.tolist(), strict=True))
            dp = self.layout.data_parallel
            tokens = total.pop("mask_sum")
            result = {"num_tokens": tokens, "entropy": total.pop("entropy_sum") / max(tokens, 1.0)}
            if "logp_abs_diff_sum" in total:
                result["logp_abs_diff"] = total.pop("logp_abs_diff_sum") / max(tokens, 1.0)
            loss = total.pop("loss")
            result["loss"] = loss / dp if scaling == "sample_share" else loss
            for key, value in total.items():
                name = key.removeprefix("user/")
                # The actor's own numbers win; a loss_fn metric of the same name keeps a prefix.
                result[f"loss_fn/{name}" if name in _ACTOR_METRICS else name] = value / dp
            out[0] = result
        pp = self.layout.pipeline_parallel
        if pp > 1:
            src = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[pp - 1]
            dist.broadcast_object_list(out, src=src, group=ps.get_pipeline_model_parallel_group())
        return dict(out[0])

    @torch.no_grad()
    @_names_collective_failures
    def compute_logprobs(self, batch: TrainBatch, model: str = "policy") -> list[list[float]]:
        if model == "ref" and self.ref_model is None:
            raise ValueError("compute_logprobs(model='ref') needs ActorConfig.ref_checkpoint")
        if model not in ("policy", "ref"):
            raise ValueError(f"model={model!r} must be 'policy' or 'ref'")
        net = self.ref_model if model == "ref" else self.ddp
        return self.forward_rows(net, batch, lambda output, mb: self._logprobs(output, mb)[0])

    @torch.no_grad()
    def forward_rows(self, net, batch: TrainBatch, per_token) -> list[list[float]]:
        """Forward only through ``net``; ``per_token(output, mb)`` -> ``[b, L]`` response values; one list of
        floats per sample of ``batch``, on every rank (collective)."""
        self.platform.prepare_training_runtime()
        net.eval()
        micro_batches, seq_len = self._micro_batches(batch)

        def loss_func_for(mb: MicroBatch):
            def loss_func(output):
                values = per_token(output, mb)
                rows = [values[i, :n].float().cpu() for i, n in enumerate(mb.response_lengths)]
                return torch.zeros((), device=output.device), {"rows": rows}

            return loss_func

        reports = self._run(net, micro_batches, seq_len, loss_func_for, forward_only=True)
        mine: dict[int, list[float]] = {}
        if self.ps.is_pipeline_last_stage() and self.layout.tp_rank == 0:
            start = self.layout.dp_rank * (len(batch) // self.layout.data_parallel)
            rows = [row for r in reports for row in r["rows"]]
            mine = {start + i: row.tolist() for i, row in enumerate(rows)}
        gathered: list[dict[int, list[float]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, mine)
        merged = {k: v for part in gathered for k, v in part.items()}
        return [merged[i] for i in range(len(batch))]

    # ---- checkpoints and weights ---------------------------------------------------------------------------
    @_names_collective_failures
    def save_checkpoint(self, path: str) -> str:
        self.platform.prepare_training_runtime()
        # The model's facts let a resume check, before anything starts, that it loads onto the same model.
        extra = {
            "hf_checkpoint": self.config.hf_checkpoint,
            "model_type": self.spec.model_type,
            "model": dataclasses.asdict(self.spec),
        }
        save_checkpoint(path, self.model, self.optimizer, self.step, self.layout, extra)
        if self.critic is not None:
            self.critic.save(Path(path) / "critic", self.step)
        return str(path)

    @_names_collective_failures
    def load_checkpoint(self, path: str) -> int:
        self.platform.prepare_training_runtime()
        meta = load_checkpoint(path, self.model, self.optimizer, self.layout)
        self.step = int(meta["step"])
        if self.critic is not None:
            if not (Path(path) / "critic").is_dir():
                raise CheckpointError(
                    f"checkpoint {path} has no critic/ (saved by a run without a value model); resume with the "
                    "run's own algo section, or start a new run"
                )
            self.critic.load(Path(path) / "critic")
        return self.step

    def named_hf_weights(self, all_stages: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        self.platform.prepare_training_runtime()
        weights = iter_hf_weights(
            self.model,
            self.spec,
            self.layers.start,
            tp_group=self.ps.get_tensor_model_parallel_group(),
            pp_group=self.ps.get_pipeline_model_parallel_group(),
            all_stages=all_stages,
            ep_group=self.ps.get_expert_model_parallel_group() if self.spec.is_moe else None,
        )
        return self._guarded(weights, "named_hf_weights")

    def _guarded(self, items: Iterator[Any], what: str) -> Iterator[Any]:
        while True:
            with self._collectives(what):  # the gathers run inside next()
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item

    @_names_collective_failures
    def export_hf(self, path: str, dtype: str | None = None) -> str:
        """HF checkpoint in ``dtype`` (default: the training dtype), from the master weights cast to it."""
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"export dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
        wider = dtype is not None and _DTYPES[dtype].itemsize > self.dtype.itemsize
        with self._master_weights() if wider else contextlib.nullcontext():
            weights = self.named_hf_weights(all_stages=True)
            if dist.get_rank() == 0:
                save_hf_checkpoint(
                    weights, path, self.config.hf_checkpoint, _DTYPES[dtype] if dtype else None
                )
            else:
                for _ in weights:  # take part in the gathers; rank 0 writes
                    pass
        dist.barrier()
        return str(path)

    @contextlib.contextmanager
    def _master_weights(self) -> Iterator[None]:
        """Parameters temporarily hold their fp32 master values (the optimizer's), for a wider export.

        In the training dtype the parameters already are the masters cast to it; only a wider export needs the
        masters themselves. The distributed optimizer shards them over data-parallel ranks: refused there.
        """
        if self.config.parallel.distributed_optimizer:
            raise ValueError(
                f"exporting wider than the training dtype ({self.dtype}) needs whole fp32 master weights, which "
                "the distributed optimizer shards; export in the training dtype or train without it"
            )
        pairs = []
        for opt in [self.optimizer, *getattr(self.optimizer, "chained_optimizers", [])]:
            for params, masters in zip(
                getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", []), strict=True
            ):
                pairs += list(zip(params, masters, strict=True))
        saved = [(param, param.data) for param, _ in pairs]
        try:
            for param, master in pairs:
                param.data = master.data
            yield
        finally:
            for param, data in saved:
                param.data = data

    def shutdown(self) -> None:
        if self.ps.model_parallel_is_initialized():
            self.ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def remote_class(**ray_options):
    """``MegatronActor`` as a Ray actor class (``ray.remote(**ray_options)``)."""
    import ray

    return ray.remote(**ray_options)(MegatronActor) if ray_options else ray.remote(MegatronActor)
