"""Pure tensor math of the RL objective (CPU-testable): advantages, policy/value losses, KL, entropy, TIS.

Entry points for the trainer: ``AlgoConfig``, ``compute_advantages`` and ``compute_policy_loss``.
"""

from portable_rl.algo.objective import compute_advantages, compute_policy_loss
from portable_rl.config.algo import AlgoConfig

__all__ = ["AlgoConfig", "compute_advantages", "compute_policy_loss"]
