# shellcheck shell=bash
# Steps shared by the GPU legs; sourced by ci/legs/cuda.sh and ci/legs/rocm-*.sh, which run inside the
# platform's portable-rl image (docker/Dockerfile.<platform>).
#
# Inputs, set by the generated workflow from ci/matrix.yaml (`python -m ci.generate --leg-env LEG` prints
# them for a run by hand): LEG_NAME LEG_PLATFORM LEG_GPUS LEG_GPU_ARCH LEG_PYTEST_MARKERS LEG_REPORT_DIR.
# Outputs in $LEG_REPORT_DIR: doctor.json, pytest.xml, conformance-<platform>.json/.md.

# The image's pins of its vendor builds (torch, SGLang, kernels), written by docker/verify_base.py.
IMAGE_CONSTRAINTS=${IMAGE_CONSTRAINTS:-/opt/portable-rl/constraints.txt}

leg_require_env() {
    local var
    for var in LEG_NAME LEG_PLATFORM LEG_GPUS LEG_PYTEST_MARKERS LEG_REPORT_DIR; do
        if [ -z "${!var:-}" ]; then
            echo "$0: $var is not set; run: eval \"\$(python3 -m ci.generate --leg-env LEG)\"" >&2
            exit 2
        fi
    done
    mkdir -p "$LEG_REPORT_DIR"
}

# Install this checkout over the image's copy of portable_rl, keeping the image's vendor builds. The platform's
# extra brings its management library (cuda: nvidia-ml-py, whose NVML probe reports device architectures).
leg_install() {
    if [ ! -f "$IMAGE_CONSTRAINTS" ]; then
        echo "$0: $IMAGE_CONSTRAINTS not found; GPU legs run inside the portable-rl image" >&2
        exit 2
    fi
    python3 -m pip install --no-cache-dir -c "$IMAGE_CONSTRAINTS" -e ".[dev,$LEG_PLATFORM]"
}

# The host must be what the leg claims: platform, at least LEG_GPUS devices, architecture LEG_GPU_ARCH.
leg_check_host() {
    portable-rl doctor --json >"$LEG_REPORT_DIR/doctor.json"
    python3 ci/legs/check_host.py "$LEG_REPORT_DIR/doctor.json" \
        --platform "$LEG_PLATFORM" --gpus "$LEG_GPUS" --arch "${LEG_GPU_ARCH:-}"
}

leg_tests() {
    python3 -m pytest -q -m "$LEG_PYTEST_MARKERS" --junitxml="$LEG_REPORT_DIR/pytest.xml" tests
}

leg_conformance() {
    portable-rl conformance --platform "$LEG_PLATFORM" --fail-on-unexpected-skip --report "$LEG_REPORT_DIR"
}

# The whole leg: tests and conformance both run (the report is wanted even when a test fails).
leg_run() {
    leg_require_env
    leg_install
    leg_check_host
    local status=0
    leg_tests || status=$?
    leg_conformance || status=$?
    return "$status"
}
