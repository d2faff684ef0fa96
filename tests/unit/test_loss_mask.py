"""The loss mask from a generate hook reaches the trainer's loss: tokens the environment inserted (mask 0)
get no policy loss, KL or entropy, no gradient, and do not count in token-mean aggregation.

Multi-turn samples (model tokens, then tool tokens, then model tokens) go through ``build_train_batch``,
``to_micro_batch`` and the loss callback ``make_loss_fn`` — the path ``TrainerWorker.train_rl_step`` takes.
"""

from __future__ import annotations

import pytest
import torch

from portable_rl.config.algo import AlgoConfig
from portable_rl.data.types import Group, Sample
from portable_rl.rollout_to_train import build_train_batch, make_loss_fn
from portable_rl.training.batch import to_micro_batch

# Two samples of one group: 2 model tokens, 3 tool tokens, 2 model tokens; and 4 model tokens.
MASKS = [[1, 1, 0, 0, 0, 1, 1], [1, 1, 1, 1]]
CFG = AlgoConfig(kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0, loss_agg="token-mean")


def _groups(masks: list[list[int]]) -> list[Group]:
    samples = [
        Sample(
            0,
            0,
            [5, 6],
            response_tokens=list(range(10, 10 + len(m))),
            rollout_logprobs=[-1.0] * len(m),
            loss_mask=m,
            reward=float(i),
        )
        for i, m in enumerate(masks)
    ]
    return [Group(0, 0, samples)]


def _loss(groups, logp_rows, entropy_rows, ref_rows):
    batch, _ = build_train_batch(groups, CFG, old_logprobs=logp_rows, ref_logprobs=ref_rows)
    mb = to_micro_batch(batch, seq_len=batch.max_length()).as_loss_batch()
    width = mb["loss_mask"].shape[1]
    logp = torch.zeros(len(logp_rows), width)
    ent = torch.zeros(len(logp_rows), width)
    for i, (row, e) in enumerate(zip(logp_rows, entropy_rows, strict=True)):
        logp[i, : len(row)] = torch.tensor(row)
        ent[i, : len(e)] = torch.tensor(e)
    logp.requires_grad_(True)
    loss, metrics = make_loss_fn(CFG)(logp, ent, mb)
    loss.backward()
    return loss.item(), logp.grad, metrics


def _rows(masks, base, env_value):
    return [[base - 0.1 * j if m else env_value for j, m in enumerate(mask)] for mask in masks]


def test_masked_tokens_change_nothing_and_get_no_gradient():
    groups = _groups(MASKS)
    a = _loss(groups, _rows(MASKS, -1.2, -1.2), _rows(MASKS, 2.0, 2.0), _rows(MASKS, -1.1, -1.1))
    b = _loss(groups, _rows(MASKS, -1.2, -9.0), _rows(MASKS, 2.0, 50.0), _rows(MASKS, -1.1, 3.0))
    assert a[0] == pytest.approx(b[0], abs=1e-7)  # what sits on tool tokens does not move the loss
    for key in ("kl_loss", "entropy", "tis_weight_mean", "pg_loss"):
        assert float(a[2][key]) == pytest.approx(float(b[2][key]), abs=1e-7), key
    grad = b[1]
    assert torch.all(grad[0, 2:5] == 0) and torch.all(grad[0, [0, 1, 5, 6]] != 0)


def test_token_mean_counts_only_model_tokens():
    # The same model tokens without the tool tokens in between: the same loss (the denominator is 8, not 11).
    groups = _groups(MASKS)
    dense = [[1, 1, 1, 1], [1, 1, 1, 1]]
    dense_groups = _groups(dense)
    with_tools = _loss(groups, _rows(MASKS, -1.2, -5.0), _rows(MASKS, 2.0, 9.0), _rows(MASKS, -1.1, 0.0))
    logp = [[-1.2, -1.3, -1.7, -1.8], _rows(MASKS, -1.2, 0)[1]]
    ent = [[2.0, 1.9, 1.5, 1.4], _rows(MASKS, 2.0, 0)[1]]
    ref = [[-1.1, -1.2, -1.6, -1.7], _rows(MASKS, -1.1, 0)[1]]
    without = _loss(dense_groups, logp, ent, ref)
    assert with_tools[0] == pytest.approx(without[0], rel=1e-6)
