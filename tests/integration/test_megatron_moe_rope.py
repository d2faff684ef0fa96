"""MoE and rotary scaling on the Megatron trainer (CPU, gloo), checked against transformers and the CPU engine.

Tiny random-init checkpoints: Qwen3-MoE and Qwen2-MoE (4 experts, top-2; Qwen2-MoE with its gated shared
expert), a Llama with ``rope_type: llama3`` and a Qwen2 with ``rope_type: yarn`` (original context 64 tokens, so
the scaling changes most rotary frequencies within the 40-token test sequences). One world-size-1 process
builds each at EP1 and records logits and the trainer's log-probs of samples the CPU engine generated; one
two-rank group trains Qwen3-MoE at DP2 with EP1 and with EP2 (each rank holds 2 of the 4 experts; the EP2 run
also saves a checkpoint and resumes from it) and at PP2 (one MoE layer per stage).

Tolerances (float32): logits within 1e-4 of transformers in float64, trainer log-probs within 1e-4 of the
engine's, EP2 and PP2 losses and router load-balancing losses within 1e-5 of EP1, weights after two steps
within 1e-5, resume bitwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from portable_rl.distributed import free_port
from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.training.batch import TrainBatch

pytestmark = pytest.mark.slow  # ~1 CPU-minute: two spawns of Megatron ranks, imports dominate

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
MODELS = {
    "qwen3_moe": TinySpec(arch="qwen3_moe"),
    "qwen2_moe": TinySpec(arch="qwen2_moe"),
    "llama3_rope": TinySpec(arch="llama", rope_scaling=LLAMA3),
    "yarn_rope": TinySpec(arch="qwen2", rope_scaling=YARN),
}
ATOL = 1e-4
SEQ = 40


def _engine_samples(ckpt: Path) -> list[tuple[list[int], list[int], list[float]]]:
    """(prompt, response, engine log-probs) from the CPU engine (transformers with its KV cache)."""
    from portable_rl.rollout.engines.cpu_engine import CpuEngine, EngineConfig, GenRequest
    from portable_rl.rollout.engines.sampling import SamplingParams

    engine = CpuEngine(EngineConfig(model_path=str(ckpt), num_threads=1))
    try:
        prompts = [[5, 17, 33, 9], [40, 8, 11, 60, 7, 21]]
        params = SamplingParams(max_new_tokens=SEQ - 8, temperature=1.0, ignore_eos=True, sampling_seed=1)
        futures = [
            engine.submit(GenRequest(rid=f"r{i}", input_ids=p, params=params)) for i, p in enumerate(prompts)
        ]
        results = [f.result(timeout=300) for f in futures]
    finally:
        engine.shutdown()
    return [(p, r.output_ids, r.logprobs) for p, r in zip(prompts, results, strict=True)]


def _hf(ckpt: Path, dtype=torch.float64, **kwargs):
    from transformers import AutoModelForCausalLM

    # transformers' grouped-GEMM experts kernel has no float64 path on the CPU; "eager" loops over experts
    return AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=dtype, experts_implementation="eager", **kwargs
    ).eval()


def _spawn(world: int, jobs: list[dict], out: Path) -> dict:
    from moe_rope_jobs import run_jobs

    out.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=run_jobs, args=(r, world, port, jobs, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    return {"procs": procs, "out": out}


def _join(spawned: dict) -> dict:
    for p in spawned["procs"]:
        p.join(timeout=900)
    assert [p.exitcode for p in spawned["procs"]] == [0] * len(spawned["procs"]), "a Megatron rank failed"
    return torch.load(spawned["out"] / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-rope")
    ckpts = {name: build_tiny_checkpoint(root / name, spec) for name, spec in MODELS.items()}
    tokens = torch.randint(3, 400, (2, SEQ), generator=torch.Generator().manual_seed(5))
    samples = {name: _engine_samples(path) for name, path in ckpts.items()}
    batches = {
        name: TrainBatch(
            prompt_tokens=[p for p, _, _ in s],
            response_tokens=[r for _, r, _ in s],
            loss_masks=[[1] * len(r) for _, r, _ in s],
        )
        for name, s in samples.items()
    }
    single = [dict(name=n, ckpt=str(ckpts[n]), tokens=tokens, batch=batches[n]) for n in MODELS]
    pair = [
        dict(
            name=f"ep{ep}",
            ckpt=str(ckpts["qwen3_moe"]),
            tokens=tokens,
            batch=batches["qwen3_moe"],
            ep=ep,
            steps=2,
        )
        for ep in (1, 2)
    ]
    pair[1].update(export=str(root / "export-ep2"), resume=str(root / "ckpt-ep2"))
    pair.append({**pair[0], "name": "pp2", "pp": 2})
    spawned = [_spawn(1, single, root / "single"), _spawn(2, pair, root / "pair")]
    hf = {}
    for name, path in ckpts.items():
        with torch.no_grad():
            hf[name] = _hf(path)(input_ids=tokens).logits
    results = {**_join(spawned[0]), **_join(spawned[1])}
    return dict(root=root, ckpts=ckpts, tokens=tokens, samples=samples, results=results, hf=hf)


def _max_abs(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(setup, name):
    assert _max_abs(setup["results"][name]["logits"], setup["hf"][name]) < ATOL


@pytest.mark.parametrize("name", ["llama3_rope", "yarn_rope"])
def test_rope_scaling_changes_the_logits(setup, name):
    """The rope rows could pass by accident if scaling did nothing: without it transformers' logits differ."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(setup["ckpts"][name])
    config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    with torch.no_grad():
        plain = _hf(setup["ckpts"][name], config=config)(input_ids=setup["tokens"]).logits
    assert _max_abs(plain, setup["hf"][name]) > 100 * ATOL


@pytest.mark.parametrize("name", list(MODELS))
def test_trainer_logprobs_match_the_engine(setup, name):
    got = setup["results"][name]["logprobs"]
    for row, (_, response, engine_logprobs) in zip(got, setup["samples"][name], strict=True):
        assert len(row) == len(response) == len(engine_logprobs)
        assert _max_abs(row, engine_logprobs) < ATOL


def test_expert_parallel_trains_like_ep1(setup):
    ep1, ep2 = setup["results"]["ep1"], setup["results"]["ep2"]
    assert _max_abs(ep2["logits"], ep1["logits"]) < 1e-5
    for a, b in zip(ep1["metrics"], ep2["metrics"], strict=True):
        assert a["moe_aux_loss"] > 0
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["moe_aux_loss"] - b["moe_aux_loss"]) < 1e-5
    assert ep1["metrics"][0]["loss"] != ep1["metrics"][1]["loss"], "the optimizer step changed nothing"
    assert set(ep1["weights"]) == set(ep2["weights"])
    assert max(_max_abs(ep1["weights"][n], ep2["weights"][n]) for n in ep1["weights"]) < 1e-5


def test_pipeline_parallel_moe_trains_like_ep1(setup):
    ep1, pp2 = setup["results"]["ep1"], setup["results"]["pp2"]
    for a, b in zip(ep1["metrics"], pp2["metrics"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["moe_aux_loss"] - b["moe_aux_loss"]) < 1e-5
    assert max(_max_abs(ep1["weights"][n], pp2["weights"][n]) for n in ep1["weights"]) < 1e-5


def test_expert_parallel_resume_is_bitwise(setup):
    ep2 = setup["results"]["ep2"]
    assert ep2["resumed"]["loss"] == ep2["continued"]["loss"]
    assert ep2["resumed"]["moe_aux_loss"] == ep2["continued"]["moe_aux_loss"]
    assert all(torch.equal(ep2["resumed_weights"][n], t) for n, t in ep2["continued_weights"].items())


def test_expert_parallel_export_loads_in_transformers(setup):
    """EP2's export gathers every expert under its HF checkpoint name; transformers loads it as is."""
    from safetensors.torch import load_file

    export = setup["root"] / "export-ep2"
    exported = load_file(str(export / "model.safetensors"))
    source = load_file(str(setup["ckpts"]["qwen3_moe"] / "model.safetensors"))
    assert set(exported) == set(source)
    weights = setup["results"]["ep2"]["weights"]
    assert max(_max_abs(exported[n], weights[n]) for n in exported) == 0.0
    model = _hf(export, dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts
    width = experts.gate_up_proj.shape[1] // 2
    assert torch.equal(
        experts.gate_up_proj[3, width:], exported["model.layers.1.mlp.experts.3.up_proj.weight"]
    )
