"""Bad input through the real CLI: one line on stderr, exit code 2, no traceback, nothing written.

Every case runs ``portable_rl.cli.main`` in-process (a few also as ``python -m portable_rl`` subprocesses).
``train`` cases run twice: against an existing run directory with ``--resume`` (so the run-directory check
passes and only the bad value can stop the command; the directory must stay byte-identical) and against a
fresh path (which must not be created). ``RunDir.prepare`` is replaced by a tripwire: a case that gets past
validation fails the test instead of starting a training job. A control case shows that the unmodified recipe
does reach ``prepare`` from both targets, so each failure below is caused by its one bad value.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from portable_rl.cli import main

ROOT = Path(__file__).resolve().parents[2]
HUGE_LINE = 20 * 1024 * 1024  # bytes of the prompt text of the one-line prompt file
PROMPTS = [{"prompt": "What is 2 + 3?", "label": "5"}, {"prompt": "What is 4 + 4?", "label": "8"}]


class ReachedPrepare(Exception):
    """Validation passed: the command was about to write the run directory."""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Prompt files, a base recipe, an existing run with a checkpoint, and a model without a chat template."""
    from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    (data / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    (data / "invalid.jsonl").write_text(json.dumps(PROMPTS[0]) + '\n{"prompt": "oops",\n', encoding="utf-8")
    (data / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9 au lait"}\n')
    recipe = {
        "model": {"path": "tiny"},
        "data": {"train": {"path": "data/train.jsonl"}},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
        "run": {"steps": 2, "mode": "colocated", "output_dir": "runs/unused"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")

    run = root / "runs" / "existing"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.25}\n', encoding="utf-8")
    (run / "sentinel.txt").write_bytes(b"keep me\x00\xff")
    (run / "checkpoints" / "step_1" / "COMPLETE").write_text("1", encoding="utf-8")
    (run / "checkpoints" / "step_1" / "data_state.json").write_text('{"step": 1}', encoding="utf-8")
    write_trainer_meta(run / "checkpoints" / "step_1", tiny_model_facts())
    (root / "runs" / "no_checkpoint").mkdir()
    (root / "runs" / "no_checkpoint" / "config.yaml").write_text("run: {}\n", encoding="utf-8")
    (root / "runs" / "a_file").write_text("not a directory", encoding="utf-8")

    model = build_tiny_checkpoint(root / "no-template", TinySpec(arch="llama"))
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "chat_template.json").unlink(missing_ok=True)

    # Late failures of old, now caught by preflight: a model cut in half, one without a tokenizer, a prompt
    # file whose one line is 20 MB (the tiny model's context is 512 tokens), and one with a short line first.
    good = build_tiny_checkpoint(root / "good-model", TinySpec(arch="llama"))
    for name in ("truncated-model", "no-tokenizer"):
        shutil.copytree(good, root / name)
    weights = root / "truncated-model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "no-tokenizer" / "tokenizer.json").unlink()
    huge = b'{"prompt": "' + b"1 + 1 = ? " * (HUGE_LINE // 10) + b'"}'
    (data / "huge.jsonl").write_bytes(huge + b"\n")
    long_prompt = {"prompt": "1 + 1 = ? " * 400, "label": "x"}  # ~4 kB: under the byte cap, over 504 tokens
    (data / "long_tokens.jsonl").write_text(
        json.dumps(PROMPTS[0]) + "\n" + json.dumps(long_prompt) + "\n", encoding="utf-8"
    )
    (data / "mixed_huge.jsonl").write_bytes(json.dumps(PROMPTS[0]).encode() + b"\n" + huge + b"\n")

    reward_mod = root / "pkg_user_reward"
    reward_mod.mkdir()
    (reward_mod / "__init__.py").write_text("", encoding="utf-8")
    (reward_mod / "broken.py").write_text("import no_such_dependency_xyz\n", encoding="utf-8")
    return root


def tiny_model_facts(**changes) -> dict:
    """The ModelSpec facts of the default tiny model (what its checkpoints record), with ``changes``."""
    from dataclasses import asdict, replace

    from portable_rl.models.tiny import TinySpec, hf_config, train_tokenizer
    from portable_rl.training.model_builder import ModelSpec

    tok = train_tokenizer(TinySpec().vocab_size)
    ids = tok.convert_tokens_to_ids
    cfg = hf_config(TinySpec(), len(tok), ids("<|im_end|>"), ids("<|endoftext|>")).to_dict()
    return asdict(replace(ModelSpec.from_hf(cfg), **changes))


def write_trainer_meta(checkpoint: Path, model: dict) -> None:
    """The trainer's meta.json of a checkpoint (what ``portable_rl.training.checkpoint`` writes last)."""
    (checkpoint / "trainer").mkdir(parents=True, exist_ok=True)
    layout = {
        "tensor_parallel": 1,
        "pipeline_parallel": 1,
        "data_parallel": 1,
        "distributed_optimizer": False,
    }
    meta = {"format": 1, "step": 1, "layout": layout, "hf_checkpoint": "gone", "model": model}
    (checkpoint / "trainer" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file and directory under ``path`` with the bytes of each file (None for directories)."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))
    }


@pytest.fixture(autouse=True)
def _tripwire(monkeypatch):
    from portable_rl.run_dir import RunDir

    def refuse(self, resolved_config, resume=False):
        raise ReachedPrepare(str(self.path))

    monkeypatch.setattr(RunDir, "prepare", refuse)
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``portable-rl argv`` run in-process (argparse's SystemExit included)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # pragma: no cover - main returns codes; kept so a regression reads clearly
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, needles: tuple[str, ...]) -> None:
    assert code == 2, f"exit code {code}; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {err!r}"
    assert lines[0].startswith("portable-rl"), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert out == "", f"stdout should be empty: {out!r}"


# ---- train: each case is (recipe text or None for the base recipe, extra argv, needles) -------------------

BASE = None
TRAIN_CASES = {
    "malformed_yaml": ("model:\n\tpath: tiny\n", [], ("line 2", "fix the YAML syntax")),
    "non_utf8_recipe": (b"model:\n  path: tiny\xff\n", [], ("not UTF-8", "save it as UTF-8")),
    "recipe_not_a_mapping": ("- model\n- data\n", [], ("must be a mapping of sections",)),
    "recipe_without_data": ("model:\n  path: tiny\n", [], ("no data section", "data.train.path")),
    "unknown_key_did_you_mean": (BASE, ["rollout.temprature=0.5"], ("rollout.temprature", "'temperature'")),
    "unknown_section": (BASE, ["trian.seed=3"], ("'trian'", "did you mean 'train'")),
    "wrong_type_int": (BASE, ["rollout.max_new_tokens=lots"], ("rollout.max_new_tokens='lots'", "integer")),
    "wrong_type_bool": (BASE, ["run.async_rollout=maybe"], ("run.async_rollout='maybe'", "true or false")),
    "wrong_type_section": (BASE, ["rollout=5"], ("rollout must be a mapping",)),
    "out_of_range_top_p": (BASE, ["rollout.top_p=1.5"], ("error: rollout.top_p=1.5", "(0, 1]")),
    "negative_steps": (BASE, ["run.steps=-3"], ("error: run.steps=-3", ">= 1")),
    "zero_token_budget": (
        BASE,
        ["train.max_tokens_per_micro_batch=0"],
        ("train.max_tokens_per_micro_batch=0", "integer >= 1"),
    ),
    "fractional_token_budget": (
        BASE,
        ["train.max_tokens_per_micro_batch=1.5"],
        ("max_tokens_per_micro_batch",),
    ),
    "attention_the_platform_cannot_run": (
        BASE,
        ["train.attention=transformer_engine"],
        ("train.attention='transformer_engine' cannot run here", "use train.attention=auto"),
    ),
    "packing_without_packed_attention": (
        BASE,
        ["train.attention=local", "train.max_tokens_per_micro_batch=64"],
        ("train.attention=local", "use train.attention=auto"),
    ),
    "literal_choice": (BASE, ["algo.loss_agg=token-sum"], ("algo.loss_agg='token-sum'", "choose one of")),
    "unknown_mode": (BASE, ["run.mode=hybrid"], ("run.mode='hybrid'", "colocated")),
    "colocated_async": (BASE, ["run.async_rollout=true"], ("run.async_rollout=true", "disaggregated")),
    "dp_does_not_split_batch": (BASE, ["train.data_parallel=3"], ("train.data_parallel=3", "multiple")),
    "tp_pp_exceed_cpus": (
        BASE,
        ["train.parallel.tensor_parallel=2", "train.parallel.pipeline_parallel=2", "run.num_cpus=1"],
        ("TP 2 x PP 2 x DP 1", "run.num_cpus=1"),
    ),
    "ranks_exceed_host_cores": (
        BASE,
        ["train.parallel.tensor_parallel=1024"],
        ("TP 1024 x PP 1 x DP 1", "this host gives"),
    ),
    "colocated_more_engines_than_ranks": (
        BASE,
        ["rollout.num_engines=2"],
        ("rollout.num_engines x rollout.engine_tp_size = 2 > TP 1 x PP 1 x DP 1", "run.mode=disaggregated"),
    ),
    "missing_model_path": (BASE, ["model.path=/no/such/model"], ("'/no/such/model'", "config.json")),
    "model_without_chat_template": (
        BASE,
        ["model.path=no-template"],
        ("no chat template", "apply_chat_template: false"),
    ),
    "missing_prompt_file": (BASE, ["data.train.path=data/nope.jsonl"], ("nope.jsonl", "does not exist")),
    "empty_prompt_file": (BASE, ["data.train.path=data/empty.jsonl"], ("empty.jsonl", "is empty")),
    "invalid_jsonl": (
        BASE,
        ["data.train.path=data/invalid.jsonl"],
        ("invalid.jsonl line 2", "not valid JSON"),
    ),
    "non_utf8_prompt_file": (BASE, ["data.train.path=data/latin1.jsonl"], ("latin1.jsonl line 1", "UTF-8")),
    "reward_module_missing": (
        BASE,
        ["rollout.reward=no_such_reward_mod:score"],
        ("'no_such_reward_mod:score'", "cannot import"),
    ),
    "reward_module_broken": (
        BASE,
        ["rollout.reward=pkg_user_reward.broken:score"],
        ("no_such_dependency_xyz", "cannot import"),
    ),
    "reward_attribute_missing": (
        BASE,
        ["rollout.reward=json:no_such_function"],
        ("json:no_such_function", "no callable 'no_such_function'"),
    ),
    "reward_not_a_path": (
        BASE,
        ["rollout.reward=banana"],
        ("rollout.reward='banana'", "package.module:function"),
    ),
    "reward_bad_options": (
        BASE,
        ["rollout.reward_options={bogus: 1}"],
        ("rollout.reward_options", "bogus"),
    ),
    "filter_module_missing": (
        BASE,
        ["rollout.filter=no_such_filter_mod:keep"],
        ("group filter", "cannot import"),
    ),
    "generate_hook_module_missing": (
        BASE,
        ["rollout.generate=no_such_hook_mod:agent"],
        ("generate hook 'no_such_hook_mod:agent'", "cannot import"),
    ),
    "generate_hook_not_async": (
        BASE,
        ["rollout.generate=json:dumps"],
        ("generate hook 'json:dumps' is not an async function", "async def hook("),
    ),
    "generate_hook_wrong_signature": (
        BASE,
        ["rollout.generate=asyncio:sleep"],
        (
            "generate hook 'asyncio:sleep' does not take (sample, sampling_params, engine)",
            "fix its signature",
        ),
    ),
    "generate_hook_unknown_option": (
        BASE,
        [
            "rollout.generate=portable_rl.rollout.examples.tool_calling:calculator_agent",
            "rollout.generate_options={bogus: 1}",
        ],
        ("bogus=", "rollout.generate_options"),
    ),
    "max_turns_zero": (BASE, ["rollout.max_turns=0"], ("rollout.max_turns=0", "integer >= 1")),
    "over_sampling_below_one": (
        BASE,
        ["rollout.over_sampling_factor=0.5"],
        ("rollout.over_sampling_factor=0.5", ">= 1"),
    ),
    # Late failures that preflight now stops before anything starts (exit 2, nothing written):
    "truncated_safetensors": (
        BASE,
        ["model.path=truncated-model"],
        ("model.safetensors is truncated", "its header declares", "copy the model directory again"),
    ),
    "model_without_tokenizer": (
        BASE,
        ["model.path=no-tokenizer"],
        ("no tokenizer", "tokenizer.save_pretrained"),
    ),
    "tp_does_not_divide_heads": (
        BASE,
        ["train.parallel.tensor_parallel=3", "run.num_cpus=4"],
        ("train.parallel.tensor_parallel=3 does not divide num_attention_heads=4", "choose a divisor"),
    ),
    "pp_does_not_divide_layers": (
        BASE,
        ["train.parallel.pipeline_parallel=3", "run.num_cpus=4"],
        ("pipeline_parallel=3 does not divide num_hidden_layers=2",),
    ),
    "engine_tp_does_not_divide_heads": (
        BASE,
        ["rollout.engine_tp_size=3", "run.mode=disaggregated", "run.num_cpus=8"],
        ("rollout.engine_tp_size=3 does not divide num_attention_heads=4",),
    ),
    "lr_nan": (BASE, ["train.optim.lr=nan"], ("train.optim.lr=nan", "finite")),
    "timeout_inf": (BASE, ["rollout.request_timeout_s=.inf"], ("rollout.request_timeout_s=inf", "finite")),
    "nan_in_the_yaml": (
        "model: {path: tiny}\ndata: {train: {path: data/train.jsonl}}\ntrain: {optim: {clip_grad: .nan}}\n",
        [],
        ("train.optim.clip_grad=nan", "finite"),
    ),
    "collective_timeout_nan": (
        BASE,
        ["train.parallel.collective_timeout_s=nan"],
        ("train.parallel.collective_timeout_s=nan",),
    ),
    "max_new_tokens_fill_the_context": (
        BASE,
        ["rollout.max_new_tokens=512"],
        ("rollout.max_new_tokens=512", "context of 512"),
    ),
    "max_prompt_tokens_beyond_context": (
        BASE,
        ["data.max_prompt_tokens=600"],
        ("data.max_prompt_tokens=600", "at most 504"),
    ),
    "long_prompts_unknown_choice": (BASE, ["data.long_prompts=truncate"], ("data.long_prompts='truncate'",)),
    "prompt_line_of_20_mb": (
        BASE,
        ["data.train.path=data/huge.jsonl"],
        ("huge.jsonl line 1 is", "every line", "shorten the prompts"),
    ),
    "long_line_refused": (
        BASE,
        ["data.train.path=data/mixed_huge.jsonl", "data.long_prompts=refuse"],
        ("mixed_huge.jsonl line 2", "data.long_prompts=skip"),
    ),
    "long_prompt_refused_in_tokens": (
        BASE,
        ["data.train.path=data/long_tokens.jsonl", "data.long_prompts=refuse"],
        ("long_tokens.jsonl line 2: the prompt has", "more than data.max_prompt_tokens=504"),
    ),
    "master_port_the_strategy_ignores": (
        BASE,
        ["weight_sync.master_port=29555"],
        ("weight_sync.master_port=29555", "strategy=broadcast"),
    ),
    "override_without_equals": (BASE, ["run.steps"], ("'run.steps'", "section.key=value")),
    "override_into_a_value": (BASE, ["run.steps.max=3"], ("'steps' is not a section",)),
    "megatron_arg_wrong_section": (BASE, ["train.megatron_args=3"], ("train.megatron_args", "mapping")),
}


def _write_recipe(work: Path, name: str, text: str | bytes | None) -> Path:
    if text is None:
        return work / "recipe.yaml"
    path = work / f"case_{name}.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_train_bad_input(work, capsys, monkeypatch, name):
    text, extra, needles = TRAIN_CASES[name]
    monkeypatch.syspath_prepend(str(work))  # where pkg_user_reward lives
    recipe = _write_recipe(work, name, text)
    existing = work / "runs" / "existing"
    before = tree(existing)

    code, out, err = run_cli(
        capsys, ["train", str(recipe), *extra, "--output-dir", str(existing), "--resume"]
    )
    assert_one_line_error(code, out, err, needles)
    assert tree(existing) == before, "the existing run directory changed"

    fresh = work / "runs" / f"fresh_{name}"
    code, out, err = run_cli(capsys, ["train", str(recipe), *extra, "--output-dir", str(fresh)])
    assert_one_line_error(code, out, err, needles)
    assert not fresh.exists(), "a run directory was created for a bad recipe"


def test_control_the_base_recipe_passes_validation(work, capsys):
    """Without a bad value the same command reaches RunDir.prepare from both targets (so the cases are real)."""
    existing = work / "runs" / "existing"
    with pytest.raises(ReachedPrepare):
        main(["train", str(work / "recipe.yaml"), "--output-dir", str(existing), "--resume"])
    with pytest.raises(ReachedPrepare):
        main(["train", str(work / "recipe.yaml"), "--output-dir", str(work / "runs" / "fresh_control")])
    # The model directory without a chat template is fine once the prompts are not templated.
    with pytest.raises(ReachedPrepare):
        main(
            [
                "train",
                str(work / "recipe.yaml"),
                "model.path=no-template",
                "data.train.apply_chat_template=false",
                "--output-dir",
                str(work / "runs" / "fresh_control2"),
            ]
        )
    capsys.readouterr()


def test_control_long_lines_are_skipped_by_default(work, capsys):
    """A file with one short prompt and one 20 MB line passes preflight: the long line is skipped (counted)."""
    argv = ["train", str(work / "recipe.yaml"), "data.train.path=data/mixed_huge.jsonl"]
    with pytest.raises(ReachedPrepare):
        main([*argv, "--output-dir", str(work / "runs" / "fresh_mixed")])
    argv = ["train", str(work / "recipe.yaml"), "data.train.path=data/long_tokens.jsonl"]
    with pytest.raises(ReachedPrepare):  # a prompt over the token limit: skipped while the run goes
        main([*argv, "--output-dir", str(work / "runs" / "fresh_long_tokens")])
    capsys.readouterr()


def test_master_port_in_use(work, capsys):
    """A port the recipe asks for and another process holds: one line now, not EADDRINUSE after the timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", 0))
        held.listen(1)
        port = held.getsockname()[1]
        extra = ["weight_sync.strategy=broadcast", f"weight_sync.master_port={port}"]
        existing = work / "runs" / "existing"
        before = tree(existing)
        argv = ["train", str(work / "recipe.yaml"), *extra, "--output-dir", str(existing), "--resume"]
        needles = (f"weight_sync.master_port={port} is already in use", "choose a free port")
        assert_one_line_error(*run_cli(capsys, argv), needles)
        assert tree(existing) == before
        fresh = work / "runs" / "fresh_port"
        argv = ["train", str(work / "recipe.yaml"), *extra, "--output-dir", str(fresh)]
        assert_one_line_error(*run_cli(capsys, argv), needles)
        assert not fresh.exists()
    # Control: the same port once free passes.
    with pytest.raises(ReachedPrepare):
        main(["train", str(work / "recipe.yaml"), *extra, "--output-dir", str(fresh)])
    capsys.readouterr()


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"hidden_size": 128}, ("checkpoint step_1 holds a model with hidden_size=128", "hidden_size=64")),
        ({"model_type": "qwen2", "qkv_bias": True}, ("model_type='qwen2'", "model_type='llama'")),
        ({"vocab_size": 1024}, ("vocab_size=1024",)),
    ],
)
def test_resume_onto_another_models_checkpoint(work, capsys, changes, needles):
    """--resume onto a checkpoint of another model: one line before anything starts; the run is untouched."""
    name = "other_" + "_".join(changes)
    run = work / "runs" / name
    shutil.copytree(work / "runs" / "existing", run)
    write_trainer_meta(run / "checkpoints" / "step_1", tiny_model_facts(**changes))
    before = tree(run)
    argv = ["train", str(work / "recipe.yaml"), "--output-dir", str(run), "--resume"]
    assert_one_line_error(*run_cli(capsys, argv), (*needles, "--resume", "start a new run"))
    assert tree(run) == before


def test_resume_with_another_trainer_layout(work, capsys):
    """A checkpoint of the earlier per-rank format fits only the layout it was saved with: refused before
    anything starts (the layout-free format reshards: test_checkpoint_preflight)."""
    existing = work / "runs" / "existing"
    before = tree(existing)
    argv = [
        "train",
        str(work / "recipe.yaml"),
        "train.data_parallel=2",
        "--output-dir",
        str(existing),
        "--resume",
    ]
    needles = (
        "saved with TP 1 x PP 1 x DP 1",
        "per-rank format",
        "asks for TP 1 x PP 1 x DP 2",
        "train.data_parallel",
    )
    assert_one_line_error(*run_cli(capsys, argv), needles)
    assert tree(existing) == before


def test_resume_from_a_corrupt_trainer_shard(work, capsys):
    """A checkpoint shard cut short (a copy that failed, a full disk): one line, not a torch.load traceback."""
    import torch

    run = work / "runs" / "corrupt_shard"
    shutil.copytree(work / "runs" / "existing", run)
    shard = run / "checkpoints" / "step_1" / "trainer" / "mp_rank_00_000_dp_000.pt"
    torch.save({"step": 1, "model": {"w": torch.zeros(64)}}, shard)
    argv = ["train", str(work / "recipe.yaml"), "--output-dir", str(run), "--resume"]
    with pytest.raises(ReachedPrepare):  # control: the complete shard passes
        main(argv)
    capsys.readouterr()
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = tree(run)
    needles = (
        "checkpoint step_1 is incomplete or corrupt",
        "mp_rank_00_000_dp_000.pt is not a complete torch file",
    )
    assert_one_line_error(*run_cli(capsys, argv), needles)
    assert tree(run) == before


def test_dry_run_prints_the_plan_and_writes_nothing(work, capsys):
    fresh = work / "runs" / "fresh_dry"
    argv = ["train", str(work / "recipe.yaml"), "train.parallel.tensor_parallel=2", "--dry-run"]
    code, out, err = run_cli(capsys, [*argv, "--output-dir", str(fresh)])
    assert code == 0, err
    plan = yaml.safe_load(out)
    assert not fresh.exists()
    assert plan["run_dir"] == {"path": str(fresh), "action": "create"}
    assert plan["layout"]["tensor_parallel"] == 2 and plan["layout"]["trainer_ranks"] == 2
    assert plan["engines"]["kind"] == "cpu" and plan["engines"]["count"] == 1
    assert plan["weight_sync"] == {"strategy": "shared_tensor", "backend": "gloo", "bucket_mb": 512.0}
    assert plan["kernels"]["attention"] == "sdpa"
    assert plan["model"]["context"] == 512 and plan["model"]["max_prompt_tokens"] == 512 - 8
    assert plan["data"]["train"] == {"prompts": 2, "lines_too_long": 0}
    assert set(plan) >= {"platform", "ports", "steps"}
    # GRPO without KL, one optimizer step: the training forward is the only one.
    assert plan["algo"] == {
        "advantage_estimator": "grpo",
        "policy_loss": "ppo",
        "optimizer_steps_per_rollout": 1,
        "reference_model": False,
        "old_logprob_forward": False,
        "critic": None,
    }

    existing = work / "runs" / "existing"  # saved with TP 1: resumed with TP 1
    before = tree(existing)
    argv_tp1 = ["train", str(work / "recipe.yaml"), "--dry-run"]
    code, out, err = run_cli(capsys, [*argv_tp1, "--output-dir", str(existing), "--resume"])
    assert code == 0, err
    assert yaml.safe_load(out)["run_dir"]["action"] == "resume from checkpoint step 1"
    assert tree(existing) == before
    # A bad value stops a dry run the same way it stops a run.
    bad = [*argv, "train.parallel.tensor_parallel=3", "run.num_cpus=4", "--output-dir", str(fresh)]
    assert_one_line_error(*run_cli(capsys, bad), ("tensor_parallel=3 does not divide",))


# ---- train: the run directory itself ------------------------------------------------------------------------

RUN_DIR_CASES = {
    "existing_run_without_resume": ("existing", [], ("already holds a run", "--resume")),
    "resume_without_a_run": ("never_created", ["--resume"], ("holds no run", "drop --resume")),
    "resume_without_a_checkpoint": ("no_checkpoint", ["--resume"], ("no complete checkpoint",)),
    "output_dir_is_a_file": ("a_file", [], ("a_file", "not a directory")),
}


@pytest.mark.parametrize("name", list(RUN_DIR_CASES))
def test_train_run_directory_misuse(work, capsys, name):
    target, extra, needles = RUN_DIR_CASES[name]
    path = work / "runs" / target
    before = tree(path) if path.is_dir() else (path.read_bytes() if path.exists() else None)
    code, out, err = run_cli(capsys, ["train", str(work / "recipe.yaml"), "--output-dir", str(path), *extra])
    assert_one_line_error(code, out, err, needles)
    after = tree(path) if path.is_dir() else (path.read_bytes() if path.exists() else None)
    assert after == before


def test_unavailable_platform(work, capsys, monkeypatch):
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "rocm")
    existing = work / "runs" / "existing"
    before = tree(existing)
    argv = ["train", str(work / "recipe.yaml"), "--output-dir", str(existing), "--resume"]
    assert_one_line_error(*run_cli(capsys, argv), ("'rocm' is not available",))
    assert tree(existing) == before
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "tpu")
    assert_one_line_error(*run_cli(capsys, argv), ("unknown platform 'tpu'", "PORTABLE_RL_PLATFORM"))
    assert tree(existing) == before


# ---- trainer ranks vs the devices of a (simulated) GPU host ----------------------------------------------------

MASKS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


@pytest.mark.parametrize(
    ("vendor", "visible", "extra", "needles"),
    [
        (
            "cuda",
            None,
            ["train.parallel.tensor_parallel=2", "run.mode=disaggregated"],
            (
                "TP 2 x PP 1 x DP 1 = 2 trainer rank(s) + 1 engine device(s) need 3 cuda device(s) but 2 are visible",
            ),
        ),
        (
            "rocm",
            {"HIP_VISIBLE_DEVICES": "1"},
            ["train.parallel.pipeline_parallel=2"],
            ("TP 1 x PP 2 x DP 1 = 2 trainer rank(s) need 2 rocm device(s) but 1 are visible",),
        ),
    ],
)
def test_trainer_ranks_exceed_visible_gpus(work, capsys, monkeypatch, vendor, visible, extra, needles):
    from fake_hosts import simulate_cuda, simulate_rocm

    for key in MASKS:
        monkeypatch.delenv(key, raising=False)
    for key, value in (visible or {}).items():
        monkeypatch.setenv(key, value)
    if vendor == "cuda":
        simulate_cuda(monkeypatch, [(9, 0)] * 2)
    else:
        simulate_rocm(monkeypatch, ["gfx942"] * 2)
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", vendor)
    existing = work / "runs" / "existing"
    before = tree(existing)
    argv = ["train", str(work / "recipe.yaml"), *extra, "--output-dir", str(existing), "--resume"]
    assert_one_line_error(*run_cli(capsys, argv), needles)
    assert tree(existing) == before
    # Control: the same recipe fits once enough devices are visible.
    for key in MASKS:
        monkeypatch.delenv(key, raising=False)
    if vendor == "cuda":
        simulate_cuda(monkeypatch, [(9, 0)] * 4)
    from portable_rl.platform import reset_current_platform

    reset_current_platform()
    with pytest.raises(ReachedPrepare):  # a fresh run: the existing run's checkpoint has another layout
        main(
            [
                "train",
                str(work / "recipe.yaml"),
                *extra,
                "--output-dir",
                str(work / "runs" / f"fresh_{vendor}"),
            ]
        )


# ---- argparse and the other commands -------------------------------------------------------------------------

CLI_CASES = {
    "unknown_command": (["frobnicate"], ("invalid choice: 'frobnicate'", "--help")),
    "train_unknown_flag": (["train", "{recipe}", "--bogus"], ("unrecognized arguments: --bogus",)),
    "train_missing_recipe_arg": (["train"], ("arguments are required: recipe;",)),
    "train_missing_recipe_file": (
        ["train", "/no/such/recipe.yaml"],
        ("'/no/such/recipe.yaml' does not exist",),
    ),
    "top_level_unknown_flag": (["--bogus", "doctor"], ("unrecognized arguments: --bogus",)),
    "image_other_vendor_variant": (
        ["image", "--platform", "cuda", "--variant", "gfx942"],
        ("no cuda image for variant 'gfx942'", "rocm variant"),
    ),
    "image_unknown_vendor": (["image", "--platform", "tpu"], ("invalid choice: 'tpu'", "cuda")),
    "image_bad_arch": (["image", "--platform", "rocm", "--variant", "sm_90"], ("'sm_90'", "rocm has:")),
    "image_bad_version": (["image", "--platform", "cpu", "--version", "0.2 beta"], ("'0.2 beta'",)),
    "launch_worker_without_address": (["launch", "worker", "--dry-run"], ("needs --address",)),
    "launch_bad_port": (["launch", "head", "--dry-run", "--port", "70000"], ("--port 70000",)),
    "launch_port_not_a_number": (["launch", "head", "--port", "lots"], ("invalid int value: 'lots'",)),
    "launch_bad_template_platform": (
        ["launch", "template", "kuberay", "--platform", "tpu"],
        ("'tpu' is not one of",),
    ),
    "launch_unknown_action": (["launch", "teleport"], ("invalid choice: 'teleport'",)),
    "launch_submit_missing_recipe": (
        ["launch", "submit", "nope.yaml", "--dry-run"],
        ("'nope.yaml' does not exist",),
    ),
    "conformance_unknown_flag": (["conformance", "--bogus"], ("unrecognized arguments: --bogus",)),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input(work, capsys, monkeypatch, name):
    argv, needles = CLI_CASES[name]
    monkeypatch.chdir(work)
    argv = [a.replace("{recipe}", str(work / "recipe.yaml")) for a in argv]
    assert_one_line_error(*run_cli(capsys, argv), needles)


# ---- the real entry point in a subprocess --------------------------------------------------------------------

SUBPROCESS_CASES = {
    "malformed_yaml": ("bad.yaml", "model: [x\n", [], {}, "fix the YAML syntax"),
    "unknown_flag": ("recipe.yaml", None, ["--bogus"], {}, "unrecognized arguments: --bogus"),
    "unavailable_platform": (
        "recipe.yaml",
        None,
        [],
        {"PORTABLE_RL_PLATFORM": "rocm"},
        "'rocm' is not available",
    ),
}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_python_m_portable_rl(work, name):
    file, text, extra, env_extra, needle = SUBPROCESS_CASES[name]
    if text is not None:
        (work / file).write_text(text, encoding="utf-8")
    existing = work / "runs" / "existing"
    before = tree(existing)
    env = {**os.environ, "PORTABLE_RL_PLATFORM": "cpu", **env_extra}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "portable_rl",
            "train",
            file,
            *extra,
            "--output-dir",
            str(existing),
            "--resume",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, (needle,))
    assert tree(existing) == before
