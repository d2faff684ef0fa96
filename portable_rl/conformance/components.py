"""Component checks: the trainer, the rollout engine and weight sync agree with each other on this platform.

(filled in as the components land)
"""

from __future__ import annotations
