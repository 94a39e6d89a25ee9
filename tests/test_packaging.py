"""pyproject.toml declares what the code imports, and nothing else: the core is what an offline render needs, every
other library is an extra named after its use (engine/extras.py says which one a command is missing), and
constraints.txt pins all of it."""
import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from engine.extras import EXTRAS

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
OURS = ("mmgt", "export", "engine", "streaming", "benchmarks", "tests")
# declared distributions nothing imports by name, and why they are there
NOT_IMPORTED = {
    "pytest-timeout": "a pytest plugin, loaded by pytest for the `timeout` setting of pyproject.toml",
    "onnxscript": "imported by torch.onnx's dynamo exporter, which export/onnx.py uses for some networks",
}
# distributions whose module has another name, for those not installed here (the installed ones are looked up)
MODULE_OF = {"onnxruntime-gpu": "onnxruntime", "tensorrt": "tensorrt", "piper-tts": "piper", "pipecat-ai": "pipecat"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict:
    """{distribution: where it is declared ("core" or the extra)}."""
    project = _project()
    out = {_name(r): "core" for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        for r in reqs:
            out.setdefault(_name(r), extra)
    return out


def _imports() -> dict:
    """{top-level third-party module: first file importing it} over the repository's Python files."""
    local = set(OURS) | {p.stem for p in (ROOT / "tests").rglob("*.py")}  # tests import their helpers by name
    found = {}
    for path in sorted(p for pkg in OURS for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for top in (n.split(".")[0] for n in names):
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _dists_of(module: str) -> set:
    dists = {d.lower().replace("_", "-") for d in importlib.metadata.packages_distributions().get(module, ())}
    return dists | {d for d, m in MODULE_OF.items() if m == module} | {module.lower().replace("_", "-")}


def test_every_import_is_declared():
    declared = _declared()
    undeclared = {m: f for m, f in _imports().items() if not _dists_of(m) & set(declared)}
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_every_declared_dependency_is_imported():
    modules = _imports()
    dist_to_modules = {}
    for module in modules:
        for dist in _dists_of(module):
            dist_to_modules.setdefault(dist, set()).add(module)
    unused = sorted(d for d in _declared() if d not in dist_to_modules and d not in NOT_IMPORTED)
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"
    assert set(NOT_IMPORTED) <= set(_declared())  # the exceptions are still declared (else drop them here)


def test_core_is_what_an_offline_render_needs():
    core = {d for d, where in _declared().items() if where == "core"}
    assert core == {"torch", "numpy", "diffusers", "transformers", "safetensors", "opencv-python-headless", "pillow",
                    "librosa", "scipy", "av", "tqdm", "huggingface-hub"}
    extras = _project()["optional-dependencies"]
    assert set(extras) == {"serve", "export", "ort", "ort-gpu", "mic", "live", "piper", "pipecat", "tensorrt", "ray",
                           "dev"}
    assert not any("torch-tensorrt" in r or "cuda-python" in r for reqs in extras.values() for r in reqs)


def test_extras_table_matches_pyproject():
    """engine/extras.py's modules per extra are the modules of that extra's distributions."""
    extras = _project()["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        dists = {_name(r) for r in extras[extra]}
        for module in modules:
            assert _dists_of(module) & dists, f"extra {extra}: no distribution of it provides {module}"


def test_constraints_pin_every_declared_dependency():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = version
    gpu_only = {"tensorrt", "onnxruntime-gpu"}
    missing = sorted(d for d in _declared() if d not in pins and d not in gpu_only)
    assert not missing, f"constraints.txt does not pin {missing}"
    assert pins["torch"] == "2.13.0"
