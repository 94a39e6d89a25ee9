"""The overlapped executor: plan -> Stage I -> Stage II -> decode -> sink.

One object crosses each boundary:

    (Window, time its audio was in) -> Stage I -> PoseWindow -> Stage II -> StageIIResult -> decode -> FrameBatch
    -> sink

* plan: the scheduler's pose windows, as their audio arrives (engine/scheduler.py);
* Stage I: the SMGA audio condition and pose diffusion, the seam blended with the previous window, pose frames and
  motion masks drawn, the MM-HAA audio tokens computed (they stay on the model's device): one ``PoseWindow``;
* Stage II: the pose windows' arrays cut into fixed-size render chunks (``StageIIChunk``, sliced, no per-frame lists),
  each denoised with the final latents of its overlap frames taken over from the previous chunk;
* decode: the new frames of each chunk to uint8; sink: the frames handed to the sink (mp4, WebRTC queue, ...).

Each stage is a worker thread joined to the next by a bounded queue (engine/workers.py), so Stage I of window k+1
runs while Stage II renders window k and the decoder turns chunk j into frames while chunk j+1 is denoised; frames
leave chunk by chunk. On a GPU each stage issues its work on its own CUDA stream and hands the next stage a CUDA event
with its output, so one stage's host sync never waits for another stage's queued kernels. What a run measures is
recorded apart from this code (engine/metrics.py). ``Runner.warm_up`` pays first-call costs (allocation,
torch.compile, CUDA-graph capture) before a run, outside its latency.

A Runner holds one session's state (avatar, settings, its stop flag); the model set it runs on is shared and
stateless, so any number of Runners (sessions, batch jobs, threads) use one model set at once.

Every chunk's frames leave with a ``ResumePoint`` (engine/types.py): what a run needs to continue exactly after them
(Stage I's state before the pose window holding the next chunk, the overlap latents, the positions). ``run(...,
start=point)`` continues from one, giving the frames a run from the beginning gives (engine/resume.py keeps the
points of a long render beside its output).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import asdict
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from mmgt import keypoints as K
from mmgt import pipeline as P
from mmgt.config import AUDIO_SAMPLE_RATE, FPS

from .metrics import CallLog, LatencyEntry, RunMetrics, RunReport, StageEvent, steady_fps
from .models import for_settings
from .rolling import RollingRenderStage
from .rolling_plan import group_size
from .scheduler import (RenderChunk, StreamChunkPlanner, StreamPlanner, Window, crossfade_weights, frames_for_samples,
                        plan_windows)
from .settings import OFFLINE, RenderSettings
from .types import AudioChunk, FrameBatch, FrameSink, PoseState, PoseWindow, RenderedChunk, ResumePoint, RunMeta
from .workers import chain, close_all

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // FPS  # 640
QUEUE_SIZES = {"stage2": 2, "decode": 2, "sink": 2}  # outputs a stage may run ahead of the next (stage1: settings)
FEED_QUEUE = 4096  # live pose windows read ahead of Stage I (small dataclasses; the audio buffer bounds the rest)


class RenderCancelled(RuntimeError):
    """The run was stopped (``Runner.stop()`` or Ctrl-C); the sink was closed without committing."""


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


class _FrameStore:
    """The pose frames, masks and audio tokens Stage I has emitted and Stage II still needs, as contiguous arrays.

    Windows are appended whole; a render chunk takes a slice (the frames past the newest are padded with the newest,
    as the last chunk of a stream is); frames behind the next chunk's start are dropped."""

    def __init__(self, base: int = 0) -> None:
        self.base = base  # global frame of row 0 (a resumed run starts at its first pose window's)
        self.frames: Optional[np.ndarray] = None  # (N, R, R, 3) uint8
        self.masks: Tuple[np.ndarray, ...] = ()  # per MM-HAA level (N, 3, h*w)
        self.tokens: Optional[torch.Tensor] = None  # (N, T, D) on the model's device
        self.poses: List[Tuple[int, Optional[PoseState]]] = []  # (first frame, Stage I's state before) per window

    @property
    def end(self) -> int:
        """Global frame after the newest stored one."""
        return self.base + (0 if self.frames is None else len(self.frames))

    def push(self, pw: PoseWindow) -> None:
        if pw.first_frame != self.end:
            raise RuntimeError(f"Stage I gap: window {pw.index} starts at frame {pw.first_frame}, expected {self.end}")
        self.poses.append((pw.first_frame, pw.before))
        if self.frames is None:
            self.frames, self.masks, self.tokens = pw.pose_frames, tuple(pw.masks), pw.audio_tokens
            return
        self.frames = np.concatenate([self.frames, pw.pose_frames])
        self.masks = tuple(np.concatenate([a, b]) for a, b in zip(self.masks, pw.masks))
        self.tokens = torch.cat([self.tokens, pw.audio_tokens])

    def take(self, start: int, n: int) -> Tuple[np.ndarray, Tuple[np.ndarray, ...], torch.Tensor]:
        """Rows of global frames [start, start + n), the ones past the newest repeating the newest (and the ones
        before the oldest kept, the rolling schedule's warm-up slots, repeating the oldest)."""
        idx = np.clip(np.arange(start, start + n), self.base, self.end - 1) - self.base  # (n,)
        tokens = self.tokens[torch.from_numpy(idx).to(self.tokens.device)]  # (n, T, D)
        return self.frames[idx], tuple(m[idx] for m in self.masks), tokens

    def pose_state_at(self, frame: int) -> Optional[PoseState]:
        """Stage I's state before the stored window that holds ``frame``."""
        return next(state for first, state in reversed(self.poses) if first <= frame)

    def drop_before(self, frame: int) -> None:
        cut = max(0, min(frame - self.base, self.end - self.base))
        if cut:
            self.frames, self.tokens = self.frames[cut:], self.tokens[cut:]
            self.masks = tuple(m[cut:] for m in self.masks)
            self.base += cut
        while len(self.poses) > 1 and self.poses[1][0] <= self.base:  # keep the window holding the base
            self.poses.pop(0)


def _cuda_event():
    """A CUDA event recorded now on the current stream."""
    event = torch.cuda.Event()
    event.record()
    return event


@contextlib.contextmanager
def _after(event, *tensors: torch.Tensor) -> Iterator[None]:
    """The block's GPU work runs after ``event`` (another stage's output is ready), and ``tensors`` (made on that
    stage's stream) are marked as used on this one, so the allocator does not hand their memory out too early."""
    if event is not None:
        stream = torch.cuda.current_stream()
        stream.wait_event(event)
        for t in tensors:
            t.record_stream(stream)
    yield


class Runner:
    """Renders audio into frames with one avatar: ``run(audio, sink)`` offline, ``run_stream(chunks, sink)`` live."""

    def __init__(self, models: P.ModelSet, avatar: P.Avatar, settings: RenderSettings = OFFLINE,
                 poses: Optional[np.ndarray] = None, overlapped: bool = True, call_log: Optional[CallLog] = None):
        """``poses`` (N, 134, 3) pixel keypoints: the pose-driven mode (Stage I draws these instead of running
        SMGA; frames past N repeat the last pose). ``overlapped=False`` runs the stages strictly one after the
        other in the calling thread (the baseline the runner benchmark compares with). ``call_log``: the log the
        model set already notes its calls in (e.g. the avatar was prepared through it); default: a new one."""
        cfg = models.cfg
        self.overlapped = overlapped
        self.settings = settings
        self.avatar = avatar
        self.poses = None if poses is None else np.asarray(poses, np.float32)
        self.steps = settings.steps or cfg.sampler.steps
        self.guidance = cfg.sampler.guidance if settings.guidance is None else settings.guidance
        if settings.window != cfg.smga.window:
            log.warning("SMGA window %d differs from the trained %d", settings.window, cfg.smga.window)
        if settings.chunk > cfg.unet.motion_max_frames:
            raise ValueError(f"chunk={settings.chunk} exceeds the motion modules' {cfg.unet.motion_max_frames} frames")
        if settings.schedule == "rolling":
            group_size(settings.chunk, self.steps)  # a rolling call holds `steps` groups of chunk / steps frames
        models = for_settings(models, settings)
        self.call_log = call_log or CallLog()
        self.models = models if call_log is not None else self.call_log.observe(models)
        self._stop = threading.Event()
        self._metrics_now: Optional[RunMetrics] = None  # the running (or last) run's recorder
        self._quiet = False  # True while probing: the run's summary is logged at debug level
        # one CUDA stream per GPU stage (None on a CPU): a stage's host sync then waits for its own work only
        cuda = torch.device(models.device).type == "cuda"
        self._streams = {name: torch.cuda.Stream(models.device) if cuda else None
                         for name in ("stage1", "stage2", "decode")}

    # ------------------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask a running ``run``/``run_stream`` to stop; it raises RenderCancelled after closing the sink."""
        self._stop.set()

    def run(self, audio: np.ndarray, sink: FrameSink, progress: Optional[Callable[[int], None]] = None,
            start: Optional[ResumePoint] = None) -> RunReport:
        """Offline: the whole waveform (16 kHz mono float32) is known; every window reads its full W frames.

        ``start``: continue from that point of an earlier run with these settings and inputs (the ``resume`` of
        one of its FrameBatches): the first frame out is ``start.frame``, and every frame equals the same frame of
        a run from the beginning."""
        audio = np.asarray(audio, np.float32)
        s = self.settings
        total = frames_for_samples(len(audio), AUDIO_SAMPLE_RATE, FPS)
        windows = plan_windows(total, s.window, s.hop, s.crossfade, lookahead_frames=s.lookahead)
        if start is not None and s.schedule == "rolling":
            raise ValueError("the rolling schedule keeps no resume points; run it from the start")
        if start is not None:
            log.info("resuming at frame %d (render chunk %d, pose window %d)", start.frame, start.chunk,
                     start.pose.window)
            windows = windows[start.pose.window:]
        t0 = time.perf_counter()
        metrics = self._metrics(t0)
        metrics.audio_in(len(audio), t0)  # offline: all of it is in at the start
        return self._execute(((w, t0) for w in windows), _AudioBuffer(audio), sink, metrics, total_frames=total,
                             progress=progress, start=start)

    def run_stream(self, chunks: Iterable[AudioChunk], sink: FrameSink,
                   progress: Optional[Callable[[int], None]] = None, keep_seconds: float = 60.0) -> RunReport:
        """Live: audio arrives chunk by chunk; a window starts as soon as its hop + lookahead of audio is in.

        Memory stays bounded however long the stream: the newest ``keep_seconds`` of audio are kept (a window
        reads at most W frames behind the newest sample while the engine keeps up) and only the latest events
        are kept in the report."""
        s = self.settings
        lookahead = s.lookahead if s.lookahead is not None else s.window - s.hop
        planner = StreamPlanner(s.window, s.hop, s.crossfade, lookahead)
        min_keep = 2 * s.window * SAMPLES_PER_FRAME  # a window and its predecessor, whatever keep_seconds says
        buf = _AudioBuffer(keep=max(int(keep_seconds * AUDIO_SAMPLE_RATE), min_keep))
        metrics = self._metrics(time.perf_counter())

        def windows() -> Iterator[Tuple[Window, float]]:
            for chunk in chunks:
                if self._stop.is_set():
                    return
                buf.append(chunk.samples)
                arrived = time.perf_counter()
                metrics.audio_in(len(buf), arrived)  # the latency budget starts each frame's clock here
                for w in planner.push(chunk.n_samples):
                    yield w, arrived
            for w in planner.finish():
                yield w, time.perf_counter()

        return self._execute(windows(), buf, sink, metrics, total_frames=None, progress=progress)

    # ------------------------------------------------------------------------------------------------------------
    def _metrics(self, t0: float) -> RunMetrics:
        """A fresh report and its recorder for one run started at ``t0``."""
        cfg, s = self.models.cfg, self.settings
        report = RunReport(settings=asdict(s), preset=cfg.name, trained=cfg.trained,
                           note="" if cfg.trained else P.UNTRAINED_NOTE)
        self._metrics_now = RunMetrics(report, t0, torch.device(self.models.device).type == "cuda", hop=s.hop)
        return self._metrics_now

    def latency_entries(self) -> List[LatencyEntry]:
        """The running (or last) run's per-chunk latency entries so far (the newest, oldest first)."""
        m = self._metrics_now
        return m.entries() if m is not None else []

    def latency_budget(self) -> Dict[str, Dict[str, float]]:
        """The running (or last) run's latency budget so far: {"p50": {stage: ms, ...}, "p95": {...}}."""
        m = self._metrics_now
        return m.budget() if m is not None else {}

    def _execute(self, windows: Iterable[Tuple[Window, float]], buf: _AudioBuffer, sink: FrameSink,
                 metrics: RunMetrics, total_frames: Optional[int], progress,
                 start: Optional[ResumePoint] = None) -> RunReport:
        cfg, s, report = self.models.cfg, self.settings, metrics.report

        def deliver(batch: FrameBatch) -> Iterator[FrameBatch]:  # the sink stage
            sink.write(batch)
            if progress:
                progress(batch.n_frames)
            yield batch

        # live: a feeder thread takes the audio as it comes, so each chunk's arrival time is when it came, not when
        # Stage I got round to it (the latency budget starts there)
        feed = [("feed", _passthrough, FEED_QUEUE)] if total_frames is None and self.overlapped else []
        stages = feed + [("stage1", _PoseStage(self, buf, metrics, start), s.queue_size),
                         ("stage2", self._stage2(metrics, start), QUEUE_SIZES["stage2"]),
                         ("decode", lambda rendered: self._decode(rendered, metrics), QUEUE_SIZES["decode"]),
                         ("sink", deliver, QUEUE_SIZES["sink"])]
        ok, workers = False, []
        try:  # from here on, an interruption (Ctrl-C, SIGTERM) at any point stops and joins every worker started
            sink.open(RunMeta(fps=FPS, width=cfg.resolution, height=cfg.resolution,
                              audio_samples=len(buf) if total_frames is not None else 0,
                              sample_rate=AUDIO_SAMPLE_RATE, preset=cfg.name, trained=cfg.trained))
            out = chain(stages, windows, overlapped=self.overlapped, stop=self._stop, on_item=metrics.on_item,
                        setup=self._on_stream, workers=workers)
            for _ in out:  # the sink stage's batches: everything has happened by the time they come out
                pass
            ok = not self._stop.is_set()
        finally:
            if not ok:
                self._stop.set()
            try:
                close_all(workers)
            finally:
                self._stop.clear()  # the runner can run again; a stop() before a run still cancels that run
                sink.close(ok)
        if not ok:
            raise RenderCancelled("render stopped before the end; nothing was committed")
        report.backends = self.call_log.kinds()
        metrics.finish(len(buf), AUDIO_SAMPLE_RATE, finite=total_frames is not None,
                       dropped=int(getattr(sink, "dropped", 0)))
        log.log(logging.DEBUG if self._quiet else logging.INFO, "run done: %s", report.summary())
        return report

    def _stage2(self, metrics: RunMetrics, start: Optional[ResumePoint] = None):
        """Stage II of one run: fixed-size chunks, or the rolling schedule's calls (engine/rolling.py)."""
        if self.settings.schedule != "rolling":
            return _RenderStage(self, metrics, start)
        cuda = torch.device(self.models.device).type == "cuda"
        return RollingRenderStage(self, metrics, _FrameStore(), _after, lambda: _cuda_event() if cuda else None)

    def _on_stream(self, stage: str):
        """The worker of ``stage`` issues its GPU work on the stage's own CUDA stream."""
        stream = self._streams.get(stage)
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    @torch.no_grad()
    def _decode(self, rendered: RenderedChunk, metrics: RunMetrics) -> Iterator[FrameBatch]:
        """Decode: the new frames of a denoised chunk -> a FrameBatch (its host copy syncs this stage's stream only)."""
        result = rendered.result
        with _after(result.ready, result.latents), metrics.gpu_span("decode"):
            frames = P.decode(self.models, result.new_latents)  # (n_new, R, R, 3) uint8
        yield FrameBatch(frames=frames, first_frame=result.first_frame + result.emit_from, fps=FPS, index=result.index,
                         resume=rendered.resume)

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
        overlapped, self.overlapped, self._quiet = self.overlapped, False, True
        try:
            # one chunk of near-silence (exact zeros make librosa's chroma warn); Stage I still runs its W frames
            hiss = np.random.default_rng(0).standard_normal(s.chunk * SAMPLES_PER_FRAME) * 1e-3
            self.run(hiss.astype(np.float32), NullSink())
        finally:
            self.overlapped, self._quiet = overlapped, False
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
        hiss = (np.random.default_rng(1).standard_normal(frames * SAMPLES_PER_FRAME) * 1e-3).astype(np.float32)
        self._quiet = True  # a measurement, not a run the user asked for: its summary goes to the debug log
        try:
            return steady_fps(self.run_stream(iter([AudioChunk(hiss, 0)]), NullSink()))
        finally:
            self._quiet = False


# ----------------------------------------------------------------------------------------------------------------
# The stages of one run
# ----------------------------------------------------------------------------------------------------------------
def _passthrough(item):
    return (item,)


class _PoseStage:
    """Stage I of one run: (Window, audio-ready time) -> PoseWindow. Keeps the previous window for the seam."""

    def __init__(self, runner: Runner, buf: _AudioBuffer, metrics: RunMetrics, start: Optional[ResumePoint] = None):
        self.runner, self.buf, self.metrics = runner, buf, metrics
        self.prev_vec: Optional[np.ndarray] = start.pose.prev_vec if start else None  # (W, 402) previous window's
        self.prev_start = start.pose.prev_start if start else 0  # SMGA output, and its first frame

    @torch.no_grad()
    def __call__(self, item: Tuple[Window, float]) -> Iterator[PoseWindow]:
        w, ready_at = item
        self.metrics.audio_ready(ready_at, w.index)
        r = self.runner
        m, s = r.models, r.settings
        before = PoseState(w.index, self.prev_vec, self.prev_start)  # what restarting at this window needs
        # 1. the window's audio: W frames from its start, zero past what it may read (padding / lookahead)
        wav = self.buf.read(w.audio_start, w.audio_start + w.n_frames * SAMPLES_PER_FRAME)  # (W * 640,)
        wav[w.audio_end - w.audio_start:] = 0.0
        if r.poses is not None:  # pose-driven: the given keypoints replace SMGA
            idx = np.clip(np.arange(w.start + w.keep_from, w.start + w.keep_to), None, len(r.poses) - 1)
            yield self._conditions(w, r.poses[idx], wav, before)  # (F, 134, 3)
            return
        cond = P.smga_condition(m, wav, w.n_frames)  # (W, audio_dim)
        # 2. poses, conditioned on the reference pose (window 0) or the previous window's last real frame
        if self.prev_vec is None:
            init = K.pixel_to_smga(r.avatar.init_pose)[0]  # (402,)
        else:
            init = self.prev_vec[w.cond_frame - self.prev_start]  # (402,)
        gen = torch.Generator().manual_seed(s.seed * 7919 + w.index)
        vec = P.generate_poses(m, cond, init, s.smga_steps, s.smga_guidance, gen)  # (W, 402)
        # 3. seam: blend the first frames with the previous window's prediction of the same frames
        out = vec[w.keep_from:w.keep_to].copy()  # (F, 402)
        if self.prev_vec is not None and w.crossfade:
            for i, wt in enumerate(crossfade_weights(w.crossfade)):
                out[i] = (1 - wt) * self.prev_vec[w.start + i - self.prev_start] + wt * vec[i]
        self.prev_vec, self.prev_start = vec, w.start
        yield self._conditions(w, K.smga_to_pixel(out), wav, before)

    def _conditions(self, w: Window, kps: np.ndarray, wav: np.ndarray, before: PoseState) -> PoseWindow:
        """Emitted keypoints (F, 134, 3) -> the PoseWindow Stage II reads (pose frames, masks, audio tokens)."""
        m = self.runner.models
        frames, masks = P.pose_conditions(m.cfg, kps)
        # 4. audio tokens of the emitted frames (wav2vec2 over the window's real audio, +-2 frame context)
        n_tok = max(w.keep_to, min(w.valid_frames, w.n_frames))
        tokens = P.audio_tokens(m, wav[:n_tok * SAMPLES_PER_FRAME], n_tok)[w.keep_from:w.keep_to]  # (F, T, D)
        cuda = torch.device(m.device).type == "cuda"
        return PoseWindow(index=w.index, first_frame=w.start + w.keep_from, n_frames=len(kps), keypoints=kps,
                          pose_frames=frames, masks=P.unet_masks(m.cfg, masks), audio_tokens=tokens,
                          ready=_cuda_event() if cuda else None, before=before)


class _RenderStage:
    """Stage II of one run: PoseWindows -> fixed-size render chunks -> denoised chunks (``flush`` renders the padded
    tail at the end of the stream). Keeps the frames the next chunk needs and the overlap latents."""

    def __init__(self, runner: Runner, metrics: RunMetrics, start: Optional[ResumePoint] = None):
        s = runner.settings
        self.runner, self.metrics = runner, metrics
        first = start.pose.window * s.hop if start else 0  # global frame of the first pose Stage I will emit
        self.planner = StreamChunkPlanner(s.chunk, s.overlap, max_chunk=runner.models.cfg.unet.motion_max_frames,
                                          first_index=start.chunk if start else 0, frames=first)
        self.store = _FrameStore(base=first)
        # final latents of the previous chunk's last `overlap` frames
        self.known: Optional[torch.Tensor] = None
        if start is not None and start.known is not None:
            self.known = torch.as_tensor(start.known).to(runner.models.device, runner.models.dtype)

    def __call__(self, pw: PoseWindow) -> Iterator[RenderedChunk]:
        with _after(pw.ready, pw.audio_tokens):
            self.store.push(pw)
        for chunk in self.planner.push(pw.n_frames):
            yield self._render(chunk)

    def flush(self) -> Iterator[RenderedChunk]:
        for chunk in self.planner.finish():
            yield self._render(chunk)

    @torch.no_grad()
    def _render(self, chunk: RenderChunk) -> RenderedChunk:
        r, s = self.runner, self.runner.settings
        frames, masks, tokens = self.store.take(chunk.start, chunk.n_frames)  # padded past the newest frame
        work = P.StageIIChunk(index=chunk.index, first_frame=chunk.start, pose_frames=frames, masks=masks,
                              audio_tokens=tokens, known=self.known if chunk.overlap else None,
                              emit_from=chunk.new_from, emit_to=chunk.new_to)
        with self.metrics.gpu_span("stage2"):
            result = P.render_chunk(r.models, r.avatar, work, r.steps, r.guidance, s.seed)
        self.known = result.latents[:, :, chunk.n_frames - s.overlap:] if s.overlap else None
        following = chunk.start + chunk.n_frames - s.overlap  # the next chunk starts there
        resume = ResumePoint(chunk=chunk.index + 1, frame=chunk.start + chunk.new_to,
                             pose=self.store.pose_state_at(following), known=self.known)
        self.store.drop_before(following)
        cuda = torch.device(r.models.device).type == "cuda"
        return RenderedChunk(dataclasses.replace(result, ready=_cuda_event() if cuda else None), resume)  # decode waits


def probe_sessions(models: P.ModelSet, avatar: P.Avatar, settings: RenderSettings, sessions: int,
                   seconds: float = 2.0) -> List[float]:
    """The steady frames per second of each of ``sessions`` runs streaming flat out at the same time on one model set
    (``Runner.probe`` each, in its own thread): what that many live sessions could render at once on this machine."""
    rates = [0.0] * sessions
    errors: List[BaseException] = []

    def probe(i: int) -> None:
        try:
            rates[i] = Runner(models, avatar, settings).probe(seconds)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=probe, args=(i,), name=f"probe-{i}") for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return rates


def render_file(models: P.ModelSet, image: np.ndarray, audio: np.ndarray, sink: FrameSink,
                settings: RenderSettings = OFFLINE, pose_file=None, weights_dir=None, progress=None) -> RunReport:
    """Convenience: avatar from ``image``, then the offline run of ``audio`` into ``sink``."""
    call_log = CallLog()
    models = call_log.observe(for_settings(models, settings))
    avatar = P.prepare_avatar(models, image, pose_file=pose_file, weights_dir=weights_dir)
    return Runner(models, avatar, settings, call_log=call_log).run(audio, sink, progress=progress)


__all__ = ["Runner", "RenderCancelled", "RunReport", "StageEvent", "steady_fps", "probe_sessions", "render_file"]
