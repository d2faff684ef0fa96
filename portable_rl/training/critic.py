"""PPO's value model: a second Megatron GPTModel, co-located with the actor on the same ranks and layout.

Contract
--------
``ValueModel(actor, checkpoint, optim)`` is built inside a ``MegatronActor`` (after its model), on the actor's
process group, parallel layout, device, dtype and kernels:

* The trunk is the GPTModel of the HF checkpoint ``checkpoint`` (usually the actor's own), loaded like the
  actor's. Its vocabulary and hidden size must equal the actor's (``check_compatible``; preflight refuses a
  mismatch before the run starts). It is built with untied embeddings (its output layer is replaced, so a tied
  one would drag the input embedding along), then the last pipeline stage's ``output_layer`` (vocab logits) is
  replaced by ``ValueHead``: ``Linear(hidden, 1)`` with bias, **initialised to zero**, so the critic predicts 0
  for every token before its first step and GAE starts from plain discounted returns. The head is replicated
  over tensor-parallel ranks (its input, the final norm's output, is whole on every rank; its gradients are
  equal there, and Megatron counts replicated parameters once in the gradient norm).
* ``compute_values(batch) -> list[list[float]]``: the value of each response token's state, i.e. the head's output
  at the position that predicts that token (the position the actor's log-prob of the token comes from).
* ``train_step(batch, loss_fn, mini_batches, epochs) -> dict``: the critic's optimizer steps on the batch, split
  like the actor's (``updates``); ``loss_fn(values, mb) -> (loss, metrics)`` returns the micro-batch's
  contribution to the mini-batch's token mean (``mb["global_num_tokens"]``). Metrics are prefixed ``critic/``:
  ``critic/value_loss``, ``critic/vf_clipfrac``, ``critic/value_mean``, ``critic/grad_norm``, ``critic/lr``.
* ``save(path, step)`` / ``load(path)``: model + optimizer (+ RNG) with ``checkpoint.save_checkpoint`` into
  ``path`` (the actor puts it under ``<its checkpoint>/critic``); same layout rules as the actor's.

Its own Megatron DDP and optimizer (``OptimConfig``: its own learning rate and schedule) step after the
actor's. All methods are collective over the trainer's ranks, like the actor's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from portable_rl.config.training import OptimConfig
from portable_rl.training.batch import MicroBatch, TrainBatch
from portable_rl.training.checkpoint import load_checkpoint, save_checkpoint
from portable_rl.training.convert import HFWeights, load_hf_into_model
from portable_rl.training.logprobs import response_view
from portable_rl.training.model_builder import (
    ModelSpec,
    build_gpt_model,
    check_parallel_layout,
    local_layer_range,
    transformer_config,
)
from portable_rl.training.updates import mean_over_updates, optimizer_step, set_lr, split_mini_batches


class CriticMismatch(ValueError):
    """The value model's checkpoint cannot serve the actor's tokens (vocabulary or hidden size differs)."""


def check_compatible(actor_spec: ModelSpec, critic_spec: ModelSpec, where: str = "train.critic.path") -> None:
    """Raise ``CriticMismatch`` naming the field when the critic's vocabulary or hidden size is not the actor's."""
    for key in ("vocab_size", "hidden_size"):
        mine, theirs = getattr(critic_spec, key), getattr(actor_spec, key)
        if mine != theirs:
            raise CriticMismatch(
                f"{where} has {key}={mine} but the actor's model has {key}={theirs}; the value model must share "
                "the actor's vocabulary and hidden size (leave train.critic.path unset to use the actor's model)"
            )


class ValueHead(torch.nn.Module):
    """Scalar value per position; called like Megatron's output layer: ``(hidden [s, b, h]) -> ([s, b, 1], None)``."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        # Zero: the untrained critic says 0 everywhere, a neutral baseline (module docstring).
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))

    def forward(self, hidden_states: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None):
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


class ValueModel:
    def __init__(self, actor: Any, checkpoint: str, optim: OptimConfig) -> None:
        self.actor = actor
        self.checkpoint = checkpoint
        self.optim = optim
        self.step = 0
        self.spec = ModelSpec.from_hf(checkpoint)
        check_compatible(actor.spec, self.spec)
        lay = actor.layout
        check_parallel_layout(self.spec, lay.tensor_parallel, lay.pipeline_parallel)
        self.layers = local_layer_range(self.spec, lay.pipeline_parallel, lay.pp_rank)
        self.model, tconfig = self._build()
        self.ddp, self.optimizer = actor._wrap(self.model, tconfig, optim)

    def _build(self):
        a, lay = self.actor, self.actor.layout
        tconfig = transformer_config(
            self.spec, lay.tensor_parallel, lay.pipeline_parallel, a.dtype, a._overrides()
        )
        untied = dataclasses.replace(self.spec, tie_word_embeddings=False)
        model = build_gpt_model(untied, tconfig, a.kernels)
        if a.device.type != "cpu":
            model = model.to(a.device)
        # Loaded with the checkpoint's own spec: a tied checkpoint fills the (soon replaced) output layer too.
        load_hf_into_model(
            model,
            self.spec,
            HFWeights(self.checkpoint),
            tp_rank=lay.tp_rank,
            tp=lay.tensor_parallel,
            layers=self.layers,
            pre_process=a.ps.is_pipeline_first_stage(),
            post_process=a.ps.is_pipeline_last_stage(),
        )
        if a.ps.is_pipeline_last_stage():
            model.output_layer = ValueHead(self.spec.hidden_size, tconfig.params_dtype, a.device)
        return model, tconfig

    def _values(self, output: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        # Position t's value is the state before token t+1: the same positions the actor's log-probs use.
        per_position = output[..., 0].float()[:, :-1]
        return response_view(per_position, mb.prompt_lengths, mb.response_lengths, mb.sample_starts)

    def compute_values(self, batch: TrainBatch) -> list[list[float]]:
        with self.actor._collectives("critic.compute_values"):
            return self.actor.forward_rows(self.ddp, batch, self._values)

    def train_step(
        self, batch: TrainBatch, loss_fn, mini_batches: int = 1, epochs: int = 1
    ) -> dict[str, float]:
        a = self.actor
        with a._collectives("critic.train_step"):
            lr = self.optim.lr_at(self.step)
            set_lr(self.optimizer, lr)
            parts = split_mini_batches(batch, mini_batches, a.layout.data_parallel)
            updates = []
            for _ in range(epochs):
                for part in parts:
                    reports = self._forward_backward(part, loss_fn)
                    grad_norm = optimizer_step(self.optimizer, f"critic optimizer step {self.step}")
                    update = a._reduce_reports(reports, "global_sum")
                    update["grad_norm"] = grad_norm
                    updates.append(update)
            self.step += 1
        metrics = mean_over_updates(updates, len(parts))
        out = {
            "critic/value_loss": metrics["loss"],
            "critic/grad_norm": metrics["grad_norm"],
            "critic/lr": lr,
        }
        for key in ("vf_clipfrac", "value_mean"):
            if key in metrics:
                out[f"critic/{key}"] = metrics[key]
        return out

    def _forward_backward(self, batch: TrainBatch, loss_fn) -> list[dict[str, torch.Tensor]]:
        """Gradients of the critic's loss over ``batch`` (a global token mean: each micro-batch's loss is its
        share of the sum, scaled back up from Megatron's division by micro-batches and DDP's mean over DP)."""
        a = self.actor
        a.platform.prepare_training_runtime()
        micro_batches, seq_len = a._micro_batches(batch)
        n_local = sum(len(mb.prompt_lengths) for mb in micro_batches)
        scale = len(micro_batches) * a.layout.data_parallel
        global_tokens = float(sum(sum(m) for m in batch.loss_masks))

        def loss_func_for(mb: MicroBatch):
            share = len(mb.prompt_lengths) / n_local

            def loss_func(output):
                values = self._values(output, mb)
                loss_batch = mb.as_loss_batch()
                loss_batch["global_num_samples"] = len(batch)
                loss_batch["global_num_tokens"] = global_tokens
                loss, metrics = loss_fn(values, loss_batch)
                # The report layout MegatronActor._reduce_reports reads (entropy: none here).
                report = {
                    f"user/{k}": torch.as_tensor(v).detach().float() * share for k, v in metrics.items()
                }
                report.pop("user/value_loss", None)
                report["loss"] = loss.detach().float()
                report["entropy_sum"] = torch.zeros((), device=values.device)
                report["mask_sum"] = mb.loss_mask.sum()
                return loss * scale, report

            return loss_func

        return a._backward(self.ddp, self.optimizer, micro_batches, seq_len, loss_func_for)

    def save(self, path: str | Path, step: int) -> None:
        extra = {
            "critic_checkpoint": self.checkpoint,
            "critic_step": self.step,
            "model": dataclasses.asdict(self.spec),
        }
        save_checkpoint(path, self.model, self.optimizer, step, self.actor.layout, extra)

    def load(self, path: str | Path) -> None:
        meta = load_checkpoint(path, self.model, self.optimizer, self.actor.layout)
        self.step = int(meta.get("critic_step", meta["step"]))
