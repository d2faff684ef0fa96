"""Preflight: everything ``portable-rl train`` can know before a run starts, checked in the driver, in seconds.

``preflight(recipe, resume, platform)`` runs before the run directory is created or touched; any failure is a
``UserError`` (one line naming the value and the fix, exit 2). ``portable-rl train --dry-run`` runs it and prints
``plan(...)``. The checks, in order:

1. run directory: fresh, a failed start to replace, or a run to resume (``portable_rl.run_dir``);
2. trainer ranks (TP x PP x DP) and engine devices vs this host's CPUs / visible devices;
3. the trainer's attention kernels on this platform (``Platform.trainer_kernels``, what the trainer asks);
4. the model: directory complete (config, tokenizer, safetensors headers and sizes vs the index), architecture
   supported, layout divisible (TP vs heads, kv heads, FFN; PP vs layers; the engine's TP vs heads), context
   vs ``rollout.max_new_tokens`` and ``data.max_prompt_tokens``;
   With ``algo.advantage_estimator=gae`` and ``train.critic.path``: the critic's model supported, divisible by
   the layout, with the actor's vocabulary and hidden size;
5. ``--resume``: the checkpoint complete (every file its index names is there and whole), its model
   (architecture, shapes, vocabulary) equal to the recipe's model, and its trainer layout one it reshards to
   (any TP, PP, DP with the same ``distributed_optimizer``; a checkpoint of the earlier per-rank format: only
   its own layout); with a critic, the checkpoint holds one;
6. ports that were asked for (``weight_sync.master_port``) are free now;
7. prompt files: streamed, every line valid, lines too large for any allowed prompt counted (all of them:
   refused), one prompt templated; with ``data.long_prompts=refuse`` every prompt measured in tokens (the
   train file, ``data.eval`` and every ``data.eval_sets`` file);
8. the reward function, group filter and generate hook import (every dotted path of the recipe); the hook
   is an ``async def`` taking (sample, sampling_params, engine, **rollout.generate_options);
8b. a remote reward (``rollout.reward=remote``): its options were checked with the recipe; its server is
   dialled once (a TCP connect, 3 s) and one that does not answer now is named in a warning (it may start
   later; the run fails at the first reward, naming the URL, if it never does);
8c. debug modes: ``rollout_only`` cannot ``--resume`` (it has no trainer checkpoint); ``train_only``'s
   ``run.rollout_source`` holds a readable saved rollout for every step to run, each splitting over
   ``train.data_parallel``;
9. pass-through flags: every ``--megatron-<name>`` is a TransformerConfig field and not one the model or the
   layout sets; every ``--sglang-<name>`` reaches the engine: one the job sets itself (port, host, model path,
   TP size) is refused, for SGLang one its installed ``ServerArgs`` lacks is refused, and on the CPU engine an
   SGLang-only option is named in one warning (it has no effect).

Numbers (finite, in range) and names are checked earlier, when the recipe's dataclasses are built.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from portable_rl.errors import UserError

# Cores that make one "device" on the CPU platform; the job's placement reads the same variable.
CPUS_PER_DEVICE_ENV = "PORTABLE_RL_CPUS_PER_DEVICE"
# Model facts a checkpoint must share with the model it is resumed onto (shapes and vocabulary).
SHAPE_FACTS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "tie_word_embeddings",
    "qkv_bias",
    "qk_norm",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


@dataclass
class Preflight:
    """What preflight found; ``plan`` prints it for ``--dry-run``."""

    run_dir_action: str
    kernels: Any  # the TrainerKernels that Platform.trainer_kernels chose (what the trainer will build)
    model: dict[str, Any] = field(default_factory=dict)  # ModelSpec facts (empty: not known before start)
    context: int | None = None
    max_prompt_tokens: int | None = None
    prompts: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # printed once, one line each, by the command


def preflight(recipe, resume: bool, platform) -> Preflight:
    from portable_rl.config_loader import ConfigError
    from portable_rl.data.prompts import PromptFileError
    from portable_rl.run_dir import RunDir, RunDirError

    try:
        run_dir = RunDir(Path(recipe.run.output_dir))
        run_dir.check(resume=resume)
        if resume:
            action = f"resume from checkpoint step {run_dir.last_checkpoint()[0]}"
        elif run_dir.failed_start():
            action = "replace the run that ended before its first checkpoint"
        else:
            action = "create"
        check_debug_mode(recipe, run_dir, resume)  # before the resume checks, which expect a trainer
        check_placement(recipe, platform)
        kernels = check_trainer_kernels(recipe, platform)
        found = Preflight(run_dir_action=action, kernels=kernels)
        check_model(recipe, run_dir, resume, found)
        check_ports(recipe)
        check_prompts(recipe, found)
        check_reward_and_filter(recipe)
        check_remote_reward(recipe, found)
        check_pass_through(recipe, platform, found)
    except (ConfigError, RunDirError, PromptFileError) as exc:
        raise UserError(str(exc)) from None
    return found


def check_placement(recipe, platform) -> None:
    """The trainer ranks (TP x PP x DP) and engine devices must fit what this host's Ray will have.

    Only for the private single-node Ray the job starts itself; a cluster joined through RAY_ADDRESS is
    checked by the placement group (its nodes' resources are not known here).
    """
    from portable_rl.orchestration.placement import PlacementConfig

    if os.environ.get("RAY_ADDRESS"):
        return
    t, r = recipe.train, recipe.rollout
    ranks = (
        f"TP {t.parallel.tensor_parallel} x PP {t.parallel.pipeline_parallel} x DP {t.data_parallel} "
        f"= {t.world_size} trainer rank(s)"
    )
    ep = t.parallel.expert_parallel
    if t.data_parallel % ep:
        # Megatron lays the expert-parallel ranks over the data-parallel ones: EP x TP x PP must fit the world
        raise UserError(
            f"train.parallel.expert_parallel={ep} needs TP x EP x PP = "
            f"{t.parallel.tensor_parallel * ep * t.parallel.pipeline_parallel} trainer ranks within {ranks}, "
            f"but does not divide train.data_parallel={t.data_parallel}; set train.data_parallel to a multiple "
            f"of {ep} or lower expert_parallel"
        )
    engine_devices = r.num_engines * r.engine_tp_size
    if recipe.run.mode == "colocated" and engine_devices > t.world_size:
        raise UserError(
            f"run.mode=colocated puts every engine device on a trainer rank, but rollout.num_engines x "
            f"rollout.engine_tp_size = {engine_devices} > {ranks}; lower rollout.num_engines or use "
            "run.mode=disaggregated"
        )
    raw_share = os.environ.get(CPUS_PER_DEVICE_ENV, "0.5")
    try:
        share = float(raw_share)
        cfg = PlacementConfig(
            mode=recipe.run.mode,
            trainer_ranks=t.world_size,
            num_engines=r.num_engines,
            devices_per_engine=r.engine_tp_size,
            cpus_per_device=share,
        )
    except ValueError as exc:
        raise UserError(f"{ranks}: {exc} ({CPUS_PER_DEVICE_ENV}={raw_share!r})") from None
    engines = "" if recipe.run.mode == "colocated" else f" + {engine_devices} engine device(s)"
    if platform.ray_resource:
        have = len(platform.resolve_visible_devices())
        if cfg.total_devices > have:
            raise UserError(
                f"{ranks}{engines} need {cfg.total_devices} {platform.name} device(s) but {have} are visible; "
                "lower train.parallel / train.data_parallel / rollout.num_engines or expose more devices"
            )
        return
    need = cfg.total_devices * share
    limit = recipe.run.num_cpus
    have = limit if limit is not None else (os.cpu_count() or 1)
    if need > have:
        source = f"run.num_cpus={limit}" if limit is not None else "this host"
        raise UserError(
            f"{ranks}{engines} need {need:g} CPUs ({share:g} per device, {CPUS_PER_DEVICE_ENV}) but {source} "
            f"gives {have}; lower train.parallel / train.data_parallel / rollout.num_engines or raise run.num_cpus"
        )


def check_trainer_kernels(recipe, platform):
    """train.attention must be one this platform runs (the trainer asks the same ``trainer_kernels``), and
    train.share_prompt_prefix needs it to come out as sdpa (``auto`` picks TransformerEngine where it imports)."""
    from portable_rl.config.training import share_prompt_prefix_refusal
    from portable_rl.platform import UnsupportedKernel

    try:
        kernels = platform.trainer_kernels(recipe.train.attention)
    except UnsupportedKernel as exc:
        raise UserError(str(exc)) from None
    if recipe.train.share_prompt_prefix:
        why = share_prompt_prefix_refusal(kernels.attention, 1, False)
        if why:
            raise UserError(
                f"{why} (train.attention={recipe.train.attention} gives {kernels.attention} here)"
            )
    return kernels


def _model_config(recipe, run_dir, resume: bool) -> dict[str, Any] | None:
    """The HF config of the model the job will load (None where it is only known once the job starts)."""
    from portable_rl.models.hf_dir import ModelDirError, check_hf_dir

    path = recipe.model.path
    try:
        if path == "tiny":
            built = run_dir.path / "model"
            if resume and (built / "config.json").is_file():
                return check_hf_dir(built)  # a resumed tiny run reloads the model it built
            from portable_rl.models.tiny import TinySpec, hf_config, train_tokenizer

            tok = train_tokenizer(TinySpec().vocab_size)
            spec = TinySpec(arch=recipe.model.tiny_arch, seed=recipe.model.tiny_seed)
            ids = tok.convert_tokens_to_ids
            return hf_config(spec, len(tok), ids("<|im_end|>"), ids("<|endoftext|>")).to_dict()
        if path == "smollm2":
            from portable_rl.models.smollm2 import gguf_path

            try:
                gguf_path()
            except FileNotFoundError as exc:
                raise UserError(f"model.path='smollm2': {exc}") from None
            return None  # its HF directory is materialised when the job starts
        return check_hf_dir(path)
    except ModelDirError as exc:
        raise UserError(str(exc)) from None


def check_model(recipe, run_dir, resume: bool, found: Preflight) -> None:
    """Model directory complete, architecture supported, layout divisible, context long enough, resume match."""
    from portable_rl.training.model_builder import (
        ModelSpec,
        UnsupportedModel,
        check_expert_layout,
        check_parallel_layout,
    )

    cfg = _model_config(recipe, run_dir, resume)
    if cfg is None:
        return
    where = f"model.path={recipe.model.path!r}"
    try:
        spec = ModelSpec.from_hf(cfg)
    except UnsupportedModel as exc:
        raise UserError(
            f"{where}: {exc}; use a Llama, Qwen2, Qwen3, Qwen2-MoE or Qwen3-MoE checkpoint"
        ) from None
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"{where}: config.json lacks or mistypes {exc}; copy the model directory again"
        ) from None
    p = recipe.train.parallel
    try:
        check_expert_layout(spec, p.tensor_parallel, p.expert_parallel)
    except ValueError as exc:
        raise UserError(f"train.parallel.{exc} ({where})") from None
    try:
        check_parallel_layout(spec, p.tensor_parallel, p.pipeline_parallel)
    except ValueError as exc:
        raise UserError(f"train.parallel.{exc} of {where}; choose a divisor of it") from None
    tp = recipe.rollout.engine_tp_size
    if spec.num_attention_heads % tp:
        raise UserError(
            f"rollout.engine_tp_size={tp} does not divide num_attention_heads={spec.num_attention_heads} of "
            f"{where}; choose a divisor"
        )
    found.model = asdict(spec)
    context = found.context = spec.max_position_embeddings
    new = recipe.rollout.max_new_tokens
    if new >= context:
        raise UserError(
            f"rollout.max_new_tokens={new} leaves no room for a prompt in the model's context of {context} "
            "tokens; lower rollout.max_new_tokens"
        )
    limit = recipe.data.max_prompt_tokens
    if limit is not None and limit + new > context:
        raise UserError(
            f"data.max_prompt_tokens={limit} + rollout.max_new_tokens={new} > the model's context of {context} "
            f"tokens; lower data.max_prompt_tokens to at most {context - new}"
        )
    found.max_prompt_tokens = limit if limit is not None else context - new
    critic_spec = check_critic(recipe, spec)
    if resume:
        check_resume_model(run_dir, spec, where, recipe)
        if recipe.algo.uses_critic:
            check_resume_critic(run_dir, critic_spec)


def check_critic(recipe, actor_spec):
    """A separate value model (``train.critic.path``) must load onto the layout and share the actor's vocabulary
    and hidden size. Returns the critic's ``ModelSpec`` (the actor's when no path is set)."""
    from portable_rl.models.hf_dir import ModelDirError, check_hf_dir
    from portable_rl.training.critic import CriticMismatch, check_compatible
    from portable_rl.training.model_builder import ModelSpec, UnsupportedModel, check_parallel_layout

    path = recipe.train.critic.path
    if not recipe.algo.uses_critic or path is None:
        return actor_spec
    where = f"train.critic.path={path!r}"
    try:
        spec = ModelSpec.from_hf(check_hf_dir(path))
        check_compatible(actor_spec, spec, where)
        p = recipe.train.parallel
        check_parallel_layout(spec, p.tensor_parallel, p.pipeline_parallel)
    except (ModelDirError, UnsupportedModel, CriticMismatch) as exc:
        raise UserError(str(exc) if isinstance(exc, CriticMismatch) else f"{where}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise UserError(f"{where}: config.json lacks or mistypes {exc}") from None
    except ValueError as exc:
        raise UserError(f"train.parallel.{exc} of {where}; choose a divisor of it") from None
    return spec


def check_resume_critic(run_dir, critic_spec=None) -> None:
    """A PPO run resumes only from a checkpoint that holds its critic, of the recipe's value model's shapes."""
    step, path = run_dir.last_checkpoint()
    meta_path = path / "trainer" / "critic" / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(
            f"--resume: checkpoint step_{step} holds no readable critic (trainer/critic/meta.json), but "
            "algo.advantage_estimator=gae trains one; resume with the run's own algo section, or start a new run"
        ) from None
    saved = meta.get("model")
    if critic_spec is None or not isinstance(saved, dict):
        return
    mine = asdict(critic_spec)
    for key in SHAPE_FACTS:
        if key in saved and saved[key] != mine[key]:
            raise UserError(
                f"--resume: checkpoint step_{step} holds a critic with {key}={saved[key]!r} but the recipe's value "
                f"model has {key}={mine[key]!r}; resume with the run's own train.critic.path or start a new run"
            )


def check_resume_model(run_dir, spec, where: str, recipe=None) -> None:
    """The checkpoint to resume holds the same model (architecture, shapes, vocabulary) as the recipe's, and
    loads onto the trainer layout the recipe asks for (``checkpoint.reshard_refusal``)."""
    step, path = run_dir.last_checkpoint()
    meta_path = path / "trainer" / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(
            f"--resume: checkpoint step_{step} has no readable trainer/meta.json, so it cannot be resumed; "
            f"move checkpoints/step_{step} aside to resume from an earlier one, or start a new run"
        ) from None
    from portable_rl.training.checkpoint import CheckpointError, file_problems, reshard_refusal

    try:
        problems = file_problems(path / "trainer")
    except CheckpointError as exc:
        problems = [str(exc)]
    if problems:
        raise UserError(
            f"--resume: checkpoint step_{step} is incomplete or corrupt ({'; '.join(problems[:3])}); "
            f"move checkpoints/step_{step} aside to resume from an earlier one, or start a new run"
        )
    saved_layout = meta.get("layout")
    if recipe is not None and isinstance(saved_layout, dict):
        t = recipe.train
        mine_layout = {
            "tensor_parallel": t.parallel.tensor_parallel,
            "pipeline_parallel": t.parallel.pipeline_parallel,
            "data_parallel": t.data_parallel,
            "distributed_optimizer": t.parallel.distributed_optimizer,
        }
        refusal = reshard_refusal(saved_layout, mine_layout, fmt=meta.get("format", 1))
        if refusal:
            raise UserError(f"--resume: checkpoint step_{step} was {refusal}")
    saved = meta.get("model")
    if not isinstance(saved, dict):
        # Checkpoints written before the model's facts were recorded: the model directory they name, if any.
        from portable_rl.training.model_builder import ModelSpec, UnsupportedModel

        source = meta.get("hf_checkpoint")
        try:
            saved = asdict(ModelSpec.from_hf(source)) if source else {"model_type": meta.get("model_type")}
        except (OSError, ValueError, KeyError, TypeError, UnsupportedModel):
            saved = {"model_type": meta.get("model_type")}
    mine = asdict(spec)
    for key in SHAPE_FACTS:
        if key in saved and saved[key] is not None and saved[key] != mine[key]:
            raise UserError(
                f"--resume: checkpoint step_{step} holds a model with {key}={saved[key]!r} but {where} has "
                f"{key}={mine[key]!r}; resume with the run's own model (its config.yaml) or start a new run"
            )


def check_ports(recipe) -> None:
    """A port the recipe asks for must be free now (else the rendezvous fails after its timeout)."""
    from portable_rl.config.weight_sync import resolve_strategy
    from portable_rl.distributed import port_in_use

    port = recipe.weight_sync.master_port
    if not port:
        return
    strategy = resolve_strategy(recipe.weight_sync, recipe.run.mode)
    if strategy != "broadcast":
        raise UserError(
            f"weight_sync.master_port={port} is used only by weight_sync.strategy=broadcast, but this run syncs "
            f"with {strategy!r}; drop weight_sync.master_port or set weight_sync.strategy=broadcast"
        )
    if port_in_use(port):
        raise UserError(
            f"weight_sync.master_port={port} is already in use on this host; choose a free port or 0 "
            "(pick a free one at start)"
        )


def check_prompts(recipe, found: Preflight) -> None:
    """Stream the prompt files (and template one prompt) so a bad file fails before the run dir is created."""
    from portable_rl.data.prompts import PromptFileError, PromptSource, line_byte_limit, read_prompt_file

    limit = found.max_prompt_tokens
    max_line = line_byte_limit(limit)
    tokenizer = None
    files = [("train", recipe.data.train), ("eval", recipe.data.eval)]
    files += [(f"eval_sets[{e.name}]", e) for e in recipe.data.eval_sets]
    for split, cfg in files:
        if cfg is None:
            continue
        prompts = read_prompt_file(cfg.path, cfg.prompt_key, cfg.label_key, cfg.apply_chat_template, max_line)
        found.prompts[split] = {"prompts": len(prompts.records), "lines_too_long": len(prompts.oversized)}
        if prompts.oversized and (recipe.data.long_prompts == "refuse" or not prompts.records):
            line, size = prompts.oversized[0]
            every = "every line" if not prompts.records else f"{len(prompts.oversized)} line(s)"
            raise UserError(
                f"data.{split}: {cfg.path} line {line} is {size} bytes, more than any prompt within "
                f"data.max_prompt_tokens={limit} can take ({every} of the file); shorten the prompts"
                + ("" if not prompts.records else " or set data.long_prompts=skip")
            )
        refuse = recipe.data.long_prompts == "refuse" and limit is not None
        # The tiny and demo models ship a chat template; a user's HF directory may not.
        user_template = cfg.apply_chat_template and recipe.model.path not in ("tiny", "smollm2")
        if not (refuse or user_template):
            continue
        tokenizer = tokenizer or _tokenizer_of(recipe)
        try:
            source = PromptSource(cfg, tokenizer, limit, recipe.data.long_prompts, prompts=prompts)
            # long_prompts=refuse: every prompt is measured now, so a long one stops the run before it starts.
            for index in range(len(source) if refuse else 1):
                source.fits(source.make_item(index, 0))
        except PromptFileError as exc:
            raise UserError(f"data.{split}: {exc}") from None


def _tokenizer_of(recipe):
    if recipe.model.path == "tiny":
        from portable_rl.models.tiny import TinySpec, train_tokenizer

        return train_tokenizer(TinySpec().vocab_size)  # what build_tiny_checkpoint saves with the model
    return _load_tokenizer(recipe.model.path)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model.path={path!r}: cannot load its tokenizer ({first}); add the tokenizer files to the directory"
        ) from None


def check_reward_and_filter(recipe) -> None:
    """Import the reward function and group filter now: a typo fails before the job starts Ray and engines."""
    import inspect

    from portable_rl.rollout.filters import load_filter
    from portable_rl.rollout.generate_hook import load_generate_hook
    from portable_rl.rollout.rewards import RewardLoadError, load_callable, load_reward_fn

    r = recipe.rollout
    try:
        if r.reward in ("math", "remote"):
            load_reward_fn(r.reward, **r.reward_options)
        else:
            fn = load_callable(r.reward)
            try:
                signature = inspect.signature(fn)
            except (TypeError, ValueError):  # builtins and some callables have none; nothing to check
                signature = None
            if signature is not None:
                signature.bind("response", None, None, **r.reward_options)
        load_filter(r.filter)
        load_generate_hook(r.generate, r.generate_options)  # importable, async, signature fits the options
    except RewardLoadError as exc:
        raise UserError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"rollout.reward_options={r.reward_options!r} do not fit reward {r.reward!r} ({exc}); "
            "pass only the function's keyword arguments"
        ) from None


def check_remote_reward(recipe, found: Preflight) -> None:
    """A remote reward's server is dialled once; one that does not answer is a warning (it may start later)."""
    import socket
    from urllib.parse import urlsplit

    if recipe.rollout.reward != "remote":
        return
    url = recipe.rollout.reward_options["url"]
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=3.0):
            pass
    except OSError as exc:
        found.warnings.append(
            f"the reward server {url} does not answer now ({exc}); the run fails at its first reward, naming "
            "the URL, unless it is up by then"
        )


def check_debug_mode(recipe, run_dir, resume: bool) -> None:
    """``run.debug_mode``: no resume without a trainer; train_only's saved rollouts present and readable."""
    from portable_rl.data.saved_rollouts import SavedRolloutError, read_step, rollouts_dir

    run = recipe.run
    if run.debug_mode == "rollout_only" and resume:
        raise UserError(
            "--resume: run.debug_mode=rollout_only has no trainer checkpoint to resume; start a new run "
            "(another run.output_dir) for more steps"
        )
    if run.debug_mode != "train_only":
        return
    source = Path(run.rollout_source)
    if not source.is_dir():
        raise UserError(
            f"run.rollout_source={run.rollout_source!r} is not a directory; point it at a run saved with "
            "run.debug_mode=rollout_only or run.save_rollouts=true"
        )
    first = run_dir.last_checkpoint()[0] + 1 if resume and run_dir.last_checkpoint() else 1
    directory = rollouts_dir(source)
    dp = recipe.train.data_parallel
    for step in range(first, run.steps + 1):
        try:
            groups = read_step(directory, step)
        except SavedRolloutError as exc:
            raise UserError(f"run.rollout_source: {exc}") from None
        n = sum(len(g.samples) for g in groups)
        if n % dp:
            raise UserError(
                f"run.rollout_source: step {step} holds {n} samples, which do not split over "
                f"train.data_parallel={dp}; use the data parallelism of the run that saved it"
            )


# Engine options the job sets for every engine itself: a pass-through value would be overwritten or contradict
# the placement, so it is refused with the setting that owns it.
JOB_OWNED_ENGINE_ARGS = {
    "model_path": "model.path",
    "host": "the job (127.0.0.1, or the Ray node's address on a cluster)",
    "port": "the job (a free port per engine)",
    "tp_size": "rollout.engine_tp_size",
    "tensor_parallel_size": "rollout.engine_tp_size",
}


def _flags(prefix: str, names) -> str:
    return ", ".join(f"--{prefix}-{str(n).replace('_', '-')}" for n in sorted(names))


def sglang_server_args() -> frozenset[str] | None:
    """Field names of SGLang's ServerArgs, read from the installed source without importing SGLang (which needs
    its GPU kernels); None where SGLang is not installed here (a cluster's engines may have it elsewhere)."""
    import ast
    import importlib.util

    found = importlib.util.find_spec("sglang")
    for base in (found.submodule_search_locations or []) if found else []:
        path = Path(base) / "srt" / "server_args.py"
        if not path.is_file():
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name == "ServerArgs":
                return frozenset(
                    st.target.id
                    for st in node.body
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
                )
    return None


def check_pass_through(recipe, platform, found: Preflight) -> None:
    """Every --megatron-* / --sglang-* flag does something on this layout, or is refused (or warned about once)."""
    import difflib

    from portable_rl.rollout.engines.launcher import engine_kind
    from portable_rl.training.model_builder import LAYOUT_OWNED_FIELDS, transformer_config_fields

    megatron = {str(k) for k in recipe.train.megatron_args}
    for name in sorted(megatron & set(LAYOUT_OWNED_FIELDS)):
        raise UserError(
            f"{_flags('megatron', [name])} is set by {LAYOUT_OWNED_FIELDS[name]}; drop the flag and set that instead"
        )
    fields = transformer_config_fields()
    unknown = sorted(megatron - fields) if fields is not None else []
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
        hint = f"did you mean {_flags('megatron', close)}?" if close else "see Megatron's TransformerConfig"
        raise UserError(f"{_flags('megatron', unknown)} is not a Megatron TransformerConfig field; {hint}")

    r = recipe.rollout
    args = {str(k).replace("-", "_") for k in r.engine_args}
    for name in sorted(args & set(JOB_OWNED_ENGINE_ARGS)):
        raise UserError(
            f"{_flags('sglang', [name])} is set for every engine by {JOB_OWNED_ENGINE_ARGS[name]}; drop the flag"
        )
    kind = engine_kind(r.engine, platform)
    if kind != "cpu":
        known_sglang = sglang_server_args()
        unknown = sorted(args - known_sglang) if known_sglang is not None else []
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known_sglang), n=1)
            hint = (
                f"did you mean {_flags('sglang', close)}?"
                if close
                else "see python -m sglang.launch_server --help"
            )
            raise UserError(
                f"{_flags('sglang', unknown)} is not an option of the installed SGLang server; {hint}"
            )
        return
    if r.engine_tp_size > 1:
        raise UserError(
            f"rollout.engine_tp_size={r.engine_tp_size}: the CPU engine has no tensor parallelism (one process "
            "per engine); use rollout.engine_tp_size=1 and more rollout.num_engines"
        )
    from portable_rl.rollout.engines.cpu_server import build_parser

    known = {a.dest for a in build_parser()._actions} - {"help"}
    ignored = sorted(args - known)
    if ignored:
        found.warnings.append(
            f"{_flags('sglang', ignored)} apply to SGLang only; the CPU engine (rollout.engine={r.engine!r} on "
            f"{platform.name}) ignores them (it takes {_flags('sglang', known - set(JOB_OWNED_ENGINE_ARGS))})"
        )


def plan(recipe, platform, found: Preflight) -> dict[str, Any]:
    """The resolved plan ``--dry-run`` prints: what the job would start, where, and how."""
    from portable_rl.config.weight_sync import resolve_strategy
    from portable_rl.rollout.engines.launcher import engine_kind

    t, r, ws = recipe.train, recipe.rollout, recipe.weight_sync
    kind = engine_kind(r.engine, platform)
    strategy = resolve_strategy(ws, recipe.run.mode)
    trainer_devices = t.world_size
    engine_devices = r.num_engines * r.engine_tp_size
    return {
        "platform": {"name": platform.name, "collectives": platform.dist_backend},
        "run_dir": {"path": str(recipe.run.output_dir), "action": found.run_dir_action},
        "layout": {
            "mode": recipe.run.mode,
            "tensor_parallel": t.parallel.tensor_parallel,
            "pipeline_parallel": t.parallel.pipeline_parallel,
            "expert_parallel": t.parallel.expert_parallel,
            "data_parallel": t.data_parallel,
            "trainer_ranks": trainer_devices,
            "devices": trainer_devices
            if recipe.run.mode == "colocated"
            else trainer_devices + engine_devices,
        },
        "engines": {
            "kind": kind,
            "count": r.num_engines,
            "tp_size": r.engine_tp_size,
            "attention_backend": platform.sglang_attention_backend if kind == "sglang" else "torch",
            "pass_through": dict(r.engine_args),
        },
        "ports": {
            "weight_sync.master_port": ws.master_port or "a free port, picked at start",
            "engines_and_router": "free ports, picked at start",
        },
        "weight_sync": {"strategy": strategy, "backend": platform.dist_backend, "bucket_mb": ws.bucket_mb},
        "kernels": asdict(found.kernels),
        "model": {
            "path": recipe.model.path,
            **{k: found.model[k] for k in ("model_type", "num_layers", "hidden_size") if k in found.model},
            "context": found.context,
            "max_prompt_tokens": found.max_prompt_tokens,
            "max_new_tokens": r.max_new_tokens,
        },
        "data": {"long_prompts": recipe.data.long_prompts, **found.prompts},
        "algo": _algo_plan(recipe),
        "steps": recipe.run.steps,
    }


def _algo_plan(recipe) -> dict[str, Any]:
    """What the trainer builds and runs per step for the recipe's algorithm (forwards beyond the training one)."""
    a = recipe.algo
    return {
        "advantage_estimator": a.advantage_estimator,
        "policy_loss": a.policy_loss,
        "optimizer_steps_per_rollout": a.updates_per_rollout,
        "reference_model": a.uses_reference,
        "old_logprob_forward": a.needs_old_logprobs,
        "critic": (recipe.train.critic.path or "the actor's model") if a.uses_critic else None,
    }
