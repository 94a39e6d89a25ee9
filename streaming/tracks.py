"""The avatar's two WebRTC tracks, timed from ONE media clock (DESIGN.md, "Streaming").

The engine renders on its own timeline: engine frame ``e`` shows the mouth for engine audio samples
``[e * 640, (e + 1) * 640)`` (16 kHz, 25 fps). The output is a second timeline of 40 ms *slots* that starts when the
first frame is out (plus a small playout margin) and advances with the wall clock. ``MediaClock`` maps every slot to
one engine frame (or to a *hold*), once, and both tracks read that map:

* the video track sends, for slot ``k``, the engine frame of that slot with pts ``k * 3600`` (90 kHz);
* the audio track sends, for the same slot, the engine audio of that frame with pts ``k * 640 + i`` (16 kHz).

So the mouth and the sound in one slot always come from the same engine time, and both pts come from the same
slot count: no second clock can drift, over hours. When the engine is late for a slot the slot is a *hold*: the
video repeats its last frame (counted as a repeat) and the audio is silence, so the output keeps 25 fps and pauses
in sync instead of drifting. When frames pile up (the engine ran ahead, e.g. after a stall) the clock skips forward
so the latency stays bounded. Frames the client is too slow to take are dropped, oldest first, by the QueueSink.

Nothing here imports aiortc at module level: ``import streaming.tracks`` stays cheap; the track classes are built on
first use by :func:`make_tracks`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from fractions import Fraction
from typing import Callable, Deque, Dict, Optional, Tuple

import numpy as np

from engine.sinks import QueueSink
from engine.types import FPS, SAMPLE_RATE, FrameBatch, RunMeta

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 engine samples per video frame
VIDEO_CLOCK = 90_000  # RTP video clock rate
VIDEO_TICKS_PER_FRAME = VIDEO_CLOCK // FPS  # 3600
AUDIO_FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms audio packets (320 samples at 16 kHz)
STAMP_BITS = 16  # frame-index stamp: 16 bits (2 rows of 8 blocks) = 43 minutes before it wraps


# ----------------------------------------------------------------------------------------------------------------
# The engine's audio, on the engine timeline
# ----------------------------------------------------------------------------------------------------------------
class AudioRecord:
    """The audio the engine was given, indexed by engine sample; keeps the last ``seconds`` (a ring).

    The audio track reads it back for the frames it sends, so the sound leaving the server is exactly what drove
    the rendered mouth (the input delayed by the video latency). Thread-safe; reads outside what is kept are zeros.
    """

    def __init__(self, seconds: float = 30.0, sample_rate: int = SAMPLE_RATE) -> None:
        if seconds <= 0:
            raise ValueError(f"AudioRecord: seconds must be > 0, got {seconds}")
        self.capacity = int(seconds * sample_rate)
        self._buf = np.zeros(self.capacity, np.float32)  # ring of the newest `capacity` samples
        self.end = 0  # engine samples appended so far
        self._lock = threading.Lock()

    def append(self, samples: np.ndarray) -> None:
        s = np.asarray(samples, np.float32)  # (n,)
        n = len(s)
        keep = s[-self.capacity:]  # a longer append only leaves its newest ring-full
        with self._lock:
            idx = np.arange(self.end + n - len(keep), self.end + n) % self.capacity
            self._buf[idx] = keep
            self.end += n

    def write(self, start: int, samples: np.ndarray) -> None:
        """Overwrite recorded samples from ``start`` (those no longer kept, or not yet appended, are left out)."""
        s = np.asarray(samples, np.float32)  # (n,)
        with self._lock:
            lo, hi = max(start, self.end - self.capacity, 0), min(start + len(s), self.end)
            if hi > lo:
                self._buf[np.arange(lo, hi) % self.capacity] = s[lo - start:hi - start]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Engine samples [start, stop) as float32; zeros where not (or no longer) recorded."""
        out = np.zeros(max(0, stop - start), np.float32)
        with self._lock:
            lo, hi = max(start, self.end - self.capacity, 0), min(stop, self.end)
            if hi > lo:
                out[lo - start:hi - start] = self._buf[np.arange(lo, hi) % self.capacity]
        return out


# ----------------------------------------------------------------------------------------------------------------
# The one clock
# ----------------------------------------------------------------------------------------------------------------
class MediaClock:
    """Output slots (1/25 s each) on the wall clock, each mapped once to an engine frame or a hold (None).

    ``produced()`` says how many engine frames exist so far (frames are produced in order from 0). Both tracks call
    :meth:`resolve` for the slot they are about to send; the first call decides, later calls read the decision, so
    the two tracks cannot disagree. Thread-safe (the engine thread only ever reads ``produced``).
    """

    def __init__(self, produced, start_margin: float = 0.2, max_lead_frames: int = 40, target_lead_frames: int = 20,
                 history: int = 250, quiet: Optional[Callable[[int], bool]] = None,
                 quiet_lead_frames: Optional[int] = None) -> None:
        if max_lead_frames <= target_lead_frames:
            raise ValueError(f"MediaClock: max_lead_frames ({max_lead_frames}) must exceed target_lead_frames "
                             f"({target_lead_frames})")
        self.produced = produced  # () -> int: engine frames rendered so far
        self.start_margin = start_margin  # playout delay after the first frame (absorbs render jitter)
        self.max_lead_frames, self.target_lead_frames = max_lead_frames, target_lead_frames
        self.t0: Optional[float] = None  # time.monotonic() of slot 0
        self.started = threading.Event()
        self.shift = 0  # slot - engine frame for the slots being resolved now (grows on holds, shrinks on skips)
        self.holds = 0  # slots with no engine frame in time (video repeated, audio silent)
        self.skipped = 0  # engine frames jumped over to bring the latency back down
        # Catching up in pauses: a hold delays every later frame by one slot for good. While more than
        # ``quiet_lead_frames`` frames wait beyond the one due and ``quiet(frame)`` says its audio (and the next
        # frame's) is silence, that frame is left out: the delay the holds added drains in the pauses between
        # sentences, never by cutting speech. None: the clock only jumps at max_lead_frames.
        self.quiet, self.quiet_lead_frames = quiet, quiet_lead_frames
        self.quiet_skipped = 0  # silent frames left out to take the latency back down
        self._next = 0  # next slot to resolve
        self._map: Dict[int, Optional[int]] = {}
        self._history = history
        self._lock = threading.Lock()
        # the last thing each track sent, for the A/V offset: (pts seconds, engine seconds)
        self.last_video: Optional[Tuple[float, float]] = None
        self.last_audio: Optional[Tuple[float, float]] = None

    def start(self, now: Optional[float] = None) -> None:
        """Slot 0 plays ``start_margin`` seconds from now (called when the first frame is out)."""
        with self._lock:
            if self.t0 is None:
                self.t0 = (time.monotonic() if now is None else now) + self.start_margin
                self.started.set()

    def slot_time(self, slot: int) -> float:
        """Wall time (monotonic) at which slot ``slot`` starts."""
        assert self.t0 is not None, "MediaClock.slot_time before start()"
        return self.t0 + slot / FPS

    def current_slot(self, now: Optional[float] = None) -> int:
        assert self.t0 is not None, "MediaClock.current_slot before start()"
        return int(((time.monotonic() if now is None else now) - self.t0) * FPS)

    def resolve(self, slot: int) -> Optional[int]:
        """The engine frame shown in ``slot``, or None for a hold. Slots resolve in order, each exactly once."""
        with self._lock:
            while self._next <= slot:
                s = self._next
                e = s - self.shift
                produced = self.produced()
                if e >= produced:  # 1. engine late: hold this slot (both tracks pause together)
                    self.shift += 1
                    self.holds += 1
                    self._map[s] = None
                else:
                    lead = produced - 1 - e  # frames ready beyond this one
                    if lead > self.max_lead_frames:  # 2. too far behind the engine: jump forward, bound latency
                        jump = lead - self.target_lead_frames
                        self.shift -= jump
                        self.skipped += jump
                        e += jump
                        log.info("MediaClock: %d frames ahead, skipping %d to bound the latency", lead, jump)
                    elif (self.quiet is not None and self.quiet_lead_frames is not None
                          and lead > self.quiet_lead_frames and self.quiet(e) and self.quiet(e + 1)):
                        self.shift -= 1  # 3. behind its usual delay, in a pause: leave one silent frame out
                        self.skipped += 1
                        self.quiet_skipped += 1
                        e += 1
                    self._map[s] = e
                self._map.pop(s - self._history, None)
                self._next += 1
            return self._map.get(slot)

    def av_offset_ms(self) -> Optional[float]:
        """(video pts - its engine time) - (audio pts - its engine time), in ms, from what the tracks last sent.

        0 when both tracks show the same engine time in the same slot; a repeated frame counts as 40 ms late."""
        v, a = self.last_video, self.last_audio
        if v is None or a is None:
            return None
        return ((v[0] - v[1]) - (a[0] - a[1])) * 1000.0


class TimedQueueSink(QueueSink):
    """QueueSink that also records when the first frame arrived (time.monotonic), for first-frame latency."""

    def __init__(self, maxsize: int = 50, on_put: Optional[Callable[[int, int, float], None]] = None) -> None:
        super().__init__(maxsize)
        self.first_frame_time: Optional[float] = None
        self.meta: Optional[RunMeta] = None
        self.on_put = on_put  # (first frame, frames, time.monotonic()) of every batch queued

    def put(self, batch: FrameBatch) -> None:
        now = time.monotonic()
        if self.first_frame_time is None:
            self.first_frame_time = now
        if self.on_put is not None:
            self.on_put(batch.first_frame, batch.n_frames, now)
        super().put(batch)

    write = put


class FramePicker:
    """The picture of each engine frame the clock asks for, taken from the frame queue in order: older queued frames
    are dropped as stale (counted in ``stats.stale``); a frame not there (dropped by the queue) gives None, so the
    caller repeats its previous picture until the clock reaches a newer one. One per consumer of the queue."""

    def __init__(self, sink: QueueSink, stats: "TrackStats") -> None:
        self.sink, self.stats = sink, stats
        self.pending: Optional[FrameBatch] = None  # a frame taken from the queue for a later slot

    def take(self, e: int) -> Optional[np.ndarray]:
        """The picture (H, W, 3) of engine frame ``e``, or None if it is not there."""
        while True:
            item = self.pending if self.pending is not None else self.sink.get_nowait()
            self.pending = None
            if item is None:
                return None
            if item.first_frame < e:
                self.stats.stale += 1
                continue
            if item.first_frame > e:
                self.pending = item
                return None
            return item.frames[0]  # (H, W, 3)


# ----------------------------------------------------------------------------------------------------------------
# Frame-index stamp (diagnostics: lets a receiver tell which engine frame it decoded)
# ----------------------------------------------------------------------------------------------------------------
def _stamp_geometry(width: int) -> int:
    return max(2, width // 8)  # block side: 8 blocks across the frame


def stamp_frame(img: np.ndarray, index: int) -> np.ndarray:
    """A copy of ``img`` (H, W, 3) with ``index`` written as 16 black/white blocks in its top two block rows."""
    out = img.copy()
    b = _stamp_geometry(img.shape[1])
    for bit in range(STAMP_BITS):
        row, col = divmod(bit, 8)
        out[row * b:(row + 1) * b, col * b:(col + 1) * b] = 255 if (index >> bit) & 1 else 0
    return out


def read_stamp(img: np.ndarray) -> int:
    """The index :func:`stamp_frame` wrote (robust to lossy video coding: each block's mean is thresholded)."""
    b = _stamp_geometry(img.shape[1])
    gray = np.asarray(img, np.float32).mean(axis=2)  # (H, W)
    value = 0
    for bit in range(STAMP_BITS):
        row, col = divmod(bit, 8)
        inner = gray[row * b + 1:(row + 1) * b - 1, col * b + 1:(col + 1) * b - 1]  # skip the ringing edges
        if inner.mean() > 127.5:
            value |= 1 << bit
    return value


# ----------------------------------------------------------------------------------------------------------------
# Track statistics (shared by both tracks; read by the stats endpoint)
# ----------------------------------------------------------------------------------------------------------------
class TrackStats:
    def __init__(self) -> None:
        self.sent = 0  # frames (video) or packets (audio) handed to the encoder
        self.repeats = 0  # video: slots that re-sent the previous picture (engine late, or its frame dropped)
        self.stale = 0  # video: frames taken from the queue but too old for their slot (skipped)
        self.late_slots = 0  # slots never sent because the encoder/network asked too late (a slow client)
        self.times: Deque[float] = deque(maxlen=128)  # monotonic send times of the last frames

    def fps(self, window: float = 2.0, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        recent = [t for t in self.times if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)


_TRACK_CLASSES = None


def _track_classes():
    """Build the aiortc track subclasses on first use (aiortc is imported only when a server runs)."""
    global _TRACK_CLASSES
    if _TRACK_CLASSES is not None:
        return _TRACK_CLASSES
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    class AvatarVideoTrack(MediaStreamTrack):
        """25 fps avatar video: slot k carries the engine frame MediaClock maps it to, pts k * 3600 (90 kHz)."""

        kind = "video"

        def __init__(self, clock: MediaClock, sink: QueueSink, size: Tuple[int, int], stamp: bool = False,
                     max_late_slots: int = 25, on_sent: Optional[Callable[[int, float], None]] = None) -> None:
            super().__init__()
            self.clock, self.sink, self.stamp = clock, sink, stamp
            self.on_sent = on_sent  # (engine frame, time.monotonic()) of every fresh frame handed to the encoder
            self.max_late_slots = max_late_slots  # behind the clock by more than this: skip to the present
            self.stats = TrackStats()
            self._slot = 0
            self._picker = FramePicker(sink, self.stats)
            self._last: Optional[np.ndarray] = None  # the picture sent last (repeated on holds)
            self._last_index = -1
            width, height = size
            self._blank = np.zeros((height, width, 3), np.uint8)

        async def _first_frame(self) -> None:
            """Wait for the engine's first frame, then start the clock (slot 0 = that frame + margin)."""
            while self._picker.pending is None:
                if self.readyState != "live":
                    raise MediaStreamError
                self._picker.pending = await self.sink.get(timeout=None)
                if self._picker.pending is None:  # the engine ended before any frame
                    self.stop()
                    raise MediaStreamError
            self.clock.start()

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if not self.clock.started.is_set():
                await self._first_frame()
            # 1. wait for this slot's time; a consumer far behind skips to the present instead of bursting
            now = time.monotonic()
            behind = self.clock.current_slot(now) - self._slot
            if behind > self.max_late_slots:
                self.stats.late_slots += behind
                self._slot += behind
            delay = self.clock.slot_time(self._slot) - now
            if delay > 0:
                await asyncio.sleep(delay)
            # 2. the slot's engine frame, or the previous picture on a hold / missing frame
            e = self.clock.resolve(self._slot)
            img = self._picker.take(e) if e is not None else None
            if img is None:
                self.stats.repeats += 1
                img = self._last if self._last is not None else self._blank
            else:
                self._last, self._last_index = img, e
                if self.on_sent is not None:
                    self.on_sent(e, time.monotonic())
            shown = self._last_index
            if self.stamp:
                img = stamp_frame(img, max(shown, 0))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self._slot * VIDEO_TICKS_PER_FRAME
            frame.time_base = Fraction(1, VIDEO_CLOCK)
            self.clock.last_video = (self._slot / FPS, max(shown, 0) / FPS)
            self._slot += 1
            self.stats.sent += 1
            self.stats.times.append(time.monotonic())
            return frame

    class EngineAudioTrack(MediaStreamTrack):
        """The engine's audio, 20 ms packets at 16 kHz, pts = slot * 640 + offset: the same clock as the video."""

        kind = "audio"

        def __init__(self, clock: MediaClock, record: AudioRecord) -> None:
            super().__init__()
            self.clock, self.record = clock, record
            self.stats = TrackStats()
            self._pos = 0  # output sample of the next packet
            self.silent_packets = 0  # packets sent during holds

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            while not self.clock.started.is_set():  # the video track starts the clock at the first frame
                await asyncio.sleep(0.01)
                if self.readyState != "live":
                    raise MediaStreamError
            now = time.monotonic()
            behind = int((now - self.clock.t0) * SAMPLE_RATE) - self._pos
            if behind > SAMPLE_RATE:  # a slow consumer: skip to the present (whole packets, on the slot grid)
                self.stats.late_slots += behind // SAMPLES_PER_FRAME
                self._pos += behind // AUDIO_FRAME_SAMPLES * AUDIO_FRAME_SAMPLES
            delay = self.clock.t0 + self._pos / SAMPLE_RATE - now
            if delay > 0:
                await asyncio.sleep(delay)
            slot, within = divmod(self._pos, SAMPLES_PER_FRAME)
            e = self.clock.resolve(slot)
            if e is None:
                pcm = np.zeros(AUDIO_FRAME_SAMPLES, np.float32)
                self.silent_packets += 1
            else:
                start = e * SAMPLES_PER_FRAME + within  # engine sample under this packet
                pcm = self.record.read(start, start + AUDIO_FRAME_SAMPLES)  # (320,) float32
                self.clock.last_audio = (self._pos / SAMPLE_RATE, start / SAMPLE_RATE)
            s16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)[None, :]  # (1, 320)
            frame = av.AudioFrame.from_ndarray(s16, format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = self._pos
            frame.time_base = Fraction(1, SAMPLE_RATE)
            self._pos += AUDIO_FRAME_SAMPLES
            self.stats.sent += 1
            self.stats.times.append(time.monotonic())
            return frame

    _TRACK_CLASSES = (AvatarVideoTrack, EngineAudioTrack)
    return _TRACK_CLASSES


def make_tracks(clock: MediaClock, sink: QueueSink, record: AudioRecord, size: Tuple[int, int],
                stamp: bool = False, on_sent: Optional[Callable[[int, float], None]] = None):
    """(video track, audio track) on ``clock``: the avatar frames from ``sink`` and the engine audio in ``record``;
    ``on_sent(frame, time)`` hears of every fresh frame the video track hands to the encoder."""
    video_cls, audio_cls = _track_classes()
    return video_cls(clock, sink, size, stamp=stamp, on_sent=on_sent), audio_cls(clock, record)


__all__ = ["AudioRecord", "MediaClock", "TimedQueueSink", "TrackStats", "FramePicker", "make_tracks", "stamp_frame",
           "read_stamp", "SAMPLES_PER_FRAME", "VIDEO_CLOCK", "AUDIO_FRAME_SAMPLES"]
