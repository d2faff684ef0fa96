"""Every accepted pass-through flag does something: it reaches the engine or the trainer, or it is refused (or,
for an SGLang-only option on the CPU engine, named in one warning) before anything starts.

The CLI's pass-through flags are enumerated from the engine's own parser (``--sglang-<name>`` for every option
of the CPU engine server) and from ``preflight.JOB_OWNED_ENGINE_ARGS`` / ``LAYOUT_OWNED_FIELDS``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from portable_rl.cli import main
from portable_rl.commands.preflight import JOB_OWNED_ENGINE_ARGS
from portable_rl.platform import load as load_platform
from portable_rl.rollout.engines.cpu_server import build_parser
from portable_rl.rollout.engines.launcher import EngineSpec, engine_command
from portable_rl.training.model_builder import LAYOUT_OWNED_FIELDS

# CPU engine options and a valid value of each (types from its parser); the job sets the JOB_OWNED ones itself.
CPU_OPTIONS = {
    a.dest: (a.choices[-1] if a.choices else {int: 3, float: 2.5}.get(a.type, "x"))
    for a in build_parser()._actions
    if a.dest != "help" and a.dest not in JOB_OWNED_ENGINE_ARGS
}


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1 + 1?", "label": "2"}) + "\n", encoding="utf-8")
    body = {
        "model": {"path": "tiny"},
        "data": {"train": {"path": "p.jsonl"}},
        "rollout": {"prompts_per_step": 1, "samples_per_prompt": 2, "max_new_tokens": 8},
        "run": {"output_dir": str(tmp_path / "run")},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    return tmp_path / "r.yaml"


def dry_run(capsys, recipe: Path, *flags: str) -> tuple[int, str, str]:
    code = main(["train", str(recipe), *flags, "--dry-run"])
    out, err = capsys.readouterr()
    assert not (recipe.parent / "run").exists()
    return code, out, err


def flag(name: str, prefix: str = "sglang") -> str:
    return f"--{prefix}-{name.replace('_', '-')}"


def test_every_cpu_engine_option_reaches_the_engine_command(recipe, capsys, tiny_llama):
    assert {"dtype", "max_running_requests", "context_length", "num_threads", "api_key"} <= set(CPU_OPTIONS)
    flags = [part for name, value in CPU_OPTIONS.items() for part in (flag(name), str(value))]
    code, out, err = dry_run(capsys, recipe, *flags)
    assert code == 0 and err == "", err  # accepted without a warning
    assert set(yaml.safe_load(out)["engines"]["pass_through"]) == set(CPU_OPTIONS)
    command = engine_command(
        EngineSpec(model_path=str(tiny_llama), kind="cpu", engine_args=dict(CPU_OPTIONS)),
        30001,
        load_platform("cpu"),
    )
    for name, value in CPU_OPTIONS.items():
        i = command.index(flag(name).replace("--sglang-", "--"))
        assert command[i + 1] == str(value), name


@pytest.mark.parametrize("name", sorted(JOB_OWNED_ENGINE_ARGS))
def test_engine_options_the_job_sets_are_refused(recipe, capsys, name):
    code, out, err = dry_run(capsys, recipe, flag(name), "7")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert f"{flag(name)} is set for every engine by {JOB_OWNED_ENGINE_ARGS[name]}" in err


def test_sglang_only_options_on_the_cpu_engine_are_warned_about_once(recipe, capsys):
    code, out, err = dry_run(capsys, recipe, "--sglang-mem-fraction-static", "0.5", "--sglang-enable-metrics")
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("portable-rl train: warning:"), err
    assert "--sglang-enable-metrics, --sglang-mem-fraction-static apply to SGLang only" in lines[0]


def test_engine_tp_size_on_the_cpu_engine_is_refused(recipe, capsys):
    code, _, err = dry_run(
        capsys, recipe, "rollout.engine_tp_size=2", "run.mode=disaggregated", "run.num_cpus=4"
    )
    assert code == 2 and "the CPU engine has no tensor parallelism" in err


def test_sglang_gets_the_tp_size_its_devices_were_reserved_for(tiny_llama):
    spec = EngineSpec(model_path=str(tiny_llama), kind="sglang", devices=[2, 3])
    command = engine_command(spec, 30001, load_platform("cpu"))
    assert command[command.index("--tp-size") + 1] == "2"
    single = engine_command(
        EngineSpec(model_path=str(tiny_llama), kind="sglang", devices=[0]), 1, load_platform("cpu")
    )
    assert "--tp-size" not in single


def test_megatron_fields_reach_the_trainer_config(recipe, capsys, tmp_path, tiny_llama):
    code, out, err = dry_run(capsys, recipe, "--megatron-recompute-granularity", "full")
    assert code == 0 and err == "", err
    from portable_rl.orchestration.job import Job
    from portable_rl.recipe import load_recipe
    from portable_rl.run_dir import RunDir

    r = load_recipe(recipe, ["--megatron-recompute-granularity", "full"])
    job = Job(r, RunDir(tmp_path / "unused"))
    job.model_dir = tiny_llama
    assert job._actor_config().megatron_overrides == {"recompute_granularity": "full"}


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (
            ["--megatron-recompute-granularty", "full"],
            ("not a Megatron TransformerConfig field", "did you mean"),
        ),
        *[
            ([flag(name, "megatron"), "2"], (f"{flag(name, 'megatron')} is set by {owner}",))
            for name, owner in sorted(LAYOUT_OWNED_FIELDS.items())
        ],
    ],
)
def test_megatron_flags_that_do_nothing_or_contradict_are_refused(recipe, capsys, flags, needles):
    code, out, err = dry_run(capsys, recipe, *flags)
    assert code == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_transformer_config_fields_read_from_source_match_the_class():
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    from portable_rl.training.model_builder import transformer_config_fields

    assert {f.name for f in dataclasses.fields(TransformerConfig)} <= transformer_config_fields()


def test_sglang_options_are_checked_against_the_installed_server(recipe, capsys, tmp_path, monkeypatch):
    """With SGLang installed, an option its ServerArgs lacks is refused (read from source, not imported)."""
    pkg = tmp_path / "fake_site" / "sglang"
    (pkg / "srt").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing sglang is not allowed in preflight')\n")
    (pkg / "srt" / "server_args.py").write_text(
        "import dataclasses\n@dataclasses.dataclass\nclass ServerArgs:\n"
        "    model_path: str\n    mem_fraction_static: float = 0.9\n    enable_metrics: bool = False\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "fake_site"))
    ok = dry_run(capsys, recipe, "rollout.engine=sglang", "--sglang-mem-fraction-static", "0.5")
    assert ok[0] == 0 and ok[2] == "", ok[2]
    assert yaml.safe_load(ok[1])["engines"]["pass_through"] == {"mem_fraction_static": 0.5}
    code, _, err = dry_run(capsys, recipe, "rollout.engine=sglang", "--sglang-mem-fraction-statik", "0.5")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--sglang-mem-fraction-statik is not an option of the installed SGLang server" in err
    assert "did you mean --sglang-mem-fraction-static?" in err
