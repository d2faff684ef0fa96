"""Fail a GPU leg early when the runner is not the machine the leg claims to test.

    python3 ci/legs/check_host.py DOCTOR_JSON --platform rocm --gpus 8 [--arch gfx942]

Reads `portable-rl doctor --json` output and checks the detected platform, that at least --gpus devices are
visible and, with --arch, that every device has that architecture ("gfx942:sramecc+:xnack-" counts as
gfx942). A mislabelled runner otherwise produces a green leg for the wrong hardware. Exit 1 with one line per
problem; standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def problems(facts: dict[str, Any], platform: str, gpus: int, arch: str | None) -> list[str]:
    out = []
    if facts.get("name") != platform:
        out.append(
            f"detected platform {facts.get('name')!r} ({facts.get('reason', '')}), the leg tests {platform!r}"
        )
    devices = facts.get("devices") or []
    if len(devices) < gpus:
        out.append(
            f"{len(devices)} device(s) visible, the leg needs {gpus}: check the runner and its device mask"
        )
    if arch:
        wrong = sorted(
            {str(d.get("arch")) for d in devices if str(d.get("arch") or "").split(":")[0] != arch}
        )
        if wrong:
            out.append(
                f"device architecture(s) {', '.join(wrong)} on a leg for {arch}: check the runner labels"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("doctor_json")
    parser.add_argument("--platform", required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--arch", default="")
    args = parser.parse_args(argv)
    with open(args.doctor_json, encoding="utf-8") as fh:
        facts = json.load(fh)
    found = problems(facts, args.platform, args.gpus, args.arch or None)
    for line in found:
        print(f"check_host: {line}", file=sys.stderr)
    if not found:
        print(
            f"check_host: {args.platform} with {len(facts.get('devices') or [])} device(s) as the leg expects"
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
