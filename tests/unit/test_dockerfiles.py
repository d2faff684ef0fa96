"""The three Dockerfiles: hadolint-clean, in agreement with backends/versions.py and the platform facts.

No Docker engine runs on CI machines, so images are linted and cross-checked here and built by the images
workflow. dockerfile-parse reads the instructions; hadolint is a dev dependency (never skipped).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from portable_rl.backends import versions

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLATFORMS = tuple(versions.PLATFORMS)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # ci/ is tooling run from the repository root, not an installed package

from ci import dockerfiles  # noqa: E402


def tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    assert found, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return found


def structure(text: str) -> list[dict]:
    return DockerfileParser(fileobj=io.BytesIO(text.encode())).structure


def declared(text: str, kind: str) -> dict[str, str]:
    """NAME -> value of every ``ARG NAME=value`` / ``ENV NAME=value`` (any stage); duplicates must agree."""
    out: dict[str, str] = {}
    for ins in structure(text):
        if ins["instruction"] != kind or "=" not in ins["value"]:
            continue
        name, _, value = ins["value"].partition("=")
        value = value.strip().strip('"')
        assert out.setdefault(name, value) == value, f"{kind} {name} declared twice with different values"
    return out


def disagreements(platform: str, text: str) -> list[str]:
    args, env = declared(text, "ARG"), declared(text, "ENV")
    out = [
        f"ARG {name}={args.get(name)!r}, table says {value!r}"
        for name, value in versions.docker_args(platform).items()
        if args.get(name) != value
    ]
    out += [
        f"ENV {name}={env.get(name)!r}, platform says {value!r}"
        for name, value in dockerfiles.expected_env(platform).items()
        if env.get(name) != value
    ]
    return out


def dockerfile(platform: str) -> str:
    return (ROOT / dockerfiles.dockerfile_path(platform)).read_text(encoding="utf-8")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_hadolint_clean(platform):
    out = subprocess.run(
        [tool("hadolint"), "--no-color", str(ROOT / dockerfiles.dockerfile_path(platform))],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_flags_a_bad_dockerfile():
    bad = "FROM ubuntu\nRUN pip install requests\n"
    out = subprocess.run([tool("hadolint"), "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert out.returncode != 0 and "DL3013" in out.stdout  # unpinned pip install


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dockerfile_agrees_with_version_table_and_platform_env(platform):
    assert disagreements(platform, dockerfile(platform)) == []


def test_drift_is_detected_and_sync_repairs_it():
    text = dockerfile("rocm")
    drifted = text.replace("ARG TORCH_VERSION=2.14.1", "ARG TORCH_VERSION=2.9.0").replace(
        "ENV NCCL_NVLS_ENABLE=0", "ENV NCCL_NVLS_ENABLE=1"
    )
    assert drifted != text
    found = disagreements("rocm", drifted)
    assert any("TORCH_VERSION='2.9.0'" in line for line in found)
    assert any("NCCL_NVLS_ENABLE='1'" in line for line in found)
    assert dockerfiles.sync("rocm", drifted) == text


def test_sync_refuses_a_dockerfile_missing_a_pin():
    text = dockerfile("cuda").replace("ARG RAY_VERSION=2.60.0\n", "")
    with pytest.raises(dockerfiles.DockerfileError, match="lacks ARG RAY_VERSION=2.60.0"):
        dockerfiles.sync("cuda", text)


def test_rocm_image_has_the_amd_runtime_env():
    env = declared(dockerfile("rocm"), "ENV")
    for name, value in {
        "HSA_NO_SCRATCH_RECLAIM": "1",
        "HIP_FORCE_DEV_KERNARG": "1",
        "SGLANG_USE_AITER": "1",
        "NCCL_CUMEM_ENABLE": "0",
        "RCCL_MSCCL_ENABLE": "0",
        "NCCL_NVLS_ENABLE": "0",
    }.items():
        assert env.get(name) == value, name


def test_rocm_gpu_arch_selects_one_base_stage_per_variant():
    froms = [ins["value"] for ins in structure(dockerfile("rocm")) if ins["instruction"] == "FROM"]
    for variant in versions.IMAGE_VARIANTS["rocm"]:
        assert f"${{BASE_IMAGE_{variant.upper()}}} AS base-{variant}" in froms
    assert froms[-1] == "base-${GPU_ARCH}"
    assert declared(dockerfile("rocm"), "ARG")["GPU_ARCH"] == versions.IMAGE_VARIANTS["rocm"][0]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_run_lines_take_versions_from_args_only(platform):
    """No version literal hides in a RUN line, and every ${VAR} a RUN uses is declared."""
    text = dockerfile(platform)
    names = set(declared(text, "ARG")) | set(declared(text, "ENV"))
    names |= {
        ins["value"] for ins in structure(text) if ins["instruction"] == "ARG" and "=" not in ins["value"]
    }
    for ins in structure(text):
        if ins["instruction"] != "RUN":
            continue
        assert not re.search(r"==\s*\d", ins["value"]), f"hard-coded pin in RUN: {ins['value'][:120]}"
        used = set(re.findall(r"\$\{(\w+)\}", ins["value"]))
        assert used <= names, f"RUN uses undeclared {sorted(used - names)}"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_copy_sources_survive_dockerignore(platform):
    """Every COPY source is re-included by the whitelist-style .dockerignore (which excludes '*')."""
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for ins in structure(dockerfile(platform)):
        if ins["instruction"] == "COPY":
            *sources, _dest = ins["value"].split()
            for src in sources:
                assert src in allowed, f"{src} is excluded by .dockerignore"
                assert (ROOT / src).exists(), src


# ---- docker/verify_base.py, run against this venv ----------------------------------------------------------


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "docker" / "verify_base.py"), *args], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def verify_base():
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import verify_base
    finally:
        sys.path.remove(str(ROOT / "docker"))
    return verify_base


def test_verify_base_accepts_what_is_installed_and_writes_constraints(tmp_path):
    import importlib.metadata

    have = importlib.metadata.version("torch")
    release = re.match(r"\d+\.\d+\.\d+", have).group(0)
    constraints = tmp_path / "c.txt"
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    out = verify("--python", py, "--require", f"torch=={release}",
                 "--optional", "no-such-dist-xyz==1.0", "--constraints", str(constraints))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert constraints.read_text() == f"torch=={have}\n"
    assert "no-such-dist-xyz is not in the base image" in out.stdout


def test_verify_base_stops_on_a_moved_base_image():
    out = verify("--require", "torch==9.9.1", "--require", "no-such-dist-xyz==1.0", "--python", "2.7")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3
    assert "Python" in lines[0] and "pins 2.7" in lines[0]
    assert "the version table pins 9.9.1" in lines[1] and "backends/versions.py" in lines[1]
    assert "lacks no-such-dist-xyz" in lines[2]


def test_verify_base_checks_what_torch_is_built_for(verify_base):
    def errors(build: str) -> list[str]:
        args = argparse.Namespace(python=None, require=[], optional=[], torch_build=build, constraints=None)
        return verify_base.check(args)[0]

    assert errors("cpu") == []  # this venv has the CPU build
    assert errors("cuda=12.9") == [
        "torch is built for cuda None, the version table pins 12.9: " + verify_base.FIX
    ]
    assert "expected cpu, cuda=VER or hip=VER" in errors("tpu=1")[0]


def test_verify_base_release_comparison(verify_base):
    assert verify_base.same_release("2.14.1+cu129", "2.14.1")
    assert verify_base.same_release("2.9.0a0+git1c57644", "2.9.0")
    assert verify_base.same_release("7.0.51831-a3e329ad8", "7.0")
    assert not verify_base.same_release("2.14.0", "2.14.1")
    assert not verify_base.same_release("12.8", "12.9")
    assert verify_base.parse_pin("amd-aiter|aiter==0.1.7") == (("amd-aiter", "aiter"), "0.1.7")
