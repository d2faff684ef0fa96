"""Import-only stand-in packages for the CPU SGLang test venv (see scripts/install_sglang_cpu.sh).

``make_stand_in_package(module, version, why)`` turns a package's ``__init__`` module into one where
``import <package>.<anything>`` succeeds and every public name read from it is a stand-in class. Calling or
instantiating a stand-in raises with ``why``, so a code path that really needs the missing library fails
loudly instead of computing something wrong. Only for running the real SGLang server on CPU in tests.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _StandInType(type):
    why = "this is a test stand-in"

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__qualname__}.{name}", cls.__module__, cls.why)

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__module__}.{cls.__qualname__} was called, but {cls.why}")


def _stand_in(qualname: str, module: str, why: str) -> type:
    name = qualname.rsplit(".", 1)[-1]
    return _StandInType(name, (), {"__qualname__": qualname, "__module__": module, "why": why})


def _module_getattr(module_name: str, why: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(name, module_name, why)

    return __getattr__


class _StandInLoader(importlib.abc.Loader):
    def __init__(self, why: str) -> None:
        self.why = why

    def create_module(self, spec):
        return None  # default module object

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # a package, so deeper submodules import as stand-ins too
        module.__getattr__ = _module_getattr(module.__name__, self.why)


class _StandInFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str, why: str) -> None:
        self.prefix = package + "."
        self.why = why

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix):
            return None
        return importlib.machinery.ModuleSpec(fullname, _StandInLoader(self.why), is_package=True)


def make_stand_in_package(module: types.ModuleType, version: str, why: str) -> None:
    module.__version__ = version
    module.__getattr__ = _module_getattr(module.__name__, why)
    sys.meta_path.append(_StandInFinder(module.__name__, why))
