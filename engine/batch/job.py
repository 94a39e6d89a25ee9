"""One batch job, in whatever process runs it (the batch's own, or a Ray worker): inputs, the model set and avatar
cached in that process, the render, and the outcome the report is made of.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from engine.batch.fingerprint import JobInputError
from engine.models import accelerate_models, load_model_set, prepare_avatar
from engine.options import CLIError, read_image, settings_from
from engine.settings import OFFLINE, RenderSettings

log = logging.getLogger(__name__)


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
    model_args: argparse.Namespace  # the model and settings flags, for engine.models.load_model_set
    threads: Optional[int] = None  # torch CPU threads (None: leave the process's setting)
    audio_bitrate: Optional[int] = None  # AAC bits/s of the video's audio (None: copy the source's, or by channels)
    restart: bool = False  # ignore what an interrupted render of this job kept beside its mp4 (--force)


# One model set per process, keyed by its flags (a Ray worker keeps it across the tasks it runs), and the avatars
# (reference features) of the last few images, keyed by path + mtime: a repeated image is prepared once.
_MODELS: Dict[tuple, Any] = {}
_AVATARS: "OrderedDict[tuple, Any]" = OrderedDict()
_AVATAR_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()
MODEL_KEYS = ("preset", "weights", "device", "dtype", "backend", "artifacts", "tiny_decoder", "compile", "cuda_graphs")
_SPEED_KEYS = ("compile", "cuda_graphs")  # applied per CFG layout of a job (_accelerated), not at load


def _model_key(model_args: argparse.Namespace) -> tuple:
    return tuple(str(getattr(model_args, k, None)) for k in MODEL_KEYS)


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
        models = load_model_set(base, settings_from(base, OFFLINE))
        _MODELS[key] = models
        return models, time.perf_counter() - t


# Compiled / CUDA-graphed model sets of the current models, one per call shapes (jobs may switch guidance on or off
# or change the chunk: that is part of the compiled shapes), each warmed up once on the first job that needs it.
_ACCELERATED: Dict[Any, Any] = {}


def _accelerated(models, model_args: argparse.Namespace, settings: RenderSettings, avatar) -> Tuple[Any, float]:
    """(the job's ModelSet with --compile / --cuda-graphs applied, warm-up seconds paid now: 0 when cached)."""
    if not any(getattr(model_args, k, False) for k in _SPEED_KEYS):
        return models, 0.0
    import dataclasses

    from engine.runner import Runner
    from mmgt.contract import Shapes

    layout = Shapes.from_settings(models.cfg, settings)
    with _CACHE_LOCK:
        if layout in _ACCELERATED:
            return _ACCELERATED[layout], 0.0
        fast = accelerate_models(dataclasses.replace(models, shapes=layout),
                                 compile=getattr(model_args, "compile", None) or False,
                                 cuda_graphs=bool(getattr(model_args, "cuda_graphs", False)))
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
    key = (_model_key(model_args), _file_key(image_path), _file_key(init_pose))
    with _CACHE_LOCK:
        if key in _AVATARS:
            _AVATARS.move_to_end(key)
            log.debug("avatar of %s: cached", image_path)
            return _AVATARS[key]
    avatar = prepare_avatar(models, image, pose_file=init_pose, weights_dir=getattr(model_args, "weights", None))
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
    from engine.models import ModelOptions
    from engine.options import read_audio
    from engine.resume import ResumableMp4Sink, Sidecar, fingerprint, model_identity
    from engine.runner import Runner
    from engine.scheduler import frames_for_samples
    from mmgt.keypoints import load_pose_file

    out = Path(p.output)
    _remove_stale_parts(out)
    if p.threads:  # CPU sums depend on the thread count: equal counts give equal frames
        import torch

        torch.set_num_threads(p.threads)
    # 1. inputs first: a bad file fails before a model is loaded
    image = read_image(Path(p.image))
    audio, source = read_audio(Path(p.audio))  # (N,) float32 16 kHz; the source's own audio for the mp4
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
    # 3. the render: segments beside `out` (a killed job continues from its last one), joined into `out` at the end
    runner = Runner(models, avatar, p.settings, poses=poses)
    sidecar = Sidecar(out)
    inputs = {"image": p.image, "audio": p.audio, "pose": p.pose, "init_pose": p.init_pose}
    key = fingerprint(inputs, p.settings, model_identity(ModelOptions.from_args(p.model_args), models))
    saved = sidecar.load(key) if sidecar.exists() and not p.restart else None
    start = saved.point if saved is not None else None
    if start is not None:
        log.info("job %s: resuming from frame %d (%s)", p.name, start.frame, sidecar.dir)
    sink = ResumableMp4Sink(out, source, sidecar, key, saved, audio_bitrate=p.audio_bitrate)
    bar = bar_factory(frames_for_samples(len(audio))) if bar_factory else contextlib.nullcontext()
    with bar:
        if start is not None and hasattr(bar, "update"):
            bar.update(start.frame)
        report = runner.run(audio, sink, progress=getattr(bar, "update", None), start=start)
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



__all__ = ["JobPayload", "MODEL_KEYS", "cached_models", "cached_avatar", "run_job", "BarFactory"]
