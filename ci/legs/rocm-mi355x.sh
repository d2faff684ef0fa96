#!/usr/bin/env bash
# ROCm leg: AMD Instinct MI355X (gfx950) self-hosted runner, inside the rocm-gfx950 image.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=ci/legs/rocm-preflight.sh
source ci/legs/rocm-preflight.sh
# shellcheck source=ci/legs/gpu-common.sh
source ci/legs/gpu-common.sh

rocm_preflight
leg_run
