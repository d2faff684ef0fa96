"""The CPU engine's preallocated KV cache and its sampler's fast path give the same bits as the plain versions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.rollout.engines import kv_cache
from portable_rl.rollout.engines.sampling import SamplingParams, sample


def _kv(batch: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, steps, 8, generator=g), torch.randn(batch, 2, steps, 8, generator=g)


def _pair() -> tuple[DynamicCache, DynamicCache]:
    """(plain cache, preallocated cache) of one layer, both empty."""
    from transformers import PretrainedConfig

    config = PretrainedConfig(num_hidden_layers=1)
    return DynamicCache(config=config), kv_cache.preallocate(DynamicCache(config=config))


def test_growth_past_capacity_keeps_every_column_and_reallocates_only_when_full():
    plain, pre = _pair()
    layer = pre.layers[0]
    assert isinstance(layer, kv_cache.PreallocLayer)
    k, v = _kv(3, 5, 0)
    plain.update(k, v, 0)
    pre.update(k, v, 0)
    capacity = layer._kbuf.shape[-2]
    assert capacity == 5 + kv_cache.headroom(5)
    buffers = {layer._kbuf.data_ptr()}
    for step in range(capacity + 10):  # runs past the first capacity: the buffer must grow and keep the past
        k, v = _kv(3, 1, step + 1)
        want_k, want_v = plain.update(k, v, 0)
        got_k, got_v = pre.update(k, v, 0)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert got_k.data_ptr() == layer._kbuf.data_ptr()  # the layer's keys are a view of its buffer
        buffers.add(layer._kbuf.data_ptr())
    assert len(buffers) == 2  # one reallocation when the first buffer filled, none per step
    assert layer._kbuf.shape[-2] >= layer.keys.shape[-2] > capacity


def test_surgery_then_updates_match_a_plain_cache():
    plain, pre = _pair()
    for cache in (plain, pre):
        cache.update(*_kv(4, 6, 0), 0)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]] * 2 + [[1] * 6] * 2)
    other_plain, other_pre = _pair()
    for cache in (other_plain, other_pre):
        cache.update(*_kv(2, 3, 1), 0)
    other_mask = torch.ones(2, 3, dtype=torch.long)
    results = []
    for cache, other in ((plain, other_plain), (pre, other_pre)):
        cache, m = kv_cache.select(cache, mask, [0, 1])  # the long rows leave
        cache, m = kv_cache.trim_left(cache, m)  # and the all-padding columns go
        cache, m = kv_cache.merge(cache, m, other, other_mask)  # new rows join
        outs = [cache.update(*_kv(4, 1, 10 + s), 0) for s in range(40)]
        results.append((m, outs))
    (m_plain, outs_plain), (m_pre, outs_pre) = results
    assert torch.equal(m_plain, m_pre)
    for (kp, vp), (kq, vq) in zip(outs_plain, outs_pre, strict=True):
        assert torch.equal(kp, kq) and torch.equal(vp, vq)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_decode_is_bit_identical_with_the_preallocated_cache(tmp_path, arch):
    path = build_tiny_checkpoint(tmp_path / arch, TinySpec(arch=arch))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # one left-padded row
    logits = []
    for cache in _model_caches(model):
        m, step_ids, rows = mask.clone(), ids, []
        with torch.inference_mode():
            for step in range(45):  # past the prefill buffer's headroom
                pos = (m.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
                out = model(input_ids=step_ids, attention_mask=m, position_ids=pos, past_key_values=cache)
                rows.append(out.logits[:, -1])
                step_ids = out.logits[:, -1:].argmax(-1)
                m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=m.dtype)], dim=1)
                if step == 20:  # a request finishes mid-rollout
                    cache, m = kv_cache.select(cache, m, [0, 2])
                    cache, m = kv_cache.trim_left(cache, m)
                    step_ids = step_ids[[0, 2]]
        logits.append(rows)
    for a, b in zip(*logits, strict=True):
        assert torch.equal(a, b)


def _model_caches(model):
    return DynamicCache(config=model.config), kv_cache.preallocate(DynamicCache(config=model.config))


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
