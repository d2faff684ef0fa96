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
        # PyPI's Linux torch wheels are CUDA builds; the CPU build comes from PyTorch's own index.
        "torch_index_url": "https://download.pytorch.org/whl/cpu",
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


# Table entries each image's Dockerfile declares as an ARG (the default must equal the table's value).
# CPU images install all of these; GPU images take torch, sglang and the vendor kernels from their base image
# and fail the build when the base ships another version (docker/verify_base.py).
IMAGE_PINS: dict[str, tuple[str, ...]] = {
    "cpu": (
        "python",
        "base_image",
        "torch",
        "torch_index_url",
        "megatron-core",
        "ray",
        "transformers",
        "sglang-router",
    ),
    "cuda": (
        "base_image",
        "cuda",
        "torch",
        "sglang",
        "flash-attn",
        "megatron-core",
        "ray",
        "transformers",
        "sglang-router",
    ),
    "rocm": (
        "base_image_gfx942",
        "base_image_gfx950",
        "rocm",
        "torch",
        "sglang",
        "amd-aiter",
        "megatron-core",
        "ray",
        "transformers",
        "sglang-router",
    ),
}


def is_version_key(key: str) -> bool:
    """Package/toolkit versions are named like the package ("megatron-core"); other facts use
    snake_case (``base_image_gfx942``, ``torch_index_url``)."""
    return "_" not in key


def arg_name(key: str) -> str:
    """Dockerfile ARG holding table entry ``key``: "megatron-core" -> MEGATRON_CORE_VERSION; other facts keep
    their name (``base_image_gfx942`` -> BASE_IMAGE_GFX942, ``torch_index_url`` -> TORCH_INDEX_URL)."""
    name = key.upper().replace("-", "_")
    return f"{name}_VERSION" if is_version_key(key) else name


def docker_args(platform: str) -> dict[str, str]:
    """ARG name -> default value that ``docker/Dockerfile.<platform>`` must declare.

    Multi-variant images also get ``GPU_ARCH`` (default: the first variant), which selects the base image.
    """
    table = versions(platform)
    args = {arg_name(key): table[key] for key in IMAGE_PINS[platform]}
    variants = IMAGE_VARIANTS[platform]
    if len(variants) > 1:
        args["GPU_ARCH"] = variants[0]
    return args


def image_targets() -> dict[str, tuple[str, str]]:
    """Build target name -> (platform, variant) for every published image: cpu, cuda, rocm-gfx942, ..."""
    return {
        "-".join(p for p in (platform, variant) if p): (platform, variant)
        for platform, variants in IMAGE_VARIANTS.items()
        for variant in variants
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
