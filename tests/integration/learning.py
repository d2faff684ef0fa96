"""What every end-to-end run of the tiny recipe must show in its metrics: it trained, and the engines held
the trainer's weights.

The tiny recipe rewards a rule on the generated tokens (about half earned by the random model) and runs with
``run.check_weight_update``, so each step logs ``grad_norm``, ``advantage_abs_mean``, ``weights_changed_frac``
(the share of the trainer's parameter tensors the optimizer step changed) and ``weight_check_ok`` (every
engine's weight checksums equal the trainer's after the sync; the run fails otherwise). A run with zeroed
advantages, a no-op optimizer step, or a no-op or partial weight sync fails these assertions.
"""

from __future__ import annotations

from collections.abc import Sequence


def assert_trained_and_synced(rows: Sequence[dict]) -> None:
    """Every step of ``rows`` (metrics.jsonl lines) had a gradient, changed every weight, synced them exactly."""
    assert rows, "no steps logged"
    for r in rows:
        step = r["step"]
        assert r["grad_norm"] > 0, f"step {step}: grad_norm {r['grad_norm']} (no gradient)"
        assert r["advantage_abs_mean"] > 0, f"step {step}: zero advantages"
        assert r["zero_std_group_frac"] < 1, f"step {step}: every group tied"
        assert r["weights_changed_frac"] == 1.0, f"step {step}: the step left weights unchanged: {r}"
        assert r["weight_check_ok"] == 1.0, f"step {step}: engine weights differ from the trainer's"
