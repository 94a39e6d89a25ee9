"""The overlapped executor: plan -> Stage I -> Stage II -> sink.

Two workers joined by a bounded queue (DESIGN.md, "Data, as it flows"):

* Stage I (a thread): takes pose windows from the scheduler as their audio arrives, runs the SMGA audio condition and
  pose diffusion, blends the seam with the previous window, draws pose frames and motion masks and computes the
  MM-HAA audio tokens; one ``PoseWindow`` per window (its emitted frames only) goes into the queue.
* Stage II (the calling thread): cuts the pose frames into fixed-size render chunks and denoises each chunk with
  the final latents of its overlap frames taken over from the previous chunk.
* Decode (a thread): decodes each chunk's new frames and hands them to the sink at once as a ``FrameBatch``, while
  Stage II already denoises the next chunk (the VAE and the sink's encoder stay off the denoiser's critical path).

So Stage I of window k+1 runs while Stage II renders window k, and frames leave chunk by chunk. On a GPU each worker
issues its work on its own CUDA stream, so one stage's host sync (poses or frames to the CPU) never waits for another
stage's queued kernels. Every run records first-frame latency, real-time factor, per-stage times and a timeline of
stage events (``RunReport``). ``Runner.warm_up`` pays first-call costs (allocation, torch.compile, CUDA-graph capture)
before a run, outside its latency.
"""
from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from mmgt import keypoints as K
from mmgt import pipeline as P
from mmgt.config import AUDIO_SAMPLE_RATE, FPS

from .scheduler import (RenderChunk, StreamChunkPlanner, StreamPlanner, Window, crossfade_weights, frames_for_samples,
                        plan_windows)
from .settings import OFFLINE, RenderSettings
from .types import AudioChunk, FrameBatch, FrameSink, PoseWindow, RunMeta

log = logging.getLogger(__name__)

_DONE = object()  # end-of-stream marker in the Stage I -> Stage II queue


class _Pump:
    """Runs an iterator in a worker thread, handing its items over through a bounded queue.

    The consumer iterates the pump; an exception in the worker is re-raised in the consumer; ``close()`` stops the
    worker (it never blocks on a consumer that has gone) and joins it.
    """

    def __init__(self, items: Iterator, maxsize: int, stop: threading.Event):
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, maxsize))
        self._stop = stop
        self._thread = threading.Thread(target=self._work, args=(items,), name="mmgt-stage1", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            self._put(e)

    def __iter__(self):
        while True:
            try:
                item = self._q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or not self._thread.is_alive() and self._q.empty():
                    return
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


class _Drain:
    """Applies ``work`` to submitted items in one worker thread, in order, through a bounded queue.

    ``submit`` blocks while the queue is full (backpressure: the producer never runs more than ``maxsize`` items
    ahead) and re-raises the worker's first error; ``finish`` waits until every submitted item is done; ``close``
    stops the worker without waiting for the items still queued.
    """

    def __init__(self, work: Callable, maxsize: int, stop: threading.Event, name: str):
        self._work, self._stop = work, stop
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, maxsize))
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is _DONE:
                    return
                if self._error is None and not self._stop.is_set():
                    self._work(item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer, which re-raises
                self._error = e
            finally:
                self._q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item) -> None:
        while True:
            self._raise()
            if self._stop.is_set():
                return
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self._q.join()
        self._raise()

    def close(self) -> None:
        self._stop.set()
        while True:  # drop what is still queued; the worker sees _DONE next
            try:
                self._q.get_nowait()
                self._q.task_done()
            except queue.Empty:
                break
        self._q.put(_DONE)
        self._thread.join(timeout=60)


class RenderCancelled(RuntimeError):
    """The run was stopped (``Runner.stop()`` or Ctrl-C); the sink was closed without committing."""


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
    decode_seconds: float = 0.0  # busy time of the decode worker (decode, GPU time on a GPU, + the sink's write)
    windows: int = 0  # pose windows run
    chunks: int = 0  # render chunks run
    av_offset_ms: float = 0.0  # |video duration - audio duration| in ms (offline) or last-frame offset (live)
    frames_dropped: int = 0  # frames a sink dropped (reported by sinks that drop)
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


class _AudioBuffer:
    """Audio on the sample clock: reads past the newest sample are zero-padded.

    Offline it wraps the whole waveform. Live (``keep`` samples) it is a ring that holds only the newest ``keep``
    samples, so an hours-long stream has bounded memory and no append copies more than the ring; a read of audio
    that has already left the ring is an error, never silent zeros.
    """

    def __init__(self, samples: Optional[np.ndarray] = None, keep: Optional[int] = None):
        self.keep = keep
        self._data = np.zeros(0, np.float32) if samples is None else np.asarray(samples, np.float32)
        self._offset = 0  # clock sample of _data[0]
        self._len = len(self._data)  # valid samples in _data
        if keep is not None:
            self._data = np.zeros(2 * keep, np.float32)  # room for `keep` samples plus one compaction's worth

    def append(self, samples: np.ndarray) -> None:
        x = np.asarray(samples, np.float32).reshape(-1)
        if self.keep is None:
            raise RuntimeError("the offline audio buffer holds the whole waveform; only a live buffer (keep=N) grows")
        if len(x) >= self.keep:  # a huge chunk: only its newest `keep` samples can ever be read
            self._offset += self._len + len(x) - self.keep
            x, self._len = x[-self.keep:], 0
        if self._len + len(x) > len(self._data):  # compact: keep the newest keep - len(x) samples
            drop = self._len + len(x) - self.keep
            self._data[: self._len - drop] = self._data[drop:self._len]
            self._offset += drop
            self._len -= drop
        self._data[self._len:self._len + len(x)] = x
        self._len += len(x)

    def __len__(self) -> int:  # the newest sample's clock position + 1
        return self._offset + self._len

    def read(self, start: int, end: int) -> np.ndarray:
        if start < self._offset and start < end:
            raise RuntimeError(f"live audio: samples from {start} were read after leaving the "
                               f"{(self.keep or 0) / AUDIO_SAMPLE_RATE:.0f} s buffer (oldest kept {self._offset})")
        out = np.zeros(end - start, np.float32)
        lo, hi = start - self._offset, min(end, len(self)) - self._offset
        if hi > lo:
            out[:hi - lo] = self._data[lo:hi]
        return out


class Runner:
    """Renders audio into frames with one avatar: ``run(audio, sink)`` offline, ``run_stream(chunks, sink)`` live."""

    def __init__(self, models: P.ModelSet, avatar: P.Avatar, settings: RenderSettings = OFFLINE,
                 poses: Optional[np.ndarray] = None, overlapped: bool = True):
        """``poses`` (N, 134, 3) pixel keypoints: the pose-driven mode (Stage I draws these instead of running
        SMGA; frames past N repeat the last pose). ``overlapped=False`` runs the stages strictly one after the
        other in the calling thread (the baseline the runner benchmark compares with)."""
        self.overlapped = overlapped
        cfg = models.cfg
        self.models, self.avatar, self.settings = models, avatar, settings
        self.poses = None if poses is None else np.asarray(poses, np.float32)
        self.steps = settings.steps or cfg.sampler.steps
        self.guidance = cfg.sampler.guidance if settings.guidance is None else settings.guidance
        if settings.window != cfg.smga.window:
            log.warning("SMGA window %d differs from the trained %d", settings.window, cfg.smga.window)
        if settings.chunk > cfg.unet.motion_max_frames:
            raise ValueError(f"chunk={settings.chunk} exceeds the motion modules' {cfg.unet.motion_max_frames} frames")
        self._stop = threading.Event()
        # one CUDA stream per worker (None on a CPU): a worker's host sync then waits for its own work only
        cuda = torch.device(models.device).type == "cuda"
        self._streams = {name: torch.cuda.Stream(models.device) if cuda else None for name in ("stage1", "decode")}

    # ------------------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask a running ``run``/``run_stream`` to stop; it raises RenderCancelled after closing the sink."""
        self._stop.set()

    def run(self, audio: np.ndarray, sink: FrameSink, progress: Optional[Callable[[int], None]] = None) -> RunReport:
        """Offline: the whole waveform (16 kHz mono float32) is known; every window reads its full W frames."""
        audio = np.asarray(audio, np.float32)
        s = self.settings
        total = frames_for_samples(len(audio), AUDIO_SAMPLE_RATE, FPS)
        windows = plan_windows(total, s.window, s.hop, s.crossfade, lookahead_frames=s.lookahead)
        buf = _AudioBuffer(audio)
        t0 = time.perf_counter()

        def feed() -> Iterator[Tuple[Window, float]]:
            for w in windows:
                yield w, t0  # all audio is available at the start

        return self._execute(feed(), buf, sink, t0, total_frames=total, progress=progress)

    def run_stream(self, chunks: Iterable[AudioChunk], sink: FrameSink,
                   progress: Optional[Callable[[int], None]] = None, keep_seconds: float = 60.0) -> RunReport:
        """Live: audio arrives chunk by chunk; a window starts as soon as its hop + lookahead of audio is in.

        Memory stays bounded however long the stream: the newest ``keep_seconds`` of audio are kept (a window
        reads at most W frames behind the newest sample while the engine keeps up) and only the latest events
        are kept in the report."""
        s = self.settings
        lookahead = s.lookahead if s.lookahead is not None else s.window - s.hop
        planner = StreamPlanner(s.window, s.hop, s.crossfade, lookahead)
        min_keep = 2 * s.window * AUDIO_SAMPLE_RATE // FPS  # a window and its predecessor, whatever keep_seconds says
        buf = _AudioBuffer(keep=max(int(keep_seconds * AUDIO_SAMPLE_RATE), min_keep))
        t0 = time.perf_counter()

        def feed() -> Iterator[Tuple[Window, float]]:
            for chunk in chunks:
                if self._stop.is_set():
                    return
                buf.append(chunk.samples)
                arrived = time.perf_counter()
                for w in planner.push(chunk.n_samples):
                    yield w, arrived
            for w in planner.finish():
                yield w, time.perf_counter()

        return self._execute(feed(), buf, sink, t0, total_frames=None, progress=progress)

    # ------------------------------------------------------------------------------------------------------------
    def _execute(self, windows: Iterator[Tuple[Window, float]], buf: _AudioBuffer, sink: FrameSink, t0: float,
                 total_frames: Optional[int], progress) -> RunReport:
        cfg, s = self.models.cfg, self.settings
        report = RunReport(settings=asdict(s), preset=cfg.name, trained=cfg.trained,
                           note="" if cfg.trained else P.UNTRAINED_NOTE)
        first_audio_ready: List[float] = []
        lock = threading.Lock()

        # 1. Stage I: a generator of PoseWindows (one per scheduler window)
        def stage1() -> Iterator[PoseWindow]:
            prev_vec: Optional[np.ndarray] = None  # (W, 402) previous window's SMGA output
            prev_start = 0
            for w, ready_at in windows:
                if self._stop.is_set():
                    return
                if not first_audio_ready:
                    first_audio_ready.append(ready_at)
                a = time.perf_counter()
                with self._on_stream("stage1"):  # outputs reach the CPU as numpy: a sync on this stream only
                    pw, vec = self._stage1_window(w, buf, prev_vec, prev_start)
                prev_vec, prev_start = vec, w.start
                b = time.perf_counter()
                with lock:
                    report.add_event(StageEvent("stage1", w.index, a - t0, b - t0, pw.n_frames))
                    report.stage1_seconds += b - a
                    report.windows += 1
                yield pw

        # 2. Decode: the new frames of a denoised chunk -> the sink (a worker thread when overlapped)
        def emit(job: Tuple[RenderChunk, torch.Tensor, Optional[Tuple[torch.cuda.Event, torch.cuda.Event]]]) -> None:
            chunk, lat, gpu = job  # gpu: (denoising began, latents ready) events of Stage II's stream, or None
            a = time.perf_counter()
            with self._on_stream("decode", gpu[1] if gpu else None):
                began = _timing_event() if gpu else None  # completes once the latents exist: times the decode only
                out = P.decode(self.models, lat[:, :, chunk.new_from:chunk.new_to])  # (n_new, R, R, 3) uint8
                done = _timing_event() if gpu else None
            if done is not None:
                done.synchronize()  # P.decode ended with a copy to the host: immediate
            b = time.perf_counter()
            sink.write(FrameBatch(frames=out, first_frame=chunk.start + chunk.new_from, fps=FPS))
            c = time.perf_counter()
            busy = (began.elapsed_time(done) / 1000 if gpu else b - a) + c - b
            with lock:
                report.add_event(StageEvent("decode", chunk.index, a - t0, b - t0, len(out)))
                report.add_event(StageEvent("sink", chunk.index, b - t0, c - t0, len(out)))
                report.decode_seconds += busy
                if gpu:  # the host only enqueued the denoising; its GPU time is known now that it has finished
                    report.stage2_seconds += gpu[0].elapsed_time(gpu[1]) / 1000
                report.frames += len(out)
            if progress:
                progress(len(out))

        meta = RunMeta(fps=FPS, width=cfg.resolution, height=cfg.resolution,
                       audio_samples=len(buf) if total_frames is not None else 0, sample_rate=AUDIO_SAMPLE_RATE,
                       preset=cfg.name, trained=cfg.trained)
        sink.open(meta)
        ok = False
        # 3. Stage II consumes the pose windows: from a worker thread through a bounded queue (overlapped), or
        # inline; its chunks go to the decode worker (overlapped) or are decoded inline
        pump = _Pump(stage1(), s.queue_size, self._stop) if self.overlapped else None
        drain = _Drain(emit, 2, self._stop, "mmgt-decode") if self.overlapped else None
        try:
            self._stage2_loop(pump if pump else stage1(), drain.submit if drain else emit, report, t0, lock)
            if drain:
                drain.finish()
            ok = not self._stop.is_set()
        except KeyboardInterrupt:
            self._stop.set()
            raise
        finally:
            if not ok:
                self._stop.set()
            if pump:
                pump.close()
            if drain:
                drain.close()
            self._stop.clear()  # the runner can run again; a stop() before a run still cancels that run
            sink.close(ok)
        if not ok:
            raise RenderCancelled("render stopped before the end; nothing was committed")
        # 4. Metrics
        end = report.last_frame_out if report.frames else time.perf_counter() - t0
        report.wall_seconds = end
        report.media_seconds = report.frames / FPS
        report.audio_seconds = len(buf) / AUDIO_SAMPLE_RATE
        report.real_time_factor = report.media_seconds / max(end, 1e-9)
        first_sink = max(report.first_frame_out, 0.0)
        report.first_frame_latency = first_sink - ((first_audio_ready[0] - t0) if first_audio_ready else 0.0)
        report.av_offset_ms = abs(report.media_seconds - report.audio_seconds) * 1000 if total_frames else 0.0
        report.frames_dropped = int(getattr(sink, "dropped", 0))
        log.info("run done: %s", report.summary())
        return report

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _stage1_window(self, w: Window, buf: _AudioBuffer, prev_vec: Optional[np.ndarray],
                       prev_start: int) -> Tuple[PoseWindow, np.ndarray]:
        """One pose window: audio -> SMGA poses (seam blended) -> pose frames, masks, audio tokens."""
        m, s = self.models, self.settings
        spf = AUDIO_SAMPLE_RATE // FPS  # samples per frame (640)
        # 1. the window's audio: W frames from its start, zero past what it may read (padding / lookahead)
        wav = buf.read(w.audio_start, w.audio_start + w.n_frames * spf)  # (W * 640,)
        wav[w.audio_end - w.audio_start:] = 0.0
        if self.poses is not None:  # pose-driven: the given keypoints replace SMGA
            idx = np.clip(np.arange(w.start + w.keep_from, w.start + w.keep_to), None, len(self.poses) - 1)
            kps = self.poses[idx]  # (F, 134, 3)
            return self._conditions(w, kps, wav), np.zeros((w.n_frames, K.N_KEYPOINTS * 3), np.float32)
        cond = P.smga_condition(m, wav, w.n_frames)  # (W, audio_dim)
        # 2. poses, conditioned on the reference pose (window 0) or the previous window's last real frame
        if prev_vec is None:
            init = K.pixel_to_smga(self.avatar.init_pose)[0]  # (402,)
        else:
            init = prev_vec[w.cond_frame - prev_start]  # (402,)
        gen = torch.Generator().manual_seed(s.seed * 7919 + w.index)
        vec = P.generate_poses(m, cond, init, s.smga_steps, s.smga_guidance, gen)  # (W, 402)
        # 3. seam: blend the first frames with the previous window's prediction of the same frames
        out = vec[w.keep_from:w.keep_to].copy()  # (F, 402)
        if prev_vec is not None and w.crossfade:
            for i, wt in enumerate(crossfade_weights(w.crossfade)):
                out[i] = (1 - wt) * prev_vec[w.start + i - prev_start] + wt * vec[i]
        return self._conditions(w, K.smga_to_pixel(out), wav), vec

    def _conditions(self, w: Window, kps: np.ndarray, wav: np.ndarray) -> PoseWindow:
        """Emitted keypoints (F, 134, 3) -> the PoseWindow Stage II reads (pose frames, masks, audio tokens)."""
        m, spf = self.models, AUDIO_SAMPLE_RATE // FPS
        frames, masks = P.pose_conditions(m.cfg, kps)
        # 4. audio tokens of the emitted frames (wav2vec2 over the window's real audio, +-2 frame context)
        n_tok = max(w.keep_to, min(w.valid_frames, w.n_frames))
        tokens = P.audio_tokens(m, wav[:n_tok * spf], n_tok)[w.keep_from:w.keep_to]  # (F, T, D)
        return PoseWindow(index=w.index, first_frame=w.start + w.keep_from, n_frames=len(kps), keypoints=kps,
                          pose_frames=frames, masks={b: tuple(v) for b, v in masks.items()},
                          audio_tokens=tokens.float().cpu().numpy())

    # ------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_stream(self, worker: str, ready: Optional["torch.cuda.Event"] = None) -> Iterator[None]:
        """Issue the block's GPU work on ``worker``'s stream, after ``ready`` (work of another stream it reads)."""
        stream = self._streams.get(worker)
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            yield

    @torch.no_grad()
    def _stage2_loop(self, pose_windows: Iterable[PoseWindow], emit: Callable, report: RunReport, t0: float,
                     lock: threading.Lock) -> None:
        """Cut pose windows into render chunks; denoise each and hand (chunk, latents, GPU events) to ``emit``."""
        m, s = self.models, self.settings
        cuda = torch.device(m.device).type == "cuda"
        planner = StreamChunkPlanner(s.chunk, s.overlap, max_chunk=m.cfg.unet.motion_max_frames)
        # frames received from Stage I and not yet behind the next chunk's start (global frame -> arrays)
        frames: List[np.ndarray] = []
        masks: Dict[str, List[List[np.ndarray]]] = {b: [] for b in P.BRANCHES}
        tokens: List[np.ndarray] = []
        base = 0  # global frame of frames[0]
        known: Optional[torch.Tensor] = None  # final latents of the previous chunk's last `overlap` frames

        def render(chunk: RenderChunk) -> None:
            nonlocal known, base, frames, tokens
            a = time.perf_counter()
            began = _timing_event() if cuda else None
            n_have = base + len(frames)
            idx = np.clip(np.arange(chunk.start, chunk.start + chunk.n_frames), None, n_have - 1) - base  # pad
            inputs = P.ChunkInputs(
                pose_frames=np.stack([frames[i] for i in idx]),
                masks={b: [np.stack([masks[b][i][lv] for i in idx]) for lv in range(len(masks[b][0]))]
                       for b in P.BRANCHES},
                audio_tokens=torch.from_numpy(np.stack([tokens[i] for i in idx])), first_frame=chunk.start)
            lat = P.render_chunk(m, self.avatar, inputs, self.steps, self.guidance, s.seed,
                                 known if chunk.overlap else None)  # (1, 4, C, h, w), still in flight on a GPU
            known = lat[:, :, chunk.n_frames - s.overlap:] if s.overlap else None
            # the decode stream starts once these latents exist (the event), not before
            gpu = (began, _timing_event()) if cuda else None
            b = time.perf_counter()
            with lock:  # on a GPU this event spans the host's enqueueing; the busy time comes from the events
                report.add_event(StageEvent("stage2", chunk.index, a - t0, b - t0, chunk.new_to - chunk.new_from))
                if not cuda:
                    report.stage2_seconds += b - a
                report.chunks += 1
            emit((chunk, lat, gpu))  # the decode worker holds `lat` until its frames are on the CPU
            # drop what no later chunk needs (the next chunk starts `chunk - overlap` frames later)
            keep_from = chunk.start + chunk.n_frames - s.overlap
            cut = max(0, min(keep_from - base, len(frames)))
            if cut:
                frames, tokens = frames[cut:], tokens[cut:]
                for br in P.BRANCHES:
                    masks[br] = masks[br][cut:]
                base += cut

        for pw in pose_windows:
            if self._stop.is_set():
                return
            if pw.first_frame != base + len(frames):
                raise RuntimeError(f"Stage I gap: window {pw.index} starts at frame {pw.first_frame}, "
                                   f"expected {base + len(frames)}")
            for i in range(pw.n_frames):
                frames.append(pw.pose_frames[i])
                tokens.append(pw.audio_tokens[i])
                for br in P.BRANCHES:
                    masks[br].append([lv[i] for lv in pw.masks[br]])
            for chunk in planner.push(pw.n_frames):
                render(chunk)
        for chunk in planner.finish():
            render(chunk)

    # ------------------------------------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Render one pose window and one chunk of near-silence, serially, and discard them; returns the seconds taken.

        The first call of every network allocates its memory and picks kernels, and with ``--compile`` /
        ``--cuda-graphs`` compiles and captures its fixed shapes (a minute or more for a compiled denoiser). Doing
        that here keeps it out of a run's first-frame latency and real-time factor, and captures graphs while no
        other stage runs."""
        from .sinks import NullSink

        s = self.settings
        t = time.perf_counter()
        overlapped, self.overlapped = self.overlapped, False
        try:
            # one chunk of near-silence (exact zeros make librosa's chroma warn); Stage I still runs its W frames
            hiss = np.random.default_rng(0).standard_normal(s.chunk * (AUDIO_SAMPLE_RATE // FPS)) * 1e-3
            self.run(hiss.astype(np.float32), NullSink())
        finally:
            self.overlapped = overlapped
        if torch.device(self.models.device).type == "cuda":
            torch.cuda.synchronize(self.models.device)
        seconds = time.perf_counter() - t
        log.info("warm-up: %.1f s (first calls%s)", seconds, "" if self.models.cfg.trained else ", untrained preset")
        return seconds

    def probe(self, seconds: float = 2.0) -> float:
        """Steady-state frames per second of these settings on this machine: at least ``seconds`` of near-silence
        (and enough for 6 chunks after the first and 3 pose windows) streamed in at once, so the engine runs flat out,
        measured between the first and the last frames out. Call after ``warm_up``; 25 or more keeps a live stream
        in real time."""
        from .sinks import NullSink

        s = self.settings
        frames = max(int(seconds * FPS), s.chunk + 6 * (s.chunk - s.overlap), 3 * s.hop)
        n = frames * (AUDIO_SAMPLE_RATE // FPS)
        hiss = (np.random.default_rng(1).standard_normal(n) * 1e-3).astype(np.float32)
        return steady_fps(self.run_stream(iter([AudioChunk(hiss, 0)]), NullSink()))


def steady_fps(report: RunReport) -> float:
    """Frames per second between the first and the last frames out (the pipeline's fill time left out)."""
    sinks = [e for e in report.events if e.stage == "sink"]
    if len(sinks) < 2:
        return report.frames / max(report.wall_seconds, 1e-9)
    return (report.frames - sinks[0].frames) / max(sinks[-1].end - sinks[0].end, 1e-9)


def _timing_event() -> "torch.cuda.Event":
    """A timing event recorded now on the current CUDA stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def render_file(models: P.ModelSet, image: np.ndarray, audio: np.ndarray, sink: FrameSink,
                settings: RenderSettings = OFFLINE, pose_file=None, weights_dir=None, progress=None) -> RunReport:
    """Convenience: avatar from ``image``, then the offline run of ``audio`` into ``sink``."""
    avatar = P.prepare_avatar(models, image, pose_file=pose_file, weights_dir=weights_dir)
    return Runner(models, avatar, settings).run(audio, sink, progress=progress)
