"""The architecture, checked from the source: layers, import cycles, public names, function length.

Every module's imports (lazy ones inside functions included) are parsed. Dependencies must point
one way, down this stack (docs/architecture.md):

    6  entry points, tune, analysis, benchmarks, cluster
    5  launch and recipes           trainer.launch, trainer.recipes, trainer.results
    4  worker loops                 trainer.worker.*
    3  methods, evaluation          trainer.methods.*, trainer.evaluation.*
    2  models, losses, attacks, ... trainer.models.*, trainer.losses, trainer.attacks.*, ...
    1  data                         data_pipeline.*
    0  config                       conf.*

A module may import its own layer or the ones below (never above), no two modules may import each
other through any chain, and no module uses another module's private (_underscore) names.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("conf", "data_pipeline", "trainer", "tune", "cluster", "benchmarks")
LAYERS = [  # (module-name prefix, layer); the longest matching prefix wins
    ("conf", 0),
    ("data_pipeline", 1),
    ("trainer.models", 2), ("trainer.losses", 2), ("trainer.attacks", 2), ("trainer.optim", 2),
    ("trainer.distributed", 2), ("trainer.progress", 2), ("trainer.checkpoint", 2),
    ("trainer.adversarial_training", 2),
    ("trainer.methods", 3), ("trainer.evaluation", 3),
    ("trainer.worker", 4),
    ("trainer.launch", 5), ("trainer.recipes", 5), ("trainer.results", 5), ("trainer.grid", 5),
    ("trainer.seeds", 5), ("trainer.signals", 5), ("trainer.trial_stop", 5),
    ("trainer.run", 6), ("trainer.evaluate", 6), ("trainer.analyze_representations", 6),
    ("tune", 6), ("benchmarks", 6), ("cluster", 6),
    ("trainer", 2),  # the package's own __init__
]
FORBIDDEN = {  # package -> packages it must never import, whatever the layers say
    "conf": ("data_pipeline", "trainer", "tune", "cluster", "benchmarks"),
    "data_pipeline": ("trainer", "tune", "cluster", "benchmarks"),
    "trainer": ("tune", "cluster", "benchmarks"),
}
MAX_FUNCTION_LINES = 80
LENGTH_CHECKED = ("conf", "data_pipeline", "trainer", "tune", "cluster")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


MODULES = project_modules()


def _resolve(target: str, names: list[str]) -> dict[str, list[str]]:
    """Module -> names taken from it: `from a.b import c` loads module a.b.c when that is a module
    (no name taken), else takes the name c from a.b."""
    out: dict[str, list[str]] = {target: []} if not names else {}
    for name in names:
        full = f"{target}.{name}"
        if full in MODULES:
            out.setdefault(full, [])
        else:
            out.setdefault(target, []).append(name)
    return out


def imports(path: Path, me: str | None = None) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    me = me or module_name(path)
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = me.split(".") if is_pkg else me.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for target, names in _resolve(base, [a.name for a in node.names]).items():
                found.append((target, names, node.lineno))
    return found


def layer(module: str) -> int:
    matches = [(len(p), n) for p, n in LAYERS if module == p or module.startswith(p + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)")
    return max(matches)[1]


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_dependencies_point_down():
    problems = []
    for m, path in MODULES.items():
        for target, _, line in imports(path):
            if target not in MODULES:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {target}, which does not exist")
                continue
            top, other = m.split(".")[0], target.split(".")[0]
            if other in FORBIDDEN.get(top, ()):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {top} must not import {other} ({target})")
            elif layer(target) > layer(m):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {m} (layer {layer(m)}) imports {target} "
                                f"(layer {layer(target)})")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("where", ["project", "tests"])
def test_only_public_names_cross_modules(where):
    files = list(MODULES.values()) if where == "project" else sorted((ROOT / "tests").glob("*.py"))
    problems = []
    for path in files:
        for target, names, line in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports private {private} from {target}")
    assert not problems, "\n".join(problems)


def test_functions_are_short():
    long = []
    for m, path in MODULES.items():
        if m.split(".")[0] not in LENGTH_CHECKED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_the_checks_can_fail(tmp_path):
    """The parser sees lazy imports, relative imports and private names (a check that cannot fail
    is no check)."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from trainer.recipes import _secret\n    from . import loaders\n")
    found = imports(f, me="data_pipeline.probe")
    assert ("trainer.recipes", ["_secret"], 2) in found
    assert ("data_pipeline.loaders", [], 3) in found
    assert layer("trainer.recipes") > layer("data_pipeline.probe")
