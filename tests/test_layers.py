"""The package imports one way (README, Layout): every module imports only from its own layer or the layers below,
its module-level imports form no cycle, and every module imports in a fresh interpreter in dependency order."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssa_adapt"

# Bottom to top. A module belongs to the first layer one of whose prefixes it matches.
LAYERS = (
    ("ssa_adapt.config", "ssa_adapt.compat", "ssa_adapt.local_paths", "ssa_adapt.provenance"),
    ("ssa_adapt.ops",),
    ("ssa_adapt.patching.registry", "ssa_adapt.patching.controller", "ssa_adapt.patching.gate",
     "ssa_adapt.patching.padding"),
    ("ssa_adapt.decoding",),
    ("ssa_adapt.patching",),
    ("ssa_adapt.modeling", "ssa_adapt.packed_data", "ssa_adapt.assets"),
    ("ssa_adapt.trainer", "ssa_adapt.eval"),
)  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(ssa_adapt modules imported at module level, those imported anywhere) by module `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, everywhere = set(), set()
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = ".".join(base[: len(base) - node.level + 1]) if node.level else ""
            source = ".".join(filter(None, [base, node.module]))
            # `from package import submodule` imports the submodule
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        found = {t for t in targets if t in modules and t != name}
        everywhere |= found
        if id(node) in module_level:
            top |= found
    return top, everywhere


def _layer(name: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None  # the package itself: the public API, above every layer


def test_modules_import_only_their_layer_or_below():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        own = _layer(name)
        for target in _imports(name, path, modules)[1]:
            below = _layer(target)
            if own is not None and (below is None or below > own):
                upward.append(f"{name} (layer {own}) imports {target} (layer {below})")
    assert not upward, "\n".join(upward)
    assert all(_layer(name) is not None for name in modules if name != "ssa_adapt"), "a module outside LAYERS"


def test_module_imports_have_no_cycle_and_import_in_dependency_order():
    modules = _modules()
    graph = {name: _imports(name, path, modules)[0] for name, path in modules.items()}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    script = (
        "import importlib, sys\n"
        f"for name in {order!r}:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert order[-1] == "ssa_adapt" or _layer(order[-1]) is not None
