"""Data layer: rollout data types, the JSONL prompt source, the data buffer, and the demo task generator."""
