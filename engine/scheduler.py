"""Pure window planning: ints in, dataclasses out (DESIGN.md, "Time model").

Two independent plans run on the same 25 fps frame clock:

* **Pose windows** (Stage I, SMGA). Every window is ``window`` frames long (W = 80), padded at the end of the
  stream, and windows start ``hop`` frames apart (1 <= Hp <= W). Window k emits exactly the frames
  ``[k*Hp, min((k+1)*Hp, total))``, so every frame is emitted once, in order, and the number of windows is
  ``ceil(total / Hp)``. The first ``crossfade`` frames a window emits are a seam: the runner blends them with the
  previous window's prediction of the same frames (that window saw them Hp frames later in its own timeline).
  Offline: Hp close to W with a short seam. Live: small Hp (e.g. 10) so the first frame needs only Hp frames of
  audio plus a short lookahead; each window then sees only ``hop + lookahead`` frames of real audio and the rest
  of its W frames is padding.
* **Render chunks** (Stage II). Fixed size C <= 32 (the motion modules' position table has 32 entries), the last
  one padded so every exported engine has one static shape. Chunk j > 0 starts ``C - O`` frames after chunk j-1;
  its first O frames are the overlap whose final latents come from chunk j-1, the rest are new and emitted.

This module imports nothing but the standard library so it can be tested in milliseconds and used anywhere.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

FPS = 25  # frame clock (mmgt.config.FPS)
SAMPLE_RATE = 16_000  # audio clock (mmgt.config.AUDIO_SAMPLE_RATE)
SMGA_WINDOW = 80  # frames per SMGA window (mmgt.config.SMGAConfig.window)
MAX_CHUNK_FRAMES = 32  # frames per temporal window of the motion modules (UNetConfig.motion_max_frames)


# ----------------------------------------------------------------------------------------------------------------
# argument checks: every error names the parameter and its value
# ----------------------------------------------------------------------------------------------------------------
def _int(name: str, value: object) -> int:
    """Accept ints (and numpy ints via __index__), reject bools, floats and everything else."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


def _at_least(name: str, value: object, low: int) -> int:
    v = _int(name, value)
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _check_clock(sample_rate: object, fps: object) -> Tuple[int, int]:
    return _at_least("sample_rate", sample_rate, 1), _at_least("fps", fps, 1)


def _check_window_args(window: object, hop: object, crossfade: object) -> Tuple[int, int, int]:
    w = _at_least("window", window, 1)
    h = _at_least("hop", hop, 1)
    if h > w:
        raise ValueError(f"hop must be <= window ({w}), got hop={h}")
    x = _at_least("crossfade", crossfade, 0)
    if x > w - h:
        raise ValueError(f"crossfade must be <= window - hop ({w} - {h} = {w - h}), got crossfade={x}")
    return w, h, x


def _check_chunk_args(chunk: object, overlap: object, max_chunk: object) -> Tuple[int, int]:
    m = _at_least("max_chunk", max_chunk, 1)
    c = _at_least("chunk", chunk, 1)
    if c > m:
        raise ValueError(f"chunk must be <= {m} frames (motion-module position table), got chunk={c}")
    o = _at_least("overlap", overlap, 0)
    if o >= c:
        raise ValueError(f"overlap must be < chunk ({c}), got overlap={o}")
    return c, o


# ----------------------------------------------------------------------------------------------------------------
# clocks
# ----------------------------------------------------------------------------------------------------------------
def frames_for_samples(n_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """Video frames for ``n_samples`` of audio: ``round(duration * fps)``, halves rounded up.

    Rounding (not ceil) is what a video of the same duration has: 60 s at 25 fps gives 1500 frames, and a clip
    that is one sample longer than 1500 frames still gives 1500 rather than a 1501st frame with no audio under it.
    The last frame may need up to half a frame of audio past the end; the runner pads that with silence.
    """
    n = _at_least("n_samples", n_samples, 0)
    sr, f = _check_clock(sample_rate, fps)
    return (2 * n * f + sr) // (2 * sr)  # floor(n*fps/sr + 1/2) in exact integer arithmetic


def frame_to_sample(frame: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """First audio sample of ``frame`` (frame f covers samples [f*sr/fps, (f+1)*sr/fps), floored)."""
    sr, f = _check_clock(sample_rate, fps)
    return _int("frame", frame) * sr // f


def complete_frames(n_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """Frames whose audio has fully arrived once ``n_samples`` samples are in (floor, unlike frames_for_samples)."""
    n = _at_least("n_samples", n_samples, 0)
    sr, f = _check_clock(sample_rate, fps)
    return n * f // sr


def crossfade_weights(n: int) -> List[float]:
    """Weights of the NEW window over an n-frame seam: (i+1)/(n+1), strictly between 0 and 1, rising.

    Output frame = (1 - w) * previous window + w * new window; neither side is used alone inside the seam, so the
    seam has no step at either end.
    """
    n = _at_least("n", n, 0)
    return [(i + 1) / (n + 1) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Stage I: pose windows
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One SMGA window. Frame numbers are global unless called local (0 = this window's first frame)."""

    index: int  # k: 0, 1, 2, ...
    start: int  # global frame of local frame 0 (= k * hop)
    n_frames: int  # W: always the full window length; frames past valid_frames are padding
    valid_frames: int  # local frames [0, valid_frames) have real audio under them (the rest is padded)
    keep_from: int  # local: first emitted frame (always 0: the previous window emitted up to start)
    keep_to: int  # local, exclusive: emitted frames are [keep_from, keep_to) (hop, or fewer at the end)
    crossfade: int  # local frames [0, crossfade) are blended with the previous window's prediction of them
    cond_frame: Optional[int]  # global frame of the previous window's last real frame, whose pose conditions
    # this window (MMGT_SPEC.md: frame 79 of window k); None for window 0 (the reference image's pose)
    audio_start: int  # audio samples this window reads: [audio_start, audio_end) (pad past the source's end)
    audio_end: int

    @property
    def end(self) -> int:
        """Global frame after the window's last (padded) frame."""
        return self.start + self.n_frames

    @property
    def padded_frames(self) -> int:
        """Frames at the end of the window without audio (the runner pads their audio with zeros)."""
        return self.n_frames - self.valid_frames

    @property
    def emit_range(self) -> Tuple[int, int]:
        """Global frames this window emits: [first, last + 1)."""
        return self.start + self.keep_from, self.start + self.keep_to

    @property
    def seam_range(self) -> Tuple[int, int]:
        """Global frames blended with the previous window (empty for the first window)."""
        return self.start, self.start + self.crossfade


def _make_window(k: int, total: Optional[int], w: int, h: int, x: int, lookahead: Optional[int],
                 sr: int, fps: int) -> Window:
    """Window k of a stream of ``total`` frames (None: the stream goes on past this window's audio needs).

    ``lookahead`` None means the window may read all of its W frames of audio (offline); an int means it reads only
    ``hop + lookahead`` frames past its start, as a live stream that emits it as early as possible does.
    """
    start = k * h
    reach = w if lookahead is None else min(w, h + lookahead)  # audio frames the window is allowed to read
    valid = reach if total is None else min(reach, total - start)
    keep_to = h if total is None else min(h, total - start)
    if k == 0:
        seam, cond = 0, None
    else:
        prev_start = start - h
        prev_valid = reach if total is None else min(reach, total - prev_start)
        # The seam blends only frames the previous window predicted from real audio (start + seam <= prev end).
        seam = min(x, keep_to, prev_start + prev_valid - start)
        # MMGT_SPEC.md: window k+1 is conditioned on the LAST frame of window k (79 when it is full); with a
        # shorter audio reach that is the last frame the previous window saw audio for.
        cond = prev_start + prev_valid - 1
    return Window(index=k, start=start, n_frames=w, valid_frames=valid, keep_from=0, keep_to=keep_to,
                  crossfade=max(seam, 0), cond_frame=cond,
                  audio_start=frame_to_sample(start, sr, fps), audio_end=frame_to_sample(start + valid, sr, fps))


def plan_windows(total_frames: int, window: int = SMGA_WINDOW, hop: int = SMGA_WINDOW, crossfade: int = 0, *,
                 lookahead_frames: Optional[int] = None, sample_rate: int = SAMPLE_RATE,
                 fps: int = FPS) -> List[Window]:
    """Pose windows for a finite stream of ``total_frames`` frames (``ceil(total / hop)`` windows, none if 0).

    ``lookahead_frames=None`` lets every window read its whole W frames of audio (offline). An int gives the plan
    a live ``StreamPlanner`` with that lookahead produces for the same stream, window for window.
    """
    total = _at_least("total_frames", total_frames, 0)
    w, h, x = _check_window_args(window, hop, crossfade)
    la = None if lookahead_frames is None else _at_least("lookahead_frames", lookahead_frames, 0)
    sr, f = _check_clock(sample_rate, fps)
    n_windows = -(-total // h)
    return [_make_window(k, total, w, h, x, la, sr, f) for k in range(n_windows)]


class StreamPlanner:
    """Open-ended pose-window planner fed with audio sample counts as they arrive.

    ``push(n)`` returns, in order, the windows that became ready: window k is ready once the audio of its hop
    plus ``lookahead_frames`` (capped at W) has fully arrived. ``finish()`` ends the stream and returns the tail
    (windows whose frames are cut short by the end). The concatenation equals
    ``plan_windows(frames_for_samples(total), ..., lookahead_frames=lookahead_frames)``; with
    ``lookahead_frames >= window - hop`` it also equals the offline plan (``lookahead_frames=None``).
    """

    def __init__(self, window: int = SMGA_WINDOW, hop: int = 10, crossfade: int = 0, lookahead_frames: int = 0, *,
                 sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> None:
        self.window, self.hop, self.crossfade = _check_window_args(window, hop, crossfade)
        self.lookahead_frames = _at_least("lookahead_frames", lookahead_frames, 0)
        self.sample_rate, self.fps = _check_clock(sample_rate, fps)
        self.samples = 0  # audio samples received so far
        self.next_index = 0  # index of the next window to hand out
        self.finished = False

    @property
    def reach(self) -> int:
        """Frames of audio past a window's start needed before it is ready."""
        return min(self.window, self.hop + self.lookahead_frames)

    @property
    def latency_frames(self) -> int:
        """Frames of audio that must arrive before the first window is ready (hop + lookahead, capped at W)."""
        return self.reach

    def push(self, n_new_samples: int) -> List[Window]:
        """Add ``n_new_samples`` of audio; return the windows that became ready, in order (often none).

        A list, not a generator: the samples are counted even if the caller ignores the result.
        """
        n = _at_least("n_new_samples", n_new_samples, 0)
        if self.finished:
            raise ValueError("StreamPlanner.push() after finish(): the stream has ended")
        self.samples += n
        have = complete_frames(self.samples, self.sample_rate, self.fps)
        ready = []
        while self.next_index * self.hop + self.reach <= have:
            ready.append(_make_window(self.next_index, None, self.window, self.hop, self.crossfade,
                                      self.lookahead_frames, self.sample_rate, self.fps))
            self.next_index += 1
        return ready

    def finish(self) -> List[Window]:
        """End the stream; return the remaining windows, cut to the final frame count (frames_for_samples).

        A second call returns an empty list.
        """
        if self.finished:
            return []
        self.finished = True
        total = frames_for_samples(self.samples, self.sample_rate, self.fps)
        tail = [_make_window(k, total, self.window, self.hop, self.crossfade, self.lookahead_frames,
                             self.sample_rate, self.fps) for k in range(self.next_index, -(-total // self.hop))]
        self.next_index += len(tail)
        return tail


# ----------------------------------------------------------------------------------------------------------------
# Stage II: render chunks
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderChunk:
    """One fixed-size Stage II chunk. Frame numbers are global unless called local."""

    index: int  # j: 0, 1, 2, ...
    start: int  # global frame of local frame 0
    n_frames: int  # C: always the full chunk size (static engine shape)
    valid_frames: int  # local frames [0, valid_frames) are real; the rest are padding (repeat the last pose)
    overlap: int  # local frames [0, overlap) reuse the previous chunk's final latents (0 for the first chunk)

    @property
    def new_from(self) -> int:
        """Local: first new (emitted) frame."""
        return self.overlap

    @property
    def new_to(self) -> int:
        """Local, exclusive: new frames are [new_from, new_to); padding is never emitted."""
        return self.valid_frames

    @property
    def padded_frames(self) -> int:
        return self.n_frames - self.valid_frames

    @property
    def emit_range(self) -> Tuple[int, int]:
        """Global frames this chunk emits: [first, last + 1)."""
        return self.start + self.new_from, self.start + self.new_to

    @property
    def padding_mask(self) -> Tuple[bool, ...]:
        """Per local frame: True where the frame is padding past the end of the stream."""
        return tuple(i >= self.valid_frames for i in range(self.n_frames))

    def audio_range(self, sample_rate: int = SAMPLE_RATE, fps: int = FPS, context_frames: int = 0) -> Tuple[int, int]:
        """Audio samples under the chunk's valid frames, widened by ``context_frames`` each side (floored at 0)."""
        ctx = _at_least("context_frames", context_frames, 0)
        first = max(0, self.start - ctx)
        return frame_to_sample(first, sample_rate, fps), frame_to_sample(self.start + self.valid_frames + ctx,
                                                                          sample_rate, fps)


def _make_chunk(j: int, total: Optional[int], c: int, o: int) -> RenderChunk:
    start = j * (c - o)
    valid = c if total is None else min(c, total - start)
    return RenderChunk(index=j, start=start, n_frames=c, valid_frames=valid, overlap=o if j > 0 else 0)


def _n_chunks(total: int, c: int, o: int) -> int:
    if total == 0:
        return 0
    if total <= c:
        return 1
    return 1 + -(-(total - c) // (c - o))  # each further chunk brings c - o new frames


def plan_chunks(total_frames: int, chunk: int, overlap: int = 0, *,
                max_chunk: int = MAX_CHUNK_FRAMES) -> List[RenderChunk]:
    """Render chunks for a finite stream: the first chunk starts at 0, each next one ``chunk - overlap`` later,
    until the stream is covered; every frame is emitted exactly once, in order."""
    total = _at_least("total_frames", total_frames, 0)
    c, o = _check_chunk_args(chunk, overlap, max_chunk)
    return [_make_chunk(j, total, c, o) for j in range(_n_chunks(total, c, o))]


class StreamChunkPlanner:
    """Open-ended render-chunk planner fed with pose frame counts as Stage I emits them.

    Chunk j is ready once all C of its frames have poses; ``finish()`` returns the padded tail. The concatenation
    equals ``plan_chunks(total, chunk, overlap)``.

    A resumed run starts mid-stream: ``first_index`` is the first chunk it renders and ``frames`` the global frame
    its first pose arrives at (the start of the pose window it restarts from, at or before that chunk's start); the
    chunks it then hands out are the tail of the same plan.
    """

    def __init__(self, chunk: int, overlap: int = 0, *, max_chunk: int = MAX_CHUNK_FRAMES, first_index: int = 0,
                 frames: int = 0) -> None:
        self.chunk, self.overlap = _check_chunk_args(chunk, overlap, max_chunk)
        self.next_index = _at_least("first_index", first_index, 0)
        self.frames = _at_least("frames", frames, 0)  # pose frames received so far (global: from frame 0)
        if self.frames > self.next_index * (self.chunk - self.overlap):
            raise ValueError(f"frames={self.frames} is past the start of chunk {self.next_index}: its poses would "
                             "be missing")
        self.finished = False

    def push(self, n_new_frames: int) -> List[RenderChunk]:
        """Add ``n_new_frames`` pose frames; return the chunks that became ready, in order (often none)."""
        n = _at_least("n_new_frames", n_new_frames, 0)
        if self.finished:
            raise ValueError("StreamChunkPlanner.push() after finish(): the stream has ended")
        self.frames += n
        step = self.chunk - self.overlap
        ready = []
        while self.next_index * step + self.chunk <= self.frames:
            ready.append(_make_chunk(self.next_index, None, self.chunk, self.overlap))
            self.next_index += 1
        return ready

    def finish(self) -> List[RenderChunk]:
        """End the stream; return the remaining (last, padded) chunk if frames are not yet covered; then []."""
        if self.finished:
            return []
        self.finished = True
        tail = [_make_chunk(j, self.frames, self.chunk, self.overlap)
                for j in range(self.next_index, _n_chunks(self.frames, self.chunk, self.overlap))]
        self.next_index += len(tail)
        return tail



# ----------------------------------------------------------------------------------------------------------------
# Structural latency of a live layout
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StructuralLatency:
    """Frames of audio that must have arrived beyond a frame before the engine can emit it (pure scheduling)."""

    first: int  # for the stream's first frame
    max: int  # the most any frame waits over a steady stream: the output clock's delay is set by this
    min: int  # the least any frame waits

    @property
    def swing(self) -> int:
        """How many more frames than the least-waiting one the worst frame waits (the burst a queue must hold)."""
        return self.max - self.min


def structural_latency(window: int, hop: int, crossfade: int, lookahead: Optional[int], stage2,
                       frames: int = 400) -> StructuralLatency:
    """The live layout's structural latency over the first ``frames`` frames of a stream.

    ``stage2`` is a fresh open-ended Stage II planner (``StreamChunkPlanner``, or a rolling one): its ``push(n)``
    takes the frames a pose window emits and returns the calls that became possible, each with ``emit_range``. A
    frame leaves with its call, and the call waits for the pose window of its LAST frame, so frames early in a chunk
    wait longer than the chunk's last frame does; ``lookahead`` None means a window reads all of W (``window - hop``
    frames past its hop)."""
    la = lookahead if lookahead is not None else window - hop
    windows = StreamPlanner(window, hop, crossfade, la)
    spf = frame_to_sample(1)
    ready: Dict[int, int] = {}  # frame -> audio frames in when its chunk can run
    for audio_frames in range(1, frames + 1):
        for w in windows.push(spf):
            for c in stage2.push(w.keep_to - w.keep_from):
                for f in range(*c.emit_range):
                    ready[f] = audio_frames
    waits = [ready[f] - f for f in sorted(ready)]
    if not waits:
        raise ValueError(f"hop {hop} / lookahead {lookahead} / {stage2} emit no frame within {frames} frames of audio")
    return StructuralLatency(first=waits[0], max=max(waits), min=min(waits))


__all__ = [
    "FPS", "SAMPLE_RATE", "SMGA_WINDOW", "MAX_CHUNK_FRAMES",
    "frames_for_samples", "frame_to_sample", "complete_frames", "crossfade_weights",
    "Window", "plan_windows", "StreamPlanner", "RenderChunk", "plan_chunks", "StreamChunkPlanner",
    "StructuralLatency", "structural_latency",
]
