"""The jobs of `engine batch`: a JSON lines or CSV manifest -> validated :class:`Job` values.

Every problem is a :class:`ManifestError` naming the file, the line and the field; nothing here touches a model.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from engine.options import CLIError
from engine.settings import RenderSettings

# manifest fields: kind of value, and the smallest allowed number for the numeric ones
_PATH_FIELDS = ("image", "audio", "pose", "init_pose")
_INT_FIELDS = {"steps": 1, "smga_steps": 1, "seed": 0, "window": 1, "hop": 1, "crossfade": 0, "chunk": 1,
               "overlap": 0}
_FLOAT_FIELDS = {"guidance": 0.0, "smga_guidance": 0.0}
REQUIRED_FIELDS = ("image", "audio", "output")
MANIFEST_FIELDS = ("image", "audio", "output", "pose", "init_pose", *_INT_FIELDS, *_FLOAT_FIELDS)


class ManifestError(CLIError):
    """The manifest cannot be read; the message names the file, the line and the problem."""


@dataclass
class Job:
    """One manifest line: inputs (absolute paths), output name, and the settings it overrides."""

    line: int  # line of the manifest the job came from (1-based)
    name: str  # output name without .mp4: DIR/<name>.mp4 and DIR/<name>.json
    image: Path
    audio: Path
    pose: Optional[Path] = None  # pose-driven mode: (F, 134, 3) keypoints instead of Stage I
    init_pose: Optional[Path] = None  # the reference image's pose instead of DWPose / the template
    overrides: Dict[str, Any] = field(default_factory=dict)  # RenderSettings fields set by this job

    def settings(self, base: RenderSettings) -> RenderSettings:
        return base.with_(**self.overrides)

    def inputs(self) -> Dict[str, Path]:
        """The files the job reads, by role (only those it names)."""
        return {role: p for role in _PATH_FIELDS if (p := getattr(self, role)) is not None}


def _convert(key: str, value: Any, where: str) -> Any:
    """One manifest value -> its Python value (CSV cells arrive as strings, JSON values as they are)."""
    if key in _PATH_FIELDS or key == "output":
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        return value.strip()
    if isinstance(value, bool):
        raise ManifestError(f"{where}: {key!r} must be a number, got {value!r}")
    if key in _INT_FIELDS:
        try:
            v = int(value.strip()) if isinstance(value, str) else value
        except ValueError:
            v = None
        if not isinstance(v, int):
            raise ManifestError(f"{where}: {key!r} must be an integer, got {value!r}")
        if v < _INT_FIELDS[key]:
            raise ManifestError(f"{where}: {key!r} must be >= {_INT_FIELDS[key]}, got {v}")
        return v
    try:
        v = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: {key!r} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < _FLOAT_FIELDS[key]:
        raise ManifestError(f"{where}: {key!r} must be a finite number >= {_FLOAT_FIELDS[key]}, got {value!r}")
    return v


def _output_name(raw: str, where: str) -> str:
    name = raw[:-4] if raw.lower().endswith(".mp4") else raw
    if not name or "/" in name or "\\" in name or name.startswith(".") or name in ("..",):
        raise ManifestError(f"{where}: 'output' must be a plain file name such as 'talk01' or 'talk01.mp4' "
                            f"(no folders, not hidden), got {raw!r}")
    return name


def _job_from_record(record: Dict[str, Any], line: int, path: Path) -> Job:
    where = f"{path} line {line}"
    keys = {str(k).strip().lower(): v for k, v in record.items()}
    unknown = sorted(k for k in keys if k not in MANIFEST_FIELDS)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(MANIFEST_FIELDS)}")
    values = {k: _convert(k, v, where) for k, v in keys.items() if v is not None and v != ""}
    missing = [k for k in REQUIRED_FIELDS if k not in values]
    if missing:
        raise ManifestError(f"{where}: missing {', '.join(map(repr, missing))} (every job needs image, audio, output)")
    base = path.resolve().parent

    def resolve(p: Optional[str]) -> Optional[Path]:
        if p is None:
            return None
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    overrides = {k: v for k, v in values.items() if k in _INT_FIELDS or k in _FLOAT_FIELDS}
    return Job(line=line, name=_output_name(values["output"], where), image=resolve(values["image"]),
               audio=resolve(values["audio"]), pose=resolve(values.get("pose")),
               init_pose=resolve(values.get("init_pose")), overrides=overrides)


def _jsonl_records(text: str, path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{path} line {n}: expected a JSON object like "
                                f'{{"image": ..., "audio": ..., "output": ...}}, got {type(obj).__name__}')
        yield n, obj


def _csv_records(text: str, path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = [h.strip().lower() for h in (reader.fieldnames or []) if h is not None]
    if not header:
        return
    unknown = [h for h in header if h not in MANIFEST_FIELDS]
    if unknown:
        raise ManifestError(f"{path} line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(MANIFEST_FIELDS)}")
    for row in reader:
        n = reader.line_num
        if None in row:  # more cells than header columns: DictReader files them under the key None
            raise ManifestError(f"{path} line {n}: {len(header) + len(row[None])} cells but the header has "
                                f"{len(header)} columns")
        cells = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        if not any(cells.values()):
            continue  # a blank row
        first = next(iter(cells.values())) or ""
        if first.startswith("#"):
            continue
        yield n, cells


def read_manifest(path: Path) -> List[Job]:
    """Jobs of a JSONL (.jsonl/.ndjson/.json) or CSV manifest (other suffixes: sniffed); ManifestError names the
    line of the first problem. Output names must be unique."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e})") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        is_json = True
    elif suffix == ".csv":
        is_json = False
    else:  # the first line that is not blank or a comment: a JSON object, or a CSV header
        first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
        is_json = first.startswith("{")
    records = _jsonl_records(text, path) if is_json else _csv_records(text, path)
    jobs: List[Job] = []
    seen: Dict[str, int] = {}
    for n, record in records:
        job = _job_from_record(record, n, path)
        if job.name in seen:
            raise ManifestError(f"{path} line {n}: output {job.name!r} is already written by line {seen[job.name]}")
        seen[job.name] = n
        jobs.append(job)
    if not jobs:
        raise ManifestError(f"{path}: no jobs (expected {'JSON lines' if is_json else 'CSV rows'} with "
                            "image, audio, output)")
    return jobs


__all__ = ["ManifestError", "Job", "read_manifest", "REQUIRED_FIELDS", "MANIFEST_FIELDS"]
