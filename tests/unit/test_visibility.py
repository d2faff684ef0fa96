"""Device visibility under every combination of ROCR / HIP / CUDA masks, and what Ray will accept."""

from __future__ import annotations

import itertools

import pytest
from fake_hosts import simulate_cuda, simulate_rocm

from portable_rl import platform as plat
from portable_rl.platform import VisibilityError

ROCR, HIP, CUDA = "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"


@pytest.fixture
def rocm8(monkeypatch):
    simulate_rocm(monkeypatch, ["gfx942"] * 8)
    return plat.load("rocm")


@pytest.fixture
def cuda8(monkeypatch):
    simulate_cuda(monkeypatch, [(9, 0)] * 8)
    return plat.load("cuda")


def _expected_rocm(env: dict[str, str]) -> list[int]:
    """Reference semantics written independently: ROCR picks physical GPUs, HIP (alias CUDA) indexes into them."""
    visible = list(range(8))
    if ROCR in env:
        visible = [visible[int(i)] for i in env[ROCR].split(",")]
    inner = env.get(HIP, env.get(CUDA))
    if inner is not None:
        visible = [visible[int(i)] for i in inner.split(",")]
    return visible


MASKS = {ROCR: [None, "4,5,6,7"], HIP: [None, "1,3"], CUDA: [None, "1,3"]}


@pytest.mark.parametrize(
    "rocr,hip,cuda", list(itertools.product(MASKS[ROCR], MASKS[HIP], MASKS[CUDA])), ids=lambda v: str(v)
)
def test_rocm_every_mask_combination(rocm8, rocr, hip, cuda):
    env = {k: v for k, v in ((ROCR, rocr), (HIP, hip), (CUDA, cuda)) if v is not None}
    assert rocm8.resolve_visible_devices(env) == _expected_rocm(env)
    before = rocm8.resolve_visible_devices(env)
    changed = dict(env)
    rocm8.prepare_process_env(changed)
    # After preparation: no ROCR mask, HIP and CUDA agree, the same physical devices stay visible,
    # both NOSET flags are set, and Ray's AMD accelerator manager would accept the env.
    assert ROCR not in changed
    if env:
        assert changed[HIP] == changed[CUDA] == ",".join(map(str, before))
    assert rocm8.resolve_visible_devices(changed) == before
    assert changed["RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES"] == "1"
    assert changed["RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES"] == "1"
    rocm8.check_ray_compatible(changed)


def test_rocr_without_hip_is_rejected_like_ray_with_a_fix(rocm8):
    with pytest.raises(VisibilityError) as err:
        rocm8.check_ray_compatible({ROCR: "0,1"})
    msg = str(err.value)
    assert "HIP_VISIBLE_DEVICES" in msg and "prepare_process_env" in msg and "\n" not in msg


def test_rocr_without_hip_matches_ray_own_rule(rocm8, monkeypatch):
    """Our check agrees with the rule inside Ray's AMD accelerator manager (the real Ray code)."""
    from ray._private.accelerators.amd_gpu import AMDGPUAcceleratorManager

    for env in ({ROCR: "0"}, {ROCR: "0", HIP: "0"}, {HIP: "1"}, {}):
        for k in (ROCR, HIP):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            AMDGPUAcceleratorManager.get_visible_accelerator_ids_env_var()
            ray_ok = True
        except RuntimeError:
            ray_ok = False
        try:
            rocm8.check_ray_compatible(env)
            ours_ok = True
        except VisibilityError:
            ours_ok = False
        assert ray_ok == ours_ok, env


def test_profile_exporting_both_masks_is_folded(rocm8):
    """ROCm shell profiles may export ROCR and HIP together; the result must be a single HIP mask."""
    env = {ROCR: "2,3,4,5", HIP: "0,1"}
    rocm8.prepare_process_env(env)
    assert env[HIP] == "2,3" and ROCR not in env


def test_hip_and_cuda_disagree(rocm8):
    with pytest.raises(VisibilityError, match="disagree"):
        rocm8.resolve_visible_devices({HIP: "0", CUDA: "1"})


def test_non_zero_based_mask_maps_to_local_ordinal(rocm8):
    env = {HIP: "4,6"}
    assert rocm8.local_ordinal(4, env) == 0
    assert rocm8.local_ordinal(6, env) == 1
    with pytest.raises(VisibilityError, match="device 5 is not visible"):
        rocm8.local_ordinal(5, env)
    env = {ROCR: "2,3,4,5,6,7", HIP: "3,1"}
    assert rocm8.resolve_visible_devices(env) == [5, 3]
    assert rocm8.local_ordinal(3, env) == 1


@pytest.mark.parametrize(
    "value,match",
    [("0,9", "out of range"), ("GPU-abc", "not a device index"), ("1,1", "listed twice")],
)
def test_malformed_masks(rocm8, cuda8, value, match):
    with pytest.raises(VisibilityError, match=match):
        rocm8.resolve_visible_devices({HIP: value})
    with pytest.raises(VisibilityError, match=match):
        cuda8.resolve_visible_devices({CUDA: value})


def test_empty_mask_hides_everything(rocm8, cuda8):
    assert rocm8.resolve_visible_devices({HIP: ""}) == []
    assert cuda8.resolve_visible_devices({CUDA: ""}) == []


def test_worker_env_rocm(rocm8):
    env = rocm8.worker_env([2, 5])
    assert env[HIP] == env[CUDA] == "2,5"
    assert ROCR not in env
    assert env["RCCL_MSCCL_ENABLE"] == "0" and env["HSA_NO_SCRATCH_RECLAIM"] == "1"
    assert env["RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES"] == "1"


def test_worker_env_cuda(cuda8):
    env = cuda8.worker_env([3])
    assert env[CUDA] == "3"
    assert HIP not in env and "RCCL_MSCCL_ENABLE" not in env
    assert env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    assert cuda8.local_ordinal(3, {CUDA: "3"}) == 0
    assert cuda8.resolve_visible_devices({CUDA: "7,0"}) == [7, 0]


def test_cpu_worker_env_has_no_masks():
    p = plat.load("cpu")
    env = p.worker_env([])
    assert not any(k.endswith("VISIBLE_DEVICES") for k in env)
    target: dict[str, str] = {}
    changes = p.prepare_process_env(target)
    assert changes == target  # only additions, all reported


def _refuse_ray_start(monkeypatch):
    import ray

    def started(*args, **kwargs):
        raise AssertionError("Ray was started with an env it refuses")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def test_launch_check_names_the_mask_fix_before_ray_starts(monkeypatch, capsys):
    from portable_rl.cli import main

    simulate_rocm(monkeypatch, ["gfx942"] * 8)
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "rocm")
    monkeypatch.setenv(ROCR, "0,1")
    monkeypatch.delenv(HIP, raising=False)
    _refuse_ray_start(monkeypatch)
    assert main(["launch", "check", "--address", "127.0.0.1:1", "--timeout", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert HIP in err and "prepare_process_env" in err and "\n" not in err


def test_conformance_ray_checks_refuse_the_env_before_ray_starts(monkeypatch, rocm8, tmp_path):
    from portable_rl.conformance.ray_visibility import _ray
    from portable_rl.conformance.registry import Context

    monkeypatch.setenv(ROCR, "2")
    monkeypatch.delenv(HIP, raising=False)
    _refuse_ray_start(monkeypatch)
    with pytest.raises(VisibilityError, match=HIP):
        _ray(Context(rocm8, workdir=tmp_path))


def test_platforms_without_a_ray_rule_accept_any_env(cuda8):
    cuda8.check_ray_compatible({CUDA: "3", ROCR: "0"})
    plat.load("cpu").check_ray_compatible({})
