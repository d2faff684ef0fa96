# shellcheck shell=bash
# Checks every ROCm leg makes before installing anything; sourced by ci/legs/rocm-*.sh.

# The container must have the KFD compute node and the DRM render nodes (docker --device), readable and
# writable through the "video" group (--group-add video), and a device mask Ray accepts.
rocm_preflight() {
    if [ ! -r /dev/kfd ] || [ ! -w /dev/kfd ]; then
        echo "rocm leg: /dev/kfd is not usable; start the container with --device /dev/kfd --group-add video" >&2
        exit 2
    fi
    if ! compgen -G "/dev/dri/renderD*" >/dev/null; then
        echo "rocm leg: no /dev/dri/renderD* nodes; start the container with --device /dev/dri" >&2
        exit 2
    fi
    if [ -n "${ROCR_VISIBLE_DEVICES:-}" ] && [ -z "${HIP_VISIBLE_DEVICES:-}" ]; then
        echo "rocm leg: ROCR_VISIBLE_DEVICES is set without HIP_VISIBLE_DEVICES; Ray rejects that, export HIP_VISIBLE_DEVICES" >&2
        exit 2
    fi
    if command -v amd-smi >/dev/null; then
        amd-smi list || true  # informational: the devices the runner exposes
    elif command -v rocm-smi >/dev/null; then
        rocm-smi --showproductname || true
    fi
}
