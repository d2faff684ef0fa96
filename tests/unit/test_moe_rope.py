"""MoE and rotary-scaling facts without building a Megatron model: HF config -> ModelSpec (and its refusals),
rotary frequencies against transformers' own, the MoE name/packing conversion both ways (expert-parallel
offsets included), the CPU engine's per-expert names, and the expert-parallel layout checks of the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.training.model_builder import (
    ModelSpec,
    UnsupportedModel,
    check_expert_layout,
    rope_attention_factor,
    rope_inv_freq,
    rope_mscale_fields,
)

ROOT = Path(__file__).resolve().parents[2]
DENSE = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
MOE = {
    **DENSE,
    "model_type": "qwen3_moe",
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.001,
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {a: build_tiny_checkpoint(root / a, TinySpec(arch=a)) for a in ("qwen3_moe", "qwen2_moe")}


# ---- rotary scaling -----------------------------------------------------------------------------------------
ROPES = {
    "llama3_31": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    # low/high factors and context other than the ones Megatron's own llama3 scaling hard-codes
    "llama3_other": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                     "original_max_position_embeddings": 256},
    "yarn_qwen25": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn_options": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16,
                     "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512,
                              "attention_factor": 1.3},
}  # fmt: skip


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_frequencies_and_factor_equal_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**ROPES[name], "rope_theta": 500000.0}
    spec = ModelSpec.from_hf({**DENSE, "rope_parameters": rope})
    assert spec.rope_type == rope["rope_type"]
    config = LlamaConfig(**{k: v for k, v in DENSE.items() if k != "model_type"}, rope_parameters=rope)
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    assert torch.equal(rope_inv_freq(spec), want_freq)
    assert rope_attention_factor(spec) == pytest.approx(want_factor, rel=1e-12)
    plain = rope_inv_freq(ModelSpec.from_hf({**DENSE, "rope_parameters": {"rope_theta": 500000.0}}))
    assert not torch.equal(plain, want_freq)  # the scaling is not a no-op for these parameters


def test_old_style_rope_scaling_key_and_default_original_context():
    """Qwen2.5 long-context configs: ``rope_scaling: {type: yarn, factor: 4}`` with no original context."""
    spec = ModelSpec.from_hf({**DENSE, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert spec.rope_type == "yarn" and spec.rope_theta == 1e6
    assert spec.rope_scaling["original_max_position_embeddings"] == DENSE["max_position_embeddings"]


@pytest.mark.parametrize("factor", [1.1386294361119891, 1.3, 0.9])
def test_mscale_fields_give_megatron_the_attention_factor(factor):
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    config = SimpleNamespace(**rope_mscale_fields(factor))
    assert _yarn_get_concentration_factor_from_config(config) == pytest.approx(factor, rel=1e-12)
    assert rope_mscale_fields(1.0) == {}


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "longrope"])
def test_unsupported_rope_type_names_the_field_and_the_supported_values(rope_type):
    with pytest.raises(UnsupportedModel) as err:
        ModelSpec.from_hf({**DENSE, "rope_scaling": {"rope_type": rope_type, "factor": 2.0}})
    assert f"rope_scaling.rope_type={rope_type!r}" in str(err.value)
    assert "default, llama3, yarn" in str(err.value)


def test_llama3_without_its_parameters_is_refused():
    with pytest.raises(UnsupportedModel, match="lacks low_freq_factor, high_freq_factor"):
        ModelSpec.from_hf({**DENSE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


# ---- MoE facts ---------------------------------------------------------------------------------------------
def test_moe_spec_facts():
    spec = ModelSpec.from_hf(MOE)
    assert (spec.num_experts, spec.experts_per_token, spec.moe_intermediate_size) == (8, 2, 32)
    assert spec.is_moe and spec.qk_norm and spec.norm_topk_prob and spec.router_aux_loss_coef == 0.001
    alias = ModelSpec.from_hf(
        {**{k: v for k, v in MOE.items() if k != "num_experts"}, "num_local_experts": 8}
    )
    assert alias.num_experts == 8  # transformers 5 writes the count under its alias
    q2 = ModelSpec.from_hf({**MOE, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 48})
    assert q2.qkv_bias and not q2.qk_norm and q2.shared_expert_intermediate_size == 48
    assert not ModelSpec.from_hf(DENSE).is_moe


@pytest.mark.parametrize("change", [{"decoder_sparse_step": 2}, {"mlp_only_layers": [0]}])
def test_moe_with_dense_layers_is_refused(change):
    with pytest.raises(UnsupportedModel, match="decoder_sparse_step=1, mlp_only_layers=\\[\\]"):
        ModelSpec.from_hf({**MOE, **change})


@pytest.mark.parametrize(
    ("config", "tp", "ep", "needle"),
    [
        (MOE, 1, 3, "expert_parallel=3 does not divide num_experts=8"),
        (MOE, 2, 1, "tensor_parallel=2 is not supported with the MoE model qwen3_moe"),
        (DENSE, 1, 2, "expert_parallel=2 needs a MoE model, but llama has no experts"),
    ],
)
def test_expert_layout_refusals(config, tp, ep, needle):
    with pytest.raises(ValueError, match=needle):
        check_expert_layout(ModelSpec.from_hf(config), tp, ep)
    check_expert_layout(ModelSpec.from_hf(MOE), 1, 4)  # a divisor: accepted


def test_parallel_config_refuses_expert_parallel_below_one():
    from portable_rl.config.training import ParallelConfig

    with pytest.raises(ValueError, match="expert_parallel=0 must be >= 1"):
        ParallelConfig(expert_parallel=0)


# ---- conversion --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_moe_conversion_round_trips_every_checkpoint_tensor(ckpts, arch):
    from portable_rl.training.convert import HFWeights, hf_to_megatron, megatron_to_hf

    spec = ModelSpec.from_hf(ckpts[arch])
    hf = HFWeights(ckpts[arch])
    full = dict(hf_to_megatron(spec, hf, range(spec.num_layers), True, True))
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in full
    assert full["decoder.layers.0.mlp.router.weight"].shape == (spec.num_experts, spec.hidden_size)
    assert not any(n.endswith("mlp.linear_fc1.weight") and "experts" not in n for n in full)
    back = dict(pair for name, t in full.items() for pair in megatron_to_hf(spec, name, t))
    assert set(back) == set(hf.keys())
    assert all(torch.equal(back[n], hf[n]) for n in back)
    if arch == "qwen2_moe":
        assert "decoder.layers.0.mlp.shared_experts.gate_weight" in full


def test_expert_parallel_rank_gets_its_experts_under_local_indices(ckpts):
    from portable_rl.training.convert import global_name, hf_to_megatron, local_name

    spec = ModelSpec.from_hf(ckpts["qwen3_moe"])
    from portable_rl.training.convert import HFWeights

    mine = [n for n, _ in hf_to_megatron(spec, HFWeights(ckpts["qwen3_moe"]), [1], False, False, range(2, 4))]
    experts = sorted({n.split("local_experts.")[1].split(".")[0] for n in mine if "local_experts" in n})
    assert experts == ["2", "3"]
    name = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    local = local_name(name, layer_offset=1, expert_offset=2)
    assert local == "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"
    assert global_name(local, 1, 2) == name


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_engine_names_every_checkpoint_tensor_and_writes_through_to_fused_experts(ckpts, arch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from portable_rl.rollout.engines.engine_weights import checksums, load_named_tensors, named_state

    model = AutoModelForCausalLM.from_pretrained(ckpts[arch], dtype=torch.float32)
    source = load_file(str(ckpts[arch] / "model.safetensors"))
    state = named_state(model)
    assert all(torch.equal(state[n], t) for n, t in source.items())
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    load_named_tensors(model, [(name, torch.full_like(source[name], 0.25))])
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    width = fused.shape[1] // 2
    assert torch.all(fused[2, width:] == 0.25) and torch.equal(
        fused[2, :width], source[name.replace("up", "gate")]
    )
    assert checksums(model, [name])[name] is not None


# ---- the CLI refuses bad expert layouts before anything is written -----------------------------------------
@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["train.parallel.expert_parallel=2", "train.data_parallel=1"], ("expert_parallel=2", "train.data_parallel=1")),
        (["train.parallel.expert_parallel=3", "train.data_parallel=3", "rollout.prompts_per_step=3"],
         ("expert_parallel=3 does not divide num_experts=4",)),
        (["train.parallel.tensor_parallel=2", "train.data_parallel=1", "train.parallel.expert_parallel=1"],
         ("tensor_parallel=2 is not supported with the MoE model",)),
        (["model.tiny_arch=llama"], ("expert_parallel=2 needs a MoE model",)),
    ],
)  # fmt: skip
def test_cli_refuses_bad_expert_layouts(tmp_path, capsys, monkeypatch, overrides, needles):
    from portable_rl.cli import main

    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "cpu")
    out_dir = tmp_path / "run"
    recipe = ROOT / "examples" / "tiny_moe_cpu.yaml"
    code = main(["train", str(recipe), "--output-dir", str(out_dir), "--dry-run", *overrides])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert not out_dir.exists()


def test_tiny_moe_recipe_passes_preflight(tmp_path, capsys, monkeypatch):
    from portable_rl.cli import main

    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "cpu")
    recipe = ROOT / "examples" / "tiny_moe_cpu.yaml"
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert not (tmp_path / "run").exists()
    out = capsys.readouterr().out
    assert "expert_parallel" in out and "qwen3_moe" in out, out
