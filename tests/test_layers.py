"""The package's layers import downward only, with no import cycles (function-local imports included).

Everything here parses the sources with `ast`; nothing under ssl_kit/ is imported. Layers, highest first:

    cli > runner, run_dir, bundle > eval > engine > methods > models, losses, data
        > recipe_files, config, config_diff, common, errors, limits, _version

A module may import modules of its own layer or of lower layers, never of a higher one, and no set of modules
may import each other in a cycle (within one layer too). ssl_kit/__init__.py is the package facade: it may import
anything, and nothing inside the package may import it. A function-local import (one inside a def, so it runs
when called) must say why it is deferred in a comment on its line or the line above ("# deferred: ...").
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "ssl_kit"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

# Highest layer first. A key names a module or a package (the package's __init__ and everything under it).
# bundle.py imports only errors, but it reads and packs the run directories runner.py writes and only the CLI uses
# it, so it sits with runner. _version.py holds __version__ (runner's env.json reads it without the facade).
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("runner", "run_dir", "bundle"),
    ("eval",),
    ("engine",),
    ("methods",),
    ("models", "losses", "data"),
    ("recipe_files", "config", "config_diff", "common", "errors", "limits", "_version"),
]
# The facade ssl_kit/__init__.py: exempt from the layer rule as importer, off limits as importee.
FACADE = PACKAGE
DEFERRED_COMMENT = re.compile(r"#.*\bdeferred\b", re.IGNORECASE)


@dataclass(frozen=True)
class Import:
    importer: str      # dotted module name, e.g. ssl_kit.data.specs
    imported: str      # dotted module name it resolves to, inside the package
    line: int
    local: bool        # inside a function body
    justified: bool    # a "# deferred: ..." comment on its line or the line above


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom | ast.Import, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """Package modules an import statement loads, most specific first; outside modules are dropped."""
    def known(name: str) -> str | None:
        # `import ssl_kit.data.specs.x` or a name that is not a module: fall back to the longest module prefix
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        names = [known(alias.name) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        return [n for n in names if n]
    if node.level:
        base = importer.split(".")
        # the package a relative import starts from: the module's own package, one up per extra dot
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != PACKAGE:
        return []
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in modules:          # `from pkg import submodule`
            out.append(sub)
        else:                       # `from module import name`
            hit = known(source)
            if hit:
                out.append(hit)
    return sorted(set(out))


def collect_imports(sources: dict[str, tuple[str, bool]]) -> list[Import]:
    """sources: module name -> (source text, is a package __init__). Returns every import inside the package."""
    modules = set(sources)
    found: list[Import] = []
    for name, (text, is_package) in sources.items():
        tree = ast.parse(text)
        lines = text.splitlines()

        def visit(node: ast.AST, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    here = lines[child.lineno - 1] if child.lineno <= len(lines) else ""
                    above = lines[child.lineno - 2] if child.lineno >= 2 else ""
                    justified = bool(DEFERRED_COMMENT.search(here) or
                                     (above.strip().startswith("#") and DEFERRED_COMMENT.search(above)))
                    targets = _resolve(child, name, is_package, modules)
                    if local:
                        # a deferred import of an outside module still needs its reason
                        found.append(Import(name, targets[0] if targets else "", child.lineno, True, justified))
                        targets = targets[1:]
                    found.extend(Import(name, t, child.lineno, local, justified) for t in targets)
                inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, inner)

        visit(tree, False)
    return found


def layer_of(module: str) -> int | None:
    """Index into LAYERS (0 = highest); -1 for the facade; None for a module no layer names."""
    if module == FACADE:
        return -1
    rel = module[len(PACKAGE) + 1:]
    head = rel.split(".")[0]
    for index, keys in enumerate(LAYERS):
        if head in keys:
            return index
    return None


def _describe_layers() -> str:
    return " > ".join("/".join(keys) for keys in LAYERS)


def layer_violations(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        if not imp.imported or imp.importer == FACADE:
            continue
        own, other = layer_of(imp.importer), layer_of(imp.imported)
        if own is None:
            problems.append(f"{imp.importer} is in no layer; add it to LAYERS in tests/test_layers.py")
            continue
        if other is None:
            problems.append(f"{imp.imported} (imported by {imp.importer}:{imp.line}) is in no layer")
            continue
        if other < own:
            what = "the package facade" if other == -1 else f"layer {'/'.join(LAYERS[other])}"
            problems.append(f"{imp.importer}:{imp.line} imports {imp.imported} ({what}) from layer "
                            f"{'/'.join(LAYERS[own])}; layers may only import downward: {_describe_layers()}")
    return sorted(set(problems))


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of the module graph with more than one module, and self-imports."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.imported:
            graph.setdefault(imp.importer, set()).add(imp.imported)
            graph.setdefault(imp.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(start: str) -> None:  # iterative Tarjan
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return sorted(components)


def _cycle_path(component: list[str], imports: list[Import]) -> str:
    """One concrete cycle through the component, with the lines that close it, for the error message."""
    members = set(component)
    edges: dict[str, dict[str, int]] = {}
    for imp in imports:
        if imp.importer in members and imp.imported in members:
            edges.setdefault(imp.importer, {}).setdefault(imp.imported, imp.line)
    start = component[0]
    # breadth-first search for the shortest path back to start
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges.get(node, {})):
                if child == start:
                    path = [start]
                    walk = node
                    while walk != start:
                        path.append(walk)
                        walk = previous[walk]
                    path = [start] + path[1:][::-1] + [start]
                    return " -> ".join(f"{a} (line {edges[a][b]})" for a, b in zip(path, path[1:])) + f" -> {start}"
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    return " <-> ".join(component)


def undeferred_local_imports(imports: list[Import]) -> list[str]:
    seen = set()
    problems = []
    for imp in sorted(imports, key=lambda i: (i.importer, i.line)):
        if imp.local and not imp.justified and (imp.importer, imp.line) not in seen:
            seen.add((imp.importer, imp.line))
            problems.append(f"{imp.importer}:{imp.line} imports inside a function without a '# deferred: <why>' "
                            "comment on that line or the one above; hoist it to module level or say why it waits")
    return problems


def read_package(root: Path = PACKAGE_DIR) -> dict[str, tuple[str, bool]]:
    return {module_name(path, root): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
            for path in sorted(root.rglob("*.py"))}


@pytest.fixture(scope="module")
def package_imports() -> list[Import]:
    return collect_imports(read_package())


# ---------------------------------------------------------------------------------------------- the package itself

def test_every_module_has_a_layer():
    unplaced = [name for name in read_package() if layer_of(name) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_layers_import_downward_only(package_imports):
    problems = layer_violations(package_imports)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_cycles(package_imports):
    cycles = import_cycles(package_imports)
    assert not cycles, "import cycles:\n" + "\n".join(_cycle_path(c, package_imports) for c in cycles)


def test_function_local_imports_say_why_they_are_deferred(package_imports):
    problems = undeferred_local_imports(package_imports)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------- the checker on fake graphs

def _fake(**modules: str) -> list[Import]:
    """Keyword names use __ for dots: data__specs -> ssl_kit.data.specs; a trailing __init marks a package."""
    sources = {}
    for key, text in modules.items():
        is_package = key.endswith("__init")
        dotted = key.removesuffix("__init").rstrip("_").replace("__", ".")
        sources[f"{PACKAGE}.{dotted}" if dotted else PACKAGE] = (text, is_package)
    return collect_imports(sources)


def test_checker_reports_an_upward_import_with_line_and_order():
    imports = _fake(data__specs="import os\n\nfrom ssl_kit.methods.base import Method\n",
                    methods__base="from ssl_kit.data.specs import thing\n")
    problems = layer_violations(imports)
    assert len(problems) == 1
    assert "ssl_kit.data.specs:3 imports ssl_kit.methods.base" in problems[0]
    assert _describe_layers() in problems[0]


def test_checker_sees_function_local_and_relative_upward_imports():
    imports = _fake(
        losses__swav="def f():\n    from ..engine import optim  # deferred: because\n",
        engine__optim="x = 1\n",
        common__files="def g():\n    from ..eval.knn import knn\n",
        eval__knn="x = 1\n",
    )
    problems = layer_violations(imports)
    assert any("ssl_kit.losses.swav:2 imports ssl_kit.engine.optim" in p for p in problems)
    assert any("ssl_kit.common.files:2 imports ssl_kit.eval.knn" in p for p in problems)


def test_checker_allows_downward_and_same_layer_imports():
    imports = _fake(cli="from ssl_kit import runner\nfrom ssl_kit.config import C\n", runner="", config="",
                    models__vit="from .heads import H\nfrom ssl_kit.data.specs import S\n", models__heads="",
                    data__specs="")
    assert layer_violations(imports) == []
    assert import_cycles(imports) == []


def test_checker_resolves_relative_imports():
    imports = _fake(
        data__init="from . import specs\nfrom .pipeline import build\n",
        data__specs="from ..errors import E\nfrom . import pipeline\n",
        data__pipeline="from .specs import S\n",
        errors="",
    )
    pairs = {(i.importer, i.imported) for i in imports}
    assert ("ssl_kit.data", "ssl_kit.data.specs") in pairs
    assert ("ssl_kit.data", "ssl_kit.data.pipeline") in pairs
    assert ("ssl_kit.data.specs", "ssl_kit.errors") in pairs
    assert ("ssl_kit.data.specs", "ssl_kit.data.pipeline") in pairs
    assert ("ssl_kit.data.pipeline", "ssl_kit.data.specs") in pairs


def test_checker_reports_a_cycle_hidden_in_a_function():
    imports = _fake(data__specs="def f():\n    from .pipeline import p  # deferred: circular\n",
                    data__pipeline="from .specs import s\n")
    assert import_cycles(imports) == [["ssl_kit.data.pipeline", "ssl_kit.data.specs"]]
    path = _cycle_path(["ssl_kit.data.pipeline", "ssl_kit.data.specs"], imports)
    assert path.startswith("ssl_kit.data.pipeline (line 1) -> ssl_kit.data.specs (line 2)")


def test_checker_reports_longer_cycles_and_self_imports():
    imports = _fake(models__a="from . import b\n", models__b="from . import c\n", models__c="from .a import x\n",
                    common__d="import ssl_kit.common.d\n")
    assert import_cycles(imports) == [["ssl_kit.common.d"],
                                      ["ssl_kit.models.a", "ssl_kit.models.b", "ssl_kit.models.c"]]


def test_checker_forbids_importing_the_facade_but_lets_it_import_anything():
    imports = _fake(__init="from ssl_kit.cli import main\nfrom ssl_kit.errors import E\n", cli="", errors="",
                    models__vit="from ssl_kit import errors\n", losses__x="import ssl_kit\n")
    problems = layer_violations(imports)
    assert len(problems) == 1 and "ssl_kit.losses.x:1 imports ssl_kit (the package facade)" in problems[0]


def test_checker_wants_a_reason_for_each_function_local_import():
    imports = _fake(eval__knn=(
        "import os\n"
        "def a():\n"
        "    import faiss  # deferred: heavy optional import (faiss)\n"
        "def b():\n"
        "    # deferred: matplotlib is slow to import\n"
        "    import matplotlib\n"
        "def c():\n"
        "    from ssl_kit.errors import E\n"
        "def d():\n"
        "    import json\n"
        "class K:\n"
        "    def e(self):\n"
        "        f = lambda: __import__('x')\n"
        "        from .features import F\n"
    ), errors="", eval__features="")
    problems = undeferred_local_imports(imports)
    assert [p.split(" ")[0] for p in problems] == ["ssl_kit.eval.knn:8", "ssl_kit.eval.knn:10", "ssl_kit.eval.knn:14"]
    module_level = [i for i in imports if not i.local]
    assert module_level == []  # `import os` is outside the package, so it is no edge
