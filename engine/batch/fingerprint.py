"""What makes a batch job complete: the digests of its inputs, the fingerprint of everything that decides its frames,
and the report a finished job leaves (a re-run skips a job whose report and mp4 match the fingerprint).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from engine.settings import RenderSettings


class JobInputError(Exception):
    """An input file of a job is missing or unreadable (the message names the role and the file)."""


def file_digest(path: Path, role: str = "input") -> Dict[str, Any]:
    """{"path", "bytes", "sha256"} of an input file; JobInputError if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise JobInputError(f"{role} file not found: {path}") from None
    except IsADirectoryError:
        raise JobInputError(f"{role} path is a directory, not a file: {path}") from None
    except OSError as e:
        raise JobInputError(f"{role} file cannot be read: {path} ({e.strerror or e})") from None
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def fingerprint(inputs: Dict[str, Dict[str, Any]], settings: RenderSettings, model: Dict[str, Any]) -> str:
    """What decides the frames: input contents (not their paths), the run settings and the model."""
    key = {"inputs": {role: d["sha256"] for role, d in sorted(inputs.items())}, "settings": asdict(settings),
           "model": model}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def model_identity(args) -> Dict[str, Any]:
    """The model flags that change the frames (the device does not: a job rendered on a GPU is done on a CPU too)."""
    from engine.models import ModelOptions

    weights = str(Path(args.weights).resolve()) if getattr(args, "weights", None) else None
    backend = getattr(args, "backend", "torch")
    artifacts = getattr(args, "artifacts", None)
    return {"preset": ModelOptions.from_args(args).preset_name, "weights": weights,
            "dtype": args.dtype, "backend": backend,
            "artifacts": str(Path(artifacts).resolve()) if artifacts and backend != "torch" else None}


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Atomic: a reader (or a killed batch) never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def complete_report(mp4: Path, report_path: Path, fp: str) -> Optional[Dict[str, Any]]:
    """The previous report when the job is done for this fingerprint: report ok/skipped, same fingerprint, and the
    mp4 there with the size the report recorded. None means the job must be rendered."""
    rep = _read_json(report_path)
    if not rep or rep.get("status") not in ("ok", "skipped") or rep.get("fingerprint") != fp:
        return None
    try:
        size = mp4.stat().st_size
    except OSError:
        return None
    return rep if size == rep.get("output_bytes") else None


__all__ = ["JobInputError", "file_digest", "fingerprint", "model_identity", "write_json", "complete_report"]
