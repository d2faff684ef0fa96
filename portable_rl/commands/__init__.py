"""Sub-commands of the portable-rl CLI (see portable_rl.cli)."""
