"""Typed configuration, one module per recipe section, below every runtime module.

Each section is a dataclass validated in ``__post_init__`` (one-line ``ValueError`` naming the field and the
fix) with every field described in its docstring. This package imports nothing from portable_rl's runtime
(rollout, training, weight_sync, orchestration...): runtime code imports its config from here, and the
recipe (``portable_rl.recipe``) composes the sections without importing runtime code.
"""
