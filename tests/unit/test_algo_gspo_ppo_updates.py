"""GSPO, the critic's value loss and several optimizer steps per rollout, against hand computations.

Every expected number is worked out in the comments from the inputs, not taken from the code under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from portable_rl.algo.objective import compute_policy_loss, compute_value_loss
from portable_rl.algo.policy_loss import gspo_policy_loss, ppo_policy_loss
from portable_rl.config.algo import AlgoConfig
from portable_rl.data.types import Group, Sample
from portable_rl.rollout_to_train import build_train_batch, prepare_train_batch
from portable_rl.training.batch import TrainBatch
from portable_rl.training.model_builder import ModelSpec
from portable_rl.training.updates import mean_over_updates, optimizer_step, set_lr, split_mini_batches

# Two sequences; the second has a padded third token.
LOGP = [[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]]
OLD = [[-1.1, -2.2, -0.3], [-1.2, -0.9, 0.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
ADV = [[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]


def _inputs():
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    return (
        logp,
        torch.tensor(OLD, dtype=torch.float64),
        torch.tensor(ADV, dtype=torch.float64),
        torch.tensor(MASK),
    )


def test_gspo_sequence_ratio_clipping_and_gradient_by_hand():
    logp, old, adv, mask = _inputs()
    # Token log-ratios: row 0: 0.1, 0.2, -0.2 -> mean 0.1/3, s0 = exp(0.0333...) = 1.033895;
    #                   row 1: 0.2, -0.1 -> mean 0.05, s1 = exp(0.05) = 1.051271.
    s0, s1 = math.exp(0.1 / 3), math.exp(0.05)
    # Clip range [0.98, 1.03]. Row 0 (A = +1): max(-s0, -1.03) = -1.03, clipped (s0 > 1.03) on all 3 tokens.
    # Row 1 (A = -1): max(s1, clip(s1) = 1.03) = s1, not clipped.
    loss, metrics = gspo_policy_loss(logp, old, adv, mask, 0.02, 0.03, None, "seq-mean-token-mean")
    # seq-mean-token-mean: (mean row 0 + mean row 1) / 2 = (-1.03 + s1) / 2
    assert loss.item() == pytest.approx((-1.03 + s1) / 2, abs=1e-12)
    assert metrics["pg_clipfrac"].item() == pytest.approx(
        3 / 5
    )  # 3 of 5 trained tokens are in a clipped sequence
    assert metrics["gspo_seq_ratio_mean"].item() == pytest.approx((s0 + s1) / 2, abs=1e-12)
    # ppo_kl = mean(old - logp) over trained tokens = -(0.1 + 0.2 - 0.2 + 0.2 - 0.1) / 5 = -0.04
    assert metrics["ppo_kl"].item() == pytest.approx(-0.04, abs=1e-12)
    loss.backward()
    # Row 0 is clipped: no gradient. Row 1: d/dlogp_t of -A * s1 * exp(logp_t - sg) = s1, weighted 1/(2 seqs * 2
    # tokens) = s1 / 4 on each trained token; 0 on the padded one.
    want = torch.tensor([[0.0, 0.0, 0.0], [s1 / 4, s1 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, atol=1e-12, rtol=0)


def test_gspo_clips_whole_sequences_where_ppo_clips_tokens():
    logp, old, adv, mask = _inputs()
    # PPO on row 1 (A = -1) with the same range: token ratios exp(0.2) = 1.2214 (kept: max(1.2214, 1.03)) and
    # exp(-0.1) = 0.9048 (clipped: max(0.9048, 0.98) = 0.98); row 0: 1.1052 and 1.2214 clipped to 1.03 (A > 0),
    # 0.8187 kept. So PPO clips 3 of 5 tokens, one of them in row 1, which GSPO keeps whole.
    _, ppo = ppo_policy_loss(logp, old, adv, mask, 0.02, 0.03, None, "seq-mean-token-mean")
    assert ppo["pg_clipfrac"].item() == pytest.approx(3 / 5)
    ppo_loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.02, 0.03, None, "seq-mean-token-mean")
    # row 0: (-1.03 - 1.03 - exp(-0.2)) / 3; row 1: (exp(0.2) + 0.98) / 2
    want = ((-1.03 - 1.03 - math.exp(-0.2)) / 3 + (math.exp(0.2) + 0.98) / 2) / 2
    assert ppo_loss.item() == pytest.approx(want, abs=1e-12)


def test_gspo_token_gradient_equals_the_sequence_objective_for_sequence_advantages():
    """GSPO-token with a per-sequence advantage has the paper's sequence-level gradient (module docstring)."""
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([[0.7], [-1.3], [0.4]], dtype=torch.float64).expand(3, 5).contiguous()
    start = old + 0.05 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        logp = start.clone().requires_grad_(True)
        gspo_policy_loss(logp, old, adv, mask, 0.01, 0.02, None, agg)[0].backward()
        # The sequence form: s_i = exp(masked mean of the log-ratio), a differentiable function of the sequence.
        ref = start.clone().requires_grad_(True)
        s = torch.exp(((ref - old) * mask).sum(-1) / mask.sum(-1))
        a = adv[:, 0]
        per_seq = torch.maximum(-a * s, -a * s.clamp(0.99, 1.02))
        weights = {
            "token-mean": mask.sum(-1) / mask.sum(),  # each token weighs 1/N: sequence i gets |y_i| / N
            "seq-mean-token-mean": torch.full((3,), 1 / 3, dtype=torch.float64),
            "seq-mean-token-sum": mask.sum(-1) / 3,
        }[agg]
        (per_seq * weights).sum().backward()
        torch.testing.assert_close(logp.grad, ref.grad, atol=1e-12, rtol=1e-10)


def test_gspo_at_ratio_one_is_the_plain_policy_gradient():
    """One update per rollout: old = current log-probs, s = 1, loss = -mean advantage, nothing clipped."""
    logp = torch.tensor(LOGP, dtype=torch.float64)
    loss, metrics = compute_policy_loss(
        logp, logp, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK), AlgoConfig(policy_loss="gspo")
    )
    assert loss.item() == pytest.approx(-(1 + 1 + 1 - 1 - 1) / 5)  # token-mean of -A
    assert metrics["pg_clipfrac"].item() == 0.0 and metrics["gspo_seq_ratio_mean"].item() == 1.0


def test_value_loss_by_hand():
    values = torch.tensor([[0.5, 1.0]], requires_grad=True)
    old = torch.tensor([[0.4, 1.5]])
    returns = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, metrics = compute_value_loss(values, old, returns, mask, AlgoConfig(value_clip=0.2))
    # token 0: (0.5 - 1)^2 = 0.25; clipped value 0.4 + clamp(0.1, +-0.2) = 0.5, the same 0.25.
    # token 1: (1.0 - 1)^2 = 0; clipped value 1.5 + clamp(-0.5, +-0.2) = 1.3 -> 0.09, larger: the clipped one.
    # 0.5 * token mean = 0.5 * (0.25 + 0.09) / 2 = 0.085
    assert loss.item() == pytest.approx(0.085)
    assert metrics["vf_clipfrac"].item() == 0.5
    assert metrics["value_mean"].item() == pytest.approx(0.75)
    loss.backward()
    # token 0: 0.5 * 2 * (0.5 - 1) / 2 = -0.25; token 1: the clamp is saturated, no gradient.
    torch.testing.assert_close(values.grad, torch.tensor([[-0.25, 0.0]]))
    # Without clipping token 1 has loss 0: 0.5 * 0.25 / 2 = 0.0625.
    unclipped, _ = compute_value_loss(values, old, returns, mask, AlgoConfig(value_clip=None))
    assert unclipped.item() == pytest.approx(0.0625)


def _sample(g: int, reward: float, n: int) -> Sample:
    return Sample(g, g, [1, 2], list(range(3, 3 + n)), [-0.5] * n, reward=reward)


def test_gae_batch_carries_returns_and_rollout_values():
    groups = [Group(0, 0, [_sample(0, 1.0, 2), _sample(0, 0.0, 1)])]
    cfg = AlgoConfig(advantage_estimator="gae", gamma=1.0, lam=1.0, whiten_gae=False)
    batch, _ = build_train_batch(groups, cfg, values=[[0.25, 0.5], [0.75]])
    # gamma = lam = 1: advantage_t = reward - V_t, return_t = reward.
    # sample 0 (reward 1): advantages 1 - 0.25 = 0.75, 1 - 0.5 = 0.5; sample 1 (reward 0): 0 - 0.75 = -0.75.
    assert batch.token_fields["advantages"] == [[0.75, 0.5], [-0.75]]
    assert batch.token_fields["returns"] == [[1.0, 1.0], [0.0]]
    assert batch.token_fields["old_values"] == [[0.25, 0.5], [0.75]]


def test_forwards_run_only_when_needed():
    """No reference forward at kl_coef 0; no old-policy forward with one optimizer step; one before several."""
    groups = [Group(0, 0, [_sample(0, 1.0, 2), _sample(0, 0.0, 3)])]
    calls: list[str] = []

    def logprobs(batch: TrainBatch, model: str) -> list[list[float]]:
        calls.append(model)
        return [[-0.5] * len(r) for r in batch.response_tokens]

    def values(batch: TrainBatch) -> list[list[float]]:
        calls.append("critic")
        return [[0.0] * len(r) for r in batch.response_tokens]

    cases = [
        (AlgoConfig(), []),
        (AlgoConfig(kl_coef=0.1), ["ref"]),
        (AlgoConfig(num_mini_batches=2), ["policy"]),
        (AlgoConfig(ppo_epochs=2, kl_coef=0.1), ["ref", "policy"]),
        (AlgoConfig(advantage_estimator="gae"), ["critic"]),
    ]
    for cfg, want in cases:
        calls.clear()
        batch, _ = prepare_train_batch(groups, cfg, logprobs, values)
        assert calls == want, cfg
        assert ("old_logprobs" in batch.token_fields) == ("policy" in want)


def test_mini_batches_split_and_metrics_average():
    batch = TrainBatch(
        [[1]] * 8, [[2, 3]] * 8, [[1, 1]] * 8, sample_fields={"i": [float(i) for i in range(8)]}
    )
    parts = split_mini_batches(batch, 2, data_parallel=2)
    assert [p.sample_fields["i"] for p in parts] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    assert split_mini_batches(batch, 1) == [batch]
    with pytest.raises(ValueError, match=r"algo.num_mini_batches=3"):
        split_mini_batches(batch, 3)
    with pytest.raises(ValueError, match=r"train.data_parallel=4"):
        split_mini_batches(batch, 4, data_parallel=4)  # mini-batches of 2 do not split over 4 ranks
    # Two passes over two mini-batches: 4 steps. Means: loss (1 + 3 + 5 + 7) / 4 = 4, grad_norm (2+2+4+4)/4 = 3;
    # num_tokens is one pass's: 10 + 6 = 16; logp_abs_diff the first step's (engine vs the sampling weights).
    steps = [
        {"loss": 1.0, "grad_norm": 2.0, "num_tokens": 10.0, "logp_abs_diff": 1e-7},
        {"loss": 3.0, "grad_norm": 2.0, "num_tokens": 6.0, "logp_abs_diff": 0.1},
        {"loss": 5.0, "grad_norm": 4.0, "num_tokens": 10.0, "logp_abs_diff": 0.2},
        {"loss": 7.0, "grad_norm": 4.0, "num_tokens": 6.0, "logp_abs_diff": 0.3},
    ]
    assert mean_over_updates(steps, per_pass=2) == {
        "loss": 4.0,
        "grad_norm": 3.0,
        "num_tokens": 16.0,
        "logp_abs_diff": 1e-7,
        "optimizer_steps": 4.0,
    }
    one = {"loss": 0.1 + 0.2, "num_tokens": 3.0}
    assert mean_over_updates([one], per_pass=1) == one  # unchanged: no optimizer_steps key, no arithmetic


def test_the_optimizer_step_sets_lr_returns_the_grad_norm_and_refuses_a_skipped_step():
    """Megatron's optimizer answers ``(ok, grad_norm, zeros)``; a skipped step must stop training, not pass."""
    param = torch.nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([param], lr=0.0)
    set_lr(sgd, 0.5)
    assert [g["lr"] for g in sgd.param_groups] == [0.5]

    class Megatronish:
        def __init__(self, ok: bool) -> None:
            self.ok = ok

        def step(self):
            param.grad = torch.ones(2)
            sgd.step()
            return self.ok, torch.tensor(1.25), None

    assert optimizer_step(Megatronish(True), "optimizer step 3") == 1.25
    assert param.tolist() == [0.5, 0.5]  # the step ran at the lr set above
    with pytest.raises(
        FloatingPointError, match=r"^critic optimizer step 4 was skipped \(non-finite gradients\)$"
    ):
        optimizer_step(Megatronish(False), "critic optimizer step 4")


TINY = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_value_model_must_match_the_actors_vocabulary_and_hidden_size():
    from portable_rl.training.critic import CriticMismatch, check_compatible

    base = TINY
    actor = ModelSpec.from_hf(base)
    check_compatible(actor, ModelSpec.from_hf({**base, "num_hidden_layers": 4}))  # depth may differ
    for key, value in (("vocab_size", 640), ("hidden_size", 96)):
        with pytest.raises(CriticMismatch, match=rf"train.critic.path has {key}={value} but the actor"):
            check_compatible(actor, ModelSpec.from_hf({**base, key: value}))


def test_resuming_ppo_needs_a_checkpoint_with_its_critic(tmp_path):
    from portable_rl.commands.preflight import check_resume_critic
    from portable_rl.errors import UserError
    from portable_rl.run_dir import RunDir

    step = tmp_path / "checkpoints" / "step_2"
    (step / "trainer").mkdir(parents=True)
    (step / "trainer" / "meta.json").write_text("{}")
    (step / "COMPLETE").write_text("2")
    with pytest.raises(UserError, match="checkpoint step_2 holds no readable critic"):
        check_resume_critic(RunDir(tmp_path))
    (step / "trainer" / "critic").mkdir()
    (step / "trainer" / "critic" / "meta.json").write_text(json.dumps({"model": {"hidden_size": 64}}))
    spec = ModelSpec.from_hf(TINY)
    check_resume_critic(RunDir(tmp_path), spec)
    wider = ModelSpec.from_hf({**TINY, "hidden_size": 96})
    with pytest.raises(
        UserError, match="holds a critic with hidden_size=64 but the recipe's value model has hidden_size=96"
    ):
        check_resume_critic(RunDir(tmp_path), wider)
