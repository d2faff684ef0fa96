"""Typed configuration, one module per recipe section, below every runtime module.

Each section is a dataclass validated in ``__post_init__`` (one-line ``ValueError`` naming the field and the
fix) with every field described in its docstring. This package imports nothing from portable_rl's runtime
(rollout, training, weight_sync, orchestration...): runtime code imports its config from here, and the
recipe (``portable_rl.recipe``) composes the sections without importing runtime code.
"""

from __future__ import annotations

import dataclasses
import math


def refuse_non_finite(section: object, prefix: str) -> None:
    """Raise ``ValueError`` naming the first float field of ``section`` that is NaN or infinite.

    Range checks written as ``value <= 0`` are silently true or false for NaN (``nan <= 0`` is False), so every
    section calls this first in ``__post_init__``: a non-finite number never reaches an optimizer or a timer.
    """
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{f.name}={value!r} must be a finite number; write a real value")
