"""Output latency measured where it is felt: an audio sample enters the session -> its frame leaves the server.

The session notes when each piece of engine audio arrived (``audio_in``), when each batch of frames reached its queue
(``frames_in``) and when the video track handed each fresh frame to the encoder (``sent``). Per sent frame that gives
the measured latency (sent - arrival of the frame's last audio sample) and the playout share (sent - queued: the
output clock's delay that keeps frames steady). Bounded: only the newest records are kept, a session runs for hours.
Times are ``time.monotonic()``; thread-safe (the feeder, the engine and the event loop all write here).
"""
from __future__ import annotations

import bisect
import threading
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np

SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps


class OutputLatency:
    def __init__(self, keep: int = 2048) -> None:
        self._lock = threading.Lock()
        self._arrivals: Deque[Tuple[int, float]] = deque(maxlen=8192)  # (engine samples in so far, time) rising
        self._queued: Deque[Tuple[int, int, float]] = deque(maxlen=512)  # (first frame, frames, time queued)
        self.frames: Deque[Tuple[int, float, float, float]] = deque(maxlen=keep)  # (frame, latency, playout, sent)

    def audio_in(self, samples: int, when: float) -> None:
        """``samples`` of engine audio (all since the start) had arrived at ``when``."""
        with self._lock:
            self._arrivals.append((samples, when))

    def frames_in(self, first_frame: int, n_frames: int, when: float) -> None:
        with self._lock:
            self._queued.append((first_frame, n_frames, when))

    def arrival(self, sample: int) -> Optional[float]:
        """When engine audio sample ``sample`` (exclusive end) had arrived; None if not (or no longer) known."""
        with self._lock:
            i = bisect.bisect_left(self._arrivals, (sample, float("-inf")))
            return self._arrivals[i][1] if i < len(self._arrivals) else None

    def _queued_at(self, frame: int) -> Optional[float]:
        for first, n, when in reversed(self._queued):
            if first <= frame < first + n:
                return when
            if first + n <= frame:
                return None
        return None

    def sent(self, frame: int, when: float) -> None:
        """Engine frame ``frame`` left for the encoder at ``when`` (fresh frames only, not repeats)."""
        arrived = self.arrival((frame + 1) * SAMPLES_PER_FRAME)
        with self._lock:
            queued = self._queued_at(frame)
            if arrived is not None and queued is not None:
                self.frames.append((frame, when - arrived, when - queued, when))

    def records(self) -> List[Tuple[int, float, float, float]]:
        """(engine frame, latency s, playout s, time sent) of the newest fresh frames sent, oldest first."""
        with self._lock:
            return list(self.frames)

    def percentiles(self, last: int = 500) -> Dict[str, Dict[str, float]]:
        """{"p50": {"total": ms, "playout": ms}, "p95": {...}} over the newest ``last`` frames ({} before any)."""
        recs = self.records()[-last:]
        if not recs:
            return {}
        lat = np.array([r[1] for r in recs]) * 1000.0
        play = np.array([r[2] for r in recs]) * 1000.0
        return {name: {"total": round(float(np.percentile(lat, q)), 1),
                       "playout": round(float(np.percentile(play, q)), 1)}
                for name, q in (("p50", 50), ("p95", 95))}


__all__ = ["OutputLatency"]
