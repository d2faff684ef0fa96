"""The package layers: every import of portable_rl (and of its backends) points down this table, never up or
sideways, so the packages form a DAG.

``LAYERS`` lists the layers from the bottom up; each holds one or more units (a package or a module, matched by
the longest dotted prefix). A module may import its own unit and any unit of a lower layer. An import of a
unit in the same layer ("across") or a higher one ("up") is a violation, whether at module level or inside a
function. Imports are read with ``ast`` from every ``.py`` file under ``portable_rl/`` and ``backends/`` (the
latter installed as ``portable_rl.backends``); modules loaded by name (``importlib.import_module``) are plugin
lookups and are not seen. A new module must belong to a unit: add it to the table where its imports put it.
The README's architecture section draws the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom first. Names are dotted module prefixes; "portable_rl" alone is the package's __init__ (the version).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("portable_rl", "portable_rl.errors")),
    ("version table", ("portable_rl.backends.versions",)),
    ("configs", ("portable_rl.config", "portable_rl.config_loader")),
    ("recipe", ("portable_rl.recipe",)),
    ("platform interface", ("portable_rl.platform",)),
    ("backends", ("portable_rl.backends",)),
    (
        "helpers",
        ("portable_rl.distributed", "portable_rl.run_dir", "portable_rl.metrics", "portable_rl.models"),
    ),
    ("math and data", ("portable_rl.algo", "portable_rl.data")),
    ("engine wire protocol", ("portable_rl.protocol",)),
    ("components", ("portable_rl.training", "portable_rl.rollout", "portable_rl.weight_sync")),
    ("rollout to trainer", ("portable_rl.rollout_to_train",)),
    ("orchestration", ("portable_rl.orchestration",)),
    ("entry points", ("portable_rl.train", "portable_rl.cluster_templates", "portable_rl.conformance")),
    ("commands", ("portable_rl.commands",)),
    ("cli", ("portable_rl.cli",)),
    ("python -m portable_rl", ("portable_rl.__main__",)),
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    """The unit a dotted module name belongs to: the longest listed prefix ("portable_rl" only exactly)."""
    if module == "portable_rl":
        return "portable_rl"
    best = None
    for unit in LAYER_OF:
        if unit != "portable_rl" and (module == unit or module.startswith(unit + ".")):
            if best is None or len(unit) > len(best):
                best = unit
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "backends":
        parts = ["portable_rl", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[:2] == ["portable_rl", "backends"]:
        base = ROOT / "backends" / Path(*parts[2:]) if parts[2:] else ROOT / "backends"
    else:
        base = ROOT / Path(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every portable_rl module ``source`` imports, wherever the import stands."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from portable_rl import platform` imports a module
                full = f"{base}.{alias.name}"
                out.append((node.lineno, full if _is_module(full) else base))
    wanted = {(line, name) for line, name in out if name == "portable_rl" or name.startswith("portable_rl.")}
    return sorted(wanted)


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """One line per import of ``source`` (the text of ``module``) that goes up or across the layers."""
    here = unit_of(module)
    if here is None:
        return [f"{module} belongs to no unit of LAYERS; add it where its imports put it"]
    found = []
    for line, target in imported_modules(source, module, is_package):
        there = unit_of(target)
        if there is None:
            found.append(f"{module}:{line} imports {target}, which belongs to no unit of LAYERS")
        elif there != here and LAYER_OF[there] >= LAYER_OF[here]:
            direction = "across" if LAYER_OF[there] == LAYER_OF[here] else "up"
            found.append(
                f"{module}:{line} imports {target}: {direction} from layer {LAYERS[LAYER_OF[here]][0]!r} "
                f"to {LAYERS[LAYER_OF[there]][0]!r}"
            )
    return found


def source_files() -> list[Path]:
    return sorted(p for d in ("portable_rl", "backends") for p in (ROOT / d).rglob("*.py"))


def test_every_import_points_down_the_layers():
    found = []
    for path in source_files():
        text = path.read_text(encoding="utf-8")
        found += violations(text, module_name(path), path.name == "__init__.py")
    assert not found, "imports against the layer order:\n" + "\n".join(found)


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_two_modules_import_each_other():
    """Inside a unit too: no circle of modules (a module importing the package it lives in is not counted,
    Python imports that package first anyway)."""
    graph: dict[str, set[str]] = {}
    for path in source_files():
        module = module_name(path)
        is_package = path.name == "__init__.py"
        for _, target in imported_modules(path.read_text(encoding="utf-8"), module, is_package):
            if target != module and not module.startswith(target + "."):
                graph.setdefault(module, set()).add(target)
    assert module_cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    graph = {"a.engine": {"a.trainer"}, "a.trainer": {"a.engine", "a.registry"}, "a.registry": set()}
    assert module_cycles(graph) == [["a.engine", "a.trainer"]]


def test_the_readme_draws_the_same_layers_in_order():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| layer | modules") :].split("\n\n", 1)[0].splitlines()[2:]
    drawn = [row.split("|")[1].strip() for row in table]
    assert drawn == [name for name, _ in reversed(LAYERS)]


def test_every_unit_of_the_table_exists():
    missing = [unit for unit in LAYER_OF if not _is_module(unit)]
    assert not missing, f"LAYERS names units that are not modules or packages: {missing}"


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (
            "portable_rl.config.algo",
            "from portable_rl.orchestration.job import Job",
            "up from layer 'configs'",
        ),
        (
            "portable_rl.rollout.manager",
            "import portable_rl.weight_sync.base",
            "across from layer 'components'",
        ),
        (
            "portable_rl.orchestration.placement",
            "def f():\n    from portable_rl.cli import main\n",
            "up from layer 'orchestration' to 'cli'",
        ),
        ("portable_rl.training.actor", "from portable_rl import train", "up from layer 'components'"),
        (
            "portable_rl.protocol.client",
            "from ..weight_sync import base",
            "up from layer 'engine wire protocol'",
        ),
        ("portable_rl.brand_new", "import torch", "belongs to no unit"),
    ],
)
def test_the_checker_reports_imports_that_go_up_or_across(module, source, expected):
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_imports_down_and_inside_a_unit():
    assert (
        violations("from portable_rl.protocol.client import EngineClient", "portable_rl.rollout.manager")
        == []
    )
    assert violations("from portable_rl.rollout.filters import keep_all", "portable_rl.rollout.manager") == []
    assert violations("from portable_rl.errors import UserError", "portable_rl.orchestration.placement") == []


def test_pyproject_lists_every_package_and_no_missing_data_folder():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {module_name(p) for d in ("portable_rl", "backends") for p in (ROOT / d).rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk
    for package, patterns in setuptools.get("package-data", {}).items():
        folder = ROOT / Path(*package.split("."))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"package-data {package}: {pattern} matches no file"
