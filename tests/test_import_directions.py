"""The one-way import rule of DESIGN.md: mmgt <- export <- engine <- streaming, checked on the source; no import
cycle among our modules; and the command line's parser imports nothing heavy."""
import ast
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmgt", "export", "engine", "streaming")
# what each package may import of ours (besides itself)
ALLOWED = {
    "mmgt": set(),
    "export": {"mmgt"},
    "engine": {"mmgt", "export"},
    "streaming": {"engine"},
}
# engine may import export.manifest only; engine/cli.py, the composition root, alone may import streaming and the
# rest of export, lazily (inside functions), so `import engine` never pulls them in.
ENGINE_EXPORT_MODULES = {"export.manifest"}


def _imports(path: Path, root: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = path.relative_to(root).parts[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the package unless it climbs out of it
                depth = len(path.relative_to(root).parts) - 1
                if node.level > depth:
                    yield node, "<relative import above the package>"
                else:
                    yield node, pkg
            elif node.module:
                yield node, node.module


def _module_level(tree_node, path):
    """True when the import statement is at module level (not inside a function)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if sub is not node and getattr(sub, "lineno", None) == tree_node.lineno and isinstance(
                        sub, (ast.Import, ast.ImportFrom)):
                    return False
    return True


def violations(root: Path = ROOT, packages=PACKAGES):
    """Every import of one of our packages that goes against the allowed direction, as 'file:line message'."""
    bad = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            for node, mod in _imports(path, root):
                top = mod.split(".")[0]
                if top not in PACKAGES or top == pkg:
                    if mod.startswith("<"):
                        bad.append(f"{path.relative_to(root)}:{node.lineno} {mod}")
                    continue
                rel = path.relative_to(root).as_posix()
                if pkg == "engine" and top in ("streaming", "export") and rel == "engine/cli.py" \
                        and not _module_level(node, path):
                    continue
                if pkg == "engine" and top == "export" and mod not in ENGINE_EXPORT_MODULES:
                    bad.append(f"{rel}:{node.lineno} imports {mod} (engine may import export.manifest only)")
                    continue
                if top not in ALLOWED[pkg]:
                    allowed = sorted(ALLOWED[pkg]) or "nothing of ours"
                    bad.append(f"{rel}:{node.lineno} imports {mod} ({pkg} may import {allowed})")
    return bad


def test_import_directions():
    bad = violations()
    assert not bad, "import direction violations:\n" + "\n".join(bad)


def test_checker_catches_a_violation(tmp_path):
    """The rule above can fail: a fake mmgt module importing engine, and an engine module importing export.onnx."""
    (tmp_path / "mmgt").mkdir()
    (tmp_path / "mmgt" / "bad.py").write_text("import engine.runner\n")
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "runner.py").write_text("from export.onnx import export_network\n")
    bad = violations(tmp_path, ("mmgt", "engine"))
    assert any(b.startswith("mmgt/bad.py:1 imports engine.runner") for b in bad), bad
    assert any(b.startswith("engine/runner.py:1 imports export.onnx") for b in bad), bad


def test_engine_imports_without_optional_libraries():
    """`import engine` (and its CLI) works without onnxruntime, tensorrt, sounddevice, aiortc being imported."""
    code = (
        "import sys, engine, engine.cli\n"
        "heavy = [m for m in ('onnxruntime', 'tensorrt', 'sounddevice', 'aiortc', 'ray') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------------------------------------------
# No cycles: the graph of imports among our modules, module-level and function-level alike
# ----------------------------------------------------------------------------------------------------------------
# Cycles someone is removing now, each exactly as found (a cycle that grows or a new one still fails the test).
KNOWN_CYCLES: list = []  # none: every cycle fails the test


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT, packages=PACKAGES):
    """{module: {imported module of ours: "file:line"}} for every .py file of ``packages``. ``from a import b``
    points at a.b when that is a module, else at a; an import of something inside a module points at the module."""
    files = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}

    def ours(name: str):
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {mod: {} for mod in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: level 1 is this package, 2 its parent, ...
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in filter(None, map(ours, targets)):
                if target != mod:
                    graph[mod].setdefault(target, f"{path.relative_to(root).as_posix()}:{node.lineno}")
    return graph


def import_cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each as a set."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe_cycle(graph, component) -> str:
    """One cycle through ``component``, edge by edge with the line of each import."""
    start = min(component)
    came_from, todo = {start: None}, deque([start])
    while todo:  # shortest way round from start back to start, inside the component
        v = todo.popleft()
        for w in graph[v]:
            if w == start:
                path = [v]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                cycle = [*reversed(path), start]
                return " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {start}"
            if w in component and w not in came_from:
                came_from[w] = v
                todo.append(w)
    return ", ".join(sorted(component))


def test_no_import_cycles():
    graph = import_graph()
    new = [c for c in import_cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(
        f"{describe_cycle(graph, c)}   [modules in the cycle: {', '.join(sorted(c))}]" for c in new)


def test_only_the_entry_point_imports_the_cli():
    """engine/cli.py is the composition root: commands share engine.options and engine.models, not its insides."""
    graph = import_graph()
    assert sorted(m for m, targets in graph.items() if "engine.cli" in targets) == ["engine.__main__"]


def test_cycle_check_finds_a_function_level_cycle(tmp_path):
    """The check can fail: a module-level import one way and a lazy, relative one back make a cycle."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "a.py").write_text("from engine.b import thing\n")
    (tmp_path / "engine" / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    (tmp_path / "engine" / "c.py").write_text("import engine.a\n")  # imports into the cycle, not part of it
    graph = import_graph(tmp_path, ("engine",))
    assert graph["engine.b"] == {"engine.a": "engine/b.py:2"}
    assert import_cycles(graph) == [{"engine.a", "engine.b"}]
    assert describe_cycle(graph, {"engine.a", "engine.b"}) == \
        "engine.a (engine/a.py:1) -> engine.b (engine/b.py:2) -> engine.a"


# ----------------------------------------------------------------------------------------------------------------
# The command line's parser stays light
# ----------------------------------------------------------------------------------------------------------------
HEAVY = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt", "aiortc", "aiohttp", "ray", "av",
         "cv2", "librosa", "huggingface_hub")
PARSE_ONLY = [["--help"], *([c, "--help"] for c in ("render", "demo", "export", "serve", "batch", "weights", "doctor")),
              ["weights", "fetch", "--help"], ["render", "--steps", "x"], ["batch", "jobs.csv"], []]


def test_help_and_argument_errors_import_nothing_heavy():
    """`engine --help`, `engine COMMAND --help` and an argument error end before torch & co. are imported."""
    code = (
        "import contextlib, io, json, sys\n"
        "from engine.cli import main\n"
        "codes = []\n"
        f"for argv in {PARSE_ONLY!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            codes.append(main(argv))\n"
        "        except SystemExit as e:\n"
        "            codes.append(e.code)\n"
        f"print(json.dumps({{'codes': codes, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * 9 + [2, 2, 2], result  # help: 0; a bad or missing flag, no command: 2
    assert result["heavy"] == [], f"building the parser imported {result['heavy']}"
