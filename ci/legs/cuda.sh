#!/usr/bin/env bash
# CUDA leg: NVIDIA H100 self-hosted runner, inside the cuda image started with --gpus all.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=ci/legs/gpu-common.sh
source ci/legs/gpu-common.sh

# Without the NVIDIA container runtime (docker --gpus) the container sees no driver; say so before any test.
if ! nvidia-smi -L; then
    echo "cuda leg: nvidia-smi failed; the container needs --gpus all (ci/matrix.yaml container_options)" >&2
    exit 2
fi
leg_run
