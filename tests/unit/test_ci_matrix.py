"""The vendor CI matrix: generated workflows and bake file are current, lint clean, and carry every leg.

The generator runs as CI and developers run it (`python -m ci.generate` from the repository root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hcl2
import pytest
import yaml
from fake_hosts import simulate_rocm

from portable_rl.backends import versions

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # ci/ is tooling run from the repository root, not an installed package

from ci import generate  # noqa: E402
from ci.legs import check_host  # noqa: E402
from ci.matrix import MatrixError, parse  # noqa: E402

GENERATED = (
    generate.WORKFLOW_CI,
    generate.WORKFLOW_IMAGES,
    generate.ACTIONLINT_CONFIG,
    generate.BAKE_FILE,
    "docker/Dockerfile.cpu",
    "docker/Dockerfile.cuda",
    "docker/Dockerfile.rocm",
)


def tool_env() -> dict[str, str]:
    # actionlint runs shellcheck (a dev dependency in this venv) on every `run:` script it finds on PATH.
    return {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}


def tool(name: str) -> str:
    found = shutil.which(name, path=tool_env()["PATH"])
    assert found, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return found


def gen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ci.generate", *args], cwd=ROOT, capture_output=True, text=True, env=tool_env()
    )


def workflow(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ci() -> dict:
    return workflow(generate.WORKFLOW_CI)


# ---- generated files are current ----------------------------------------------------------------------------


def test_generated_files_are_current(tmp_path):
    out = gen("--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for rel in GENERATED:
        assert (tmp_path / rel).read_text(encoding="utf-8") == (ROOT / rel).read_text(encoding="utf-8"), (
            f"{rel} is stale: run `python -m ci.generate` and commit the result"
        )


def test_check_names_a_stale_file(tmp_path):
    for folder in ("ci", "docker", ".github"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert gen("--root", str(tmp_path), "--check").returncode == 0
    ci_yml = tmp_path / generate.WORKFLOW_CI
    ci_yml.write_text(ci_yml.read_text().replace("cuda or gpu or not rocm", "not slow"))
    dockerfile = tmp_path / "docker/Dockerfile.cpu"
    dockerfile.write_text(
        dockerfile.read_text().replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0")
    )
    out = gen("--root", str(tmp_path), "--check")
    assert out.returncode == 1
    assert "stale: .github/workflows/ci.yml" in out.stderr and "stale: docker/Dockerfile.cpu" in out.stderr
    assert "stale: docker/docker-bake.hcl" not in out.stderr


# ---- lint ----------------------------------------------------------------------------------------------------


def actionlint(config: Path) -> subprocess.CompletedProcess:
    files = [str(ROOT / generate.WORKFLOW_CI), str(ROOT / generate.WORKFLOW_IMAGES)]
    return subprocess.run(
        [tool("actionlint"), "-no-color", "-config-file", str(config), *files],
        capture_output=True,
        text=True,
        env=tool_env(),
    )


def test_workflows_pass_actionlint():
    out = actionlint(ROOT / generate.ACTIONLINT_CONFIG)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_needs_our_runner_labels(tmp_path):
    empty = tmp_path / "actionlint.yaml"
    empty.write_text("self-hosted-runner:\n  labels: []\n")
    out = actionlint(empty)
    assert out.returncode == 1 and 'label "nvidia" is unknown' in out.stdout


def test_leg_scripts_pass_shellcheck():
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ci" / "legs").glob("*.sh"))
    out = subprocess.run([tool("shellcheck"), "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- the legs ------------------------------------------------------------------------------------------------


def steps_run(job: dict) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def upload_paths(job: dict) -> list[str]:
    return [
        s["with"]["path"] for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")
    ]


def test_cpu_leg_runs_the_repository_ci_entry_on_a_hosted_runner(ci):
    job = ci["jobs"]["cpu"]
    assert job["runs-on"].startswith("ubuntu-") and "container" not in job
    assert steps_run(job) == ["bash ci/legs/cpu.sh"]
    script = (ROOT / "ci/legs/cpu.sh").read_text()
    assert "bash .ci/run" in script and "conformance --platform cpu --fail-on-unexpected-skip" in script
    assert upload_paths(job) == [job["env"]["LEG_REPORT_DIR"]]


def test_cuda_leg(ci):
    job = ci["jobs"]["cuda"]
    assert job["runs-on"][:2] == ["self-hosted", "linux"] and "nvidia" in job["runs-on"]
    assert job["container"]["image"] == versions.image_ref("cuda")
    assert "--gpus all" in job["container"]["options"]
    assert job["env"]["LEG_PYTEST_MARKERS"] == "(cuda or gpu or not rocm) and not sglang"
    assert job["env"]["PORTABLE_RL_PLATFORM"] == "cuda" and int(job["env"]["LEG_GPUS"]) > 0
    assert steps_run(job) == ["bash ci/legs/cuda.sh"]
    assert upload_paths(job) == [job["env"]["LEG_REPORT_DIR"]]
    assert "pull_request.head.repo.full_name == github.repository" in job["if"]  # no fork PRs on our machines


@pytest.mark.parametrize("leg,variant", [("rocm-mi300x", "gfx942"), ("rocm-mi355x", "gfx950")])
def test_rocm_legs(ci, leg, variant):
    job = ci["jobs"][leg]
    assert "self-hosted" in job["runs-on"] and "amd" in job["runs-on"]
    assert job["container"]["image"] == versions.image_ref("rocm", variant)
    options = job["container"]["options"]
    for flag in (
        "--device /dev/kfd",
        "--device /dev/dri",
        "--group-add video",
        "--security-opt seccomp=unconfined",
        "--shm-size",
    ):
        assert flag in options, flag
    assert job["env"]["LEG_GPU_ARCH"] == variant
    assert job["env"]["LEG_PYTEST_MARKERS"] == "(rocm or gpu or not cuda) and not sglang"
    assert steps_run(job) == [f"bash ci/legs/{leg}.sh"]
    assert upload_paths(job) == [job["env"]["LEG_REPORT_DIR"]]


def test_gpu_legs_run_tests_and_conformance_with_a_report():
    common = (ROOT / "ci/legs/gpu-common.sh").read_text()
    assert 'pytest -q -m "$LEG_PYTEST_MARKERS"' in common
    assert 'portable-rl conformance --platform "$LEG_PLATFORM" --fail-on-unexpected-skip' in common
    for leg in ("cuda", "rocm-mi300x", "rocm-mi355x"):
        assert "leg_run" in (ROOT / f"ci/legs/{leg}.sh").read_text()


def test_leg_env_is_evaluable_in_bash():
    out = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(python -m ci.generate --leg-env rocm-mi355x)" && echo "$LEG_PYTEST_MARKERS|$LEG_GPU_ARCH"',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**tool_env(), "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(rocm or gpu or not cuda) and not sglang|gfx950"
    bad = gen("--leg-env", "tpu")
    assert bad.returncode == 2 and "no leg 'tpu'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ---- images: bake file and publishing workflow ---------------------------------------------------------------


def plain(node):
    """python-hcl2 keeps HCL's quotes and marks blocks; strip both to compare values."""
    if isinstance(node, dict):
        return {plain(k): plain(v) for k, v in node.items() if k != "__is_block__"}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, str) and len(node) >= 2 and node[0] == node[-1] == '"':
        return json.loads(node)
    return node


def test_bake_targets_and_tags_follow_the_version_table():
    with open(ROOT / generate.BAKE_FILE, encoding="utf-8") as fh:
        bake = plain(hcl2.load(fh))
    defaults = {name: body["default"] for var in bake["variable"] for name, body in var.items()}
    targets = {name: body for t in bake["target"] for name, body in t.items()}
    assert set(versions.image_targets()) <= set(targets)
    for name, (platform, variant) in versions.image_targets().items():
        body = targets[name]
        assert body["dockerfile"] == f"docker/Dockerfile.{platform}"
        assert (ROOT / body["dockerfile"]).exists()
        tags = [
            t.replace("${REGISTRY}", defaults["REGISTRY"]).replace("${VERSION}", defaults["VERSION"])
            for t in body["tags"]
        ]
        assert tags == [versions.image_ref(platform, variant)]
        if variant:
            assert body["args"]["GPU_ARCH"] == variant
    default_group = next(g["default"] for g in bake["group"] if "default" in g)
    assert default_group["targets"] == list(versions.image_targets())


def test_images_workflow_publishes_every_target_on_tags():
    wf = workflow(generate.WORKFLOW_IMAGES)
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert on["push"]["tags"] == ["v*"]
    build = wf["jobs"]["build"]
    assert build["strategy"]["matrix"]["target"] == list(versions.image_targets())
    assert build["permissions"]["packages"] == "write"
    bake = next(s for s in build["steps"] if s.get("uses", "").startswith("docker/bake-action@"))
    assert bake["with"]["files"] == generate.BAKE_FILE
    assert "refs/tags/" in bake["with"]["push"]
    assert "python -m ci.generate --check" in steps_run(wf["jobs"]["check"])


def test_check_tag():
    assert gen("--check-tag", f"v{versions.PROJECT_VERSION}").returncode == 0
    out = gen("--check-tag", "v99.0.0")
    assert out.returncode == 1 and f"expected 'v{versions.PROJECT_VERSION}'" in out.stderr


# ---- matrix validation ---------------------------------------------------------------------------------------


def matrix_data() -> dict:
    return yaml.safe_load((ROOT / "ci/matrix.yaml").read_text())


@pytest.mark.parametrize(
    "leg,change,message",
    [
        ("cuda", {"platform": "tpu"}, "unknown platform 'tpu'"),
        ("cuda", {"variant": "gfx942"}, "no cuda image variant 'gfx942'"),
        ("rocm-mi300x", {"variant": None}, "images come per variant"),
        ("rocm-mi300x", {"pytest_markers": None}, "needs pytest_markers"),
        ("cpu", {"gpus": 4}, "drop gpus/container/markers"),
        ("cuda", {"gpu_count": 8}, "unknown keys ['gpu_count']"),
    ],
)
def test_bad_matrix_data_is_one_clear_line(leg, change, message):
    data = matrix_data()
    data["legs"][leg].update(change)
    data["legs"][leg] = {k: v for k, v in data["legs"][leg].items() if v is not None}
    with pytest.raises(MatrixError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        parse(data)
    assert "\n" not in str(err.value) and leg in str(err.value)


def test_gpu_leg_device_mounts_come_from_the_platform():
    from portable_rl.platform import platform_class

    leg = parse(matrix_data()).leg("rocm-mi300x")
    for path in platform_class("rocm").container_device_mounts:
        assert f"--device {path}" in leg.docker_options


# ---- host check of the GPU legs ------------------------------------------------------------------------------


def test_check_host_on_a_simulated_mi300x(monkeypatch, tmp_path):
    from portable_rl.commands.doctor import report

    simulate_rocm(monkeypatch, ["gfx942:sramecc+:xnack-"] * 8)
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "rocm")
    facts = json.loads(json.dumps(report(), default=str))
    assert check_host.problems(facts, "rocm", 8, "gfx942") == []
    wrong = check_host.problems(facts, "cuda", 16, "gfx950")
    assert len(wrong) == 3
    assert "detected platform 'rocm'" in wrong[0] and "8 device(s) visible, the leg needs 16" in wrong[1]
    assert "gfx942:sramecc+:xnack- on a leg for gfx950" in wrong[2]
    doctor_json = tmp_path / "doctor.json"
    doctor_json.write_text(json.dumps(facts))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ci/legs/check_host.py"),
            str(doctor_json),
            "--platform",
            "rocm",
            "--gpus",
            "9",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "8 device(s) visible, the leg needs 9" in out.stderr


# ---- which tests each leg runs --------------------------------------------------------------------------------
# What a marker needs, and so which legs can run its tests: a GPU of any vendor, one vendor's GPU, or the CPU
# SGLang venv (built only by .ci/run's second stage, which selects `-m sglang` itself). `slow` and `netns` run
# everywhere (netns tests skip, naming the step, where the host refuses namespaces).
def _unavailable(platform: str) -> set[str]:
    if platform == "cpu":
        return {"gpu", "cuda", "rocm", "sglang"}
    return {"cuda", "rocm"} - {platform} | {"sglang"}


def _this_run_collected_everything(config) -> bool:
    invoked = Path(config.invocation_params.dir)
    return bool(config.args) and all(
        (invoked / arg.split("::")[0]).resolve() in (ROOT, ROOT / "tests") for arg in config.args
    )


@pytest.fixture(scope="module")
def collected_markers(request, tmp_path_factory) -> dict[str, set[str]]:
    # `make test` collects the whole suite: tests/conftest.py kept every test's markers before deselection.
    if _this_run_collected_everything(request.config) and getattr(
        request.config, "portable_rl_markers", None
    ):
        return request.config.portable_rl_markers
    out = tmp_path_factory.mktemp("markers") / "markers.json"
    env = {**os.environ, "PORTABLE_RL_MARKER_DUMP": str(out), "PYTHONPATH": str(ROOT / "tests" / "unit")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "marker_dump",
            "-p",
            "no:cacheprovider",
            "tests",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {node: set(marks) for node, marks in json.loads(out.read_text()).items()}


def _selects(expression: str, markers: set[str]) -> bool:
    from _pytest.mark.expression import Expression  # what `pytest -m` evaluates

    return Expression.compile(expression).evaluate(lambda name, **kwargs: name in markers)


def _leg_expressions() -> dict[str, tuple[str, str]]:
    """leg -> (platform, the -m expression its pytest run uses): GPU legs from the matrix, the cpu leg from
    `make test` (what .ci/run runs)."""
    import re

    from ci.matrix import load

    make_test = re.search(r'pytest .*-m "([^"]+)" tests', (ROOT / "Makefile").read_text())
    assert make_test, "the Makefile's test target no longer runs pytest -m '...' tests"
    legs = {}
    for leg in load().legs:
        legs[leg.name] = (leg.platform, leg.pytest_markers or make_test.group(1))
    assert legs["cpu"][1] == make_test.group(1)
    return legs


def test_each_leg_runs_exactly_the_tests_it_can(collected_markers):
    assert len(collected_markers) > 100
    for leg, (platform, expression) in _leg_expressions().items():
        cannot = _unavailable(platform)
        selected = {t for t, marks in collected_markers.items() if _selects(expression, marks)}
        runnable = {t for t, marks in collected_markers.items() if not marks & cannot}
        assert not selected - runnable, (
            f"leg {leg} ({expression!r}) selects tests it cannot run: {sorted(selected - runnable)[:5]}"
        )
        assert not runnable - selected, (
            f"leg {leg} ({expression!r}) leaves out tests it can run: {sorted(runnable - selected)[:5]}"
        )
    gpu_tests = {t for t, marks in collected_markers.items() if "gpu" in marks}
    assert gpu_tests, "no test is marked gpu: the GPU legs would only rerun CPU tests"


def test_the_sglang_stage_of_the_cpu_leg_selects_the_sglang_tests(collected_markers):
    import re

    stage = re.search(r"pytest -q -m (\S+) (\S+)", (ROOT / ".ci/run").read_text())
    assert stage and stage.group(1) == "sglang"
    sglang = {t for t, marks in collected_markers.items() if "sglang" in marks}
    assert sglang and all(t.startswith(stage.group(2).rstrip("/") + "/") for t in sglang)
