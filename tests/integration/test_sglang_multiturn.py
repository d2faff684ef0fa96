"""The shipped multi-turn tool-calling example on the real SGLang 0.5.23 server on CPU (marker ``sglang``).

Needs the SGLang venv (``make sglang-venv``; ``SGLANG_VENV`` overrides its path). The rollout manager runs the
recipe's hook (``examples/tiny_multiturn_cpu.yaml``: ``calculator_agent``, every turn a calculator call, three
turns) against one SGLang server on the tiny Llama checkpoint, then a float64 forward pass of the model scores
each whole conversation: on the model's tokens (loss mask 1) its log-probs must equal SGLang's, and the
conversation must be what the chat template renders for the same messages, turn by turn.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from sglang_server import launch_sglang
from test_sglang_real import ATOL
from transformers import AutoModelForCausalLM, AutoTokenizer

from portable_rl.config.rollout import RolloutConfig
from portable_rl.rollout.manager import RolloutManager

pytestmark = pytest.mark.sglang

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "sglang-multiturn-token"


@pytest.fixture(scope="module")
def engine(tiny_llama):
    proc = launch_sglang(tiny_llama, api_key=TOKEN)
    yield proc
    assert proc.stop() is not None


def test_multiturn_episodes_on_sglang_match_a_forward_pass_on_model_tokens(engine, tiny_llama):
    recipe = yaml.safe_load((ROOT / "examples" / "tiny_multiturn_cpu.yaml").read_text())["rollout"]
    keys = (
        "max_new_tokens",
        "max_turns",
        "temperature",
        "generate",
        "generate_options",
        "reward",
        "reward_options",
    )
    cfg = RolloutConfig(samples_per_prompt=2, health_check_interval_s=0, **{k: recipe[k] for k in keys})
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "Compute 12 - 5.")]
    prompts = [
        (i, tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), None)
        for i, m in enumerate(messages)
    ]
    prompts = [(i, tok.encode(text, add_special_tokens=False), label) for i, text, label in prompts]
    mgr = RolloutManager(cfg, engine.url, tok, engine_urls=[engine.url], api_key=TOKEN)
    samples = [s for g in mgr.rollout(prompts, step=1, seed=0).groups for s in g.samples]
    assert len(samples) == 4

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    for s in samples:
        assert (
            s.metadata["turns"] == recipe["max_turns"] and s.metadata["tool_calls"] == recipe["max_turns"] - 1
        )
        mask = torch.tensor(s.loss_mask, dtype=torch.bool)
        assert 0 < int(mask.sum()) < len(s.loss_mask), "model tokens and tool tokens both present"
        ids = s.prompt_tokens + s.response_tokens
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        start = len(s.prompt_tokens)
        lps = torch.log_softmax(logits[start - 1 : -1] / cfg.temperature, dim=-1)
        ours = lps.gather(1, torch.tensor(s.response_tokens)[:, None]).squeeze(1)
        served = torch.tensor(s.rollout_logprobs, dtype=torch.float64)
        torch.testing.assert_close(served[mask], ours[mask], atol=ATOL, rtol=0)
        # Each observation is the chat template's rendering of a "tool" message after the assistant turn.
        text = tok.decode(s.response_tokens, skip_special_tokens=False)
        assert text.count("<|im_start|>tool\n") == recipe["max_turns"] - 1
        assert text.count("<|im_start|>assistant\n") == recipe["max_turns"] - 1
