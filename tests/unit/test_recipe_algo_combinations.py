"""Every algorithm recipe the validator accepts runs through the loop's batch building and loss; every one it
refuses is refused with a message naming the field.

The combinations are the product of the algorithm's discrete choices (estimator, KL placement and estimator,
loss aggregation, clipping variants, TIS, entropy), each with the switch off and on. GRPO's std normalisation,
the policy loss (ppo / gspo) and the optimizer steps per rollout (one / several mini-batches and epochs) are
drawn per combination from a seeded generator instead of multiplied out (each would double the runtime); over
thousands of combinations each of their values meets every estimator (asserted) and the other choices. Each is validated as the loop validates it (``Recipe``); an
accepted one goes through ``prepare_train_batch`` — the function the trainer step runs, here with stand-ins for
the actor's ``compute_logprobs`` and the critic's ``compute_values`` — and through the loss callback on the
micro-batch the actor would build (``to_micro_batch``), with a backward pass (and the critic's value loss for gae).
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import torch

from portable_rl.algo.aggregation import LOSS_AGG_MODES
from portable_rl.algo.kl import KL_ESTIMATORS
from portable_rl.config.algo import ADVANTAGE_ESTIMATORS, KL_MODES, POLICY_LOSSES, AlgoConfig
from portable_rl.data.prompts import PromptConfig
from portable_rl.data.types import Group, Sample
from portable_rl.recipe import DataConfig, Recipe
from portable_rl.rollout_to_train import make_loss_fn, make_value_loss_fn, prepare_train_batch
from portable_rl.training.batch import TrainBatch, to_micro_batch

CHOICES: dict[str, tuple[Any, ...]] = {
    "advantage_estimator": ADVANTAGE_ESTIMATORS,
    "kl_mode": KL_MODES,
    "kl_coef": (0.0, 0.05),
    "kl_estimator": KL_ESTIMATORS,
    "loss_agg": LOSS_AGG_MODES,
    "tis_cap": (None, 2.0),
    "dual_clip_c": (None, 3.0),
    "clip_eps_high": (0.2, 0.28),
    "entropy_coef": (0.0, 0.01),
}
# Choices that only matter together with another one are not multiplied out when that one is off.
KL_ONLY = ("kl_mode", "kl_estimator")
# Drawn per combination (module docstring); num_mini_batches 2 splits the test's 12 samples in two.
DRAWN: dict[str, tuple[Any, ...]] = {
    "grpo_normalize_std": (True, False),  # changes GRPO's numbers only, never what is accepted
    "policy_loss": POLICY_LOSSES,
    "num_mini_batches": (1, 2),
    "ppo_epochs": (1, 2),
}


def _combinations() -> list[dict[str, Any]]:
    out = []
    draw = random.Random(0)
    for values in itertools.product(*CHOICES.values()):
        combo = dict(zip(CHOICES, values, strict=True))
        if combo["kl_coef"] == 0 and any(combo[k] != CHOICES[k][0] for k in KL_ONLY):
            continue
        combo.update({k: draw.choice(v) for k, v in DRAWN.items()})
        out.append(combo)
    return out


def _recipe(algo: dict[str, Any]) -> Recipe:
    return Recipe(data=DataConfig(train=PromptConfig(path="prompts.jsonl")), algo=AlgoConfig(**algo))


def _groups() -> list[Group]:
    gen = torch.Generator().manual_seed(0)
    groups = []
    for g in range(3):
        samples = []
        for j in range(4):
            n = 2 + (g + j) % 4  # ragged responses
            logprobs = (-torch.rand(n, generator=gen)).tolist()
            response = list(range(5, 5 + n))
            samples.append(Sample(g, g, [1, 2, 3], response, logprobs, reward=float((g + j) % 2)))
        groups.append(Group(g, g, samples))
    return groups


def _fake_logprobs(batch: TrainBatch, model: str) -> list[list[float]]:
    """The actor's ``compute_logprobs`` stand-in: per-token log-probs, different for policy and reference."""
    shift = 0.1 if model == "ref" else 0.0
    return [[-0.5 - shift - 0.01 * t for t in range(len(r))] for r in batch.response_tokens]


def _fake_values(batch: TrainBatch) -> list[list[float]]:
    """The critic's ``compute_values`` stand-in: a value per response token."""
    return [[0.1 * (t % 3) for t in range(len(r))] for r in batch.response_tokens]


def _run(recipe: Recipe) -> None:
    algo = recipe.algo
    batch, _ = prepare_train_batch(_groups(), algo, _fake_logprobs, _fake_values)
    mb = to_micro_batch(batch, batch.max_length())
    loss_batch = mb.as_loss_batch()
    loss_batch.update(global_num_samples=float(len(batch)), global_num_tokens=float(mb.loss_mask.sum()))
    logprobs = (mb.token_fields["rollout_logprobs"] + 0.01).requires_grad_(True)
    entropy = torch.full_like(logprobs, 0.7)
    loss, _ = make_loss_fn(algo)(logprobs, entropy, loss_batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    if algo.uses_critic:
        values = (mb.token_fields["old_values"] + 0.05).requires_grad_(True)
        value_loss, _ = make_value_loss_fn(algo)(values, loss_batch)
        assert torch.isfinite(value_loss)
        value_loss.backward()
        assert torch.isfinite(values.grad).all()


def test_the_combinations_cover_both_outcomes():
    outcomes = set()
    combos = _combinations()
    for key, values in DRAWN.items():  # every drawn value occurs with every estimator
        for est in ADVANTAGE_ESTIMATORS:
            assert {c[key] for c in combos if c["advantage_estimator"] == est} == set(values), (key, est)
    for combo in combos:
        try:
            _recipe(combo)
            outcomes.add("accepted")
        except ValueError:
            outcomes.add("refused")
    assert outcomes == {"accepted", "refused"}


def test_every_accepted_recipe_runs_and_every_refused_one_names_its_field():
    failures = []
    for combo in _combinations():
        try:
            recipe = _recipe(combo)
        except ValueError as exc:
            named = set(re.findall(r"algo\.(\w+)", str(exc)))
            if not named & set(combo) or "\n" in str(exc):
                failures.append(f"{combo}: refused without naming its algo field in one line: {exc}")
            continue
        try:
            _run(recipe)
        except Exception as exc:  # noqa: BLE001 - every failure is collected and reported below
            failures.append(f"{combo}: accepted, but the loop raises {type(exc).__name__}: {exc}")
    head = f"{len(failures)} of {len(_combinations())} combinations:"
    assert not failures, "\n".join([head, *failures[:20]])
