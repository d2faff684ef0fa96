#!/usr/bin/env bash
# Installs the real SGLang server into its own venv for the CPU integration stage (`pytest -m sglang`).
#
# SGLang's PyPI release pins a CUDA torch and CUDA-only kernel wheels. On a CPU-only machine this venv instead
# gets the CPU torch build, `sglang --no-deps`, SGLang's pure-Python requirements, `triton --no-deps` (imported
# unconditionally at start-up), and the import-only stand-ins under scripts/sglang_cpu_stubs/. The server is then
# started with SGLANG_USE_CPU_ENGINE=1 and the torch_native attention backend, which never calls GPU kernels.
# This is a test set-up for the project's SGLang adapter, not a supported SGLang install.
#
# Env: SGLANG_VENV (default: <repo>/.venv-sglang), PY (interpreter that creates the venv, default python3).
# Idempotent: a stamp file holding a hash of this script and the stand-ins makes a repeated run instant.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SGLANG_VENV:-$ROOT/.venv-sglang}"
PY="${PY:-python3}"
STUBS="$ROOT/scripts/sglang_cpu_stubs"
STAMP="$VENV/.sglang-cpu-installed"

TORCH_PIN="torch==2.13.0"
SGLANG_PIN="sglang==0.5.23"
TRITON_PIN="triton==3.8.0"
# SGLang 0.5.23's requirements minus the CUDA-only ones (flashinfer, sglang-kernel, sgl-*, cuda-python, nvidia-*
# wheels, flash-attn, quack, tilelang, torch_memory_saver) and the vision stack (timm, torchvision, torchaudio,
# torchcodec), whose current releases pull a CUDA torch.
SGLANG_DEPS=(
  aiohttp anthropic blobfile==3.0.0 build compressed-tensors==0.18.0 datasets distro easydict einops fastapi gguf
  interegular IPython "llguidance<2.0.0,>=1.7.6" "mistral_common>=1.11.5" msgspec ninja numpy nvidia-ml-py
  openai==2.8.0 openai-harmony==0.0.4 orjson outlines==0.1.11 packaging partial_json_parser pillow
  prometheus-client psutil pybase64 pydantic python-dateutil python-multipart pyzmq regex requests scipy
  sentencepiece==0.2.1 setproctitle smg-grpc-servicer tiktoken tqdm transformers==5.19.0 tokenizers==0.23.2
  uvicorn uvloop watchfiles xgrammar==0.2.7 xxhash zstandard numba==0.65.1 soundfile==0.13.1
)

want="$( (cat "$0"; find "$STUBS" -type f -name '*.py' | sort | xargs cat) | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "SGLang CPU venv is up to date: $VENV"
  exit 0
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip setuptools wheel

# The CPU torch first, then pin it for every later step so no requirement can swap in a CUDA build.
constraints="$VENV/.torch-constraint.txt"
echo "$TORCH_PIN" >"$constraints"
"${pip[@]}" "$TORCH_PIN"
"${pip[@]}" -c "$constraints" "${SGLANG_DEPS[@]}"
# Last and without dependencies: pip then skips its (here expected) report of SGLang's CUDA-only requirements.
"${pip[@]}" --no-deps "$SGLANG_PIN" "$TRITON_PIN"

# Anything that still dragged in GPU wheels or the real vision stack goes; the stand-ins replace what is imported.
extra="$("$VENV/bin/python" -m pip list --format=freeze | cut -d= -f1 |
  grep -iP '^(torchvision|torchaudio|torchcodec|timm|nvidia-(?!ml-py)|cuda-|flashinfer|sgl-kernel|sglang-kernel)' || true)"
if [[ -n "$extra" ]]; then
  echo "removing GPU-only packages: $extra"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip uninstall -q -y $extra
fi

# Stand-ins go into site-packages as copies, so the venv does not depend on where this checkout lives.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for stub in "$STUBS"/*; do
  name="$(basename "$stub")"
  rm -rf "${site:?}/$name"
  cp -r "$stub" "$site/$name"
done

"$VENV/bin/python" - <<'PY'
import sys

import torch

if torch.__version__.split("+")[0] != "2.13.0" or torch.version.cuda is not None:
    sys.exit(f"SGLang venv has torch {torch.__version__} (cuda={torch.version.cuda}); expected the 2.13.0 CPU build")
import sglang  # noqa: F401  (a failed import here is a broken install, not a test failure)
from sglang.srt.entrypoints.http_server import launch_server  # noqa: F401

print(f"torch {torch.__version__}, sglang {sglang.__version__}")
PY

echo "$want" >"$STAMP"
echo "SGLang CPU venv ready at $VENV in $(( $(date +%s) - start )) s"
