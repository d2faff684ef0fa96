"""Recipes: the examples load, cross-section rules hold, bad input is one line, README's reference is current."""

from __future__ import annotations

from pathlib import Path

import pytest

from portable_rl.config_loader import ConfigError
from portable_rl.recipe import load_recipe, reference_markdown

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    recipe = load_recipe(path)
    assert Path(recipe.data.train.path).is_file()


def test_overrides_and_pass_through_reach_the_tree():
    r = load_recipe(
        ROOT / "examples/tiny_cpu.yaml",
        [
            "run.steps=7",
            "train.optim.lr=2e-6",
            "--sglang-mem-fraction-static",
            "0.5",
            "--megatron-recompute-granularity=full",
        ],
    )
    assert r.run.steps == 7 and r.train.optim.lr == 2e-6
    assert r.rollout.engine_args == {"mem_fraction_static": 0.5}
    assert r.train.megatron_args == {"recompute_granularity": "full"}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["run.stpes=3"], "did you mean 'steps'"),
        (["run.mode=hybrid"], "run.mode='hybrid'"),
        (["run.async_rollout=true"], "needs run.mode=disaggregated"),
        (["run.steps=0"], "run.steps=0 must be >= 1"),
        (["train.data_parallel=3"], "does not split over train.data_parallel=3"),
        (["model.path=/nonexistent"], "is not a HF checkpoint directory"),
        (
            ["train.critic.path=/nonexistent", "algo.advantage_estimator=gae"],
            "train.critic.path='/nonexistent'",
        ),
        (["train.critic.path=."], "train.critic.path"),
        (["algo.num_mini_batches=3"], "does not split into algo.num_mini_batches=3"),
        (["algo.ppo_epochs=0"], "algo.ppo_epochs=0 must be an integer >= 1"),
        (["algo.policy_loss=grpo"], "algo.policy_loss='grpo' is not allowed"),
        (["rollout.top_p=1.5"], "rollout.top_p=1.5"),
        (
            ["train.max_tokens_per_micro_batch=0"],
            "train.max_tokens_per_micro_batch=0 must be an integer >= 1",
        ),
        (["train.max_tokens_per_micro_batch=-5"], "train.max_tokens_per_micro_batch=-5"),
        (["train.max_tokens_per_micro_batch=2.5"], "train.max_tokens_per_micro_batch"),
        (["train.attention=flash"], "train.attention='flash' is not one of"),
        (["train.attention=local", "train.max_tokens_per_micro_batch=64"], "use train.attention=auto"),
        (["train.dtype=float16"], "train.dtype='float16'"),
        (["train.share_prompt_prefix=true", "train.attention=local"], "needs train.attention=sdpa"),
        (["train.share_prompt_prefix=true", "train.parallel.pipeline_parallel=2"], "pipeline parallelism"),
        (["train.share_prompt_prefix=true", "algo.advantage_estimator=gae"], "does not support a critic"),
        (["train.share_prompt_prefix=sometimes"], "train.share_prompt_prefix"),
    ],
)
def test_bad_recipes(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(ROOT / "examples/tiny_cpu.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_readme_reference_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- recipe-reference:start -->\n") + len("<!-- recipe-reference:start -->\n")
    end = readme.index("<!-- recipe-reference:end -->")
    assert readme[start:end] == reference_markdown(), (
        "README's recipe reference is stale; regenerate it from portable_rl.recipe.reference_markdown()"
    )
