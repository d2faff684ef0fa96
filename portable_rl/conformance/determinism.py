"""Training determinism: the same seed must give the same losses and the same weights, bit for bit.

``train_steps(platform, seed)`` builds a tiny Llama from its config under ``seed`` on the platform's device,
runs two AdamW steps on a fixed batch and returns the two losses and a digest of the final weights. The check
does that twice and measures the largest difference (losses and weights; tolerance 0). It also insists the
optimizer step changed the loss — two runs that never train would agree vacuously.

Deterministic algorithms are requested (``torch.use_deterministic_algorithms(True, warn_only=True)``) for the
duration of the check and the global RNG state is restored afterwards.
"""

from __future__ import annotations

from typing import Any

from portable_rl.conformance.registry import Context, Measurement, register
from portable_rl.platform import Platform

STEPS = 2


def train_steps(platform: Platform, seed: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from portable_rl.models.tiny import TinySpec, hf_config

    spec = TinySpec(arch="llama")
    device = platform.torch_device(0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(spec, spec.vocab_size, 1, 0), dtype=torch.float32)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    batch = torch.randint(2, spec.vocab_size, (4, 48), generator=gen).to(device)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach().to("cpu", torch.float64).item())
    weights = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    return {"losses": losses, "weights": weights}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    import torch

    err = max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
    for name, w in a["weights"].items():
        err = max(err, float((w.to(torch.float64) - b["weights"][name].to(torch.float64)).abs().max()))
    return err


@register(
    "determinism.hf_train_steps",
    "max difference in losses and final weights between two seeded 2-step AdamW runs of a tiny HF Llama",
)
def check_hf_train_steps(ctx: Context, dtype: str | None) -> Measurement:
    import torch

    # Looked up through the module so a meta-test can swap train_steps for a non-deterministic one.
    import portable_rl.conformance.determinism as this

    previous = torch.are_deterministic_algorithms_enabled()
    dev_type = ctx.platform.torch_device_type
    rng = (
        torch.random.fork_rng(devices=[])
        if dev_type == "cpu"
        else torch.random.fork_rng(device_type=dev_type)
    )
    with rng:
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            first = this.train_steps(ctx.platform, seed=1234)
            second = this.train_steps(ctx.platform, seed=1234)
        finally:
            torch.use_deterministic_algorithms(previous)
    if first["losses"][0] == first["losses"][-1]:
        return Measurement(float("inf"), "the optimizer step did not change the loss; nothing was compared")
    losses = ", ".join(f"{x:.6f}" for x in first["losses"])
    return Measurement(_diff(first, second), f"losses {losses}")
