"""Device-mask arithmetic shared by the GPU backends (pure functions over an env mapping).

A mask variable holds a comma-separated list of indices into the devices visible *before* it is applied.
Masks compose outermost first: on ROCm, ROCR_VISIBLE_DEVICES selects among physical devices and
HIP_VISIBLE_DEVICES (or its alias CUDA_VISIBLE_DEVICES) selects among what ROCR left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from portable_rl.platform import VisibilityError


def parse_mask(var: str, value: str, universe: Sequence[int]) -> list[int]:
    """Apply mask ``var=value`` to ``universe`` (the indices visible so far); return the physical indices."""
    value = value.strip()
    if value == "":
        return []  # an empty mask hides every device, as the runtimes do
    out: list[int] = []
    for item in value.split(","):
        item = item.strip()
        if not item.isdigit():
            # UUID masks (GPU-xxxx) are valid for the runtimes but cannot be mapped without the device list.
            raise VisibilityError(
                f"{var}={value!r}: entry {item!r} is not a device index; use integer indices"
            )
        pos = int(item)
        if pos >= len(universe):
            raise VisibilityError(
                f"{var}={value!r}: index {pos} out of range, only {len(universe)} device(s) visible at that point"
            )
        if universe[pos] in out:
            raise VisibilityError(f"{var}={value!r}: index {pos} listed twice")
        out.append(universe[pos])
    return out


def apply_masks(env: Mapping[str, str], masks: Sequence[str], n_physical: int) -> list[int]:
    """Compose ``masks`` (outermost first) present in ``env`` over ``n_physical`` devices."""
    visible = list(range(n_physical))
    for var in masks:
        if var in env:
            visible = parse_mask(var, env[var], visible)
    return visible


def format_mask(indices: Sequence[int]) -> str:
    return ",".join(str(i) for i in indices)
