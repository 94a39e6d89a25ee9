"""The optional extras of the package (pyproject.toml ``[project.optional-dependencies]``) and the one line a command
says when the extra it needs is not installed.

The core install renders offline on the torch backend (tiny preset or ``--weights``); everything else is an extra
named after its use. A command checks its extra before any work (a model load, a download), with
``importlib.util.find_spec``: nothing is imported here, so the check costs nothing and ``engine --help`` stays light.
"""
from __future__ import annotations

import importlib.util
from typing import Mapping, Optional, Sequence, Tuple

from engine.options import CLIError

PACKAGE = "mmgt-engine"
# extra -> the modules it provides (import names), as pyproject.toml declares them
EXTRAS: Mapping[str, Tuple[str, ...]] = {
    "serve": ("aiohttp", "aiortc", "aioice", "prometheus_client"),
    "export": ("onnx", "onnxscript"),
    "ort": ("onnxruntime",),
    "ort-gpu": ("onnxruntime",),
    "mic": ("sounddevice",),
    "live": ("pyvirtualcam", "sounddevice"),
    "piper": ("piper",),
    "tensorrt": ("tensorrt",),
    "ray": ("ray",),
    "pipecat": ("pipecat",),
}


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install '{PACKAGE}[{extra}]'"


def missing_modules(modules: Sequence[str]) -> Tuple[str, ...]:
    """Those of ``modules`` that cannot be found (not installed, or blocked with ``sys.modules[name] = None``)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            out.append(name)
    return tuple(out)


def extra_problem(extra: str, what: Optional[str] = None, modules: Optional[Sequence[str]] = None) -> Optional[str]:
    """None when the modules of ``extra`` (or ``modules``) are installed, else one line naming the extra: "WHAT needs
    the EXTRA extra (M not installed): pip install 'mmgt-engine[EXTRA]'" ("the EXTRA extra is missing ..." without
    ``what``: the command's own name starts the error line already)."""
    missing = missing_modules(modules if modules is not None else EXTRAS[extra])
    if not missing:
        return None
    head = f"{what} needs the {extra} extra" if what else f"the {extra} extra is missing"
    return f"{head} ({', '.join(missing)} not installed): {install_hint(extra)}"


def require_extra(extra: str, what: Optional[str] = None, modules: Optional[Sequence[str]] = None) -> None:
    """Raise CLIError (one line, exit 2) when ``extra`` is missing; see :func:`extra_problem`."""
    problem = extra_problem(extra, what, modules)
    if problem:
        raise CLIError(problem)


__all__ = ["PACKAGE", "EXTRAS", "install_hint", "missing_modules", "extra_problem", "require_extra"]
