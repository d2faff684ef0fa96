"""Trainer checks: Megatron after HF->Megatron conversion computes what transformers computes, at any TP.

One spawn of two ranks (``torch.multiprocessing``, the platform's dist backend) builds portable_rl's
``MegatronActor`` from tiny Llama / Qwen2 / Qwen3 / Qwen3-MoE checkpoints, at TP1 (data-parallel over the two
ranks) and TP2 (the MoE model, which Megatron does not tensor-split here, at expert parallel 2 instead: each rank
holds half of the experts), and records: the full-vocabulary logits of a fixed batch (gathered over TP), the trainer's response
log-probs (``compute_logprobs``), the HF weights it exports (``named_hf_weights``) and, for Llama, the losses
of two seeded training steps (twice at TP1, once at TP2), and, for Llama at TP1, one training step over
variable-length samples packed into token-budget micro-batches and the same step one sample per micro-batch
(log-probs and entropy the loss function saw, the loss, the gradient norm). The trainer runs in the platform's
default training dtype (``train.dtype=auto``: fp32 on CPU, bf16 on GPUs). When the rollout engine exists, its samples
(``conformance.engine``) are scored at TP1 too, for ``rollout.engine_vs_trainer_logprobs``. Megatron is only ever imported in those workers:
the CPU platform's Megatron runtime patches torch process-wide.

The parent compares with transformers run in float64 on the CPU from the same checkpoint:

* ``training.megatron_vs_hf_logits`` / ``..._logprobs``: max abs difference, worst architecture; where the
  trainer is not in fp32, the detail also gives transformers' own error in the trainer's dtype (CPU, same
  checkpoint), the floor that dtype sets (bf16 alone moves the MoE model's logits by ~0.3: see the tolerances);
* ``training.hf_roundtrip``: max abs difference of exported weights from the checkpoint cast to the trainer's
  dtype (0: bit-equal; in bf16 the parameters are the checkpoint rounded once to bf16, nothing else);
* ``training.packed_vs_unpacked``: max abs difference of log-probs, entropy, loss and gradient norm, packed
  micro-batches against one sample at a time (fp32 rounding on CPU);
* ``training.tp2_vs_tp1``: max abs difference of logits and of the two training losses, TP2 against TP1;
* ``training.ep2_vs_ep1``: max abs difference of the MoE model's logits and log-probs, EP2 against EP1;
* ``determinism.megatron_train_steps``: difference of the losses of two seeded TP1 runs (tolerance 0).

On a device platform each rank takes device ``rank``; with one device the spawn has a single rank and the TP2
check is skipped (``min_devices=2``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from portable_rl.conformance.engine_fixture import ENGINE_MODULES
from portable_rl.conformance.registry import Context, Measurement, _module_exists, register
from portable_rl.distributed import free_ports

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")
MOE_ARCHS = ("qwen3_moe",)
DENSE_ARCHS = tuple(a for a in ARCHS if a not in MOE_ARCHS)
TRAINER_MODULE = "portable_rl.training.actor"
PROMPT, RESPONSE = 4, 28
LR = 1e-3
SEED = 1234
# Variable-length (prompt, response) samples for packed_vs_unpacked; a 40-token budget packs them 2-3 at a time
# and leaves the 44-token sample in a micro-batch of its own (longer than the budget).
PACKED_SAMPLES = ((3, 9), (6, 14), (4, 40), (5, 7), (2, 11), (8, 20))
PACK_BUDGET = 40


def layouts(arch: str) -> tuple[str, str]:
    """The two layouts each architecture is recorded at: TP1 and TP2, or TP1 and EP2 for a MoE model."""
    return ("tp1", "ep2") if arch in MOE_ARCHS else ("tp1", "tp2")


def fixed_tokens(vocab_size: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab_size, (2, PROMPT + RESPONSE), generator=gen).tolist()


def _worker(
    rank: int,
    world: int,
    platform_name: str,
    ckpts: dict[str, str],
    ports: list[int],
    out: str,
    engine_samples: list[dict[str, Any]] | None,
) -> None:
    import torch
    import torch.distributed as dist

    from portable_rl.platform import PLATFORM_ENV, reset_current_platform

    os.environ[PLATFORM_ENV] = platform_name  # the actor asks current_platform()
    reset_current_platform()
    from portable_rl.training.actor import ActorConfig, MegatronActor, OptimConfig, ParallelConfig
    from portable_rl.training.batch import TrainBatch, to_micro_batch

    port = iter(ports)
    record: dict[str, Any] = {"timings": {}}
    t0 = time.perf_counter()

    def mark(what: str) -> None:
        record["timings"][what] = round(time.perf_counter() - t0, 2)

    def build(arch: str, tp: int, ep: int = 1, **extra: Any) -> MegatronActor:
        cfg = ActorConfig(
            hf_checkpoint=ckpts[arch],
            parallel=ParallelConfig(tensor_parallel=tp, expert_parallel=ep),
            optim=OptimConfig(lr=LR, clip_grad=0.0),
            seed=SEED,
            **extra,
        )
        device = rank if world > 1 else 0
        return MegatronActor(cfg, rank, world, "127.0.0.1", next(port), local_device=device)

    def batch_for(actor) -> TrainBatch:
        toks = fixed_tokens(actor.spec.vocab_size)
        return TrainBatch(
            prompt_tokens=[t[:PROMPT] for t in toks],
            response_tokens=[t[PROMPT:] for t in toks],
            loss_masks=[[1] * RESPONSE for _ in toks],
        )

    def forward(actor, batch: TrainBatch) -> dict[str, Any]:
        mb = to_micro_batch(batch, PROMPT + RESPONSE, actor.device)
        with torch.no_grad():
            actor.model.eval()
            logits = actor.model(mb.tokens, mb.position_ids, None).float()
        tp_group = actor.ps.get_tensor_model_parallel_group()
        tp = actor.layout.tensor_parallel
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=tp_group)
            logits = torch.cat(parts, dim=-1)
        # clone: on the CPU .to("cpu") is the parameter itself, which the training steps then change
        weights = {n: t.detach().to("cpu").clone() for n, t in actor.named_hf_weights(all_stages=True)}
        return {
            "logits": logits[..., : actor.spec.vocab_size].cpu(),
            "logprobs": actor.compute_logprobs(batch),
            "weights": weights,
        }

    def train(actor, batch: TrainBatch) -> list[float]:
        def loss_fn(logp, ent, mb):
            mask = mb["loss_mask"]
            return -(logp * mask).sum() / mask.sum(), {}

        return [float(actor.train_step(batch, loss_fn)["loss"]) for _ in range(2)]

    def packed_vs_unpacked(arch: str, vocab: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(11)
        draw = [torch.randint(3, vocab, (p + r,), generator=gen).tolist() for p, r in PACKED_SAMPLES]
        batch = TrainBatch(
            prompt_tokens=[t[:p] for t, (p, _) in zip(draw, PACKED_SAMPLES, strict=True)],
            response_tokens=[t[p:] for t, (p, _) in zip(draw, PACKED_SAMPLES, strict=True)],
            loss_masks=[[1] * r for _, r in PACKED_SAMPLES],
        )
        out: dict[str, Any] = {}
        for name, extra in (
            ("unpacked", {"micro_batch_size": 1}),
            ("packed", {"max_tokens_per_micro_batch": PACK_BUDGET}),
        ):
            seen: list[tuple[Any, Any]] = []

            def loss_fn(logp, ent, mb, seen=seen):
                mask = mb["loss_mask"]
                for i, n in enumerate(mb["response_lengths"].tolist()):
                    seen.append((logp[i, :n].detach().float().cpu(), ent[i, :n].detach().float().cpu()))
                # mean over samples of per-sample token means: the same objective at any micro-batching
                per_sample = ((logp + 0.01 * ent) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                return -per_sample.mean(), {}

            packed_actor = build(arch, 1, **extra)
            metrics = packed_actor.train_step(batch, loss_fn)
            packed_actor.shutdown()
            out[name] = {"seen": seen, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}
        return out

    mark("imported")
    for arch in ckpts:
        actor = build(arch, 1)
        mark(f"{arch}/tp1 built")
        batch = batch_for(actor)
        record[f"{arch}/tp1"] = forward(actor, batch)
        if arch == "llama" and engine_samples:
            rollout = TrainBatch(
                prompt_tokens=[s["prompt"] for s in engine_samples],
                response_tokens=[s["response"] for s in engine_samples],
                loss_masks=[[1] * len(s["response"]) for s in engine_samples],
            )
            record["llama/tp1/engine_samples"] = engine_samples
            record["llama/tp1/engine_logprobs"] = actor.compute_logprobs(rollout)
        if arch == "llama":
            record["llama/tp1/losses"] = train(actor, batch)
            record["dtype"] = str(actor.dtype).removeprefix("torch.")
        actor.shutdown()
        mark(f"{arch}/tp1 done")
        if arch == "llama":
            actor = build(arch, 1)
            record["llama/tp1/losses_again"] = train(actor, batch)
            vocab = actor.spec.vocab_size
            actor.shutdown()
            record["llama/tp1/packed_vs_unpacked"] = packed_vs_unpacked(arch, vocab)
            mark(f"{arch}/tp1 again and packed done")
        if world > 1 and arch in MOE_ARCHS:
            actor = build(arch, 1, ep=2)
            record[f"{arch}/ep2"] = forward(actor, batch)
            actor.shutdown()
            mark(f"{arch}/ep2 done")
        elif world > 1:
            actor = build(arch, 2)
            record[f"{arch}/tp2"] = forward(actor, batch)
            if arch == "llama":
                record["llama/tp2/losses"] = train(actor, batch)
            actor.shutdown()
            mark(f"{arch}/tp2 done")
    if rank == 0:
        torch.save(record, Path(out) / "trainer.pt")


def trainer_world(ctx: Context) -> int:
    platform = ctx.platform
    return 2 if platform.torch_device_type == "cpu" or len(platform.devices) >= 2 else 1


def run_trainer_workers(ctx: Context) -> dict[str, Any]:
    import torch
    import torch.multiprocessing as mp

    out = ctx.workdir / "trainer"
    out.mkdir(parents=True, exist_ok=True)
    ckpts = {arch: str(ctx.tiny_checkpoint(arch)) for arch in ARCHS}
    world = trainer_world(ctx)
    samples = None
    if all(_module_exists(m) for m in ENGINE_MODULES):
        from portable_rl.conformance.engine_fixture import engine_samples

        try:
            samples = engine_samples(ctx)  # scored by the trainer for rollout.engine_vs_trainer_logprobs
        except Exception:  # noqa: BLE001 - the rollout checks report the engine's failure themselves
            samples = None
    ports = free_ports(14, "127.0.0.1")
    mp.start_processes(
        _worker,
        args=(world, ctx.platform.name, ckpts, ports, str(out), samples),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return torch.load(out / "trainer.pt")


def trainer_record(ctx: Context) -> dict[str, Any]:
    """What the trainer spawn recorded (runs it on first use; shared between parallel test workers)."""
    import portable_rl.conformance.trainer as this  # through the module: meta-tests patch run_trainer_workers

    return ctx.shared_memo("trainer", lambda: this.run_trainer_workers(ctx))


def hf_reference(ckpt: Path, dtype: str = "float64") -> dict[str, Any]:
    """transformers on the CPU (float64 unless ``dtype``): logits and response log-probs of the fixed batch."""
    import torch
    from transformers import AutoModelForCausalLM

    # transformers' grouped-GEMM experts kernel has no float64 path on the CPU: loop over experts ("eager")
    moe = {"experts_implementation": "eager"} if "num_experts_per_tok" in _config(ckpt) else {}
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype), **moe).eval()
    tokens = torch.tensor(fixed_tokens(model.config.vocab_size))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return {"logits": logits, "logprobs": logp[:, PROMPT - 1 :]}


def _config(ckpt: Path) -> dict[str, Any]:
    import json

    return json.loads((Path(ckpt) / "config.json").read_text())


def _ref(ctx: Context, arch: str) -> dict[str, Any]:
    return ctx.memo(f"hf-ref:{arch}", lambda: hf_reference(ctx.tiny_checkpoint(arch)))


def _max_abs(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        return float("inf")
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def _per_arch(ctx: Context, key: str, measure) -> Measurement:
    rec = trainer_record(ctx)
    errs = {arch: measure(rec[f"{arch}/tp1"], arch) for arch in ARCHS}
    return Measurement(max(errs.values()), ", ".join(f"{a} {e:.3g}" for a, e in errs.items()))


# slow: one spawn of two Megatron ranks building seven models (~1 min on 2 cores)
_NEEDS = dict(
    requires=(TRAINER_MODULE,), depends_on="portable_rl.training.actor.MegatronActor", markers=("slow",)
)


@register(
    "training.megatron_vs_hf_logits",
    "max |Megatron TP1 logits after HF->Megatron conversion - transformers float64 logits|, worst of "
    "llama/qwen2/qwen3/qwen3_moe",
    **_NEEDS,
)
def check_megatron_vs_hf_logits(ctx: Context, dtype: str | None) -> Measurement:
    got = _per_arch(ctx, "logits", lambda got, arch: _max_abs(got["logits"], _ref(ctx, arch)["logits"]))
    return _with_dtype_floor(ctx, got, "logits")


@register(
    "training.megatron_vs_hf_logprobs",
    "max |trainer compute_logprobs (TP1) - transformers float64 response log-probs|, worst architecture",
    **_NEEDS,
)
def check_megatron_vs_hf_logprobs(ctx: Context, dtype: str | None) -> Measurement:
    got = _per_arch(ctx, "logprobs", lambda got, arch: _max_abs(got["logprobs"], _ref(ctx, arch)["logprobs"]))
    return _with_dtype_floor(ctx, got, "logprobs")


def _with_dtype_floor(ctx: Context, got: Measurement, key: str) -> Measurement:
    """``got`` with transformers' own error in the trainer's dtype added to the detail (fp32: unchanged)."""
    dtype = trainer_record(ctx).get("dtype", "float32")
    if dtype == "float32":
        return got
    floors = {arch: _max_abs(_dtype_ref(ctx, arch, dtype)[key], _ref(ctx, arch)[key]) for arch in ARCHS}
    text = ", ".join(f"{a} {e:.3g}" for a, e in floors.items())
    return Measurement(got.error, f"{got.detail}; transformers in {dtype}: {text}")


def _dtype_ref(ctx: Context, arch: str, dtype: str) -> dict[str, Any]:
    return ctx.memo(f"hf-ref:{arch}:{dtype}", lambda: hf_reference(ctx.tiny_checkpoint(arch), dtype))


def _roundtrip_error(got: dict[str, Any], ckpt: Path, dtype: str) -> float:
    import torch
    from safetensors.torch import load_file

    source = load_file(str(ckpt / "model.safetensors"))
    exported = got["weights"]
    if set(exported) != set(source):
        return float("inf")
    # Expectation per dtype: bit-equal to the checkpoint cast once to the trainer's dtype.
    cast = getattr(torch, dtype)
    return max(_max_abs(exported[n], source[n].to(cast)) for n in source)


@register(
    "training.hf_roundtrip",
    "max |HF weights exported by the trainer (TP1 and TP2, before any step) - the checkpoint loaded, cast to "
    "the trainer's dtype|",
    **_NEEDS,
)
def check_hf_roundtrip(ctx: Context, dtype: str | None) -> Measurement:
    rec = trainer_record(ctx)
    errs = {}
    trainer_dtype = rec.get("dtype", "float32")
    for key in sorted(k for k in rec if k.count("/") == 1):
        errs[key] = _roundtrip_error(rec[key], ctx.tiny_checkpoint(key.split("/")[0]), trainer_dtype)
    worst = max(errs, key=errs.get)
    return Measurement(errs[worst], f"{len(errs)} exports in {trainer_dtype}, worst {worst}")


@register(
    "training.packed_vs_unpacked",
    "max |packed token-budget micro-batches - one sample per micro-batch| over the log-probs and entropy the "
    "loss saw, the loss and the gradient norm of one training step (llama, TP1, variable lengths)",
    **_NEEDS,
)
def check_packed_vs_unpacked(ctx: Context, dtype: str | None) -> Measurement:
    rec = trainer_record(ctx)["llama/tp1/packed_vs_unpacked"]
    ref, got = rec["unpacked"], rec["packed"]
    if len(ref["seen"]) != len(got["seen"]) or not ref["seen"]:
        return Measurement(float("inf"), f"{len(got['seen'])} packed rows vs {len(ref['seen'])} unpacked")
    logp = max(_max_abs(a[0], b[0]) for a, b in zip(got["seen"], ref["seen"], strict=True))
    ent = max(_max_abs(a[1], b[1]) for a, b in zip(got["seen"], ref["seen"], strict=True))
    loss = abs(got["loss"] - ref["loss"])
    grad = abs(got["grad_norm"] - ref["grad_norm"])
    return Measurement(
        max(logp, ent, loss, grad),
        f"logprobs {logp:.3g}, entropy {ent:.3g}, loss {loss:.3g}, grad_norm {grad:.3g}",
    )


@register(
    "training.tp2_vs_tp1",
    "max |TP2 - TP1| over full-vocabulary logits (3 dense architectures) and two training-step losses (llama)",
    min_devices=2,
    **_NEEDS,
)
def check_tp2_vs_tp1(ctx: Context, dtype: str | None) -> Measurement:
    rec = trainer_record(ctx)
    logit_err = max(_max_abs(rec[f"{a}/tp2"]["logits"], rec[f"{a}/tp1"]["logits"]) for a in DENSE_ARCHS)
    loss_err = _max_abs(rec["llama/tp2/losses"], rec["llama/tp1/losses"])
    return Measurement(max(logit_err, loss_err), f"logits {logit_err:.3g}, losses {loss_err:.3g}")


@register(
    "training.ep2_vs_ep1",
    "max |EP2 - EP1| over the MoE model's full-vocabulary logits and response log-probs (qwen3_moe, each of two "
    "ranks holding half of the experts)",
    min_devices=2,
    **_NEEDS,
)
def check_ep2_vs_ep1(ctx: Context, dtype: str | None) -> Measurement:
    rec = trainer_record(ctx)
    errs = {
        a: max(
            _max_abs(rec[f"{a}/ep2"]["logits"], rec[f"{a}/tp1"]["logits"]),
            _max_abs(rec[f"{a}/ep2"]["logprobs"], rec[f"{a}/tp1"]["logprobs"]),
        )
        for a in MOE_ARCHS
    }
    return Measurement(max(errs.values()), ", ".join(f"{a} {e:.3g}" for a, e in errs.items()))


@register(
    "determinism.megatron_train_steps",
    "max difference of the losses of two seeded 2-step runs of the Megatron trainer (TP1)",
    **_NEEDS,
)
def check_megatron_train_steps(ctx: Context, dtype: str | None) -> Measurement:
    rec = trainer_record(ctx)
    first, again = rec["llama/tp1/losses"], rec["llama/tp1/losses_again"]
    if first[0] == first[-1]:
        return Measurement(float("inf"), "the optimizer step did not change the loss; nothing was compared")
    return Measurement(_max_abs(first, again), "losses " + ", ".join(f"{x:.6f}" for x in first))
