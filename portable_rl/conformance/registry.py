"""The check registry: what a conformance check is, what it needs, and how one case is run.

Contract
--------
* A check measures one number (``Measurement.error``) — a max abs error, a count of mismatching elements,
  a loss difference — that the runner compares with the tolerance for (check, platform, dtype) from
  ``tolerances.TOLERANCES``. The check function never decides pass/fail itself; it only measures. That keeps
  tolerances reviewable as data and lets the meta-tests break an implementation and watch the verdict flip.
* ``dtypes`` expands a check into cases (one per dtype; ``None`` means dtype-free). ``markers`` are pytest
  markers (``gpu``, ``cuda``, ``rocm``, ``slow``) and also runtime requirements: a ``gpu`` check is skipped,
  with the reason, on a platform without devices. ``min_devices`` applies only to device platforms (on CPU
  processes share the host). ``requires`` names portable_rl modules from other components; a check whose
  module does not exist is skipped with "component not available".
* Expected and unexpected skips: a skip the platform explains (a GPU check on CPU, a vendor's check on another
  vendor, too few devices, or a reason an ``available`` hook returns as ``ExpectedSkip``, such as no golden
  file recorded for the platform yet) is expected. Any other skip (a required module missing, a golden file
  that the repository should hold gone) means something broke; ``CheckResult.skip_expected`` tells them
  apart, ``portable-rl conformance --fail-on-unexpected-skip`` and the pytest suite fail on the unexpected.
* Check functions take ``(ctx, dtype)``; ``ctx.memo`` shares expensive work (one 3-process collective run,
  one tiny checkpoint) between the cases of one run.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_rl.platform import Platform

KNOWN_MARKERS = ("gpu", "cuda", "rocm", "slow")
STATUSES = ("pass", "fail", "skipped")


class ExpectedSkip(str):
    """A skip reason the platform explains (see module docstring); any other reason is unexpected."""


def is_expected_skip(reason: str | None) -> bool:
    return isinstance(reason, ExpectedSkip)


@dataclass(frozen=True)
class Measurement:
    """What a check measured: ``error`` is compared with the tolerance (smaller is better)."""

    error: float
    detail: str = ""


@dataclass(frozen=True)
class Check:
    name: str  # "group.what", unique
    measures: str  # one sentence: what ``error`` is
    fn: Callable[[Context, str | None], Measurement]
    dtypes: tuple[str | None, ...] = (None,)
    markers: tuple[str, ...] = ()
    min_devices: int = 0
    requires: tuple[str, ...] = ()  # portable_rl modules (other components) this check exercises
    depends_on: str = ""  # human note on what must exist before the check can run
    # Extra precondition (e.g. a golden file for the platform): None when met, else the one-line reason.
    available: Callable[[Platform], str | None] | None = None

    def __post_init__(self) -> None:
        if "." not in self.name or self.name != self.name.strip():
            raise ValueError(f"check name {self.name!r} must look like 'group.what'")
        unknown = [m for m in self.markers if m not in KNOWN_MARKERS]
        if unknown:
            raise ValueError(f"check {self.name}: unknown markers {unknown}; use {KNOWN_MARKERS}")
        if not self.dtypes:
            raise ValueError(f"check {self.name}: dtypes must name at least one case (None for dtype-free)")

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    def cases(self) -> list[Case]:
        return [Case(self, d) for d in self.dtypes]


@dataclass(frozen=True)
class Case:
    check: Check
    dtype: str | None

    @property
    def id(self) -> str:
        return self.check.name if self.dtype is None else f"{self.check.name}[{self.dtype}]"


@dataclass
class CheckResult:
    check: str
    dtype: str | None
    status: str  # pass | fail | skipped
    error: float | None = None
    tolerance: float | None = None
    reason: str = ""  # why skipped / why failed
    detail: str = ""
    seconds: float = 0.0
    measures: str = ""
    skip_expected: bool = False  # a skip the platform explains (see module docstring)

    @property
    def id(self) -> str:
        return self.check if self.dtype is None else f"{self.check}[{self.dtype}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "dtype": self.dtype,
            "status": self.status,
            "error": self.error,
            "tolerance": self.tolerance,
            "reason": self.reason,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
            "measures": self.measures,
            "skip_expected": self.skip_expected,
        }


@dataclass
class Context:
    """State shared by the cases of one conformance run on one platform."""

    platform: Platform
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="portable-rl-conformance-")))
    cache: dict[str, Any] = field(default_factory=dict)
    finalizers: list[Callable[[], Any]] = field(default_factory=list)
    shared_dir: Path | None = None  # cross-process cache for shared_memo (parallel test workers)

    def close(self) -> None:
        """Undo what checks started (a local Ray, ...), last started first."""
        while self.finalizers:
            self.finalizers.pop()()

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per context; later cases reuse the value (and a raised error is re-raised)."""
        if key not in self.cache:
            try:
                self.cache[key] = ("ok", compute())
            except Exception as exc:  # remembered so every dependent case reports the same cause
                self.cache[key] = ("error", exc)
        kind, value = self.cache[key]
        if kind == "error":
            raise value
        return value

    def shared_memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """Like ``memo``, but with ``shared_dir`` set the value is computed once across processes.

        Parallel pytest workers each hold their own Context; the first to take the lock computes and saves the
        value (``torch.save``), the others wait and load it. Without ``shared_dir`` this is ``memo``.
        """
        if self.shared_dir is None:
            return self.memo(key, compute)

        def load_or_compute() -> Any:
            import fcntl

            import torch

            self.shared_dir.mkdir(parents=True, exist_ok=True)
            path = self.shared_dir / f"{key}.pt"
            with open(self.shared_dir / f"{key}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if path.exists():
                    return torch.load(path)
                value = compute()
                torch.save(value, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
                return value

        return self.memo(key, load_or_compute)

    def tiny_checkpoint(self, arch: str = "llama") -> Path:
        from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

        return self.memo(
            f"tiny:{arch}", lambda: build_tiny_checkpoint(self.workdir / f"tiny-{arch}", TinySpec(arch=arch))
        )


CHECKS: dict[str, Check] = {}


def register(
    name: str,
    measures: str,
    *,
    dtypes: tuple[str | None, ...] = (None,),
    markers: tuple[str, ...] = (),
    min_devices: int = 0,
    requires: tuple[str, ...] = (),
    depends_on: str = "",
    available: Callable[[Platform], str | None] | None = None,
) -> Callable[[Callable[[Context, str | None], Measurement]], Callable[[Context, str | None], Measurement]]:
    """Decorator: add a check function to ``CHECKS`` under ``name``."""

    def deco(
        fn: Callable[[Context, str | None], Measurement],
    ) -> Callable[[Context, str | None], Measurement]:
        if name in CHECKS:
            raise ValueError(f"conformance check {name!r} is registered twice")
        CHECKS[name] = Check(
            name, measures, fn, dtypes, markers, min_devices, requires, depends_on, available
        )
        return fn

    return deco


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def unmet_requirement(check: Check, platform: Platform) -> str | None:
    """Why ``check`` cannot run on ``platform`` (one line), or None when it can. Reasons the platform explains
    are ``ExpectedSkip`` instances; any other reason is an unexpected skip."""
    if "gpu" in check.markers and platform.torch_device_type == "cpu":
        return ExpectedSkip(f"needs a GPU platform; this run is on {platform.name!r}")
    for vendor in ("cuda", "rocm"):
        if vendor in check.markers and platform.name != vendor:
            return ExpectedSkip(f"needs the {vendor} platform; this run is on {platform.name!r}")
    if (
        check.min_devices
        and platform.torch_device_type != "cpu"
        and len(platform.devices) < check.min_devices
    ):
        return ExpectedSkip(
            f"needs {check.min_devices} devices; platform {platform.name!r} has {len(platform.devices)}"
        )
    missing = [m for m in check.requires if not _module_exists(m)]
    if missing:
        note = f" ({check.depends_on})" if check.depends_on else ""
        return f"component not available: {', '.join(missing)} missing{note}"
    if check.available is not None:
        return check.available(platform)
    return None


def load_all() -> dict[str, Check]:
    """Import every module that registers checks and return the registry (idempotent)."""
    from portable_rl.conformance import CHECK_MODULES

    for module in CHECK_MODULES:
        importlib.import_module(module)
    return CHECKS


def all_cases() -> list[Case]:
    return [case for check in load_all().values() for case in check.cases()]


def select(names: list[str] | None) -> list[Check]:
    """Checks named in ``names`` (exact names or group prefixes like ``kernels``); all when empty."""
    checks = load_all()
    if not names:
        return list(checks.values())
    chosen: dict[str, Check] = {}
    for name in names:
        hits = [c for c in checks.values() if c.name == name or c.group == name]
        if not hits:
            import difflib

            close = difflib.get_close_matches(name, list(checks) + sorted({c.group for c in checks.values()}))
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown conformance check {name!r}{hint} (see `portable-rl conformance --list`)")
        chosen.update({c.name: c for c in hits})
    return [c for c in checks.values() if c.name in chosen]
