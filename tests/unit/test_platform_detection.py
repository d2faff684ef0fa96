"""Detection on simulated hosts: the right platform and facts for cpu, cuda and rocm; clear errors."""

from __future__ import annotations

import sys

import pytest
from fake_hosts import simulate_cpu, simulate_cuda, simulate_rocm

from portable_rl import platform as plat


def test_cpu_host_detects_cpu(monkeypatch):
    simulate_cpu(monkeypatch)
    monkeypatch.delenv(plat.PLATFORM_ENV, raising=False)
    p = plat.detect()
    assert p.name == "cpu"
    assert p.dist_backend == "gloo" and p.torch_device_type == "cpu"
    assert p.sglang_server_args()["attention_backend"] == "torch_native"
    assert p.trainer_kernels().attention == "sdpa" and p.default_train_dtype == "float32"
    assert p.fp8_dtype() is None
    assert "skipped" in p.reason and "rocm" in p.reason


def test_rocm_host_gfx942(monkeypatch):
    simulate_rocm(monkeypatch, ["gfx942"] * 8)
    monkeypatch.delenv(plat.PLATFORM_ENV, raising=False)
    p = plat.detect()
    assert p.name == "rocm"
    assert len(p.devices) == 8 and p.devices[0].arch == "gfx942"
    assert p.torch_device_type == "cuda"  # ROCm torch exposes HIP devices as "cuda"
    assert p.dist_backend == "nccl" and p.comm_library == "RCCL"
    assert p.fp8_dtype() == "float8_e4m3fnuz"
    assert p.peak_flops("bf16") == pytest.approx(1307.4e12)
    assert p.comm_env_defaults["NCCL_CUMEM_ENABLE"] == "0"
    assert p.comm_env_defaults["RCCL_MSCCL_ENABLE"] == "0"
    assert p.comm_env_defaults["NCCL_NVLS_ENABLE"] == "0"
    assert p.runtime_env_defaults["HSA_NO_SCRATCH_RECLAIM"] == "1"
    assert p.runtime_env_defaults["HIP_FORCE_DEV_KERNARG"] == "1"
    assert p.runtime_env_defaults["SGLANG_USE_AITER"] == "1"
    assert set(p.ray_noset_env) == {
        "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES",
        "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES",
    }
    assert not p.supports_numa_affinity
    assert p.ipc_handle_carries_device
    # amd-aiter is absent on this host, so SGLang falls back to triton attention
    assert p.sglang_server_args()["attention_backend"] == "triton"
    assert p.image_ref().endswith("-rocm-gfx942")


def test_rocm_host_gfx950_fp8_is_ocp(monkeypatch):
    simulate_rocm(monkeypatch, ["gfx950"] * 8)
    p = plat.load("rocm")
    assert p.fp8_dtype() == "float8_e4m3fn"
    assert p.fp8_dtype("gfx942:sramecc+:xnack-") == "float8_e4m3fnuz"
    assert p.fp8_dtype("gfx90a") is None
    assert p.peak_flops("bf16") == pytest.approx(2300e12)


def test_cuda_host_h100(monkeypatch):
    simulate_cuda(monkeypatch, [(9, 0)] * 4)
    monkeypatch.delenv(plat.PLATFORM_ENV, raising=False)
    p = plat.detect()
    assert p.name == "cuda"
    assert len(p.devices) == 4 and p.devices[0].arch == "sm90"
    assert p.dist_backend == "nccl" and p.comm_library == "NCCL"
    assert p.fp8_dtype() == "float8_e4m3fn"
    assert p.sglang_server_args()["attention_backend"] == "fa3"
    assert p.supports_numa_affinity
    assert p.peak_flops("bf16") == pytest.approx(989e12)
    assert p.ray_noset_env == ("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES",)


def test_cuda_host_a100_has_no_fp8_and_uses_flashinfer(monkeypatch):
    simulate_cuda(monkeypatch, [(8, 0)])
    p = plat.load("cuda")
    assert p.fp8_dtype() is None
    assert p.sglang_server_args()["attention_backend"] == "flashinfer"


def test_cuda_build_without_devices_is_unavailable(monkeypatch):
    simulate_cuda(monkeypatch, [])
    with pytest.raises(plat.PlatformUnavailable, match="no NVIDIA device"):
        plat.load("cuda")
    monkeypatch.delenv(plat.PLATFORM_ENV, raising=False)
    assert plat.detect().name == "cpu"


def test_rocm_probe_on_cuda_build_names_the_build(monkeypatch):
    simulate_cuda(monkeypatch, [(9, 0)])
    with pytest.raises(plat.PlatformUnavailable, match="not a ROCm build"):
        plat.load("rocm")


@pytest.mark.parametrize("requested", ["rocm", "cuda"])
def test_override_to_unavailable_platform_is_one_line(monkeypatch, requested):
    simulate_cpu(monkeypatch)
    monkeypatch.setenv(plat.PLATFORM_ENV, requested)
    with pytest.raises(plat.PlatformUnavailable) as err:
        plat.detect()
    msg = str(err.value)
    assert "\n" not in msg and requested in msg


def test_override_unknown_name(monkeypatch):
    monkeypatch.setenv(plat.PLATFORM_ENV, "tpu")
    with pytest.raises(plat.PlatformUnavailable, match="unknown platform 'tpu'.*cpu, cuda, rocm"):
        plat.detect()


def test_override_selects_cpu_on_gpu_host(monkeypatch):
    simulate_rocm(monkeypatch, ["gfx942"])
    monkeypatch.setenv(plat.PLATFORM_ENV, "cpu")
    p = plat.detect()
    assert p.name == "cpu" and plat.PLATFORM_ENV in p.reason


def test_detection_creates_no_device_context(monkeypatch):
    """Probing must not initialise a device runtime (it would pin a GPU in the driver process)."""
    import torch

    simulate_rocm(monkeypatch, ["gfx942"])
    calls = []
    monkeypatch.setattr(torch.cuda, "init", lambda: calls.append("init"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls.append("count") or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append("avail") or False)
    plat.detect({})
    assert calls == []
    assert not torch.cuda.is_initialized()


def test_importing_portable_rl_does_not_import_vendor_libraries():
    import subprocess

    code = (
        "import sys, portable_rl, portable_rl.platform, portable_rl.cli;"
        "bad=[m for m in ('amdsmi','pynvml','ray','megatron') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_kfd_sysfs_fallback(monkeypatch, tmp_path):
    from portable_rl.backends.rocm import platform as rocm

    for i, (gfx, simd) in enumerate([(0, 0), (90402, 304), (90402, 304)]):
        node = tmp_path / str(i)
        node.mkdir()
        (node / "properties").write_text(f"cpu_cores_count 0\nsimd_count {simd}\ngfx_target_version {gfx}\n")
    devices = rocm._kfd_devices(str(tmp_path))
    assert [d.arch for d in devices] == ["gfx942", "gfx942"]
    assert rocm._arch_from_gfx_version(90500) == "gfx950"
    assert rocm._arch_from_gfx_version(90010) == "gfx90a"


def test_describe_is_plain_data(monkeypatch):
    import json

    simulate_rocm(monkeypatch, ["gfx942"] * 2)
    facts = plat.load("rocm").describe()
    json.dumps(facts)
    assert facts["comm_library"] == "RCCL" and len(facts["devices"]) == 2
