"""The CPU engine sampler's all-temperature-1 fast path gives the same tokens and log-probs as the general path."""

from __future__ import annotations

import torch

from portable_rl.rollout.engines.sampling import SamplingParams, sample


def test_all_temperature_one_batch_draws_what_per_row_multinomial_draws():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    params = [SamplingParams() for _ in range(5)]
    tokens, logprobs = sample(logits, params, [torch.Generator().manual_seed(s) for s in range(5)])
    ref_lp = torch.log_softmax(logits, dim=-1)
    for i in range(5):
        want = torch.multinomial(ref_lp[i].exp(), 1, generator=torch.Generator().manual_seed(i)).item()
        assert tokens[i] == want
        assert logprobs[i] == ref_lp[i, want].item()
    # A mixed batch (one row at another temperature) takes the general path: the temperature-1 rows agree.
    mixed = [SamplingParams() for _ in range(4)] + [SamplingParams(temperature=0.5)]
    tokens_mixed, lp_mixed = sample(logits, mixed, [torch.Generator().manual_seed(s) for s in range(5)])
    assert tokens_mixed[:4] == tokens[:4] and lp_mixed[:4] == logprobs[:4]
    assert lp_mixed[4] == torch.log_softmax(logits[4] / 0.5, dim=-1)[tokens_mixed[4]].item()
