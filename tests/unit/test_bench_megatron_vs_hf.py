"""The Megatron-vs-HF benchmark's FLOP count (MFU's numerator) and its CPU run (MFU n/a without a peak)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_megatron_vs_hf as bench  # noqa: E402

from portable_rl.training.batch import TrainBatch  # noqa: E402
from portable_rl.training.model_builder import ModelSpec  # noqa: E402


def test_model_flops_of_the_qwen_shape():
    """4 x 2048 tokens of the Qwen2.5-1.5B shape: ~80 TFLOP for fwd+bwd (matmuls 75.8 + causal attention 4.3)."""
    spec = ModelSpec.from_hf({**bench.SHAPES["qwen1.5b"], "hidden_act": "silu"})
    batch = TrainBatch([[1] * 64] * 4, [[1] * 1984] * 4, [[1] * 1984] * 4)
    assert bench.model_flops(spec, batch) == pytest.approx(80.1e12, rel=0.01)
    # Attention grows with the square of each sample's length, the matmuls with the tokens.
    one = TrainBatch([[1] * 64], [[1] * 8128], [[1] * 8128])
    assert bench.model_flops(spec, one) > bench.model_flops(spec, batch)


@pytest.mark.slow
def test_cpu_run_prints_every_path():
    """In a subprocess: the trainer's CPU runtime patches torch process-wide."""
    script = Path(bench.__file__)
    args = ["--iters", "1", "--samples", "4", "--prompt-len", "8", "--response-len", "24"]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for path in ("megatron padded", "megatron packed", "hf padded"):
        assert path in out.stdout
    assert "n/a" in out.stdout  # no peak FLOPs for the CPU: MFU is n/a
