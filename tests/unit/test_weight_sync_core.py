"""Weight-sync building blocks: config validation, bucketing, flat layout, checksums, disk writer, factory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from portable_rl.protocol.buckets import (
    dtype_from_name,
    dtype_name,
    flatten,
    iter_buckets,
    metas_from_lists,
    unflatten,
)
from portable_rl.protocol.checksum import EngineCheck, WeightCheckReport, WeightMismatch
from portable_rl.weight_sync import (
    WeightSyncConfig,
    make_weight_sync,
    resolve_strategy,
    tensor_checksum,
)
from portable_rl.weight_sync.disk import INDEX_NAME, write_safetensors_dir


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        ("a.weight", torch.randn(8, 4, generator=g)),
        ("b.bias", torch.randn(16, generator=g).to(torch.bfloat16)),
        ("c.weight", torch.randn(3, 5, 7, generator=g)),
        ("d.scale", torch.randn(2, generator=g).to(torch.float16)),
        ("e.count", torch.arange(5, dtype=torch.int64)),
    ]


# ---- config -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"strategy": "nccl"}, "weight_sync.strategy='nccl'"),
        ({"bucket_mb": 0}, "bucket_mb=0"),
        ({"bucket_mb": -1.5}, "bucket_mb=-1.5"),
        ({"timeout_s": 0}, "timeout_s=0"),
        ({"strategy": "disk"}, "disk_dir"),
        ({"flatten_buckets": "yes"}, "flatten_buckets='yes'"),
        ({"master_port": 70000}, "master_port=70000"),
        ({"group_name": ""}, "group_name"),
    ],
)
def test_config_rejects_bad_values_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match="weight_sync") as info:
        WeightSyncConfig(**kwargs)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_auto_strategy_follows_mode_and_explicit_wins():
    cfg = WeightSyncConfig()
    assert resolve_strategy(cfg, "colocated") == "shared_tensor"
    assert resolve_strategy(cfg, "disaggregated") == "broadcast"
    assert resolve_strategy(WeightSyncConfig(strategy="broadcast"), "colocated") == "broadcast"
    with pytest.raises(ValueError, match="deployment mode 'hybrid'"):
        resolve_strategy(cfg, "hybrid")


def test_factory_builds_the_resolved_strategy(tmp_path):
    from portable_rl.weight_sync.broadcast import BroadcastWeightSync
    from portable_rl.weight_sync.disk import DiskWeightSync
    from portable_rl.weight_sync.shared_tensor import SharedTensorWeightSync

    assert isinstance(make_weight_sync(WeightSyncConfig(), "colocated"), SharedTensorWeightSync)
    assert isinstance(make_weight_sync(WeightSyncConfig(), "disaggregated"), BroadcastWeightSync)
    disk = make_weight_sync(WeightSyncConfig(strategy="disk", disk_dir=str(tmp_path)), "colocated")
    assert isinstance(disk, DiskWeightSync)
    assert WeightSyncConfig(bucket_mb=1).bucket_bytes == 1024 * 1024


# ---- buckets ------------------------------------------------------------------------------------------------
def test_buckets_hold_one_dtype_respect_size_and_keep_everything():
    weights = _weights()
    buckets = list(iter_buckets(iter(weights), max_bytes=100))
    flat_names = [n for b in buckets for n, _ in b]
    assert sorted(flat_names) == sorted(n for n, _ in weights)
    for bucket in buckets:
        assert len({t.dtype for _, t in bucket}) == 1
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= 100 or len(bucket) == 1  # only a lone oversize tensor may exceed the limit
    # a.weight (128 B) is larger than the limit and travels alone
    assert [["a.weight"]] == [[n for n, _ in b] for b in buckets if any(n == "a.weight" for n, _ in b)]


def test_bucket_of_many_small_tensors_is_split_at_the_limit():
    weights = [(f"w{i}", torch.zeros(10)) for i in range(10)]  # 40 B each
    sizes = [len(b) for b in iter_buckets(weights, max_bytes=120)]
    assert sizes == [3, 3, 3, 1]


def test_duplicate_names_and_non_tensors_are_rejected():
    with pytest.raises(ValueError, match="'x' appears twice"):
        list(iter_buckets([("x", torch.zeros(1)), ("x", torch.zeros(1))], 10))
    with pytest.raises(TypeError, match="'y' is a list"):
        list(iter_buckets([("y", [1.0])], 10))


def test_flatten_roundtrip_is_bit_exact_and_matches_declared_layout():
    bucket = [
        ("x", torch.randn(3, 4)),
        ("y", torch.randn(5).t()),
        ("z", torch.randn(4, 3).t()),
    ]  # z non-contiguous
    flat, metas = flatten(bucket)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * 4 for _, t in bucket)
    assert [(m.start_idx, m.end_idx) for m in metas] == [(0, 48), (48, 68), (68, 116)]
    # the receiver derives the same layout from names/dtypes/shapes alone
    rebuilt = metas_from_lists([n for n, _ in bucket], ["float32"] * 3, [list(t.shape) for _, t in bucket])
    assert rebuilt == metas
    for (name, original), (name2, view) in zip(bucket, unflatten(flat.clone(), rebuilt), strict=True):
        assert name == name2 and view.shape == original.shape
        assert torch.equal(view, original)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned-buffer", "odd-buffer"])
def test_flatten_copies_every_bit_whether_or_not_a_tensor_is_aligned_for_its_dtype(offset):
    """Tensors are copied as their own dtype where their offset allows it, else byte-wise: the bytes are equal."""
    nan_payloads = torch.tensor([0x7FC00001, -1], dtype=torch.int32).view(torch.float32)
    bucket = [
        ("h", torch.randn(3).to(torch.bfloat16)),  # 6 bytes: the next tensor starts unaligned for fp32
        ("f", torch.cat([nan_payloads, torch.randn(5)])),
        ("g", torch.randn(4, 2).t()),  # non-contiguous
        ("s", torch.tensor(7, dtype=torch.int64)),  # 0-dim
    ]
    out = torch.zeros(128, dtype=torch.uint8)[offset:]
    flat, metas = flatten(bucket, out)
    expected = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])
    assert torch.equal(flat, expected)
    assert [m.start_idx for m in metas] == [0, 6, 34, 66]


def test_flatten_into_a_given_buffer_and_rejects_a_small_one():
    bucket = [("x", torch.ones(4))]
    out = torch.zeros(32, dtype=torch.uint8)
    flat, _ = flatten(bucket, out)
    assert flat.data_ptr() == out.data_ptr() and flat.numel() == 16
    with pytest.raises(ValueError, match=">= 16 elements"):
        flatten(bucket, torch.zeros(8, dtype=torch.uint8))


def test_dtype_names_roundtrip_and_bad_name():
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float8_e4m3fn):
        assert dtype_from_name(dtype_name(dt)) is dt
    with pytest.raises(ValueError, match="'floaty'"):
        dtype_from_name("floaty")


# ---- checksums ----------------------------------------------------------------------------------------------
def test_checksum_sees_one_bit_dtype_and_shape():
    t = torch.randn(4, 4)
    base = tensor_checksum(t)
    assert tensor_checksum(t.clone()) == base
    flipped = t.clone()
    flipped.view(torch.int32)[2, 3] ^= 1  # one mantissa bit
    assert tensor_checksum(flipped) != base
    assert tensor_checksum(t.reshape(2, 8)) != base
    assert tensor_checksum(t.view(torch.int32)) != base
    assert tensor_checksum(torch.tensor([0.0])) != tensor_checksum(torch.tensor([-0.0]))  # bit-equal, not ==
    assert tensor_checksum(t.t()) == tensor_checksum(t.t().contiguous())


def test_report_raises_with_names():
    report = WeightCheckReport([EngineCheck("http://e0", compared=3, mismatched=["w1"], missing=["w2"])])
    assert not report.ok
    with pytest.raises(WeightMismatch, match="w1") as info:
        report.raise_if_failed()
    assert "w2" in str(info.value) and "http://e0" in str(info.value)
    WeightCheckReport([EngineCheck("http://e0", compared=3)]).raise_if_failed()


# ---- disk writer --------------------------------------------------------------------------------------------
def test_disk_writer_shards_indexes_and_is_bit_exact(tmp_path):
    weights = _weights(1)
    target = write_safetensors_dir(
        iter(weights), tmp_path / "weights_v3", shard_bytes=100, metadata={"weight_version": "3"}
    )
    index = json.loads((target / INDEX_NAME).read_text())
    shards = sorted(p.name for p in target.glob("*.safetensors"))
    assert len(shards) >= 3 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert set(index["weight_map"]) == {n for n, _ in weights}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in weights)
    loaded = {}
    for shard in shards:
        loaded.update(load_file(str(target / shard)))
    for name, tensor in weights:
        assert tensor_checksum(loaded[name]) == tensor_checksum(tensor)
    assert not list(tmp_path.glob(".*partial"))


def test_disk_writer_leaves_no_partial_directory_on_failure(tmp_path):
    def broken():
        yield "ok", torch.zeros(2)
        raise RuntimeError("trainer died while gathering")

    with pytest.raises(RuntimeError, match="trainer died"):
        write_safetensors_dir(broken(), tmp_path / "weights_v1", shard_bytes=4)
    assert list(tmp_path.iterdir()) == []


def test_buckets_can_keep_small_tensors_apart_from_large_ones():
    big, small = torch.zeros(256), torch.zeros(4)  # 1 KiB and 16 bytes
    named = [("b0", big), ("s0", small), ("b1", big), ("s1", small), ("b2", big)]
    plain = [[n for n, _ in b] for b in iter_buckets(iter(named), 2048 + 16)]
    split = [[n for n, _ in b] for b in iter_buckets(iter(named), 2048 + 16, split_at=64)]
    assert plain == [["b0", "s0", "b1"], ["s1", "b2"]]
    assert split == [["b0", "b1"], ["b2"], ["s0", "s1"]]


class _Listing:
    def __init__(self, label, backends):
        self.label, self._backends = label, backends

    def weight_update_backends(self):
        return self._backends


def test_group_backend_is_the_platforms_unless_an_engine_lists_others():
    from portable_rl.weight_sync import WeightSyncError
    from portable_rl.weight_sync.broadcast import group_backend

    sglang_like, cpu_engine = _Listing("a", None), _Listing("b", ["gloo"])
    assert group_backend("device", [sglang_like, sglang_like]) == "device"
    assert group_backend("gloo", [sglang_like, cpu_engine]) == "gloo"
    assert group_backend("device", [cpu_engine]) == "gloo"
    assert group_backend("device", [_Listing("c", ["device", "gloo"])]) == "device"
    with pytest.raises(WeightSyncError, match=r"c lists \['other'\].*weight_sync.strategy=disk"):
        group_backend("device", [cpu_engine, _Listing("c", ["other"])])
