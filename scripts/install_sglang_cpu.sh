#!/usr/bin/env bash
# Installs the real SGLang server into its own venv for the CPU integration stage (`pytest -m sglang`).
#
# SGLang's PyPI release pins a CUDA torch and CUDA-only kernel wheels. On a CPU-only machine this venv instead
# gets the CPU torch build, `sglang --no-deps`, SGLang's pure-Python requirements, `triton --no-deps` (imported
# unconditionally at start-up), and the import-only stand-ins under scripts/sglang_cpu_stubs/. The server is then
# started with SGLANG_USE_CPU_ENGINE=1 and the torch_native attention backend, which never calls GPU kernels.
# This is a test set-up for the project's SGLang adapter, not a supported SGLang install.
#
# Disk: about 2.3 GB when the project's own venv already holds the same torch build (its files are hard-linked,
# not copied), about 3 GB otherwise; the script checks the free space first and says how much it needs. Nothing is
# kept in pip's cache, and triton's CUDA/ROCm compiler binaries are removed (nothing here compiles a GPU kernel).
#
# Env: SGLANG_VENV (default: <repo>/.venv-sglang), PY (interpreter that creates the venv, default python3),
# MAIN_VENV (the project's venv whose torch may be hard-linked, default: <repo>/.venv).
# Idempotent: a stamp file holding a hash of this script and the stand-ins makes a repeated run instant.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SGLANG_VENV:-$ROOT/.venv-sglang}"
PY="${PY:-python3}"
MAIN_VENV="${MAIN_VENV:-$ROOT/.venv}"
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
mkdir -p "$(dirname "$VENV")"
main_site="$MAIN_VENV/lib/python3.11/site-packages"
torch_info="torch-${TORCH_PIN#torch==}+cpu.dist-info"
# Measured on a fresh machine (pip cache off): 2.3 GB with the hard-linked torch, 3.0 GB without; a margin on top.
if [[ -d "$main_site/$torch_info" ]]; then need_mb=2600; else need_mb=3400; fi
free_mb=$(($(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}') / 1024))
if ((free_mb < need_mb)); then
  echo "error: $free_mb MB free under $(dirname "$VENV"), the SGLang CPU venv needs about $need_mb MB;" \
    "free disk or set SGLANG_VENV to a larger disk" >&2
  exit 3
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --no-cache-dir)
"${pip[@]}" --upgrade pip setuptools wheel
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# The CPU torch first, then pin it for every later step so no requirement can swap in a CUDA build. When the
# project's venv holds the same build on the same Python, its files are hard-linked (read-only use on both sides,
# about 750 MB saved) and pip then only adds torch's own dependencies.
constraints="$VENV/.torch-constraint.txt"
echo "$TORCH_PIN" >"$constraints"
if [[ -d "$main_site/$torch_info" && "$site" == */python3.11/site-packages && ! -d "$site/torch" ]]; then
  if ! cp -al "$main_site/torch" "$main_site/torchgen" "$main_site/functorch" "$main_site/$torch_info" "$site/"; then
    echo "hard links to $main_site failed (another disk?); installing torch by copy"
    rm -rf "${site:?}/torch" "$site/torchgen" "$site/functorch" "$site/$torch_info"
  fi
fi
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
# triton is only imported here; its bundled GPU compiler binaries and device libraries (about 360 MB) are never run.
rm -rf "$site/triton/backends/nvidia/bin" "$site/triton/backends/nvidia/lib" "$site/triton/backends/amd/lib"

# Stand-ins go into site-packages as copies, so the venv does not depend on where this checkout lives.
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
