"""Resident engine weights: the engine's tensors move into one shared segment, a trainer writes them in place.

In one process: ``make_resident`` leaves the model's output unchanged and keeps tied weights tied; a writer that
opens the segment by name and follows the layout makes the model compute exactly what ``load_state_dict`` of
the same weights computes; bad names and shapes are refused naming them; too little shared memory is refused
before anything moves; the shared-tensor sync falls back to buckets ("auto") or fails ("on") when an engine
does not offer resident weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from portable_rl.config.weight_sync import WeightSyncConfig
from portable_rl.rollout.engines import resident_weights
from portable_rl.rollout.engines.engine_weights import named_state
from portable_rl.weight_sync import WeightSyncError
from portable_rl.weight_sync.resident import ResidentTargets, _open_segment, _views
from portable_rl.weight_sync.shared_tensor import SharedTensorWeightSync

IDS = torch.tensor([[1, 5, 9, 33, 2, 17]])


def tiny(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def targets_for(shared) -> ResidentTargets:
    described = shared.describe()
    segment = _open_segment(described["segment"])
    return ResidentTargets([segment], [_views(segment, described["tensors"])])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resident_model_computes_the_same_and_takes_writes_in_place(tied):
    model, reference = tiny(tied), tiny(tied, seed=1)
    before = logits(model)
    shared = resident_weights.make_resident(model)
    try:
        assert resident_weights.make_resident(model, shared) is shared
        torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
        start = torch.frombuffer(shared.segment.buf, dtype=torch.uint8).data_ptr()
        for name, p in model.named_parameters():
            assert start <= p.data_ptr() < start + shared.segment.size, name
        assert set(shared.layout) == set(named_state(model))
        if tied:
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert (
                shared.layout["lm_head.weight"]["offset"]
                == shared.layout["model.embed_tokens.weight"]["offset"]
            )

        new = sorted(reference.state_dict().items())
        targets = targets_for(shared)
        try:
            assert targets.write(iter(new)) == len(new)
        finally:
            targets.close()
        torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)
    finally:
        shared.release()


def test_writer_refuses_unknown_names_and_wrong_shapes_naming_them():
    model = tiny(False)
    shared = resident_weights.make_resident(model)
    targets = targets_for(shared)
    try:
        with pytest.raises(ValueError, match=r"'model.nope.weight' is not a parameter"):
            targets.write([("model.nope.weight", torch.zeros(3))])
        with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(31,\).*expects \(32,\)"):
            targets.write([("model.norm.weight", torch.zeros(31))])
        with pytest.raises(ValueError, match="got no tensors"):
            targets.write([])
    finally:
        targets.close()
        shared.release()


def test_too_little_shared_memory_is_refused_before_anything_moves(monkeypatch):
    model = tiny(False)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    monkeypatch.setattr(resident_weights, "shm_free_bytes", lambda path=resident_weights.SHM_DIR: 1000)
    with pytest.raises(
        ValueError, match=r"need \d+ bytes of shared memory, /dev/shm has 1000 free.*--shm-size"
    ):
        resident_weights.make_resident(model)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before


class _NoResident:
    label = "http://engine-without-resident"
    tp_size = 1

    def supports_resident_weights(self) -> bool:
        return False


def test_sync_falls_back_to_buckets_on_auto_and_fails_on_on():
    sync = SharedTensorWeightSync(WeightSyncConfig(strategy="shared_tensor", resident_weights="auto"))
    sync.engines = [_NoResident()]
    assert sync._open_resident() is None
    sync.cfg = WeightSyncConfig(strategy="shared_tensor", resident_weights="on")
    with pytest.raises(WeightSyncError, match="resident_weights=on, but http://engine-without-resident"):
        sync._open_resident()
    sync.cfg = WeightSyncConfig(strategy="shared_tensor", resident_weights="off")
    assert sync._open_resident() is None


def test_config_refuses_an_unknown_resident_mode():
    with pytest.raises(ValueError, match=r"resident_weights='yes' is not one of auto, on, off"):
        WeightSyncConfig(resident_weights="yes")
