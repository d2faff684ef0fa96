"""A generate hook for the run-failure test: single-turn generation for the first step's samples, then it
raises (imported by ``portable-rl train`` through PYTHONPATH, as a user's own hook module would be)."""

from __future__ import annotations

from portable_rl.rollout.generate_hook import single_turn

FIRST_STEP_SAMPLES = 8  # tiny_multiturn_cpu.yaml: 2 prompts x 4 samples
calls = 0


async def fails_in_step_two(sample, sampling_params, engine):
    global calls
    calls += 1
    if calls > FIRST_STEP_SAMPLES:
        raise ConnectionResetError("the sandbox went away")
    return await single_turn(sample, sampling_params, engine)
