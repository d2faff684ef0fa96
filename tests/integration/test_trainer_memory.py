"""Trainer memory grows linearly with the packed micro-batch: 16k tokens need at most 5x what 4k tokens need.

Each size runs in a fresh process (``memory_probe.py``) that measures the resident-set high-water mark of one
``forward_backward`` over one packed micro-batch of the tiny model, above the resident set before it. Attention
that materialises the s x s scores (Megatron's unfused ``DotProductAttention``, ``train.attention=local``)
needs ~16x for 4x the tokens; measured on a 2-core CPU: 0.40 GB at 2k, 1.48 GB at 4k, 5.70 GB at 8k tokens
(16k does not fit a 24 GB machine), against 0.10 GB at 4k and 0.43 GB at 16k with the platform's choice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

pytestmark = pytest.mark.slow  # four fresh trainer processes, ~50 s on 2 cores

PROBE = Path(__file__).with_name("memory_probe.py")


def peak_bytes(ckpt: Path, tokens: int, attention: str) -> int:
    out = subprocess.run(
        [sys.executable, str(PROBE), str(ckpt), str(tokens), attention],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def test_packed_micro_batch_memory_is_linear_in_tokens(tmp_path):
    ckpt = build_tiny_checkpoint(tmp_path / "tiny", TinySpec(arch="qwen3"))
    small = peak_bytes(ckpt, 4096, "auto")
    large = peak_bytes(ckpt, 16384, "auto")
    assert small > 0
    ratio = large / small
    assert ratio <= 5.0, f"16k tokens took {ratio:.1f}x the memory of 4k tokens ({large} vs {small} bytes)"


def test_the_same_check_fails_for_quadratic_attention(tmp_path):
    """The measurement sees s x s scores: Megatron's unfused attention (``local``, padded) at 4x the tokens needs
    far more than 5x (measured 9.5x from 1k to 4k tokens, 14x from 2k to 8k; sizes kept small to fit)."""
    ckpt = build_tiny_checkpoint(tmp_path / "tiny", TinySpec(arch="qwen3"))
    ratio = peak_bytes(ckpt, 4096, "local") / peak_bytes(ckpt, 1024, "local")
    assert ratio > 5.0, f"unfused attention grew only {ratio:.1f}x for 4x the tokens"
