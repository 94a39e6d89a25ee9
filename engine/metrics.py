"""What a run measures, recorded apart from the stage code: the timeline, busy times, latency, and the networks called.

* ``RunReport`` -- the metrics of one run (``--metrics-json`` writes it).
* ``RunMetrics`` -- fills a report from the stage workers' ``on_item`` callbacks (engine/workers.py: every output of
  every stage with the span of its production) and, on a GPU, from CUDA-event spans (``gpu_span``), since a stage
  thread there only enqueues work and its wall-clock span says little.
* ``CallLog`` -- which network ran on which backend: a view of a model set whose executors note their network.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

FPS = 25  # frame clock (mmgt.config.FPS)
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
BUDGET_STAGES = ("audio_wait", "stage1", "stage2", "decode", "sink")  # in the order a frame goes through them


@dataclass
class LatencyEntry:
    """Where the time went for the first new frame of one render chunk, from its audio to the sink (seconds).

    audio_wait: the frame's audio is in -> the pose window of the chunk's LAST frame is ready (the audio the schedule
    makes it wait for: the rest of its chunk plus the window's lookahead); stage1: that window ready -> its poses,
    masks and tokens done (queueing included); stage2: -> the chunk denoised; decode: -> frames decoded; sink: -> the
    sink took them (encode, or a live session's queue). The five add up to ``total`` exactly."""

    chunk: int  # render chunk number
    frame: int  # its first new frame (global)
    audio_wait: float
    stage1: float
    stage2: float
    decode: float
    sink: float
    total: float  # audio in -> frames out of the engine


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
    latency: List[LatencyEntry] = field(default_factory=list)  # per chunk, where the time went (newest MAX_EVENTS)
    latency_budget: Dict[str, Dict[str, float]] = field(default_factory=dict)  # p50 / p95 of each stage (ms)
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

    def add_latency(self, entry: LatencyEntry) -> None:
        self.latency.append(entry)
        if len(self.latency) > self.MAX_EVENTS:
            del self.latency[: len(self.latency) - self.MAX_EVENTS // 2]

    def summary(self) -> str:
        return (f"{self.frames} frames ({self.media_seconds:.2f} s) in {self.wall_seconds:.2f} s: "
                f"RTF {self.real_time_factor:.2f}, {self.frames / max(self.wall_seconds, 1e-9):.1f} fps, "
                f"first frame {self.first_frame_latency * 1000:.0f} ms, stage I {self.stage1_seconds:.2f} s, "
                f"stage II {self.stage2_seconds:.2f} s, decode {self.decode_seconds:.2f} s"
                + (f"; audio->frame p50 {self.latency_budget['p50']['total']:.0f} ms "
                   f"(p95 {self.latency_budget['p95']['total']:.0f})" if self.latency_budget else ""))

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

    def __init__(self, report: RunReport, t0: float, cuda: bool, hop: int = 0):
        self.report, self.t0, self.cuda, self.hop = report, t0, cuda, hop
        self._lock = threading.Lock()
        self._gpu: List[Tuple[str, Any, Any]] = []  # (stage, began, ended) CUDA events
        self.first_audio_ready: Optional[float] = None  # perf_counter when the first window's audio was in
        # what the latency budget needs, kept for the recent past only (a live run goes on for hours)
        self._arrivals: Deque[Tuple[int, float]] = deque(maxlen=4096)  # (audio samples in, perf_counter) rising
        self._window_ready: Dict[int, float] = {}  # pose window -> perf_counter its audio was ready
        self._window_done: Dict[int, float] = {}  # pose window -> perf_counter Stage I finished it
        self._chunks: Dict[int, Dict[str, float]] = {}  # render chunk -> {"frame", "last", "stage2", "decode"}

    def audio_in(self, samples: int, when: float) -> None:
        """``samples`` of audio (all since the start) had arrived at ``when``."""
        with self._lock:
            self._arrivals.append((samples, when))

    def audio_ready(self, when: float, window: int = 0) -> None:
        """Pose window ``window`` became ready (its audio in) at ``when``."""
        with self._lock:
            if self.first_audio_ready is None:
                self.first_audio_ready = when
            self._window_ready[window] = when

    def _arrival(self, sample: int) -> Optional[float]:
        """When audio sample ``sample`` had arrived (None: before the oldest kept)."""
        if not self._arrivals:
            return None
        sample = min(sample, self._arrivals[-1][0])  # the last frame may end past the audio (it is padded)
        i = bisect.bisect_left(self._arrivals, (sample, float("-inf")))
        return self._arrivals[i][1] if i < len(self._arrivals) else None

    def on_item(self, stage: str, out: Any, start: float, end: float) -> None:
        if stage not in self.BUSY:  # the live feeder only hands windows on
            return
        index, frames = describe(out)
        with self._lock:
            self._budget(stage, out, index, end)
            self.report.add_event(StageEvent(stage, index, start - self.t0, end - self.t0, frames))
            if not (self.cuda and stage in ("stage2", "decode")):
                setattr(self.report, self.BUSY[stage], getattr(self.report, self.BUSY[stage]) + end - start)
            if stage in self.COUNT:
                setattr(self.report, self.COUNT[stage], getattr(self.report, self.COUNT[stage]) + 1)
            if stage == "sink":
                self.report.frames += frames

    def _budget(self, stage: str, out: Any, index: int, end: float) -> None:
        """Collect each chunk's milestones as its outputs pass; at the sink, one LatencyEntry (under the lock)."""
        if stage == "stage1":
            self._window_done[index] = end
        elif stage == "stage2":
            out = out.result  # the StageIIResult of Stage II's RenderedChunk
            newest = getattr(out, "newest_frame", None)  # a rolling call emits older frames than it reads
            last = newest if newest is not None else out.first_frame + max(out.emit_to, 1) - 1  # last real frame
            self._chunks[index] = {"frame": out.first_frame + out.emit_from, "last": last, "stage2": end}
        elif stage == "decode" and index in self._chunks:
            self._chunks[index]["decode"] = end
        elif stage == "sink" and index in self._chunks:
            c = self._chunks.pop(index)
            window = c["last"] // self.hop if self.hop else 0
            arrived = self._arrival((c["frame"] + 1) * SAMPLES_PER_FRAME)
            ready, done = self._window_ready.get(window), self._window_done.get(window)
            if None not in (arrived, ready, done) and "decode" in c:
                ready = max(ready, arrived)  # offline: all audio is in at the start
                self.report.add_latency(LatencyEntry(
                    chunk=index, frame=int(c["frame"]), audio_wait=ready - arrived, stage1=done - ready,
                    stage2=c["stage2"] - done, decode=c["decode"] - c["stage2"], sink=end - c["decode"],
                    total=end - arrived))
            for old in [w for w in self._window_ready if w < window - 8]:  # done with these windows
                self._window_ready.pop(old, None)
                self._window_done.pop(old, None)

    def entries(self) -> List[LatencyEntry]:
        """The latency entries so far (thread-safe copy, while the run goes on)."""
        with self._lock:
            return list(self.report.latency)

    def budget(self, last: int = 200) -> Dict[str, Dict[str, float]]:
        """The latency budget (p50 / p95 per stage, ms) over the newest ``last`` chunks, while the run goes on."""
        return budget_percentiles(self.entries()[-last:])

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
        r.latency_budget = budget_percentiles(r.latency)
        return r


def budget_percentiles(entries: List[LatencyEntry]) -> Dict[str, Dict[str, float]]:
    """{"p50": {stage: ms, ..., "total": ms}, "p95": {...}} over ``entries`` ({} when there are none)."""
    if not entries:
        return {}
    import numpy as np

    out = {}
    for name, q in (("p50", 50), ("p95", 95)):
        out[name] = {key: round(float(np.percentile([getattr(e, key) for e in entries], q)) * 1000.0, 1)
                     for key in BUDGET_STAGES + ("total",)}
    return out


def describe(out: Any) -> Tuple[int, int]:
    """(index, frames) of a stage output: a PoseWindow (window number), a StageIIResult (alone or as the ``result``
    of Stage II's RenderedChunk) or a FrameBatch (chunk number)."""
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


__all__ = ["BUDGET_STAGES", "LatencyEntry", "StageEvent", "RunReport", "steady_fps", "RunMetrics", "describe",
           "budget_percentiles", "CallLog"]
