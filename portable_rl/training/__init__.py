"""The training engine: Megatron-core GPTModel from a HF checkpoint, trained with a pluggable loss.

Modules (each states its own contract):

* ``actor``        ``MegatronActor`` — one per rank (Ray actor or in-process): train_step(batch, loss_fn,
                   mini_batches, epochs), compute_logprobs, save/load_checkpoint, export_hf, named_hf_weights;
                   typed configs.
* ``critic``       ``ValueModel`` — PPO's value model inside the actor (same ranks and layout): a GPTModel trunk
                   with a zero-initialised scalar head, its own optimizer, values per response token.
* ``updates``      several optimizer steps per rollout: the mini-batch split and how their metrics combine.
* ``batch``        ``TrainBatch`` (what the actor consumes), token-budget packing, and the padded or packed
                   ``MicroBatch`` (a loss function sees the same tensors either way).
* ``model_builder`` ``ModelSpec`` from a HF config (Llama, Qwen2, Qwen3, Qwen2/Qwen3-MoE; default, llama3 and
                   yarn rotary embeddings) and the Megatron model/config; the layer spec comes from the
                   platform's ``trainer_kernels`` answer.
* ``attention``    ``SdpaCoreAttention``: Megatron core attention on torch SDPA (padded or packed ``thd``).
* ``convert``      HF safetensors <-> Megatron tensors, TP-sharded (experts EP-split), both directions; HF
                   checkpoint writer.
* ``logprobs``     per-token log-probs and entropy from vocab-parallel logits.
* ``checkpoint``   resumable checkpoints in Megatron's distributed format (model, optimizer, RNG, step; any
                   layout resumes them) and HF weights out of a sharded model.
* ``checkpoint_legacy``  reading the per-rank checkpoints of earlier releases, onto their own layout.

Nothing here imports Megatron at package import time; the platform's ``prepare_training_runtime()`` runs first
(inside ``MegatronActor``), which is what lets the same code train on every platform.
"""
