"""``train.share_prompt_prefix`` on real Megatron (CPU, one spawned rank): the same numbers as without it.

One world-size-1 process builds the tiny llama (grouped-query attention, rotary embeddings) four times: padded
micro-batches and packed ones (a token budget), each without and with shared prompts. The batch mixes groups of
3, 2 and 1 samples (a unique prompt), interleaved so that every micro-batch holds several groups, with response
lengths from 1 to 7 and a partly masked response. Shared and unshared runs must give the same log-probs
(``compute_logprobs``) and the same gradients of a per-token policy-gradient loss with an entropy term (DDP's
``main_grad`` of every parameter after ``forward_backward``), to fp32 rounding. A wrong mask (a response seeing
another response), a wrong rotary position or a wrong target would each move them by far more than that.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from portable_rl.distributed import free_port
from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

pytestmark = pytest.mark.slow  # one spawned trainer built four times, ~20 s on 2 cores

# (prompt id, response length); prompt ids 0 and 1 repeat, 2 is unique, 3 appears twice
SAMPLES = [(0, 5), (2, 4), (0, 2), (3, 6), (1, 7), (0, 3), (3, 1), (1, 4)]
PROMPT_LENGTHS = {0: 6, 1: 3, 2: 5, 3: 4}
LAYOUTS = {
    "padded": dict(micro_batch_size=4),
    "padded-shared": dict(micro_batch_size=4, share_prompt_prefix=True),
    "packed": dict(max_tokens_per_micro_batch=40),
    "packed-shared": dict(max_tokens_per_micro_batch=40, share_prompt_prefix=True),
}


def _batch(vocab: int):
    from portable_rl.training.batch import TrainBatch

    g = torch.Generator().manual_seed(11)
    prompts = {k: torch.randint(3, vocab, (n,), generator=g).tolist() for k, n in PROMPT_LENGTHS.items()}
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for _, n in SAMPLES]
    masks = [[1] * n for _, n in SAMPLES]
    masks[0][1] = 0  # a masked token inside a shared group's response
    advantages = [torch.randn(n, generator=g).tolist() for _, n in SAMPLES]
    return TrainBatch(
        [prompts[k] for k, _ in SAMPLES], responses, masks, token_fields={"advantages": advantages}
    )


def _loss_fn(logp, ent, mb):
    mask = mb["loss_mask"]
    per_token = -logp * mb["advantages"] - 0.01 * ent
    return (per_token * mask).sum() / mask.sum(), {}


def _worker(ckpt: str, port: int, out: str) -> None:
    from portable_rl.training.actor import ActorConfig, MegatronActor, OptimConfig

    torch.set_num_threads(1)
    res = {}
    for name, options in LAYOUTS.items():
        config = ActorConfig(hf_checkpoint=ckpt, optim=OptimConfig(lr=1e-3), attention="sdpa", **options)
        actor = MegatronActor(config, 0, 1, "127.0.0.1", port)
        batch = _batch(actor.spec.vocab_size)
        micro_batches, _ = actor._micro_batches(batch)
        logprobs = actor.compute_logprobs(batch)
        actor.forward_backward(batch, _loss_fn)
        grads = {n: p.main_grad.detach().clone() for n, p in actor.model.named_parameters()}
        res[name] = {
            "logprobs": logprobs,
            "grads": grads,
            "rows": [tuple(mb.tokens.shape) for mb in micro_batches],
        }
        actor.ps.destroy_model_parallel()  # the next layout on the same process group
    torch.save(res, Path(out) / "result.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    ckpt = build_tiny_checkpoint(root / "tiny", TinySpec(arch="llama"))
    proc = mp.get_context("spawn").Process(
        target=_worker, args=(str(ckpt), free_port("127.0.0.1"), str(root))
    )
    proc.start()
    proc.join(timeout=600)
    assert proc.exitcode == 0, "the trainer process failed; its traceback is in the log above"
    return torch.load(root / "result.pt", weights_only=False)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_shared_prompts_give_the_same_logprobs_and_gradients(result, mode):
    base, shared = result[mode], result[f"{mode}-shared"]
    # The shared layout really is shorter: one packed row per micro-batch, fewer tokens than unshared.
    assert all(rows == 1 for rows, _ in shared["rows"])
    assert sum(n for _, n in shared["rows"]) < sum(r * n for r, n in base["rows"])
    assert [len(r) for r in shared["logprobs"]] == [n for _, n in SAMPLES]
    for a, b in zip(shared["logprobs"], base["logprobs"], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert shared["grads"].keys() == base["grads"].keys()
    for name, g in base["grads"].items():
        assert g.abs().max() > 0, name  # every parameter takes part
        assert _max_rel(shared["grads"][name], g) < 1e-5, name


def test_packed_and_padded_unshared_agree(result):
    # The reference itself: the two unshared layouts agree, so both comparisons above test against the truth.
    for a, b in zip(result["packed"]["logprobs"], result["padded"]["logprobs"], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
