"""The vendor CI matrix: ci/matrix.yaml loaded into validated dataclasses.

A leg is one CI job on one kind of machine: the platform it tests, the runner labels that select the machine,
and for GPU legs the container image (from the version table), its docker options (the platform's device
mounts plus the leg's own options), the GPU count and architecture the host must show, and the pytest marker
expression. Bad data fails at load time with one line naming the leg, the field and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from portable_rl.backends import versions
from portable_rl.platform import platform_class

ROOT = Path(__file__).resolve().parents[1]
MATRIX_FILE = ROOT / "ci" / "matrix.yaml"
LEG_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# The conformance report and test results of a leg land here (ignored by git: conformance-report*/).
REPORT_ROOT = "conformance-report"


class MatrixError(ValueError):
    """ci/matrix.yaml is malformed; the message is one line naming the leg and field."""


@dataclass(frozen=True)
class Leg:
    name: str
    platform: str
    runs_on: tuple[str, ...]
    script: str
    timeout_minutes: int = 60
    variant: str | None = None
    gpus: int = 0
    gpu_arch: str | None = None
    container_options: tuple[str, ...] = ()
    pytest_markers: str | None = None

    def __post_init__(self) -> None:
        where = f"ci/matrix.yaml: leg {self.name!r}"
        if not LEG_NAME.match(self.name):
            raise MatrixError(f"{where}: name must be lowercase letters, digits and '-'")
        if self.platform not in versions.PLATFORMS:
            raise MatrixError(
                f"{where}: unknown platform {self.platform!r}; use one of {', '.join(versions.PLATFORMS)}"
            )
        if not self.runs_on:
            raise MatrixError(f"{where}: runs_on needs at least one runner label")
        if not self.script.startswith("ci/legs/") or not self.script.endswith(".sh"):
            raise MatrixError(f"{where}: script {self.script!r} must be a ci/legs/*.sh file")
        if self.timeout_minutes <= 0:
            raise MatrixError(f"{where}: timeout_minutes must be positive, got {self.timeout_minutes}")
        variants = versions.IMAGE_VARIANTS[self.platform]
        if self.variant is not None and self.variant not in variants:
            raise MatrixError(
                f"{where}: no {self.platform} image variant {self.variant!r}; "
                f"available: {', '.join(v or '(default)' for v in variants)}"
            )
        if self.variant is None and len(variants) > 1:
            raise MatrixError(
                f"{where}: {self.platform} images come per variant; set variant to one of {variants}"
            )
        if self.is_gpu:
            if self.gpus <= 0:
                raise MatrixError(f"{where}: a {self.platform} leg needs gpus > 0")
            if not self.pytest_markers:
                raise MatrixError(f"{where}: a GPU leg needs pytest_markers (which tests it runs)")
        elif self.gpus or self.container_options or self.pytest_markers:
            raise MatrixError(
                f"{where}: the cpu leg runs .ci/run on a hosted runner; drop gpus/container/markers"
            )

    @property
    def is_gpu(self) -> bool:
        return self.platform != "cpu"

    @property
    def image(self) -> str | None:
        """The image a GPU leg runs in: the version table's reference for its platform and variant."""
        return versions.image_ref(self.platform, self.variant) if self.is_gpu else None

    @property
    def docker_options(self) -> str:
        """`docker create` options: the platform's device mounts, then the leg's own options."""
        mounts = [f"--device {path}" for path in platform_class(self.platform).container_device_mounts]
        return " ".join([*mounts, *self.container_options])

    @property
    def report_dir(self) -> str:
        return f"{REPORT_ROOT}/{self.name}"

    def env(self) -> dict[str, str]:
        """What the leg script reads (the workflow sets it; `python -m ci.generate --leg-env` prints it)."""
        env = {"LEG_NAME": self.name, "LEG_PLATFORM": self.platform, "LEG_REPORT_DIR": self.report_dir}
        if self.is_gpu:
            env.update(
                {
                    "PORTABLE_RL_PLATFORM": self.platform,
                    "LEG_GPUS": str(self.gpus),
                    "LEG_GPU_ARCH": self.gpu_arch or "",
                    "LEG_PYTEST_MARKERS": self.pytest_markers or "",
                }
            )
        return env


@dataclass(frozen=True)
class Images:
    tags: tuple[str, ...]
    runs_on: str
    timeout_minutes: int = 240


@dataclass(frozen=True)
class Matrix:
    actions: dict[str, str]
    legs: tuple[Leg, ...]
    images: Images
    runner_labels: tuple[str, ...] = field(default=())

    def leg(self, name: str) -> Leg:
        for leg in self.legs:
            if leg.name == name:
                return leg
        raise MatrixError(
            f"no leg {name!r} in ci/matrix.yaml; legs: {', '.join(leg.name for leg in self.legs)}"
        )


REQUIRED_ACTIONS = ("checkout", "setup-python", "upload-artifact", "setup-buildx", "login", "bake")
HOSTED_LABEL = re.compile(r"^(ubuntu|windows|macos)-")


def _leg(name: str, data: Any) -> Leg:
    if not isinstance(data, dict):
        raise MatrixError(f"ci/matrix.yaml: leg {name!r} must be a mapping")
    known = set(Leg.__dataclass_fields__) - {"name"}
    unknown = set(data) - known
    if unknown:
        raise MatrixError(
            f"ci/matrix.yaml: leg {name!r} has unknown keys {sorted(unknown)}; known: {sorted(known)}"
        )
    for key in ("platform", "runs_on", "script"):
        if key not in data:
            raise MatrixError(f"ci/matrix.yaml: leg {name!r} lacks {key!r}")
    return Leg(
        name=name,
        platform=data["platform"],
        runs_on=tuple(data["runs_on"]),
        script=data["script"],
        timeout_minutes=int(data.get("timeout_minutes", 60)),
        variant=data.get("variant"),
        gpus=int(data.get("gpus", 0)),
        gpu_arch=data.get("gpu_arch"),
        container_options=tuple(data.get("container_options", ())),
        pytest_markers=data.get("pytest_markers"),
    )


def parse(data: Any) -> Matrix:
    if not isinstance(data, dict) or not {"actions", "legs", "images"} <= set(data):
        raise MatrixError("ci/matrix.yaml: needs top-level 'actions', 'legs' and 'images'")
    actions = dict(data["actions"])
    missing = [a for a in REQUIRED_ACTIONS if a not in actions]
    if missing:
        raise MatrixError(f"ci/matrix.yaml: actions lacks {missing}")
    for key, ref in actions.items():
        if "@" not in str(ref):
            raise MatrixError(
                f"ci/matrix.yaml: action {key!r} = {ref!r} must be pinned as owner/name@version"
            )
    legs = tuple(_leg(name, body) for name, body in dict(data["legs"]).items())
    img = data["images"]
    images = Images(
        tags=tuple(img["tags"]), runs_on=img["runs_on"], timeout_minutes=int(img.get("timeout_minutes", 240))
    )
    labels = sorted(
        {
            label
            for leg in legs
            for label in leg.runs_on
            if label != "self-hosted" and not HOSTED_LABEL.match(label)
        }
    )
    return Matrix(actions=actions, legs=legs, images=images, runner_labels=tuple(labels))


def load(path: Path = MATRIX_FILE) -> Matrix:
    with open(path, encoding="utf-8") as fh:
        return parse(yaml.safe_load(fh))
