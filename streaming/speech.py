"""The speech queue of a live session: text (or a TTS audio stream) in, 16 kHz speech into the engine timeline.

Reusable by anything that owns an engine timeline (streaming/session.py; a presenter without a browser; a voice-agent
integration)::

    speech = SpeechQueue(make_tts(), SpeechOptions())
    speech.start()
    uid = speech.say("Hello. How are you?")        # queued; SpeechQueueFull (429) / SpeechError (400) otherwise
    ...                                            # the timeline's producer, at real-time pace, for EVERY block:
    block = speech.read(n, at=timeline_sample)     # (n,) float32 16 kHz: speech, zeros while none is ready
    ...
    cut = speech.interrupt()                       # queue and synthesised audio dropped; cut.dropped: their ids
    unplayed = speech.emitted.read(played, cut.at) # speech already in the timeline but not yet heard: remove it
    speech.close()

Text is spoken sentence by sentence: a worker thread synthesises the first sentence, hands it over, and only then
synthesises the next (at most ``ahead_seconds`` of speech waits synthesised), so the first sound never waits for the
rest of a long text. Audio from another TTS (a voice agent's) enters as an audio utterance: ``open_audio()``,
``feed_audio(uid, samples, rate)`` as it comes, ``close_audio(uid)``; it is paced and interrupted the same way.

Utterances go ``queued -> speaking -> done`` (or ``interrupted``, or ``failed`` when synthesis fails); "speaking" and
"done" refer to the timeline: speaking from when its first sample entered it, done when its last did (the session
adds when it is heard: the output delay later). The queue is bounded: a flood gets SpeechQueueFull, never a silent
drop. Thread-safe: ``say``/``interrupt`` from the event loop, ``read`` from the timeline's producer.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

import numpy as np

from engine.sources import LiveSource
from engine.types import SAMPLE_RATE

from .tracks import AudioRecord
from .tts import TTSEngine, TTSError, TTSUnavailable, split_sentences

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechOptions:
    """Limits of one session's speech queue."""

    max_queued: int = 32  # utterances waiting to be spoken; one more is refused (SpeechQueueFull: HTTP 429)
    max_text_chars: int = 100_000  # characters of one utterance (about two hours of speech); more: SpeechTooLong
    max_sentence_chars: int = 250  # longer sentences are cut at a clause or word boundary (the first sound sooner)
    ahead_seconds: float = 8.0  # synthesised speech kept ready beyond what entered the timeline (bounds memory)
    history: int = 64  # finished utterances kept for lookups and stats
    record_seconds: float = 30.0  # speech emitted into the timeline kept, to take it out again on an interrupt


class SpeechError(ValueError):
    """A request the queue cannot take as it is (HTTP 400): the message says why."""


class SpeechTooLong(SpeechError):
    """One utterance over ``max_text_chars`` (HTTP 413)."""


class SpeechQueueFull(RuntimeError):
    """``max_queued`` utterances are waiting (HTTP 429): try again when some have been spoken."""


@dataclass
class Utterance:
    id: str
    kind: str  # "text" (synthesised here) or "audio" (fed by the caller)
    text: str = ""
    state: str = "queued"  # queued -> speaking -> done | interrupted | failed
    created: float = field(default_factory=time.monotonic)
    sentences: int = 0  # pieces synthesised so far
    start_sample: Optional[int] = None  # timeline sample where its first sample entered
    end_sample: Optional[int] = None  # timeline sample after its last one (None until done)
    started_at: Optional[float] = None  # time.monotonic() when its first sample entered the timeline
    error: Optional[str] = None
    source: Optional[LiveSource] = None  # audio utterances: what the caller fed, resampled to 16 kHz

    def describe(self) -> Dict:
        return {"id": self.id, "kind": self.kind, "state": self.state, "chars": len(self.text),
                "sentences": self.sentences, "start_sample": self.start_sample, "end_sample": self.end_sample,
                "error": self.error}


@dataclass
class Interruption:
    dropped: List[str]  # utterances stopped (the one speaking, if any, first) or never started
    at: int  # timeline sample where speech stopped entering (everything before it came out of read())


class SpeechQueue:
    """Utterances -> one paced 16 kHz speech stream (see the module docstring)."""

    def __init__(self, tts: Optional[TTSEngine], options: SpeechOptions = SpeechOptions(),
                 tts_error: Optional[str] = None) -> None:
        self.tts = tts
        self.tts_error = tts_error  # why there is no tts (said by say())
        self.options = options
        self.emitted = AudioRecord(options.record_seconds)  # the speech read() put into the timeline, by sample
        self._cond = threading.Condition()
        self._pending: Deque[Utterance] = deque()  # accepted, not yet taken by the worker
        self._ready: Deque[list] = deque()  # [utterance, samples or None (its end), offset] synthesised, in order
        self._ready_samples = 0
        self._current: Optional[Utterance] = None  # the one whose samples read() is handing out
        self._working: Optional[Utterance] = None  # the one the worker is synthesising
        self._queued = 0  # utterances in state "queued"
        self._gen = 0  # bumped by interrupt(): work started before it is thrown away
        self._by_id: Dict[str, Utterance] = {}
        self._finished: Deque[str] = deque()
        self.counts = {"said": 0, "done": 0, "interrupted": 0, "failed": 0, "refused": 0}
        self.speech_seconds = 0.0  # speech that entered the timeline
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="speech", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (a synthesis in progress finishes first) and drop everything."""
        self.interrupt()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------------------
    def _admit(self, kind: str, text: str = "") -> Utterance:
        """Queue a new utterance (caller holds the lock); SpeechQueueFull when the queue is full."""
        if self._stop:
            raise SpeechError("the session is closing")
        if self._queued >= self.options.max_queued:
            self.counts["refused"] += 1
            raise SpeechQueueFull(f"{self._queued} utterances are already waiting to be spoken (the limit): "
                                  "try again when some have been spoken, or interrupt")
        u = Utterance(uuid.uuid4().hex[:12], kind, text)
        if kind == "audio":
            u.source = LiveSource()
        self._pending.append(u)
        self._by_id[u.id] = u
        self._queued += 1
        self.counts["said"] += 1
        self._cond.notify_all()
        return u

    def say(self, text: object) -> str:
        """Queue ``text`` to be spoken; returns its utterance id. SpeechError (not a string, empty), SpeechTooLong,
        SpeechQueueFull, TTSUnavailable (no TTS engine)."""
        self.check(text)
        with self._cond:
            return self._admit("text", text).id

    def check(self, text: object) -> None:
        """Raise what :meth:`say` would for ``text`` itself (all but a full queue)."""
        if not isinstance(text, str):
            raise SpeechError(f"\"text\" must be a string, got {type(text).__name__}")
        if not text.strip():
            raise SpeechError("\"text\" is empty: nothing to say")
        if len(text) > self.options.max_text_chars:
            raise SpeechTooLong(f"\"text\" has {len(text)} characters, more than the {self.options.max_text_chars} "
                                "one utterance may have: send it in parts (they are queued in order)")
        if self.tts is None:
            raise TTSUnavailable(self.tts_error or "no text-to-speech engine is configured")

    def open_audio(self) -> str:
        """Queue an utterance whose audio the caller feeds (another TTS); returns its id."""
        with self._cond:
            return self._admit("audio").id

    def feed_audio(self, uid: str, samples: np.ndarray, sample_rate: int) -> bool:
        """More audio of ``uid`` (any rate, float32 or int16, mono or (N, channels)); False once it was interrupted
        (the caller stops feeding) or closed."""
        u = self._by_id.get(uid)
        if u is None or u.source is None:
            raise SpeechError(f"no audio utterance {uid!r}")
        if u.state in ("interrupted", "failed") or u.source.closed:
            return False
        try:
            u.source.push(samples, sample_rate)
        except RuntimeError:  # closed by an interrupt in between
            return False
        return True

    def close_audio(self, uid: str) -> None:
        """No more audio for ``uid``: it is done once what was fed has entered the timeline."""
        u = self._by_id.get(uid)
        if u is not None and u.source is not None:
            u.source.close()

    def say_audio(self, samples: np.ndarray, sample_rate: int) -> str:
        """Queue a whole piece of speech audio (any rate) as one utterance; returns its id."""
        uid = self.open_audio()
        self.feed_audio(uid, samples, sample_rate)
        self.close_audio(uid)
        return uid

    # ------------------------------------------------------------------------------------------------------------
    def interrupt(self) -> Interruption:
        """Stop speaking now: the utterance speaking, those queued and every synthesised sample not yet read are
        dropped (state "interrupted"); a synthesis in progress is thrown away when it returns."""
        with self._cond:
            self._gen += 1
            dropped: List[Utterance] = []
            for u in [self._current, self._working, *(item[0] for item in self._ready), *self._pending]:
                if u is not None and u not in dropped:
                    dropped.append(u)
            for u in dropped:
                if u.state in ("queued", "speaking"):
                    if u.state == "queued":
                        self._queued -= 1
                    u.state = "interrupted"
                    self.counts["interrupted"] += 1
                    self._finish(u)
                if u.source is not None:
                    u.source.close()
            self._pending.clear()
            self._ready.clear()
            self._ready_samples = 0
            self._current = None
            self._cond.notify_all()
            at = self.emitted.end
        if dropped:
            log.info("speech: interrupted %s", ", ".join(u.id for u in dropped))
        return Interruption([u.id for u in dropped if u.state == "interrupted"], at)

    def _finish(self, u: Utterance) -> None:
        """Keep ``u`` for lookups among the last ``history`` finished ones (caller holds the lock)."""
        if u.end_sample is None and u.start_sample is not None:
            u.end_sample = self.emitted.end
        self._finished.append(u.id)
        while len(self._finished) > self.options.history:
            self._by_id.pop(self._finished.popleft(), None)

    # ------------------------------------------------------------------------------------------------------------
    def read(self, n: int, at: int) -> np.ndarray:
        """The next ``n`` samples of speech, for timeline samples [at, at + n): (n,) float32, zeros where nothing
        is ready. Call it for every block of the timeline in order (``at`` = the previous ``at + n``; a gap is
        taken as silence), at real-time pace: that is what paces the speech."""
        out = np.zeros(max(0, n), np.float32)
        with self._cond:
            if at < self.emitted.end:
                raise ValueError(f"SpeechQueue.read: at={at} is before the timeline's end {self.emitted.end}")
            if at > self.emitted.end:
                self.emitted.append(np.zeros(at - self.emitted.end, np.float32))
            pos = 0
            while self._ready and pos <= n:
                item = self._ready[0]
                u, samples, offset = item
                if u.state == "queued":  # 1. its first sample enters here
                    u.state, u.start_sample, u.started_at = "speaking", at + pos, time.monotonic()
                    self._queued -= 1
                    self._current = u
                if samples is None:  # 2. its end: done (or failed, with what could be synthesised spoken)
                    u.end_sample = at + pos
                    u.state = "failed" if u.error else "done"
                    self.counts[u.state] += 1
                    self._finish(u)
                    self._current = None
                    self._ready.popleft()
                    continue
                if pos == n:
                    break
                take = min(n - pos, len(samples) - offset)  # 3. as much of it as this block holds
                out[pos:pos + take] = samples[offset:offset + take]
                item[2] += take
                pos += take
                self._ready_samples -= take
                if item[2] == len(samples):
                    self._ready.popleft()
            self.speech_seconds += pos / SAMPLE_RATE
            self.emitted.append(out)
            self._cond.notify_all()  # room for the worker
        return out

    # ------------------------------------------------------------------------------------------------------------
    def _hand_over(self, u: Utterance, gen: int, samples: Optional[np.ndarray]) -> bool:
        """Add synthesised ``samples`` of ``u`` (None: its end) unless an interrupt came since; False then."""
        with self._cond:
            if gen != self._gen or self._stop:
                return False
            if samples is None or len(samples):
                self._ready.append([u, samples, 0])
                self._ready_samples += 0 if samples is None else len(samples)
            self._cond.notify_all()
            return True

    def _room(self, gen: int) -> bool:
        """Wait until fewer than ``ahead_seconds`` of speech wait synthesised; False when interrupted or stopping."""
        ahead = int(self.options.ahead_seconds * SAMPLE_RATE)
        with self._cond:
            while self._ready_samples >= ahead and gen == self._gen and not self._stop:
                self._cond.wait(0.5)
            return gen == self._gen and not self._stop

    def _pieces(self, u: Utterance, gen: int):
        """The 16 kHz audio of ``u`` piece by piece: a sentence synthesised at a time, or what the caller fed."""
        if u.kind == "text":
            for sentence in split_sentences(u.text, self.options.max_sentence_chars):
                if not self._room(gen):
                    return
                samples = self.tts.synthesize(sentence)
                u.sentences += 1
                yield samples
            return
        while self._room(gen):
            try:
                chunk = u.source.read(timeout=0.2)
            except TimeoutError:
                continue
            if chunk is None:  # closed and drained
                return
            yield chunk.samples

    def _work(self) -> None:
        """The synthesis worker: one utterance at a time, in order."""
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                u, gen = self._pending.popleft(), self._gen
                self._working = u
            try:
                for samples in self._pieces(u, gen):
                    if not self._hand_over(u, gen, samples):
                        break
            except TTSError as e:
                log.warning("speech: utterance %s: %s", u.id, e)
                u.error = str(e)
            except Exception as e:  # noqa: BLE001 - one bad utterance must not stop the session's speech
                log.exception("speech: utterance %s failed", u.id)
                u.error = f"{type(e).__name__}: {e}"
            self._hand_over(u, gen, None)  # its end (dropped when interrupted)
            with self._cond:
                self._working = None

    # ------------------------------------------------------------------------------------------------------------
    def utterance(self, uid: str) -> Optional[Dict]:
        """What is known of utterance ``uid`` (one of the last ``history`` finished, or an unfinished one)."""
        with self._cond:
            u = self._by_id.get(uid)
            return None if u is None else u.describe()

    def at(self, sample: int) -> Optional[str]:
        """The utterance whose speech is at timeline ``sample`` (None: silence there, or an interrupted part)."""
        with self._cond:
            for u in self._by_id.values():
                if u.start_sample is not None and u.start_sample <= sample and u.state in ("speaking", "done",
                                                                                         "failed"):
                    if sample < (u.end_sample if u.end_sample is not None else self.emitted.end):
                        return u.id
        return None

    def stats(self) -> Dict:
        with self._cond:
            return {"queued": self._queued, "speaking": self._current.id if self._current else None,
                    "ready_seconds": round(self._ready_samples / SAMPLE_RATE, 2),
                    "utterances": dict(self.counts), "speech_seconds": round(self.speech_seconds, 2),
                    "tts": self.tts.describe() if self.tts is not None else None, "tts_error": self.tts_error}


__all__ = ["SpeechQueue", "SpeechOptions", "SpeechError", "SpeechTooLong", "SpeechQueueFull", "Utterance",
           "Interruption"]
