"""portable_rl: RL post-training that runs the same launch script on NVIDIA, AMD and CPU."""

__version__ = "0.1.0"
