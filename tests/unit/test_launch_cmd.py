"""`portable-rl launch`: node env and `ray start` command per platform (dry run on simulated hosts), job
submission command, template writing, and the mixed-vendor cluster check."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
from fake_hosts import simulate_cpu, simulate_cuda, simulate_rocm

from portable_rl.cli import main
from portable_rl.orchestration.cluster import (
    ClusterPlatformError,
    check_cluster_platforms,
    default_route_interface,
)

MASKS = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def _never_exec(monkeypatch):
    """A test that forgot --dry-run must fail, not replace the test process with `ray start`."""
    import os

    def refuse(*args, **kwargs):
        raise AssertionError(f"launch tried to exec {args[1] if len(args) > 1 else args}")

    monkeypatch.setattr(os, "execvpe", refuse)
    monkeypatch.setattr(os, "execvp", refuse)


def _clean_env(monkeypatch):
    for key in (*MASKS, "PORTABLE_RL_PLATFORM", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key in ("RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES", "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)


def _dry_run(capsys, *argv: str) -> tuple[list[str], list[str]]:
    """(env lines, ray start argv) of a dry run."""
    assert main(["launch", argv[0], "--dry-run", *argv[1:]]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    return lines[:-1], shlex.split(lines[-1])


def _env_after(script_lines: list[str], start_env: dict[str, str]) -> dict[str, str]:
    """Run the printed env lines in bash from ``start_env`` and return the resulting environment."""
    out = subprocess.run(
        ["bash", "-c", "\n".join([*script_lines, "env -0"])], env=start_env, capture_output=True, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def test_head_dry_run_on_rocm_folds_masks_and_sets_noset(monkeypatch, capsys):
    _clean_env(monkeypatch)
    simulate_rocm(monkeypatch, ["gfx942"] * 8)
    # What a ROCm shell profile plus a scheduler leave behind: ROCR picks 4 GPUs, HIP picks 2 of those.
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "2,3,4,5")
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1,3")
    env_lines, argv = _dry_run(capsys, "head", "--port", "6380", "--ifname", "lo")
    assert "unset ROCR_VISIBLE_DEVICES" in env_lines
    assert "export HIP_VISIBLE_DEVICES=3,5" in env_lines  # physical indices
    assert "export CUDA_VISIBLE_DEVICES=3,5" in env_lines
    for flag in ("RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES", "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES"):
        assert f"export {flag}=1" in env_lines
    for line in (
        "RCCL_MSCCL_ENABLE=0",
        "NCCL_SOCKET_IFNAME=lo",
        "GLOO_SOCKET_IFNAME=lo",
        "PORTABLE_RL_PLATFORM=rocm",
    ):
        assert f"export {line}" in env_lines
    assert argv[1:5] == ["start", "--head", "--port", "6380"]
    assert argv[argv.index("--num-gpus") + 1] == "2"
    assert json.loads(argv[argv.index("--resources") + 1]) == {"portable_rl_platform:rocm": 1}
    # The printed lines are a shell script that leaves Ray an env it accepts.
    after = _env_after(
        env_lines, {"PATH": "/usr/bin:/bin", "ROCR_VISIBLE_DEVICES": "2,3,4,5", "HIP_VISIBLE_DEVICES": "1,3"}
    )
    assert "ROCR_VISIBLE_DEVICES" not in after and after["HIP_VISIBLE_DEVICES"] == "3,5"


def test_worker_dry_run_on_rocm_with_rocr_only(monkeypatch, capsys):
    _clean_env(monkeypatch)
    simulate_rocm(monkeypatch, ["gfx950"] * 4)
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "1,2")  # Ray >= 2.45 would refuse this env as is
    env_lines, argv = _dry_run(
        capsys, "worker", "--address", "10.0.0.1:6379", "--role", "engine", "--ifname", "none"
    )
    assert "unset ROCR_VISIBLE_DEVICES" in env_lines and "export HIP_VISIBLE_DEVICES=1,2" in env_lines
    assert not any("SOCKET_IFNAME" in line for line in env_lines)
    assert argv[1:4] == ["start", "--address", "10.0.0.1:6379"]
    assert json.loads(argv[argv.index("--resources") + 1]) == {
        "portable_rl_platform:rocm": 1,
        "portable_rl_role:engine": 1,
    }


def test_head_dry_run_on_cuda(monkeypatch, capsys):
    _clean_env(monkeypatch)
    simulate_cuda(monkeypatch, [(9, 0)] * 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")  # already chosen by the admin: auto must not replace it
    env_lines, argv = _dry_run(
        capsys, "head", "--num-cpus", "16", "--node-ip", "10.0.0.5", "--", "--temp-dir", "/x"
    )
    assert not any("ROCR" in line or "HIP_" in line for line in env_lines)
    assert not any(line.startswith("export NCCL_SOCKET_IFNAME") for line in env_lines)
    assert "export NCCL_CUMEM_ENABLE=0" in env_lines and "export PORTABLE_RL_PLATFORM=cuda" in env_lines
    assert argv[argv.index("--num-gpus") + 1] == "2"
    assert argv[argv.index("--num-cpus") + 1] == "16"
    assert argv[argv.index("--node-ip-address") + 1] == "10.0.0.5"
    assert argv[-2:] == ["--temp-dir", "/x"]
    assert json.loads(argv[argv.index("--resources") + 1]) == {"portable_rl_platform:cuda": 1}


def test_explicit_ifname_wins_over_exported_one(monkeypatch, capsys):
    _clean_env(monkeypatch)
    simulate_cuda(monkeypatch, [(9, 0)])
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    env_lines, _ = _dry_run(capsys, "head", "--ifname", "lo")
    assert "export NCCL_SOCKET_IFNAME=lo" in env_lines


def test_cpu_head_has_no_gpus_and_merges_resources(monkeypatch, capsys):
    _clean_env(monkeypatch)
    simulate_cpu(monkeypatch)
    env_lines, argv = _dry_run(
        capsys, "head", "--resources", '{"node_trainer": 1}', "--block", "--ifname", "lo"
    )
    assert "--num-gpus" not in argv and "--block" in argv
    assert json.loads(argv[argv.index("--resources") + 1]) == {
        "node_trainer": 1,
        "portable_rl_platform:cpu": 1,
    }
    assert "export GLOO_SOCKET_IFNAME=lo" in env_lines
    assert not any("NCCL" in line for line in env_lines)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["worker"], "needs --address"),
        (["worker", "--address", "nohost"], "must be HOST:PORT"),
        (["head", "--resources", "{bad"], "is not JSON"),
        (["head", "--resources", '{"GPU": 2}'], "use ray's own flag"),
        (["head", "--resources", '["x"]'], "JSON object of numbers"),
        (["head", "--ifname", "no-such-if0"], "not a network interface"),
        (["head", "--port", "70000"], "--port 70000"),
    ],
)
def test_node_errors_are_one_line(monkeypatch, capsys, argv, needle):
    _clean_env(monkeypatch)
    simulate_cpu(monkeypatch)
    assert main(["launch", argv[0], "--dry-run", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("portable-rl launch: error:")


def test_default_route_interface(tmp_path):
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "ens5\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    assert default_route_interface(table) == "ens5"
    table.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n")
    assert default_route_interface(table) is None
    assert default_route_interface(tmp_path / "missing") is None


# ---- submit --------------------------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text("train: {}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_submit_dry_run_builds_the_job(workdir, capsys):
    argv = [
        "launch",
        "submit",
        "recipes/tiny.yaml",
        "rollout.n_samples=4",
        "--address",
        "10.0.0.1:8265",
        "--sglang-mem-fraction-static",
        "0.5",
        "--resume",
        "--dry-run",
        "--",
        "--dry-run",
    ]
    assert main(argv) == 0
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert cmd[1:3] == ["job", "submit"]
    assert cmd[cmd.index("--address") + 1] == "http://10.0.0.1:8265"
    runtime_env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == str(workdir) and ".venv" in runtime_env["excludes"]
    entry = cmd[cmd.index("--") + 1 :]
    assert entry == [
        "portable-rl",
        "train",
        "recipes/tiny.yaml",
        "rollout.n_samples=4",
        "--resume",
        "--dry-run",  # after a literal -- it belongs to train
        "--sglang-mem-fraction-static",  # the CLI hands engine flags over separately; they go last
        "0.5",
    ]


def test_submit_recipe_outside_working_dir_is_refused(workdir, tmp_path_factory, capsys):
    other = tmp_path_factory.mktemp("elsewhere") / "r.yaml"
    other.write_text("{}\n")
    assert main(["launch", "submit", str(other), "--dry-run"]) == 2
    assert "outside the working dir" in capsys.readouterr().err
    assert main(["launch", "submit", "recipes/missing.yaml", "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_submit_no_wait_and_working_dir(workdir, capsys):
    assert (
        main(["launch", "submit", "--no-wait", "--working-dir", "recipes", "recipes/tiny.yaml", "--dry-run"])
        == 0
    )
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert "--no-wait" in cmd and cmd[-1] == "tiny.yaml"


# ---- template --------------------------------------------------------------------------------------------------


def test_template_writes_file_and_keeps_existing(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    args = ["launch", "template", "slurm", "--platform", "rocm", "--nodes", "2", "--out", str(out)]
    assert main(args) == 0
    assert out.read_text().startswith("#!/bin/bash") and out.stat().st_mode & 0o100
    out.write_text("mine")
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "mine"
    assert main([*args, "--force"]) == 0 and out.read_text() != "mine"


def test_template_bad_platform_is_one_line(capsys):
    assert main(["launch", "template", "kuberay", "--platform", "tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'tpu' is not one of" in err and "\n" not in err


def test_template_to_stdout(capsys):
    assert main(["launch", "template", "kuberay", "--platform", "cuda", "--gpus-per-node", "4"]) == 0
    assert "nvidia.com/gpu: 4" in capsys.readouterr().out


def test_launch_without_action_prints_help(capsys):
    assert main(["launch"]) == 2
    assert "submit" in capsys.readouterr().out


# ---- the mixed-vendor check ------------------------------------------------------------------------------------


def _node(ip: str, platform: str | None, role: str | None = None, alive: bool = True) -> dict:
    resources = {"CPU": 8.0, f"node:{ip}": 1.0}
    if platform:
        resources[f"portable_rl_platform:{platform}"] = 1.0
    if role:
        resources[f"portable_rl_role:{role}"] = 1.0
    return {"NodeManagerAddress": ip, "Alive": alive, "Resources": resources}


def test_single_vendor_cluster_passes():
    found = check_cluster_platforms([_node("10.0.0.1", "rocm"), _node("10.0.0.2", "rocm")], "broadcast")
    assert found.trainer_platform == "rocm" and found.engine_platforms == ("rocm",) and len(found.nodes) == 2


def test_mixed_vendor_training_group_is_refused():
    nodes = [_node("10.0.0.1", "cuda"), _node("10.0.0.2", "rocm"), _node("10.0.0.3", "rocm")]
    with pytest.raises(ClusterPlatformError) as err:
        check_cluster_platforms(nodes, "disk")  # even disk sync cannot make one training collective
    msg = str(err.value)
    assert (
        "mixed-vendor training group" in msg
        and "cuda on 10.0.0.1" in msg
        and "rocm on 10.0.0.2, 10.0.0.3" in msg
    )
    assert "\n" not in msg


@pytest.mark.parametrize("strategy", ["broadcast", "shared_tensor", "auto"])
def test_foreign_engines_need_disk_sync(strategy):
    nodes = [_node("10.0.0.1", "cuda", "trainer"), _node("10.0.0.2", "rocm", "engine")]
    with pytest.raises(ClusterPlatformError, match="need weight_sync.strategy=disk"):
        check_cluster_platforms(nodes, strategy)
    found = check_cluster_platforms(nodes, "disk")
    assert found.trainer_platform == "cuda" and found.engine_platforms == ("rocm",)


def test_same_vendor_engines_need_no_disk_sync():
    nodes = [_node("10.0.0.1", "rocm", "trainer"), _node("10.0.0.2", "rocm", "engine")]
    assert check_cluster_platforms(nodes, "broadcast").engine_platforms == ("rocm",)


def test_dead_nodes_are_ignored_and_unlabelled_nodes_need_a_default():
    nodes = [_node("10.0.0.1", "cuda"), _node("10.0.0.9", "rocm", alive=False)]
    assert check_cluster_platforms(nodes, "broadcast").trainer_platform == "cuda"
    with pytest.raises(ClusterPlatformError, match="portable-rl launch head"):
        check_cluster_platforms([_node("10.0.0.1", None)], "broadcast")
    assert (
        check_cluster_platforms([_node("10.0.0.1", None)], "auto", default_platform="cpu").trainer_platform
        == "cpu"
    )


def test_cluster_without_trainer_nodes_is_refused():
    with pytest.raises(ClusterPlatformError, match="no node can host the trainer"):
        check_cluster_platforms([_node("10.0.0.1", "cuda", "engine")], "disk")
    with pytest.raises(ClusterPlatformError, match="no alive node"):
        check_cluster_platforms([], "disk")


@pytest.fixture
def fake_ray(monkeypatch):
    """`launch check` against a stand-in for the three ray calls it makes; the test sets the nodes."""
    import ray

    import portable_rl.commands.launch as launch

    state = {"nodes": []}
    monkeypatch.setattr(launch, "wait_for_port", lambda address, deadline: None)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "nodes", lambda: state["nodes"])
    return state


def test_check_command_refuses_mixed_cluster_in_one_line(fake_ray, capsys):
    fake_ray["nodes"] = [_node("10.0.0.1", "cuda"), _node("10.0.0.2", "rocm")]
    assert (
        main(["launch", "check", "--address", "10.0.0.1:6379", "--nodes", "2", "--weight-sync", "disk"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "mixed-vendor training group" in err and "\n" not in err


def test_check_command_reports_a_good_cluster(fake_ray, capsys):
    fake_ray["nodes"] = [_node("10.0.0.1", "rocm"), _node("10.0.0.2", "rocm", "engine")]
    assert main(["launch", "check", "--address", "10.0.0.1:6379", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "cluster ok: 2 node(s); trainer platform rocm" in out and "10.0.0.2" in out


def test_check_command_times_out_waiting_for_nodes(fake_ray, capsys):
    fake_ray["nodes"] = [_node("10.0.0.1", "rocm")]
    assert main(["launch", "check", "--address", "10.0.0.1:6379", "--nodes", "3", "--timeout", "0"]) == 2
    assert "only 1 of 3 node(s) joined" in capsys.readouterr().err


def test_wait_for_port_gives_up_with_one_line():
    import socket
    import time

    from portable_rl.commands.launch import wait_for_port
    from portable_rl.errors import UserError

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"no Ray head answers at 127.0.0.1:{port}"):
            wait_for_port(f"127.0.0.1:{port}", time.monotonic())
