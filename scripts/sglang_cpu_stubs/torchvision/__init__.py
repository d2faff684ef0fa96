"""Test stand-in for ``torchvision``, installed only into the CPU SGLang test venv.

SGLang 0.5.23 imports torchvision at start-up (its multimodal configs do ``import torchvision.transforms`` at
module level), and transformers imports ``torchvision.io`` once it sees the package. The real releases cannot
live in this venv: 0.29+ pulls a CUDA torch and 0.28 fails to import beside the CPU torch 2.13.0 build. The
integration tests serve text-only models, which never touch torchvision, so this package only has to import
and report 0.28.0, the release that pairs with torch 2.13. Calling anything from it raises.
"""

import sys

from _cpu_test_stand_in import make_stand_in_package

make_stand_in_package(
    sys.modules[__name__],
    version="0.28.0",
    why="torchvision is a test stand-in in the CPU SGLang venv (text-only models do not need it)",
)
