"""One live session: audio in -> engine (its own Runner) -> output slots on one clock.

:class:`SessionCore` is the session without an output: engine, feeder, speech and the MediaClock (it imports no
aiortc). What plays the clock's slots is added on top: :class:`Session` adds the two WebRTC tracks (the server's
sessions); streaming/player.py's SlotPlayer pulls slot by slot for other outputs (``engine live``'s virtual camera and
sound card, the Pipecat video service).

Threads of a session (the event loop only ever does non-blocking calls into it):

* the *feeder* (real-time pace, every 20 ms) moves input audio (browser microphone, a file played by the page, or
  the server's microphone; pushed by :meth:`Session.push_input` from any thread) into the engine's LiveSource and
  into the AudioRecord the audio track reads back. When no speech arrives it pushes silence at real-time pace, so
  the engine keeps rendering and the avatar idles (it moves; it never freezes or goes black). When the engine falls
  more than ``max_engine_lag`` behind, input is dropped (counted) instead of queueing without bound;
* the *engine* runs ``Runner.run_stream(LiveSource, QueueSink)``: Stage I and Stage II workers, frames to the sink;
* the *speech* worker (streaming/speech.py) synthesises what :meth:`Session.say` queued, a sentence at a time; the
  feeder mixes it into the timeline at real-time pace, so spoken text reaches the engine, the media clock and the
  returned audio exactly as microphone input does. :meth:`Session.interrupt` drops the queued speech and takes the
  speech not yet played out of the returned audio (the frames already rendered from it still play: see there).

``close()`` stops both and joins them; it is idempotent and safe from any thread.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from engine.native_memory import release_freed_memory
from engine.runner import RenderCancelled, Runner
from engine.settings import LIVE, RenderSettings
from engine.sources import LiveSource
from engine.types import FPS, SAMPLE_RATE

from .latency import OutputLatency
from .speech import SpeechOptions, SpeechQueue
from .tracks import (AUDIO_FRAME_SAMPLES, SAMPLES_PER_FRAME, AudioRecord, MediaClock, TimedQueueSink, TrackStats,
                     make_tracks)

log = logging.getLogger(__name__)

QUIET_RMS = 0.003  # a frame's audio below this RMS (about -50 dBFS) is a pause the clock may shorten


@dataclass(frozen=True)
class SessionOptions:
    """Knobs of a live session (the server's flags fill these)."""

    settings: RenderSettings = LIVE  # engine scheduling/sampling (small hop: low latency)
    queue_frames: int = 100  # QueueSink size (4 s of frames); a slow client drops the oldest beyond this
    start_margin: float = 0.25  # playout delay after the first frame, absorbs render jitter (seconds), on top of
    # what the chunk layout needs (later frames may wait for more audio than the first: RenderSettings.structural)
    jitter: float = 0.06  # input audio may arrive this late before silence is filled in (seconds)
    max_engine_lag: float = 5.0  # engine this far behind its input: drop input instead of queueing (seconds)
    record_seconds: float = 30.0  # engine audio kept for the audio track (a ring)
    tick: float = 0.02  # feeder period (seconds)
    stamp_frames: bool = False  # write the engine frame index into each picture (diagnostics, tests)
    catch_up_in_pauses: bool = True  # after the engine ran late (held frames), leave silent frames out until the
    # delay is back to the usual: the latency a stall added drains in the next pause, speech is never cut
    speech: SpeechOptions = SpeechOptions()  # the text-to-speech queue's limits (POST /say)

    def layout(self) -> Dict[str, int]:
        """The output clock's numbers for these settings; ValueError when the queue cannot hold a burst of frames.

        Frames arrive in bursts (pose windows, render chunks): in steady state up to ``swing`` frames are ready
        beyond the one playing, so the queue must hold a burst plus a render chunk."""
        s = self.settings
        st = s.structural()
        first, worst, best, swing = st.first, st.max, st.min, st.swing
        need = min_queue_frames(s)
        if self.queue_frames < need:
            raise ValueError(f"queue_frames={self.queue_frames} is too small for hop {s.hop} / chunk {s.chunk} / "
                             f"overlap {s.overlap}: frames arrive up to {swing + s.chunk - s.overlap} ahead; "
                             f"need >= {need}")
        if self.start_margin < 0 or self.jitter < 0 or self.max_engine_lag <= 0 or self.tick <= 0:
            raise ValueError(f"SessionOptions: start_margin, jitter >= 0 and max_engine_lag, tick > 0 required "
                             f"(got {self.start_margin}, {self.jitter}, {self.max_engine_lag}, {self.tick})")
        return {"first_frames": first, "max_frames": worst, "min_frames": best, "swing": swing}


def min_queue_frames(settings: RenderSettings) -> int:
    """The smallest frame queue that holds a steady-state burst of ``settings`` plus a render chunk and a margin."""
    return settings.structural().swing + (settings.chunk - settings.overlap) + 16


@dataclass
class InputStats:
    source: str = "none"  # "browser" (mic or page file), "server-mic", or "none" (idle)
    received_seconds: float = 0.0  # input audio received (at 16 kHz)
    silence_seconds: float = 0.0  # silence filled in while no input arrived (the avatar idles)
    dropped_seconds: float = 0.0  # input thrown away because the engine was too far behind
    peak: float = 0.0  # largest |sample| received (shows a live microphone)


class SessionCore:
    """One live avatar without an output: its own Runner, LiveSource, QueueSink, speech queue and MediaClock; the
    models and avatar are shared. An output (the WebRTC tracks of :class:`Session`, a SlotPlayer) plays the clock's
    slots and counts what it sends in ``video_stats`` / ``audio_stats``."""

    def __init__(self, models, avatar, options: SessionOptions = SessionOptions(), session_id: Optional[str] = None,
                 tts=None, tts_error: Optional[str] = None):
        self.id = session_id or uuid.uuid4().hex[:12]
        self.options = options
        self.created = time.monotonic()
        self.state = "new"  # new -> waiting (engine started, no frame yet) -> streaming -> closed | error
        self.error: Optional[str] = None
        self.close_reason: Optional[str] = None
        self.last_client_audio: Optional[float] = None  # time.monotonic() of the client's last audio
        self.inputs = InputStats()
        # 1. engine side
        # the engine reads audio at most max_engine_lag + one window behind the newest sample; keep twice that
        keep = 2.0 * (options.max_engine_lag + options.settings.window / FPS) + 10.0
        self.keep_seconds = keep
        self.runner = Runner(models, avatar, options.settings)
        self.live = LiveSource()  # what the engine reads (16 kHz, the engine timeline)
        self.latency = OutputLatency()  # audio in -> frame out, measured per frame sent
        self.sink = TimedQueueSink(options.queue_frames, on_put=self.latency.frames_in)
        self.record = AudioRecord(options.record_seconds)
        self.pushed = 0  # engine samples pushed so far (audio + filled silence)
        # 2. input side: any-rate audio from any thread, resampled to 16 kHz, drained by the feeder
        self._input = LiveSource()
        # speech from text (say) or another TTS's audio, mixed in by the feeder; tts: a streaming.tts.TTSEngine
        # shared by the sessions (None: text is refused with tts_error)
        self.speech = SpeechQueue(tts, options.speech, tts_error=tts_error)
        self._feed_lock = threading.Lock()  # one block of timeline at a time: the feeder's push vs. interrupt()
        # 3. output side: one clock, two tracks
        # The clock starts late enough for the slowest frame (structural latency) and skips ahead only when more
        # frames wait than the queue can hold (the engine ran ahead, e.g. after a stall)
        self.structural = options.layout()
        max_lead = options.queue_frames - 8
        margin = options.start_margin + (self.structural["max_frames"] - self.structural["first_frames"]) / FPS
        s = options.settings
        self.clock = MediaClock(
            lambda: self.sink.put_frames, start_margin=margin,
            max_lead_frames=max_lead, target_lead_frames=max(self.structural["swing"] + 4, max_lead // 2),
            # the usual lead: the start margin plus a burst of frames (a chunk's new frames arrive together)
            quiet=self._quiet if options.catch_up_in_pauses else None,
            quiet_lead_frames=int(round(margin * FPS)) + (s.chunk - s.overlap) + 2)
        self.size = (models.cfg.resolution, models.cfg.resolution)  # (width, height) of a frame
        self.video_stats, self.audio_stats = TrackStats(), TrackStats()  # what the output sent (it counts there)
        # called with (first, end) engine samples of the timeline an interrupt took speech out of (from the sample
        # heard now to where speech stopped entering): an output may hide the frames rendered from it (SlotPlayer
        # does)
        self.interrupt_listeners: List[Callable[[int, int], None]] = []
        self.report = None  # the engine's RunReport (None while running / when cancelled)
        self._stop = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._feed_start: Optional[float] = None
        self._threads: Dict[str, threading.Thread] = {}

    # ------------------------------------------------------------------------------------------------------------
    def _quiet(self, frame: int) -> bool:
        """Engine frame ``frame``'s audio is silence (the clock may leave such a frame out to catch up)."""
        audio = self.record.read(frame * SAMPLES_PER_FRAME, (frame + 1) * SAMPLES_PER_FRAME)
        return float(np.sqrt(np.mean(np.square(audio)))) < QUIET_RMS

    def start(self) -> None:
        """Start the feeder and the engine (frames flow to the sink; the tracks start the clock on the first)."""
        if self._threads:
            return
        self.state = "waiting"
        self.speech.start()
        self._threads = {"feeder": threading.Thread(target=self._feed, name=f"feed-{self.id}", daemon=True),
                         "engine": threading.Thread(target=self._engine, name=f"engine-{self.id}", daemon=True)}
        for t in self._threads.values():
            t.start()

    def push_input(self, samples: np.ndarray, sample_rate: int, source: str = "browser") -> None:
        """Input audio from any thread: float32 or int16, (N,) or (N, channels), any rate."""
        if self._closed:
            return
        if source == "browser":
            self.last_client_audio = time.monotonic()  # the client is alive (the server's own mic says nothing)
        self.inputs.source = source
        try:
            self._input.push(samples, sample_rate)
        except RuntimeError:  # closed in between: the session is going away
            pass

    # ------------------------------------------------------------------------------------------------------------
    def say(self, text: object, interrupt: bool = False) -> str:
        """Queue ``text`` to be spoken by the avatar (after an :meth:`interrupt` when ``interrupt``); returns the
        utterance id. Raises what SpeechQueue.say raises (SpeechError, SpeechTooLong, SpeechQueueFull,
        TTSUnavailable); a text refused for itself interrupts nothing."""
        if interrupt:
            self.speech.check(text)
            self.interrupt()
        return self.speech.say(text)

    def played_sample(self) -> int:
        """The engine sample being heard now: the audio track's next packet (the video slot now, without an audio
        track); 0 before the first frame. Speech from here on has not been played."""
        clock = self.clock
        if clock.t0 is None or time.monotonic() < clock.t0:
            return 0
        if clock.last_audio is not None:  # (pts s, engine s) of the packet handed to the encoder last
            return int(round(clock.last_audio[1] * SAMPLE_RATE)) + AUDIO_FRAME_SAMPLES
        return max(0, clock.current_slot() - clock.shift) * SAMPLES_PER_FRAME

    def interrupt(self) -> Dict:
        """Stop the avatar's speech now: drop the queued utterances and the synthesised speech not yet in the
        timeline (SpeechQueue.interrupt), and take the speech that is in the timeline but not yet played out of
        the audio the track sends back, so the returned audio is silent from the next packet on (microphone input
        mixed with it stays). The frames already rendered from that speech (the output delay's worth: structural
        latency + render time + playout margin) still play, at 25 fps, with silent audio; frames rendered from
        the timeline after the interrupt idle. Returns {"interrupted": ids, "muted_ms": speech taken out}."""
        with self._feed_lock:  # no block of speech enters between the cut and the mute
            cut = self.speech.interrupt()
            start, end = min(self.played_sample(), cut.at), cut.at
            lo = max(start, self.speech.emitted.end - self.speech.emitted.capacity, 0)
            speech = self.speech.emitted.read(lo, end)  # (end - lo,) speech in the timeline, not yet heard
            muted, span = 0, None
            if speech.any():
                self.record.write(lo, self.record.read(lo, end) - speech)
                self.speech.emitted.write(lo, np.zeros_like(speech))
                nz = np.flatnonzero(speech)
                # the frames rendered from [lo, end) were driven by this speech, its pauses included
                muted, span = int(nz[-1] - nz[0] + 1), (lo, end)
        if span is not None:
            for listener in list(self.interrupt_listeners):
                listener(*span)
        log.info("session %s: interrupted %s (%.0f ms of unplayed speech muted)", self.id, cut.dropped or "nothing",
                 muted / SAMPLE_RATE * 1000)
        return {"interrupted": cut.dropped, "muted_ms": round(muted / SAMPLE_RATE * 1000, 1)}

    def speech_stats(self) -> Dict:
        """The speech queue's stats plus ``playing``: the utterance heard now (None: none, silence, or nothing is
        played yet)."""
        started = self.clock.t0 is not None and time.monotonic() >= self.clock.t0
        playing = self.speech.at(self.played_sample()) if started else None
        return {**self.speech.stats(), "playing": playing}

    # ------------------------------------------------------------------------------------------------------------
    def _engine(self) -> None:
        try:
            self.report = self.runner.run_stream(self.live, self.sink, keep_seconds=self.keep_seconds)
        except RenderCancelled:
            pass
        except Exception as e:  # noqa: BLE001 - a session's failure must not take the server down
            log.exception("session %s: engine failed", self.id)
            self.error, self.state = f"{type(e).__name__}: {e}", "error"
        finally:
            if not self.sink.closed:
                self.sink.close(False)

    def _drain_input(self) -> list:
        parts = []
        while True:
            try:
                chunk = self._input.read(timeout=0)
            except TimeoutError:
                return parts
            if chunk is None:
                return parts
            parts.append(chunk.samples)

    def _push_engine(self, samples: np.ndarray) -> None:
        self.record.append(samples)  # first: the audio track may read it as soon as a frame of it exists
        self.live.push(samples, SAMPLE_RATE)
        self.pushed += len(samples)
        self.latency.audio_in(self.pushed, time.monotonic())

    def _feed(self) -> None:
        """Real-time pacer: input audio as it comes, silence where none came, nothing while the engine is far behind."""
        o = self.options
        origin = self._feed_start = time.monotonic()
        last = origin
        try:
            while not self._stop.wait(o.tick):
                now = time.monotonic()
                parts = self._drain_input()
                got = sum(len(p) for p in parts)
                self.inputs.received_seconds += got / SAMPLE_RATE
                if got:
                    self.inputs.peak = max(self.inputs.peak, float(max(np.abs(p).max() for p in parts if len(p))))
                # 1. engine too far behind its input: drop the input and let the clock hold
                lag = self.pushed - self.sink.put_frames * SAMPLES_PER_FRAME
                if lag > o.max_engine_lag * SAMPLE_RATE:
                    self.inputs.dropped_seconds += got / SAMPLE_RATE
                    origin += now - last  # the dropped time is not owed later as silence
                    last = now
                    continue
                # 2. input audio, as it arrived, then silence up to the real-time target (minus the jitter
                # allowance): the avatar idles
                target = int((now - origin - o.jitter) * SAMPLE_RATE)
                gap = max(0, target - self.pushed - got)
                self.inputs.silence_seconds += gap / SAMPLE_RATE
                if got or gap:
                    block = np.concatenate(parts + [np.zeros(gap, np.float32)])  # (n,) this tick's timeline
                    with self._feed_lock:
                        # 3. speech mixed in over the same samples: it enters at real-time pace
                        speech = self.speech.read(len(block), at=self.pushed)
                        if got:
                            block = np.clip(block + speech, -1.0, 1.0)
                        else:
                            block = speech
                        self._push_engine(block)
                last = now
                if self.state == "waiting" and self.clock.started.is_set():
                    self.state = "streaming"
        except RuntimeError as e:  # LiveSource closed under us by close()
            log.debug("session %s feeder: %s", self.id, e)

    # ------------------------------------------------------------------------------------------------------------
    def close(self, reason: str = "closed", timeout: float = 30.0) -> None:
        """Stop the engine and the feeder, join their threads, end the tracks. Idempotent, any thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        log.info("session %s: closing (%s)", self.id, reason)
        self._stop.set()
        self.speech.close()
        self.runner.stop()
        self._input.close()
        self.live.close()
        for name, t in self._threads.items():
            if t is not threading.current_thread():
                t.join(timeout)
                if t.is_alive():
                    log.warning("session %s: %s thread did not stop within %.0f s", self.id, name, timeout)
        if not self.sink.closed:
            self.sink.close(False)
        self._stop_outputs()
        if self.state != "error":
            self.state = "closed"
        self.close_reason = reason
        release_freed_memory()  # what the session's threads freed (engine/native_memory.py)

    def _stop_outputs(self) -> None:
        """End what plays the slots (an output that needs ending overrides this)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def threads_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads.values())

    # ------------------------------------------------------------------------------------------------------------
    def latency_budget(self) -> Dict[str, Dict[str, float]]:
        """Where an audio sample's way to its frame on the wire goes, p50 and p95 in ms: the engine's stages (audio
        wait, Stage I, Stage II, decode, sink: Runner.latency_budget), then ``playout`` (queued -> sent: the output
        clock's delay), and ``total``, measured end to end per frame sent (not the sum of the parts)."""
        engine, out = self.runner.latency_budget(), self.latency.percentiles()
        if not engine or not out:
            return {}
        budget = {q: {**{k: v for k, v in engine[q].items() if k != "total"}, "engine": engine[q]["total"],
                      "playout": out[q]["playout"], "total": out[q]["total"]} for q in ("p50", "p95")}
        # percentiles do not add up; the parts of one frame do: (engine stages + playout) / measured, per chunk's
        # first frame, in % (100: the budget accounts for all of the measured latency)
        sent = {f: (lat, play) for f, lat, play, _ in self.latency.records()}
        ratios = [100.0 * (e.total + sent[e.frame][1]) / sent[e.frame][0]
                  for e in self.runner.latency_entries()[-200:] if e.frame in sent and sent[e.frame][0] > 0]
        if ratios:
            budget["parts_over_measured_pct"] = round(float(np.median(ratios)), 1)
        return budget

    def stats(self) -> Dict:
        """What the page shows: state, latency, fps, A/V offset, drops (JSON-ready)."""
        now = time.monotonic()
        vs, aus = self.video_stats, self.audio_stats
        first = None
        if self.sink.first_frame_time is not None and self._feed_start is not None:
            first = (self.sink.first_frame_time - self._feed_start) * 1000.0
        latency = None  # input-to-output delay of the slot playing now: clock start + holds - engine time
        if self.clock.t0 is not None and self._feed_start is not None:
            latency = (self.clock.t0 - self._feed_start + self.clock.shift / FPS) * 1000.0
        av = self.clock.av_offset_ms()
        return {
            "id": self.id,
            "state": self.state,
            "error": self.error,
            "uptime_s": round(now - self.created, 2),
            "first_frame_latency_ms": None if first is None else round(first, 1),
            "output_latency_ms": None if latency is None else round(latency, 1),
            "fps": round(vs.fps(now=now), 2),
            "frames_sent": vs.sent,
            "frames_rendered": self.sink.put_frames,
            "frames_dropped": self.sink.dropped,
            "frames_repeated": vs.repeats,
            "frames_stale": vs.stale,
            "holds": self.clock.holds,
            "skipped": self.clock.skipped,
            "skipped_in_pauses": self.clock.quiet_skipped,
            "late_slots": vs.late_slots + aus.late_slots,
            "av_offset_ms": None if av is None else round(av, 2),
            "audio_packets_sent": aus.sent,
            "structural_latency_frames": self.structural,
            "latency_budget_ms": self.latency_budget(),
            "engine_lag_ms": round((self.pushed - self.sink.put_frames * SAMPLES_PER_FRAME) / SAMPLE_RATE * 1000, 1),
            "input": asdict(self.inputs),
            "speech": self.speech_stats(),
        }


class Session(SessionCore):
    """One viewer of the server: a SessionCore plus its two WebRTC tracks (video, audio) on the session's clock."""

    def __init__(self, models, avatar, options: SessionOptions = SessionOptions(), session_id: Optional[str] = None,
                 tts=None, tts_error: Optional[str] = None):
        super().__init__(models, avatar, options, session_id=session_id, tts=tts, tts_error=tts_error)
        self.video, self.audio = make_tracks(self.clock, self.sink, self.record, self.size,
                                             stamp=options.stamp_frames, on_sent=self.latency.sent)
        self.video_stats, self.audio_stats = self.video.stats, self.audio.stats

    def _stop_outputs(self) -> None:
        self.video.stop()
        self.audio.stop()


__all__ = ["Session", "SessionCore", "SessionOptions", "InputStats", "min_queue_frames"]
