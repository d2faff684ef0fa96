"""Loss aggregation modes and masked statistics against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from portable_rl.algo.aggregation import aggregate_loss, masked_mean, masked_whiten

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 10 / 4),
        ("seq-mean-token-mean", (2 + 4) / 2),
        ("seq-mean-token-sum", (6 + 4) / 2),
        ("seq-mean-token-sum-norm", 10 / (2 * 3)),  # L defaults to the padded length T = 3
    ],
)
def test_modes_hand_values(mode, expected):
    assert aggregate_loss(VALUES, MASK, mode).item() == pytest.approx(expected)


def test_dr_grpo_constant_normaliser():
    assert aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", norm_constant=5).item() == pytest.approx(
        1.0
    )


def test_padding_never_leaks_even_nan():
    v = VALUES.clone()
    v[1, 1] = float("nan")
    v[1, 2] = float("inf")
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert math.isfinite(aggregate_loss(v, MASK, mode).item()), mode


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_microbatches_with_global_counts_sum_to_full_batch(mode):
    full = aggregate_loss(VALUES, MASK, mode).item()
    parts = sum(
        aggregate_loss(VALUES[i : i + 1], MASK[i : i + 1], mode, global_tokens=4, global_seqs=2).item()
        for i in range(2)
    )
    assert parts == pytest.approx(full)


def test_masked_mean_empty_is_zero_and_whiten_unbiased():
    assert masked_mean(VALUES, torch.zeros(2, 3)).item() == 0.0
    w = masked_whiten(VALUES, MASK)
    # masked values 1,2,3,4: mean 2.5, unbiased var 5/3
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3 + 1e-8)
    assert torch.allclose(w[MASK.bool()], expected, atol=1e-6)
    assert torch.equal(w[~MASK.bool()], torch.zeros(2))


def test_errors():
    with pytest.raises(
        ValueError, match="loss aggregation 'mean' is not one of token-mean, seq-mean-token-mean"
    ):
        aggregate_loss(VALUES, MASK, "mean")
    with pytest.raises(ValueError, match=r"mask shape \(2, 2\) does not match values shape \(2, 3\)"):
        aggregate_loss(VALUES, MASK[:, :2], "token-mean")
