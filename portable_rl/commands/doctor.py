"""`portable-rl doctor [--json]`: what platform this host is, why, and what workers will be given.

Prints the detected platform and the reason, the env workers get (visibility, NOSET flags, collective env),
kernel and communication choices (the trainer's attention comes from ``Platform.trainer_kernels``, the
function the model builder calls), the image to pull, the devices, and what is missing with its consequence.
Read-only: it probes but never changes the process env or creates a device context.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from typing import Any

PACKAGES = ("torch", "megatron-core", "ray", "transformers", "sglang", "sglang-router")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> dict[str, Any]:
    from portable_rl.platform import current_platform

    platform = current_platform()
    facts = platform.describe()
    visible = list(range(len(platform.devices)))
    facts["worker_env_example"] = platform.worker_env(visible[:1])
    facts["sglang_server_args"] = platform.sglang_server_args()
    facts["megatron_overrides"] = platform.megatron_overrides()
    facts["kernels"] = [k.__dict__ for k in platform.kernels()]
    facts["missing"] = [f"{k.name}: {k.note}" for k in platform.kernels() if not k.available]
    facts["versions"] = {p: _version(p) for p in PACKAGES}
    return facts


def _print_text(facts: dict[str, Any]) -> None:
    def row(key: str, value: Any) -> None:
        print(f"  {key:<28} {value}")

    print(f"platform: {facts['name']}")
    row("why", facts["reason"])
    row("torch device type", facts["torch_device_type"])
    row("collectives", f"{facts['comm_library']} (torch backend {facts['dist_backend']!r})")
    row("devices", len(facts["devices"]) or "none (CPU)")
    for d in facts["devices"]:
        row(f"  [{d['index']}]", f"{d['name']} {d['arch'] or ''}".strip())
    k = facts["trainer_kernels"]
    row("trainer attention", f"{k['attention']} (layer spec {k['layer_spec']}): {k['note']}")
    row("trainer dtype (auto)", facts["default_train_dtype"])
    row(
        "sglang args",
        " ".join(f"--{k.replace('_', '-')} {v}" for k, v in facts["sglang_server_args"].items()),
    )
    row("fp8 dtype", facts["fp8_dtype"] or "unsupported")
    row("co-located weight hand-off", facts["shared_tensor_transport"])
    row("image", facts["image"])
    print("worker env:")
    for key, value in sorted(facts["worker_env_example"].items()):
        row(key, value)
    print("versions:")
    for pkg, ver in facts["versions"].items():
        row(pkg, ver or "not installed")
    if facts["missing"]:
        print("missing:")
        for line in facts["missing"]:
            print(f"  - {line}")


def run(args: argparse.Namespace) -> int:
    facts = report()
    if args.json:
        json.dump(facts, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_text(facts)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="show the detected platform, why, and the env/kernels/image workers will use",
        description=(
            "Detect the platform (PORTABLE_RL_PLATFORM=cpu|cuda|rocm overrides) and print the env workers get, "
            "kernel and collective choices, the image, the devices, and what is missing."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
