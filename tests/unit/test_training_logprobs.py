"""Vocab-parallel log-probs/entropy against torch's log_softmax (TP1 in-process, TP2 over gloo), and batches."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from portable_rl.distributed import free_port
from portable_rl.training.batch import TrainBatch, to_micro_batch
from portable_rl.training.logprobs import response_positions, response_view, token_logprobs_and_entropy

VOCAB, PADDED = 11, 12


def _reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    logp_all = torch.log_softmax(logits[..., :VOCAB].float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, PADDED, generator=g) * 3
    logits[..., VOCAB:] = 50.0  # padding columns must not count, even with huge values
    targets = torch.randint(0, VOCAB, (2, 5), generator=g)
    return logits, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_rank_matches_log_softmax_and_its_gradient(temperature):
    logits, targets = _inputs()
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs_and_entropy(ours_in, targets, VOCAB, temperature=temperature)
    ref_logp, ref_ent = _reference(ref_in, targets, temperature)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-6)
    (logp.sum() + 0.3 * ent.sum()).backward()
    (ref_logp.sum() + 0.3 * ref_ent.sum()).backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-6)


def _tp_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    logits, targets = _inputs()
    local = logits[..., rank * 6 : (rank + 1) * 6].clone().requires_grad_(True)
    logp, ent = token_logprobs_and_entropy(local, targets, VOCAB, tp_group=dist.group.WORLD)
    (logp.sum() + 0.3 * ent.sum()).backward()
    # plain lists: a shared-memory tensor would need this process alive until the parent reads it
    queue.put((rank, logp.detach().tolist(), ent.detach().tolist(), local.grad.tolist()))
    dist.destroy_process_group()


def test_two_tp_ranks_match_the_full_vocabulary():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_tp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, logp, ent, grad = queue.get()
        results[rank] = (torch.tensor(logp), torch.tensor(ent), torch.tensor(grad))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    logits, targets = _inputs()
    ref_in = logits.clone().requires_grad_(True)
    ref_logp, ref_ent = _reference(ref_in, targets)
    (ref_logp.sum() + 0.3 * ref_ent.sum()).backward()
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][0], ref_logp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank][1], ref_ent, rtol=1e-5, atol=1e-6)
    grad = torch.cat([results[0][2], results[1][2]], dim=-1)
    torch.testing.assert_close(grad, ref_in.grad, rtol=1e-5, atol=1e-6)


def test_response_view_aligns_with_response_tokens():
    values = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    out = response_view(values, prompt_lengths=[2, 3], response_lengths=[3, 1])
    # position p-1 predicts the first response token
    assert out.tolist() == [[1.0, 2.0, 3.0], [8.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "prompts, responses, starts",
    [
        ([2, 3], [3, 1], None),  # padded rows: one position list for both
        ([4, 1, 3], [0, 2, 5], None),  # a sample without response tokens
        ([2, 3, 1], [2, 1, 3], [0, 4, 8]),  # packed: samples end to end in one row
    ],
)
def test_logits_of_kept_positions_give_the_same_response_view(prompts, responses, starts):
    rows, width = (1, 16) if starts is not None else (len(prompts), 10)
    values = torch.randn(rows, width)
    kept, offsets = response_positions(prompts, responses, starts)
    assert kept == sorted(set(kept))
    firsts = [s + p - 1 for s, p in zip(starts or [0] * len(prompts), prompts, strict=True)]
    assert set(kept) == {f + j for f, r in zip(firsts, responses, strict=True) for j in range(r)}
    compact = values[:, kept]
    assert torch.equal(
        response_view(compact, prompts, responses, starts, offsets),
        response_view(values, prompts, responses, starts),
    )


def test_batch_validation_names_the_problem():
    with pytest.raises(ValueError, match="empty prompt"):
        TrainBatch([[]], [[1]], [[1]])
    with pytest.raises(ValueError, match="loss mask has 1 entries for 2"):
        TrainBatch([[1]], [[1, 2]], [[1]])
    with pytest.raises(ValueError, match="advantages"):
        TrainBatch([[1]], [[1, 2]], [[1, 1]], token_fields={"advantages": [[1.0]]})
    with pytest.raises(ValueError, match="multiple of 2"):
        TrainBatch([[1]] * 3, [[2]] * 3, [[1]] * 3).shard(0, 2)


def test_micro_batch_padding_and_sharding():
    batch = TrainBatch(
        prompt_tokens=[[1, 2], [3], [4, 5, 6], [7]],
        response_tokens=[[8, 9, 10], [11], [12], [13, 14]],
        loss_masks=[[1, 1, 0], [1], [1], [0, 1]],
        token_fields={"advantages": [[1.0] * 3, [2.0], [3.0], [4.0, 4.0]]},
        sample_fields={"rewards": [1.0, 0.0, 1.0, 0.0]},
    )
    second = batch.shard(1, 2)
    assert second.prompt_tokens == [[4, 5, 6], [7]]
    mb = to_micro_batch(second, seq_len=8)
    assert mb.tokens.shape == (2, 8) and mb.tokens[0, :4].tolist() == [4, 5, 6, 12]
    assert mb.loss_mask.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert mb.token_fields["advantages"].tolist() == [[3.0, 0.0], [4.0, 4.0]]
    assert mb.as_loss_batch()["rewards"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="does not fit"):
        to_micro_batch(batch, seq_len=3)
    assert [len(m) for m in batch.micro_batches(3)] == [3, 1]
