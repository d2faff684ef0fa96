"""`portable-rl image`: the container image to pull for a platform, from the version table.

    portable-rl image [--platform auto|cpu|cuda|rocm] [--variant ARCH] [--version X] [--json]

``--platform auto`` (the default) detects this host's platform and, for platforms whose images are built per
GPU architecture, picks the variant of the first device. A named platform is looked up without probing: this
prints the image for a machine you are about to use, not only the one you are on. Without ``--variant`` a
named platform gets its default variant. Asking for a variant the platform has no image for, or a malformed
version, is a one-line error with exit code 2. Output: the image reference and the ``docker pull`` command
(``--json``: also the tag, base image and the pinned versions).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

PLATFORM_CHOICES = ("auto", "cpu", "cuda", "rocm")
# Docker's tag grammar (word characters, dots, dashes; no leading dot or dash), short enough that the full
# tag (version + platform + variant) stays within Docker's 128 characters.
TAG_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def _variants_text(variants: tuple[str, ...]) -> str:
    return ", ".join(v or "(default)" for v in variants)


def _owner_of(variant: str, variants_by_platform: dict[str, tuple[str, ...]]) -> list[str]:
    return [name for name, variants in variants_by_platform.items() if variant and variant in variants]


def resolve(platform: str, variant: str | None, version: str | None) -> dict[str, Any]:
    """Everything `image` prints, for ``platform`` ("auto" detects) and an optional variant/version."""
    from portable_rl.backends import versions
    from portable_rl.errors import UserError
    from portable_rl.platform import current_platform, platform_class

    if version is not None and not TAG_PART.match(version):
        raise UserError(
            f"--version {version!r} is not usable in an image tag; use letters, digits, '.', '_' or '-' "
            f"(e.g. {versions.PROJECT_VERSION})"
        )
    if platform == "auto":
        detected = current_platform()
        name, how = detected.name, f"detected: {detected.reason}"
        if variant is None:
            archs = [d.arch.split(":")[0] for d in detected.devices if d.arch]
            variant = next((a for a in archs if a in versions.IMAGE_VARIANTS[name]), None)
    else:
        name, how = platform_class(platform).name, "requested with --platform"
    variants = versions.IMAGE_VARIANTS[name]
    if variant is not None and variant not in variants:
        owners = _owner_of(variant, versions.IMAGE_VARIANTS)
        hint = f" ({variant} is a {'/'.join(owners)} variant)" if owners else ""
        raise UserError(
            f"no {name} image for variant {variant!r}{hint}; {name} has: {_variants_text(variants)}"
        )
    variant = variant if variant is not None else variants[0]
    table = versions.versions(name)
    ref = versions.image_ref(name, variant, version)
    return {
        "platform": name,
        "variant": variant or None,
        "version": version or versions.PROJECT_VERSION,
        "how": how,
        "image": ref,
        "tag": versions.image_tag(name, variant, version),
        "pull": f"docker pull {ref}",
        "base_image": table.get(f"base_image_{variant}") if variant else table.get("base_image"),
        # What the image pins (GPU images take Python from their base, so it is not listed for them).
        "versions": {k: table[k] for k in versions.IMAGE_PINS[name] if versions.is_version_key(k)},
    }


def run(args: argparse.Namespace) -> int:
    info = resolve(args.platform, args.variant, args.image_version)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0
    label = info["platform"] + (f" ({info['variant']})" if info["variant"] else "")
    print(f"platform: {label}  [{info['how']}]")
    print(f"image:    {info['image']}")
    print(f"base:     {info['base_image']}")
    print(f"pull:     {info['pull']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "image",
        help="print the container image (and docker pull command) for this or another platform",
        description=(
            "Print the image reference from the version table for the detected platform, or for --platform "
            "without needing its hardware, and the command to pull it."
        ),
    )
    p.add_argument(
        "--platform",
        choices=PLATFORM_CHOICES,
        default="auto",
        help="whose image to print (default: auto-detect this host)",
    )
    p.add_argument(
        "--variant", help="GPU architecture for platforms with per-architecture images (e.g. gfx950)"
    )
    p.add_argument(
        "--version",
        dest="image_version",
        metavar="X",
        help="portable-rl release to print the image of (default: the version table's)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the reference, tag, base image and versions as JSON"
    )
    p.set_defaults(func=run)
