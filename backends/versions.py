"""The one version table: every pinned version and image reference, per platform.

Dockerfiles, the CI matrix, `portable-rl image` and the backends all read this table; a test checks the
Dockerfiles agree with it. Change a version here and nowhere else.
"""

from __future__ import annotations

PROJECT_VERSION = "0.1.0"
IMAGE_REGISTRY = "ghcr.io/portable-rl/portable-rl"

# Versions shared by every platform.
COMMON: dict[str, str] = {
    "python": "3.11",
    "megatron-core": "0.16.1",
    "ray": "2.60.0",
    "transformers": "5.23.0",
    "sglang": "0.5.23",
    "sglang-router": "0.3.2",
}

# Per-platform versions. torch differs: CPU uses the CPU build; GPU images use the vendor build that
# SGLang's image ships.
PLATFORMS: dict[str, dict[str, str]] = {
    "cpu": {
        "torch": "2.13.0",
        "base_image": "python:3.11-slim-bookworm",
    },
    "cuda": {
        "torch": "2.14.1",
        "cuda": "12.9",
        "flash-attn": "2.8.3",
        "base_image": "lmsysorg/sglang:v0.5.23-cu129",
    },
    "rocm": {
        "torch": "2.14.1",
        "rocm": "7.0",
        "amd-aiter": "0.1.7",
        "base_image_gfx942": "lmsysorg/sglang:v0.5.23-rocm700-mi30x",
        "base_image_gfx950": "lmsysorg/sglang:v0.5.23-rocm700-mi35x",
    },
}

# Image variants per platform: the GPU architectures an image is built for.
IMAGE_VARIANTS: dict[str, tuple[str, ...]] = {
    "cpu": ("",),
    "cuda": ("",),
    "rocm": ("gfx942", "gfx950"),
}


def versions(platform: str) -> dict[str, str]:
    """Merged version table for ``platform``."""
    if platform not in PLATFORMS:
        raise KeyError(f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}")
    return {**COMMON, **PLATFORMS[platform]}


def image_tag(platform: str, variant: str | None = None, version: str | None = None) -> str:
    """Tag of portable_rl's image, e.g. ``0.1.0-rocm-gfx942``."""
    variants = IMAGE_VARIANTS[platform]
    variant = variant if variant is not None else variants[0]
    if variant not in variants:
        raise KeyError(
            f"no {platform} image for variant {variant!r}; available: {', '.join(v or '(default)' for v in variants)}"
        )
    parts = [version or PROJECT_VERSION, platform] + ([variant] if variant else [])
    return "-".join(parts)


def image_ref(platform: str, variant: str | None = None, version: str | None = None) -> str:
    return f"{IMAGE_REGISTRY}:{image_tag(platform, variant, version)}"
