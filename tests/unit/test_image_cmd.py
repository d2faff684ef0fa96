"""`portable-rl image`: the version table's image for the detected or a named platform, without its hardware."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hosts import simulate_cpu, simulate_rocm

import portable_rl
from portable_rl.backends import versions
from portable_rl.cli import main
from portable_rl.platform import platform_class

ROOT = Path(__file__).resolve().parents[2]
# The installed console script, as users run it.
ENTRY = shutil.which(
    "portable-rl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
)


def run_json(capsys, *args: str) -> dict:
    assert main(["image", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def no_probing(monkeypatch):
    """Fail the test if any platform probes its hardware."""

    def refuse(cls):
        raise AssertionError(f"{cls.__name__}.probe() called: a named platform must not need its hardware")

    for name in ("cpu", "cuda", "rocm"):
        monkeypatch.setattr(platform_class(name), "probe", classmethod(refuse))


@pytest.mark.parametrize(
    "platform,variant", [("cpu", None), ("cuda", None), ("rocm", "gfx942"), ("rocm", "gfx950")]
)
def test_named_platform_prints_the_table_image_without_probing(capsys, no_probing, platform, variant):
    args = ["--platform", platform] + (["--variant", variant] if variant else [])
    info = run_json(capsys, *args)
    ref = versions.image_ref(platform, variant)
    assert info["image"] == ref and info["pull"] == f"docker pull {ref}"
    assert info["platform"] == platform and info["variant"] == variant
    assert info["versions"]["torch"] == versions.versions(platform)["torch"]
    assert (
        info["base_image"]
        == versions.versions(platform)[f"base_image_{variant}" if variant else "base_image"]
    )


def test_text_output_has_reference_and_pull_command(capsys, no_probing):
    assert main(["image", "--platform", "rocm"]) == 0
    text = capsys.readouterr().out
    ref = versions.image_ref("rocm", "gfx942")  # the default variant of a named platform
    assert f"image:    {ref}" in text and f"pull:     docker pull {ref}" in text


def test_variant_of_another_vendor_is_a_one_line_error(capsys, no_probing):
    assert main(["image", "--platform", "cuda", "--variant", "gfx942"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no cuda image for variant 'gfx942'" in err[0] and "rocm variant" in err[0]


def test_unknown_variant_lists_what_exists(capsys, no_probing):
    assert main(["image", "--platform", "rocm", "--variant", "gfx90a"]) == 2
    err = capsys.readouterr().err
    assert "'gfx90a'" in err and "gfx942, gfx950" in err


def test_version_overrides_the_tag_and_bad_versions_are_refused(capsys, no_probing):
    info = run_json(capsys, "--platform", "cuda", "--version", "0.2.0rc1")
    assert info["tag"] == "0.2.0rc1-cuda" and info["image"].endswith(":0.2.0rc1-cuda")
    assert main(["image", "--platform", "cuda", "--version", "0.2 beta"]) == 2
    assert "--version '0.2 beta'" in capsys.readouterr().err


def test_auto_on_a_simulated_mi355x_picks_the_gfx950_image(capsys, monkeypatch):
    simulate_rocm(monkeypatch, ["gfx950:sramecc+:xnack-"] * 8)
    monkeypatch.delenv("PORTABLE_RL_PLATFORM", raising=False)
    info = run_json(capsys)
    assert info["platform"] == "rocm" and info["variant"] == "gfx950"
    assert info["image"] == versions.image_ref("rocm", "gfx950")
    assert info["how"].startswith("detected")


def test_auto_on_a_cpu_host(capsys, monkeypatch):
    simulate_cpu(monkeypatch)
    monkeypatch.delenv("PORTABLE_RL_PLATFORM", raising=False)
    assert run_json(capsys)["image"] == versions.image_ref("cpu")


def test_cli_entry_point_one_line_exit_2_without_traceback():
    assert ENTRY, "the portable-rl console script is not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "PORTABLE_RL_PLATFORM"}
    out = subprocess.run(
        [ENTRY, "image", "--platform", "cpu", "--variant", "gfx950"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "portable-rl image: error: no cpu image for variant 'gfx950' (gfx950 is a rocm variant); cpu has: (default)"
    ]
    help_text = subprocess.run([ENTRY, "--help"], capture_output=True, text=True, env=env).stdout
    assert "image" in help_text


def test_version_table_matches_the_package_version():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert versions.PROJECT_VERSION == portable_rl.__version__ == declared
