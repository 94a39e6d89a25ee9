"""`engine batch`: many long renders from a manifest, resumable, on one machine or fanned out over Ray.

    engine batch jobs.jsonl --out-dir renders/                    one job after another, models loaded once
    engine batch jobs.csv --out-dir renders/ --ray auto           one Ray task per job on a local Ray instance
    engine batch jobs.csv --out-dir /nfs/renders --ray HOST:6379 --gpus-per-job 1    an existing Ray cluster

The manifest is JSON lines (one object per line) or CSV with a header row. Every job names ``image``, ``audio`` and
``output`` (a file name: ``intro`` or ``intro.mp4``); optional per-job fields override the command's flags:
``steps``, ``guidance``, ``seed``, ``smga_steps``, ``smga_guidance``, ``window``, ``hop``, ``crossfade``, ``chunk``,
``overlap``, ``pose`` (keypoints that replace Stage I) and ``init_pose`` (the reference image's pose). Relative
paths are read against the manifest's folder. Blank lines and lines starting with ``#`` are skipped.

Every job leaves DIR/<output>.mp4 (written to a temp file, renamed only when complete) and DIR/<output>.json, its
report: status (ok / error / skipped), frames, durations, first-frame latency, real-time factor, the settings, the
model, and the sha256 of every input. A re-run skips a job whose mp4 and report are complete and whose inputs,
settings and model are unchanged, and renders the rest; a failing job is reported and the others go on. The exit
code is 0 only when every job succeeded (rendered or skipped); 1 when a job failed; 2 for a bad manifest or flag.

With ``--ray`` every job to render becomes one Ray task; each worker process loads the models once (the module
level cache below) and writes the mp4 itself, so inputs and DIR must be paths every node sees (a shared
filesystem). The driver gathers the results into the same reports. Without ``--ray`` nothing of Ray is imported.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from engine.cli import (CLIError, _add_backend_flags, _add_model_flags, _add_settings_flags, _load_models,
                        _read_image, _settings_from, _setup_logging)
from engine.settings import OFFLINE, RenderSettings

log = logging.getLogger(__name__)

REPORT_VERSION = 1
STATUSES = ("ok", "error", "skipped")
# manifest fields: kind of value, and the smallest allowed number for the numeric ones
_PATH_FIELDS = ("image", "audio", "pose", "init_pose")
_INT_FIELDS = {"steps": 1, "smga_steps": 1, "seed": 0, "window": 1, "hop": 1, "crossfade": 0, "chunk": 1,
               "overlap": 0}
_FLOAT_FIELDS = {"guidance": 0.0, "smga_guidance": 0.0}
REQUIRED_FIELDS = ("image", "audio", "output")
MANIFEST_FIELDS = ("image", "audio", "output", "pose", "init_pose", *_INT_FIELDS, *_FLOAT_FIELDS)


# ----------------------------------------------------------------------------------------------------------------
# 1. Manifest
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# 2. Fingerprints and reports
# ----------------------------------------------------------------------------------------------------------------
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
    from mmgt.config import DEFAULT_PRESET

    weights = str(Path(args.weights).resolve()) if getattr(args, "weights", None) else None
    backend = getattr(args, "backend", "torch")
    artifacts = getattr(args, "artifacts", None)
    return {"preset": "mmgt" if weights else (args.preset or DEFAULT_PRESET), "weights": weights,
            "dtype": args.dtype, "backend": backend,
            "artifacts": str(Path(artifacts).resolve()) if artifacts and backend != "torch" else None}


def _write_json(path: Path, data: Dict[str, Any]) -> None:
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


# ----------------------------------------------------------------------------------------------------------------
# 3. One job, in whatever process runs it (this one, or a Ray worker)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class JobPayload:
    """Everything a process needs to render one job (picklable: shipped to Ray workers as is)."""

    name: str
    image: str
    audio: str
    pose: Optional[str]
    init_pose: Optional[str]
    output: str  # absolute path of the mp4
    settings: RenderSettings
    model_args: argparse.Namespace  # the model flags, for engine.cli._load_models
    threads: Optional[int] = None  # torch CPU threads (None: leave the process's setting)


# One model set per process, keyed by its flags (a Ray worker keeps it across the tasks it runs), and the avatars
# (reference features) of the last few images, keyed by path + mtime: a repeated image is prepared once.
_MODELS: Dict[tuple, Any] = {}
_AVATARS: "OrderedDict[tuple, Any]" = OrderedDict()
_AVATAR_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()
_MODEL_KEYS = ("preset", "weights", "device", "dtype", "backend", "artifacts", "tiny_decoder", "compile", "cuda_graphs")
_SPEED_KEYS = ("compile", "cuda_graphs")  # applied per CFG layout of a job (_accelerated), not at load


def _model_key(model_args: argparse.Namespace) -> tuple:
    return tuple(str(getattr(model_args, k, None)) for k in _MODEL_KEYS)


def cached_models(model_args: argparse.Namespace) -> Tuple[Any, float]:
    """(ModelSet, seconds spent loading: 0 when cached). Loading other flags drops the previous set first."""
    key = _model_key(model_args)
    with _CACHE_LOCK:
        if key in _MODELS:
            return _MODELS[key], 0.0
        _MODELS.clear()  # one model set per process: free the old one before loading the next
        _AVATARS.clear()
        _ACCELERATED.clear()
        t = time.perf_counter()
        base = argparse.Namespace(**{**vars(model_args), **{k: False for k in _SPEED_KEYS}})
        models = _load_models(base)
        _MODELS[key] = models
        return models, time.perf_counter() - t


# Compiled / CUDA-graphed denoisers of the current model set, one per CFG layout (jobs may switch guidance on or
# off: the layout is part of the compiled shape), each warmed up once on the first job that needs it.
_ACCELERATED: Dict[bool, Any] = {}


def _accelerated(models, model_args: argparse.Namespace, settings: RenderSettings, avatar) -> Tuple[Any, float]:
    """(the job's ModelSet with --compile / --cuda-graphs applied, warm-up seconds paid now: 0 when cached)."""
    if not any(getattr(model_args, k, False) for k in _SPEED_KEYS):
        return models, 0.0
    from engine.backends import BackendUnavailable, accelerate
    from engine.runner import Runner

    guidance = models.cfg.sampler.guidance if settings.guidance is None else settings.guidance
    layout = guidance != 1.0
    with _CACHE_LOCK:
        if layout in _ACCELERATED:
            return _ACCELERATED[layout], 0.0
        try:
            fast = accelerate(models, settings, compile=getattr(model_args, "compile", None) or False,
                              cuda_graphs=bool(getattr(model_args, "cuda_graphs", False)))
        except BackendUnavailable as e:
            raise CLIError(f"--cuda-graphs: {e}") from e
        seconds = Runner(fast, avatar, settings).warm_up()
        _ACCELERATED[layout] = fast
        return fast, seconds


def _file_key(p: Optional[Path]) -> Optional[tuple]:
    if p is None:
        return None
    st = p.stat()
    return str(p.resolve()), st.st_mtime_ns, st.st_size


def cached_avatar(models, model_args: argparse.Namespace, image_path: Path, image, init_pose: Optional[Path]):
    """prepare_avatar once per (model, image path + mtime, initial pose file); LRU of the last few images."""
    from mmgt import pipeline as P

    key = (_model_key(model_args), _file_key(image_path), _file_key(init_pose))
    with _CACHE_LOCK:
        if key in _AVATARS:
            _AVATARS.move_to_end(key)
            log.debug("avatar of %s: cached", image_path)
            return _AVATARS[key]
    avatar = P.prepare_avatar(models, image, pose_file=init_pose, weights_dir=getattr(model_args, "weights", None))
    with _CACHE_LOCK:
        _AVATARS[key] = avatar
        while len(_AVATARS) > _AVATAR_CACHE_SIZE:
            _AVATARS.popitem(last=False)
    return avatar


def _remove_stale_parts(mp4: Path) -> None:
    """Temp files a hard-killed render of this output left behind (Mp4Sink names them .<name>.mp4.*.part)."""
    for part in mp4.parent.glob(f".{mp4.name}.*.part"):
        with contextlib.suppress(OSError):
            part.unlink()
            log.info("removed %s, left by an interrupted render", part)


BarFactory = Callable[[int], Any]  # total frames -> a tqdm-like context manager with update(n)


def _render(p: JobPayload, bar_factory: Optional[BarFactory]) -> Dict[str, Any]:
    from engine.runner import Runner
    from engine.scheduler import frames_for_samples
    from engine.sinks import Mp4Sink
    from mmgt.audio_io import load_audio
    from mmgt.keypoints import load_pose_file

    out = Path(p.output)
    _remove_stale_parts(out)
    if p.threads:  # CPU sums depend on the thread count: equal counts give equal frames
        import torch

        torch.set_num_threads(p.threads)
    # 1. inputs first: a bad file fails before a model is loaded
    image = _read_image(Path(p.image))
    audio = load_audio(p.audio)  # (N,) float32 16 kHz; AudioError names the file
    poses = None
    if p.pose:
        try:
            poses = load_pose_file(p.pose)  # (F, 134, 3)
        except (OSError, ValueError) as e:
            raise JobInputError(f"pose file {p.pose}: {e}") from e
    # 2. models and reference features, cached in this process
    models, load_seconds = cached_models(p.model_args)
    init_pose = Path(p.init_pose) if p.init_pose else None
    avatar = cached_avatar(models, p.model_args, Path(p.image), image, init_pose)
    models, warmup_seconds = _accelerated(models, p.model_args, p.settings, avatar)
    # 3. the render: Mp4Sink writes a temp file and renames it over `out` only when complete
    runner = Runner(models, avatar, p.settings, poses=poses)
    sink = Mp4Sink(out, audio)
    bar = bar_factory(frames_for_samples(len(audio))) if bar_factory else contextlib.nullcontext()
    with bar:
        report = runner.run(audio, sink, progress=getattr(bar, "update", None))
    metrics = {k: v for k, v in asdict(report).items() if k not in ("events", "settings")}
    return {"frames": report.frames, "duration_seconds": report.media_seconds, "audio_seconds": report.audio_seconds,
            "first_frame_latency": report.first_frame_latency, "real_time_factor": report.real_time_factor,
            "output_bytes": out.stat().st_size, "metrics": metrics, "pose_method": avatar.pose_method,
            "device": str(models.device), "compute_dtype": str(models.dtype).replace("torch.", ""),
            "model_load_seconds": load_seconds, "warmup_seconds": warmup_seconds}


def _error_message(e: BaseException) -> str:
    from mmgt.audio_io import AudioError

    known = (CLIError, JobInputError, AudioError, FileNotFoundError, ValueError)
    return str(e) if isinstance(e, known) and str(e) else f"{type(e).__name__}: {e}"


def run_job(p: JobPayload, bar_factory: Optional[BarFactory] = None) -> Dict[str, Any]:
    """Render one job; returns its outcome (status ok or error with a message, metrics, worker). Any exception but
    KeyboardInterrupt becomes status "error": one job's failure never stops a batch."""
    t0 = time.perf_counter()
    outcome: Dict[str, Any] = {"status": "error", "error": None,
                               "worker": {"host": socket.gethostname(), "pid": os.getpid()}}
    try:
        result = _render(p, bar_factory)
        outcome["worker"].update({k: result.pop(k) for k in ("device", "compute_dtype", "model_load_seconds",
                                                              "warmup_seconds")})
        outcome.update(result, status="ok")
    except Exception as e:  # noqa: BLE001 - reported per job
        outcome["error"] = _error_message(e)
        log.warning("job %s failed: %s", p.name, outcome["error"])
        log.debug("job %s", p.name, exc_info=True)
    outcome["wall_seconds"] = time.perf_counter() - t0
    return outcome


def _ray_task(p: JobPayload) -> Dict[str, Any]:
    """The Ray task body: one job in a worker process (models cached in that process)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_job(p)


# ----------------------------------------------------------------------------------------------------------------
# 4. The batch: plan (skip / fail early / render), run locally or on Ray, report
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    job: Job
    mp4: Path
    report_path: Path
    settings: RenderSettings
    inputs: Dict[str, Dict[str, Any]]
    fingerprint: str
    report: Optional[Dict[str, Any]] = None  # set once the job's outcome is known


def _base_report(item: _Item, model: Dict[str, Any]) -> Dict[str, Any]:
    return {"version": REPORT_VERSION, "name": item.job.name, "manifest_line": item.job.line,
            "output": str(item.mp4), "settings": asdict(item.settings), "model": model, "inputs": item.inputs,
            "fingerprint": item.fingerprint}


def _finish(item: _Item, model: Dict[str, Any], outcome: Dict[str, Any]) -> None:
    rep = _base_report(item, model)
    rep.update({"status": outcome["status"], "error": outcome.get("error"), "frames": 0, "duration_seconds": 0.0,
                "audio_seconds": 0.0, "wall_seconds": 0.0, "first_frame_latency": None, "real_time_factor": None,
                "output_bytes": None})
    rep.update({k: v for k, v in outcome.items() if k != "status"})
    rep["rendered_at" if rep["status"] == "ok" else "failed_at"] = _now()
    if rep["status"] == "error":
        rep["output_bytes"] = None  # an mp4 there, if any, is from an earlier run and not this report's
    _write_json(item.report_path, rep)
    item.report = rep


def _plan(jobs: List[Job], out_dir: Path, base: RenderSettings, model: Dict[str, Any], force: bool) -> List[_Item]:
    """Digest every input; settle skipped jobs and jobs with a missing input at once (their reports written)."""
    items = []
    for job in jobs:
        settings = job.settings(base)
        mp4, report_path = out_dir / f"{job.name}.mp4", out_dir / f"{job.name}.json"
        try:
            inputs = {role: file_digest(p, role) for role, p in job.inputs().items()}
        except JobInputError as e:
            item = _Item(job, mp4, report_path, settings, {}, "")
            log.warning("job %s (manifest line %d): %s", job.name, job.line, e)
            _finish(item, model, {"status": "error", "error": str(e)})
            items.append(item)
            continue
        item = _Item(job, mp4, report_path, settings, inputs, fingerprint(inputs, settings, model))
        prev = None if force else complete_report(mp4, report_path, item.fingerprint)
        if prev is not None:
            rep = dict(prev, status="skipped", skipped_at=_now(), manifest_line=job.line, inputs=inputs)
            _write_json(report_path, rep)
            item.report = rep
            log.info("job %s: %s is complete and up to date; skipped", job.name, mp4)
        items.append(item)
    return items


def _payload(item: _Item, model_args: argparse.Namespace, threads: Optional[int]) -> JobPayload:
    j = item.job
    return JobPayload(name=j.name, image=str(j.image), audio=str(j.audio), pose=str(j.pose) if j.pose else None,
                      init_pose=str(j.init_pose) if j.init_pose else None, output=str(item.mp4),
                      settings=item.settings, model_args=model_args, threads=threads)


def _model_args(args) -> argparse.Namespace:
    """Only what _load_models reads (the parsed args also hold the subcommand's function)."""
    keys = _MODEL_KEYS + ("steps", "guidance", "smga_steps", "smga_guidance", "seed", "window", "hop", "crossfade",
                          "chunk", "overlap")
    return argparse.Namespace(**{k: getattr(args, k, None) for k in keys})


def _run_local(todo: List[_Item], model: Dict[str, Any], model_args, jobs_bar, args) -> None:
    from tqdm import tqdm

    for item in todo:
        def bar(total: int, name=item.job.name):
            return tqdm(total=total, unit="frame", desc=name, position=1, leave=False,
                        disable=getattr(args, "quiet", False) or None)

        outcome = run_job(_payload(item, model_args, args.threads), bar)
        _finish(item, model, outcome)
        jobs_bar.update(1)


def _ray_connect(address: str, num_cpus: int) -> bool:
    """Connect to (or, for "auto", start) Ray; True when this call started it (so the batch shuts it down)."""
    try:
        import ray
    except ImportError as e:
        raise CLIError(f"--ray needs Ray, an optional extra: pip install 'ray>=2.9' ({e})") from e
    if ray.is_initialized():
        return False
    try:
        if address == "auto":  # a new local instance on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:  # an existing cluster: "HOST:6379" or "ray://HOST:10001"
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise CLIError(f"--ray {address}: cannot start or reach a Ray cluster ({e})") from e
    return True


def _run_ray(todo: List[_Item], model: Dict[str, Any], model_args, jobs_bar, args) -> None:
    import ray

    started = _ray_connect(args.ray, args.ray_num_cpus)
    try:
        # max_retries: a crashed worker (node lost, OOM kill) is retried; a Python error is reported, not retried
        task = ray.remote(_ray_task).options(num_cpus=args.cpus_per_job, num_gpus=args.gpus_per_job, max_retries=2,
                                             name="mmgt-batch-job")
        have = ray.cluster_resources()
        if args.gpus_per_job > have.get("GPU", 0) or args.cpus_per_job > have.get("CPU", 0):
            log.warning("no node of the Ray cluster offers %g GPU(s) and %g CPU(s) now (cluster total: %g GPU, "
                        "%g CPU); the jobs wait until one joins", args.gpus_per_job, args.cpus_per_job,
                        have.get("GPU", 0), have.get("CPU", 0))
        # a worker's torch threads: --threads, else its CPU share (Ray sets OMP_NUM_THREADS alike)
        threads = args.threads or max(1, int(args.cpus_per_job))
        refs = {task.remote(_payload(item, model_args, threads)): item for item in todo}
        log.info("submitted %d jobs to Ray (%s)", len(refs), args.ray)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the task died (not a job error: those are returned)
                        outcome = {"status": "error", "error": f"Ray task failed: {e}"}
                    _finish(refs[ref], model, outcome)
                    jobs_bar.update(1)
        except KeyboardInterrupt:
            # a cancelled task gets KeyboardInterrupt in its worker: the runner discards its temp mp4
            for ref in pending:
                ray.cancel(ref)
            with contextlib.suppress(Exception):
                ray.wait(pending, num_returns=len(pending), timeout=30)
            raise
    finally:
        if started:
            ray.shutdown()


def format_summary(items: List[_Item], out_dir: Path) -> str:
    """The table printed at the end: one row per job, then the counts."""
    rows = [("JOB", "STATUS", "FRAMES", "MEDIA S", "WALL S", "RTF", "1ST FRAME", "ERROR")]
    counts = {s: 0 for s in STATUSES}
    pending = 0
    for it in items:
        r = it.report
        if r is None:
            rows.append((it.job.name, "not run", "", "", "", "", "", ""))
            pending += 1
            continue
        counts[r["status"]] += 1
        ok = r["status"] != "error"
        ffl = r.get("first_frame_latency")
        rows.append((it.job.name, r["status"], str(r.get("frames", 0)) if ok else "-",
                     f"{r.get('duration_seconds', 0):.2f}" if ok else "-",
                     f"{r.get('wall_seconds', 0):.2f}" if r["status"] == "ok" else "-",
                     f"{r.get('real_time_factor') or 0:.2f}" if ok else "-",
                     f"{ffl * 1000:.0f} ms" if ok and ffl is not None else "-", r.get("error") or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row) -> str:  # names and statuses left-aligned, numbers right-aligned, the error as it is
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row[:-1], widths))]
        return "  ".join([*cells, row[-1]]).rstrip()

    tail = (f"{len(items)} job{'s' if len(items) != 1 else ''}: {counts['ok']} rendered, "
            f"{counts['skipped']} skipped, {counts['error']} failed")
    if pending:
        tail += f", {pending} not run"
    return "\n".join([*(line(row) for row in rows), f"{tail} (reports in {out_dir})"])


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so the runner discards the temp mp4 of the job in
    progress; a second SIGTERM kills at once (its temp file is removed by the next run of that job)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_batch(args) -> Tuple[int, List[_Item]]:
    """The whole command: (exit code, items with their reports). Prints the summary table."""
    from tqdm import tqdm

    # 1. manifest, output folder, settings: every problem here is a one-line error before any work
    jobs = read_manifest(args.manifest)
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out-dir {out_dir}: cannot create it ({e.strerror or e})") from e
    if not os.access(out_dir, os.W_OK):
        raise CLIError(f"--out-dir {out_dir}: not writable")
    out_dir = out_dir.resolve()
    model = model_identity(args)
    base = _settings_from(args, OFFLINE)
    # 2. plan: digests, skips, missing inputs
    items = _plan(jobs, out_dir, base, model, args.force)
    todo = [it for it in items if it.report is None]
    log.info("%d jobs: %d to render, %d settled already", len(items), len(todo), len(items) - len(todo))
    quiet = getattr(args, "quiet", False)
    # 3. render
    try:
        with tqdm(total=len(items), initial=len(items) - len(todo), unit="job", desc="batch", position=0,
                  disable=quiet or None) as jobs_bar:
            if todo and args.ray:
                _run_ray(todo, model, _model_args(args), jobs_bar, args)
            elif todo:
                _run_local(todo, model, _model_args(args), jobs_bar, args)
    except KeyboardInterrupt:
        print(format_summary(items, out_dir), flush=True)
        raise
    print(format_summary(items, out_dir), flush=True)
    failed = sum(1 for it in items if it.report["status"] == "error")
    return (1 if failed else 0), items


def cmd_batch(args) -> int:
    """`engine batch`: exit code 0 when every job is rendered or skipped, 1 when one failed."""
    if args.gpus_per_job < 0 or args.cpus_per_job < 0 or args.ray_num_cpus < 1 or (args.threads or 1) < 1:
        raise CLIError("--gpus-per-job and --cpus-per-job must be >= 0, --ray-num-cpus and --threads >= 1")
    if args.gpus_per_job and not args.ray:
        log.warning("--gpus-per-job applies to Ray tasks only; without --ray jobs run here on --device")
    with sigterm_as_interrupt():
        return run_batch(args)[0]


# ----------------------------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------------------------
def _add_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, metavar="MANIFEST",
                   help="jobs: JSON lines or CSV with image, audio, output (+ optional per-job settings)")
    p.add_argument("--out-dir", type=Path, required=True, help="where <output>.mp4 and <output>.json go")
    p.add_argument("--force", action="store_true", help="render every job again, even complete ones")
    r = p.add_argument_group("Ray (optional extra: pip install 'ray>=2.9')")
    r.add_argument("--ray", metavar="ADDRESS|auto",
                   help="fan jobs out as Ray tasks: 'auto' starts a local Ray instance on this machine; an address "
                        "(HOST:6379, ray://HOST:10001) joins an existing cluster. Inputs and --out-dir must be on "
                        "storage every node sees")
    r.add_argument("--gpus-per-job", type=float, default=0.0, help="GPUs each Ray task asks for (0: CPU only)")
    r.add_argument("--cpus-per-job", type=float, default=1.0, help="CPUs each Ray task asks for")
    r.add_argument("--ray-num-cpus", type=int, default=2,
                   help="CPUs of the local instance that --ray auto starts (jobs at once = this / --cpus-per-job)")
    _add_model_flags(p)
    _add_settings_flags(p, OFFLINE)
    _add_backend_flags(p)


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Register `engine batch` on the CLI's subparsers."""
    p = subparsers.add_parser("batch", help="render many jobs from a manifest (resumable; optional Ray fan-out)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_batch_args(p)
    p.set_defaults(func=cmd_batch)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m engine.batch MANIFEST --out-dir DIR ...`: the batch command on its own (same flags and exit
    codes as `engine batch`)."""
    ap = argparse.ArgumentParser(prog="engine batch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    _add_batch_args(ap)
    args = ap.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return cmd_batch(args)
    except CLIError as e:
        print(f"engine batch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("engine batch: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
