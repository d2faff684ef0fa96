"""Shipped rollout examples: environments written as generate hooks (see docs/customise-rollout.md)."""
