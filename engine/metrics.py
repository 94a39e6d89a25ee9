"""What a run measures, recorded apart from the stage code: the timeline, busy times, latency, and the networks called.

* ``RunReport`` -- the metrics of one run (``--metrics-json`` writes it).
* ``RunMetrics`` -- fills a report from the stage workers' ``on_item`` callbacks (engine/workers.py: every output of
  every stage with the span of its production) and, on a GPU, from CUDA-event spans (``gpu_span``), since a stage
  thread there only enqueues work and its wall-clock span says little.
* ``CallLog`` -- which network ran on which backend: a view of a model set whose executors note their network.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

FPS = 25  # frame clock (mmgt.config.FPS)


@dataclass
class StageEvent:
    """One unit of work on the timeline: which stage, which window/chunk, when (seconds since run start)."""

    stage: str  # "stage1" (a pose window) | "stage2" (a chunk denoised) | "decode" | "sink" (frames handed over)
    index: int  # window or chunk index
    start: float
    end: float
    frames: int = 0  # frames produced (stage1: emitted poses; stage2: new frames denoised; decode/sink: frames)


@dataclass
class RunReport:
    """Metrics of one run (also written as JSON by ``--metrics-json``)."""

    frames: int = 0  # frames handed to the sink
    media_seconds: float = 0.0  # frames / fps
    audio_seconds: float = 0.0  # audio consumed
    wall_seconds: float = 0.0  # run start -> last frame out
    real_time_factor: float = 0.0  # media seconds produced per wall second (>= 1: faster than real time)
    first_frame_latency: float = 0.0  # seconds from the first window's audio being available to the first frame out
    stage1_seconds: float = 0.0  # busy time of Stage I (audio features, SMGA, drawing, masks, audio tokens)
    stage2_seconds: float = 0.0  # busy time of Stage II (pose guider + denoising; GPU time on a GPU, CUDA events)
    decode_seconds: float = 0.0  # busy time of the decoder (GPU time on a GPU, CUDA events)
    sink_seconds: float = 0.0  # time the sink took to take the frames (encode / queue)
    windows: int = 0  # pose windows run
    chunks: int = 0  # render chunks run
    av_offset_ms: float = 0.0  # |video duration - audio duration| in ms (offline) or last-frame offset (live)
    frames_dropped: int = 0  # frames a sink dropped (reported by sinks that drop)
    backends: Dict[str, str] = field(default_factory=dict)  # every network the run called -> its executor's kind
    settings: Dict = field(default_factory=dict)
    preset: str = ""
    trained: bool = True
    note: str = ""
    events: List[StageEvent] = field(default_factory=list)  # the timeline (the newest MAX_EVENTS in long runs)
    first_frame_out: float = -1.0  # seconds since run start when the first frames reached the sink
    last_frame_out: float = 0.0  # ... when the last frames did

    MAX_EVENTS = 4096  # a live stream runs for hours: keep the timeline's tail only

    def add_event(self, event: StageEvent) -> None:
        self.events.append(event)
        if len(self.events) > self.MAX_EVENTS:
            del self.events[: len(self.events) - self.MAX_EVENTS // 2]
        if event.stage == "sink":
            if self.first_frame_out < 0:
                self.first_frame_out = event.end
            self.last_frame_out = event.end

    def summary(self) -> str:
        return (f"{self.frames} frames ({self.media_seconds:.2f} s) in {self.wall_seconds:.2f} s: "
                f"RTF {self.real_time_factor:.2f}, {self.frames / max(self.wall_seconds, 1e-9):.1f} fps, "
                f"first frame {self.first_frame_latency * 1000:.0f} ms, stage I {self.stage1_seconds:.2f} s, "
                f"stage II {self.stage2_seconds:.2f} s, decode {self.decode_seconds:.2f} s")

    def to_json(self, path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(p)


def steady_fps(report: RunReport) -> float:
    """Frames per second between the first and the last frames out (the pipeline's fill time left out)."""
    sinks = [e for e in report.events if e.stage == "sink"]
    if len(sinks) < 2:
        return report.frames / max(report.wall_seconds, 1e-9)
    return (report.frames - sinks[0].frames) / max(sinks[-1].end - sinks[0].end, 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Recording a run
# ----------------------------------------------------------------------------------------------------------------
class RunMetrics:
    """Turns the stage workers' callbacks into a RunReport's timeline and busy times (thread-safe).

    Each stage output describes itself: ``index`` and ``frames`` via ``describe``. On a GPU, ``gpu_span(stage)``
    brackets the stage's work with CUDA events; their elapsed times replace the wall-clock busy times of stage2 and
    decode when the run ends (``finish``), when every event has completed."""

    BUSY = {"stage1": "stage1_seconds", "stage2": "stage2_seconds", "decode": "decode_seconds", "sink": "sink_seconds"}
    COUNT = {"stage1": "windows", "stage2": "chunks"}

    def __init__(self, report: RunReport, t0: float, cuda: bool):
        self.report, self.t0, self.cuda = report, t0, cuda
        self._lock = threading.Lock()
        self._gpu: List[Tuple[str, Any, Any]] = []  # (stage, began, ended) CUDA events
        self.first_audio_ready: Optional[float] = None  # perf_counter when the first window's audio was in

    def audio_ready(self, when: float) -> None:
        with self._lock:
            if self.first_audio_ready is None:
                self.first_audio_ready = when

    def on_item(self, stage: str, out: Any, start: float, end: float) -> None:
        index, frames = describe(out)
        with self._lock:
            self.report.add_event(StageEvent(stage, index, start - self.t0, end - self.t0, frames))
            if not (self.cuda and stage in ("stage2", "decode")):
                setattr(self.report, self.BUSY[stage], getattr(self.report, self.BUSY[stage]) + end - start)
            if stage in self.COUNT:
                setattr(self.report, self.COUNT[stage], getattr(self.report, self.COUNT[stage]) + 1)
            if stage == "sink":
                self.report.frames += frames

    @contextlib.contextmanager
    def gpu_span(self, stage: str) -> Iterator[None]:
        """On a GPU: CUDA events on the current stream around the block (resolved in ``finish``)."""
        if not self.cuda:
            yield
            return
        import torch

        began = torch.cuda.Event(enable_timing=True)
        began.record()
        yield
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        with self._lock:
            self._gpu.append((stage, began, ended))

    def finish(self, audio_samples: int, sample_rate: int, finite: bool, dropped: int) -> RunReport:
        """Fill the derived figures once the run is over."""
        r = self.report
        for stage, began, ended in self._gpu:
            ended.synchronize()
            setattr(r, self.BUSY[stage], getattr(r, self.BUSY[stage]) + began.elapsed_time(ended) / 1000)
        end = r.last_frame_out if r.frames else time.perf_counter() - self.t0
        r.wall_seconds = end
        r.media_seconds = r.frames / FPS
        r.audio_seconds = audio_samples / sample_rate
        r.real_time_factor = r.media_seconds / max(end, 1e-9)
        first_audio = (self.first_audio_ready - self.t0) if self.first_audio_ready is not None else 0.0
        r.first_frame_latency = max(r.first_frame_out, 0.0) - first_audio
        r.av_offset_ms = abs(r.media_seconds - r.audio_seconds) * 1000 if finite else 0.0
        r.frames_dropped = dropped
        return r


def describe(out: Any) -> Tuple[int, int]:
    """(index, frames) of a stage output: a PoseWindow (window number), a StageIIResult (alone or as the ``result``
    of the runner's Stage II output) or a FrameBatch (chunk number)."""
    out = getattr(out, "result", out)
    if hasattr(out, "emit_to"):  # StageIIResult: the chunk's new frames
        return int(out.index), int(out.emit_to - out.emit_from)
    return int(getattr(out, "index", -1)), int(getattr(out, "n_frames", 0))


# ----------------------------------------------------------------------------------------------------------------
# Which network ran where
# ----------------------------------------------------------------------------------------------------------------
class CallLog:
    """Notes every network called through the model sets it ``observe``s, with its executor's kind."""

    def __init__(self) -> None:
        self._kinds: Dict[str, str] = {}
        self._lock = threading.Lock()

    def observe(self, models):
        """A view of ``models`` (same modules, same executors) whose every call is noted here."""
        executors = {name: _Noted(name, ex, self) for name, ex in models.calls.items()}
        return dataclasses.replace(models, executors=executors)

    def note(self, network: str, kind: str) -> None:
        if network not in self._kinds:
            with self._lock:
                self._kinds[network] = kind

    def kinds(self) -> Dict[str, str]:
        """network -> executor kind, for every network called so far."""
        with self._lock:
            return dict(self._kinds)


class _Noted:
    """An executor that notes its network in a CallLog, then runs."""

    def __init__(self, network: str, executor: Any, log: CallLog):
        self.network, self.executor, self.log = network, executor, log
        self.kind = getattr(executor, "kind", type(executor).__name__)
        self.contract = getattr(executor, "contract", None)

    def __call__(self, feeds):
        self.log.note(self.network, self.kind)
        return self.executor(feeds)


__all__ = ["StageEvent", "RunReport", "steady_fps", "RunMetrics", "describe", "CallLog"]
