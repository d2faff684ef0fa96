"""Model sources: tiny random-init checkpoints for tests and the shipped demo model."""
