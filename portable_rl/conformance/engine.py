"""Rollout-engine and weight-sync checks: the engine scores tokens as the trainer does, and every weight-sync
strategy leaves the engine holding the trainer's weights bit for bit.

One engine per run, started with portable_rl's launcher (``kind="auto"``: the CPU engine server where the
platform's device is the CPU, SGLang elsewhere) on the tiny Llama checkpoint. Right after it is healthy it
samples two responses (temperature 1, 24 tokens, log-probs returned) — before any weight-sync check changes
its weights. Those samples are scored by:

* ``rollout.engine_vs_hf_logprobs``: transformers in float64 on the CPU;
* ``rollout.engine_vs_trainer_logprobs``: the Megatron trainer (``compute_logprobs`` at TP1, in the trainer
  spawn of ``conformance.trainer``), i.e. the mismatch the RL loss sees between rollout and training.

``weight_sync.<strategy>`` pushes a perturbed copy of the checkpoint (a fresh seed per variant, so a sync that
does nothing cannot pass) through ``make_weight_sync`` — flattened buckets and per-tensor for the
``shared_tensor`` and ``broadcast`` strategies, sharded safetensors for ``disk`` — and counts the tensors that
``check_weights`` finds not bit-equal or missing on the engine (tolerance 0).
"""

from __future__ import annotations

from typing import Any

from portable_rl.conformance.engine_fixture import ENGINE_MODULES, NEW_TOKENS, running_engine
from portable_rl.conformance.registry import Context, Measurement, register

SYNC_MODULES = ("portable_rl.weight_sync",)


def _max_abs_rows(got: list[list[float]], want: list[list[float]]) -> float:
    import torch

    err = 0.0
    for g, w in zip(got, want, strict=True):
        g, w = torch.tensor(g, dtype=torch.float64), torch.as_tensor(w, dtype=torch.float64)
        if g.shape != w.shape:
            return float("inf")
        err = max(err, float((g - w).abs().max()))
    return err


def hf_logprobs(ctx: Context, samples: list[dict[str, Any]]) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ctx.tiny_checkpoint("llama"), dtype=torch.float64).eval()
    rows = []
    for s in samples:
        ids = torch.tensor([s["prompt"] + s["response"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        logp = torch.log_softmax(logits[len(s["prompt"]) - 1 : -1], -1)
        rows.append(logp.gather(1, torch.tensor(s["response"])[:, None]).squeeze(1).tolist())
    return rows


@register(
    "rollout.engine_vs_hf_logprobs",
    "max |log-probs the rollout engine returned for its own samples - transformers float64 on the CPU|",
    requires=ENGINE_MODULES,
    depends_on="the rollout engine launcher and client",
)
def check_engine_vs_hf(ctx: Context, dtype: str | None) -> Measurement:
    eng = running_engine(ctx)
    samples = eng["samples"]
    err = _max_abs_rows([s["logprobs"] for s in samples], hf_logprobs(ctx, samples))
    return Measurement(err, f"{eng['kind']} engine, {len(samples)} x {NEW_TOKENS} sampled tokens")


@register(
    "rollout.engine_vs_trainer_logprobs",
    "max |rollout engine log-probs - Megatron trainer log-probs| on the engine's samples, same weights",
    requires=ENGINE_MODULES + ("portable_rl.training.actor",),
    depends_on="the rollout engine and the Megatron trainer",
    markers=("slow",),
)
def check_engine_vs_trainer(ctx: Context, dtype: str | None) -> Measurement:
    from portable_rl.conformance.trainer import trainer_record

    rec = trainer_record(ctx)
    if "llama/tp1/engine_logprobs" not in rec:
        running_engine(ctx)  # re-raises why the engine could not sample
        raise RuntimeError("the trainer spawn ran without the engine's samples")
    # The samples the trainer scored (a parallel test worker's engine may have made them).
    samples = rec["llama/tp1/engine_samples"]
    err = _max_abs_rows([s["logprobs"] for s in samples], rec["llama/tp1/engine_logprobs"])
    return Measurement(err, f"engine vs Megatron TP1, {len(samples)} x {NEW_TOKENS} tokens")


# ---- weight sync ------------------------------------------------------------------------------------------------
VARIANTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # strategy -> [(deployment mode, extra WeightSyncConfig fields)]
    # Buckets both ways, then resident weights where the engine offers them (portable_rl's CPU engine; "auto"
    # falls back to buckets elsewhere). Last, because the engine's weights then stay in shared memory.
    "shared_tensor": [
        ("colocated", {"flatten_buckets": "on", "resident_weights": "off"}),
        ("colocated", {"flatten_buckets": "off", "resident_weights": "off"}),
        ("colocated", {"resident_weights": "auto"}),
    ],
    "broadcast": [
        ("disaggregated", {"flatten_buckets": "on"}),
        ("disaggregated", {"flatten_buckets": "off"}),
    ],
    "disk": [("colocated", {})],
}


def perturbed_weights(ctx: Context, seed: int) -> list[tuple[str, Any]]:
    """The checkpoint's tensors plus seeded noise, on the platform's device (where a trainer holds them)."""
    import torch
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    base = sorted(load_file(str(ctx.tiny_checkpoint("llama") / "model.safetensors")).items())
    device = ctx.platform.torch_device(0)
    return [(n, (t + 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype)).to(device)) for n, t in base]


def sync_and_compare(ctx: Context, strategy: str, seed: int) -> tuple[int, list[str]]:
    """Run every variant of ``strategy``; return (tensors not bit-equal, notes)."""
    from portable_rl.weight_sync import WeightSyncConfig, check_weights, make_weight_sync

    url = running_engine(ctx)["url"]
    bad, notes = 0, []
    for i, (mode, extra) in enumerate(VARIANTS[strategy]):
        version = seed * 10 + i
        weights = perturbed_weights(ctx, version)
        if check_weights([url], weights).ok:
            raise RuntimeError(
                "the engine already holds the weights about to be synced; nothing would be checked"
            )
        if strategy == "disk":
            extra = {**extra, "disk_dir": str(ctx.workdir / f"weight-sync-disk-{version}")}
        cfg = WeightSyncConfig(
            strategy=strategy, bucket_mb=0.25, timeout_s=120, master_address="127.0.0.1", **extra
        )
        sync = make_weight_sync(cfg, mode, ctx.platform)
        sync.connect([url])
        try:
            sync.update(iter(weights), version=version)
        finally:
            sync.disconnect()
        report = check_weights([url], weights)
        e = report.engines[0]
        if e.error:
            raise RuntimeError(f"reading the engine's weights back failed: {e.error}")
        bad += len(e.mismatched) + len(e.missing)
        label = ",".join(f"{k}={v}" for k, v in extra.items() if k != "disk_dir") or "default"
        notes.append(f"{label}: {e.compared - len(e.mismatched) - len(e.missing)}/{e.compared} bit-equal")
    return bad, notes


def _register_sync(strategy: str, seed: int) -> None:
    @register(
        f"weight_sync.{strategy}",
        f"tensors not bit-equal on the engine after a {strategy} sync ("
        + "; ".join(
            ",".join(f"{k}={v}" for k, v in x.items()) or "sharded safetensors" for _, x in VARIANTS[strategy]
        )
        + ")",
        requires=ENGINE_MODULES + SYNC_MODULES,
        depends_on="the rollout engine and portable_rl.weight_sync",
    )
    def check(ctx: Context, dtype: str | None) -> Measurement:
        import portable_rl.conformance.engine as this  # meta-tests patch sync_and_compare

        bad, notes = this.sync_and_compare(ctx, strategy, seed)
        return Measurement(float(bad), "; ".join(notes))


for _seed, _strategy in enumerate(VARIANTS, start=1):
    _register_sync(_strategy, _seed)
