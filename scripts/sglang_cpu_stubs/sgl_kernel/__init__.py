"""Test stand-in for SGLang's CUDA kernel package ``sgl_kernel`` (installed only into the CPU test venv).

SGLang imports names from ``sgl_kernel`` at start-up, but the real wheel (``sglang-kernel``) ships CUDA binaries
only. With ``SGLANG_USE_CPU_ENGINE=1``, ``--device cpu --attention-backend torch_native --sampling-backend
pytorch`` the server never calls these kernels, so names that merely import are enough to run the real server on
CPU in tests. Calling any of them raises.
"""

import sys

from _cpu_test_stand_in import make_stand_in_package

make_stand_in_package(
    sys.modules[__name__],
    version="0.0.0",
    why="sgl_kernel is a test stand-in in the CPU SGLang venv (the CUDA kernel wheel is not installed)",
)
