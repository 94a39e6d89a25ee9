"""The one-way import rule of DESIGN.md: mmgt <- export <- engine <- streaming, checked on the source."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmgt", "export", "engine", "streaming")
# what each package may import of ours (besides itself)
ALLOWED = {
    "mmgt": set(),
    "export": {"mmgt"},
    "engine": {"mmgt", "export"},
    "streaming": {"engine", "mmgt"},
}
# engine may import export.manifest only; engine/cli.py, the composition root, alone may import streaming and the rest of
# export, lazily (inside functions), so `import engine` never pulls them in.
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
                    bad.append(f"{rel}:{node.lineno} imports {mod} ({pkg} may import {sorted(ALLOWED[pkg]) or 'nothing of ours'})")
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
