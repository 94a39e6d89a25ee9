"""Output-agnostic playout of a live session: slot by slot from its MediaClock, the picture of slot k and its 40 ms of
audio, together.

The WebRTC tracks (streaming/tracks.py) read the clock from two aiortc coroutines; everything else that plays a
session (``engine live``'s virtual camera and sound card, the Pipecat video service) pulls here instead: one
:class:`Slot` per 40 ms with the picture of the engine frame the clock chose and the engine audio under that frame.
Both come from the same clock decision, so an output that sends them together is in sync by construction; an output
whose audio path is slower than its video path (a sound card's buffer) delays the pictures by that much
(streaming/live.py).

After an interrupt (``SessionCore.interrupt``) the audio of the speech not yet heard is silenced at once, but the
frames already rendered from it (the output delay's worth, ~1 s) would still move the mouth. With
``PlayerOptions.cover_interrupted`` the player shows the avatar idling instead: the last idle pictures it played
(frames whose audio was silence), back and forth, cross-faded in and out, until the clock reaches frames rendered
after the speech stopped. The output keeps 25 fps and never freezes or goes black.

Nothing here imports aiortc or torch.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np

from engine.types import FPS, SAMPLE_RATE

from .session import QUIET_RMS, SessionCore
from .tracks import SAMPLES_PER_FRAME, FramePicker, stamp_frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlayerOptions:
    """How a SlotPlayer plays a session."""

    stamp: bool = False  # write the engine frame index into each picture (diagnostics, tests)
    max_late_slots: int = 25  # a consumer behind the clock by more slots than this skips to the present
    cover_interrupted: bool = True  # after an interrupt, idle pictures replace the frames rendered from the speech
    idle_frames: int = 50  # idle pictures kept for that (2 s), played back and forth
    cover_margin_frames: int = 4  # frames after the interrupted speech covered too (lookahead, pose continuity)
    idle_guard: float = 0.4  # a picture is idle when its audio is quiet and no speech is this near (s): pauses
    # inside an utterance are not idling
    fade_frames: int = 3  # slots of cross-fade into and out of the idle pictures


@dataclass
class Slot:
    """What plays in one 40 ms output slot."""

    index: int  # output slot k (slot 0 = the first frame, at clock.t0)
    time: float  # time.monotonic() at which the slot starts
    frame: Optional[int]  # engine frame of the slot (None: a hold, the engine was late)
    picture: np.ndarray  # (H, W, 3) uint8: that frame, the previous picture on a hold, or an idle picture
    audio: np.ndarray  # (640,) float32 at 16 kHz: the engine audio of that frame (silence on a hold)
    fresh: bool  # a new engine picture (False: repeated, or an idle picture covering interrupted speech)
    covered: bool  # the frame belongs to interrupted speech: an idle picture is shown instead


class SlotPlayer:
    """Pulls ``session``'s output slot by slot (see the module docstring). One consumer per session: it takes the
    frames from the session's queue and counts what it plays in ``session.video_stats`` / ``audio_stats``."""

    def __init__(self, session: SessionCore, options: PlayerOptions = PlayerOptions()) -> None:
        self.session, self.options = session, options
        self.clock = session.clock
        self.picker = FramePicker(session.sink, session.video_stats)
        self.next_slot = 0
        width, height = session.size
        self._last: Optional[np.ndarray] = None  # the engine picture played last
        self._last_index = -1
        self._blank = np.zeros((height, width, 3), np.uint8)
        self._idle: Deque[Tuple[int, np.ndarray]] = deque(maxlen=max(1, options.idle_frames))  # (frame, picture)
        self._covers: List[Tuple[int, int]] = []  # engine frame ranges [lo, hi) to cover
        self._cover_lock = threading.Lock()
        self._cover_pos, self._cover_step = 0, -1
        self._fade: Optional[Tuple[np.ndarray, int]] = None  # (picture faded from, slots faded so far)
        self._was_covered = False
        self._shown: Optional[Tuple[int, np.ndarray]] = None  # (stamp index, picture) of the last slot
        self.covered_slots = 0  # slots that showed an idle picture instead of interrupted speech
        if options.cover_interrupted:
            session.interrupt_listeners.append(self._on_interrupt)

    # ------------------------------------------------------------------------------------------------------------
    def _on_interrupt(self, first: int, end: int) -> None:
        """Engine samples [first, end) of speech were taken out of the audio: cover their frames (any thread)."""
        lo = first // SAMPLES_PER_FRAME
        hi = -(-end // SAMPLES_PER_FRAME) + self.options.cover_margin_frames
        with self._cover_lock:
            self._covers.append((lo, hi))
        log.info("player: frames %d-%d (interrupted speech) covered by idle pictures", lo, hi - 1)

    def _idles(self, e: int, audio: np.ndarray) -> bool:
        """Engine frame ``e`` shows the avatar idling: its audio (``audio``) is quiet and the speech queue put no
        speech within ``idle_guard`` of it."""
        if float(np.sqrt(np.mean(np.square(audio)))) >= QUIET_RMS:
            return False
        guard = int(self.options.idle_guard * SAMPLE_RATE)
        near = self.session.speech.emitted.read(e * SAMPLES_PER_FRAME - guard, (e + 1) * SAMPLES_PER_FRAME + guard)
        return not near.any()

    def _covered(self, e: Optional[int]) -> bool:
        if e is None:
            return self._was_covered  # a hold inside a cover stays covered
        with self._cover_lock:
            self._covers = [(lo, hi) for lo, hi in self._covers if hi > e]  # ranges behind the clock are done
            return any(lo <= e < hi for lo, hi in self._covers)

    def _idle_picture(self) -> Tuple[int, np.ndarray]:
        """The next idle picture, going back and forth over the ones kept (the most recent first)."""
        if not self._idle:  # nothing idled yet (speech from the very start): keep the last picture
            return max(self._last_index, 0), self._last if self._last is not None else self._blank
        n = len(self._idle)
        if not self._was_covered:
            self._cover_pos, self._cover_step = n - 1, -1
        pos = min(self._cover_pos, n - 1)
        item = self._idle[pos]
        if n > 1:
            if not 0 <= pos + self._cover_step < n:
                self._cover_step = -self._cover_step
            self._cover_pos = pos + self._cover_step
        return item

    def _faded(self, index: int, picture: np.ndarray, transition: bool) -> Tuple[int, np.ndarray]:
        """``picture`` cross-faded from the one shown when a cover started or ended (``transition``: this slot), over
        ``fade_frames`` slots. The stamp index stays ``picture``'s: what fades out is a still of a picture already
        shown, never a new frame of the interrupted speech."""
        fade = self.options.fade_frames
        if transition and self._shown is not None and fade > 0:
            self._fade = (self._shown[1], 0)
        if self._fade is None:
            return index, picture
        source, done = self._fade
        done += 1
        if done > fade or source.shape != picture.shape:
            self._fade = None
            return index, picture
        self._fade = (source, done)
        w = done / (fade + 1)  # weight of the new picture: 1/4, 2/4, 3/4 for 3 slots
        mixed = (source.astype(np.float32) * (1 - w) + picture.astype(np.float32) * w).round().astype(np.uint8)
        return index, mixed

    # ------------------------------------------------------------------------------------------------------------
    def _started(self, item) -> bool:
        if item is None:  # the engine ended before any frame
            return False
        self.picker.pending = item
        self.clock.start()
        return True

    def wait_first_frame(self, timeout: Optional[float] = None) -> bool:
        """Block until the engine's first frame, then start the clock (slot 0 = that frame + the start margin).
        False when the engine ended first; TimeoutError after ``timeout`` s."""
        if self.clock.started.is_set():
            return True
        return self._started(self.session.sink.get_blocking(timeout))

    async def first_frame(self, timeout: Optional[float] = None) -> bool:
        """:meth:`wait_first_frame` for an event loop."""
        if self.clock.started.is_set():
            return True
        return self._started(await self.session.sink.get(timeout))

    def due(self) -> float:
        """time.monotonic() at which the next slot starts."""
        return self.clock.slot_time(self.next_slot)

    def next(self, now: Optional[float] = None) -> Slot:
        """The next slot (call it at :meth:`due`; the clock decides what it shows when it is asked)."""
        o, session = self.options, self.session
        now = time.monotonic() if now is None else now
        # 1. a consumer far behind skips to the present instead of bursting
        behind = self.clock.current_slot(now) - self.next_slot
        if behind > o.max_late_slots:
            session.video_stats.late_slots += behind
            session.audio_stats.late_slots += behind
            self.next_slot += behind
        k = self.next_slot
        # 2. the slot's engine frame and its audio (silence on a hold)
        e = self.clock.resolve(k)
        picture = self.picker.take(e) if e is not None else None
        fresh = picture is not None
        if fresh:
            self._last, self._last_index = picture, e
            session.latency.sent(e, now)
        else:
            session.video_stats.repeats += 1
            picture = self._last if self._last is not None else self._blank
        if e is None:
            audio = np.zeros(SAMPLES_PER_FRAME, np.float32)
        else:
            audio = session.record.read(e * SAMPLES_PER_FRAME, (e + 1) * SAMPLES_PER_FRAME)  # (640,)
            half = SAMPLES_PER_FRAME // 2  # the slot's audio is "heard" at its middle (played_sample: the next one)
            self.clock.last_audio = ((k * SAMPLES_PER_FRAME + half) / SAMPLE_RATE,
                                     (e * SAMPLES_PER_FRAME + half) / SAMPLE_RATE)
        # 3. idle pictures are remembered; interrupted speech is covered with them
        covered = self._covered(e)
        index = max(self._last_index, 0)
        if fresh and not covered and self._idles(e, audio):
            self._idle.append((e, picture))
        if covered:
            self.covered_slots += 1
            index, picture = self._faded(*self._idle_picture(), transition=not self._was_covered)
        else:
            index, picture = self._faded(index, picture, transition=self._was_covered)
        self._was_covered = covered
        self._shown = (index, picture)
        if o.stamp:
            picture = stamp_frame(picture, index)
        self.clock.last_video = (k / FPS, max(self._last_index, 0) / FPS)
        for stats in (session.video_stats, session.audio_stats):
            stats.sent += 1
            stats.times.append(now)
        self.next_slot += 1
        return Slot(k, self.clock.slot_time(k), e, picture, audio, fresh and not covered, covered)

    # ------------------------------------------------------------------------------------------------------------
    def play(self, emit: Callable[[Slot], None], stop: threading.Event, poll: float = 0.5) -> None:
        """In a thread: wait for the first frame, then ``emit`` every slot at its time until ``stop`` is set or the
        session ends."""
        while not stop.is_set() and not self.clock.started.is_set():
            try:
                if not self.wait_first_frame(poll):
                    return
            except TimeoutError:
                continue
        while not stop.is_set() and not self.session.closed:
            delay = self.due() - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            emit(self.next())

    async def aplay(self, emit) -> None:
        """On an event loop: ``await emit(slot)`` for every slot at its time until the session ends (cancel the task
        to stop earlier)."""
        if not await self.first_frame():
            return
        while not self.session.closed:
            delay = self.due() - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await emit(self.next())


__all__ = ["PlayerOptions", "Slot", "SlotPlayer"]
