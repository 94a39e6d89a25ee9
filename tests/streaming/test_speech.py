"""The speech queue (streaming/speech.py) on its own, with a scripted TTS: order, pacing, the first sentence before
the rest is synthesised, the bounded queue, interruption, audio fed by another TTS, failures."""
import threading
import time

import numpy as np
import pytest

from streaming.speech import SpeechError, SpeechOptions, SpeechQueue, SpeechQueueFull, SpeechTooLong
from streaming.tts import TTSEngine, TTSError, TTSUnavailable

BLOCK = 320  # the timeline block the tests read (20 ms at 16 kHz)


class ScriptedTTS(TTSEngine):
    """Each sentence -> 0.1 s of a constant: 0.01 * (its number in the order synthesised, from 1). A sentence
    containing "WAIT" blocks until ``release`` is set; one containing "FAIL" raises TTSError."""

    name = "scripted"

    def __init__(self):
        self.calls = []
        self.release = threading.Event()
        self.waiting = threading.Event()

    def synthesize(self, sentence):
        self.calls.append(sentence)
        if "WAIT" in sentence:
            self.waiting.set()
            assert self.release.wait(10)
        if "FAIL" in sentence:
            raise TTSError("scripted failure")
        return np.full(1600, 0.01 * len(self.calls), np.float32)


def drain(q: SpeechQueue, seconds: float, at: int = 0, until=None):
    """Read the queue block by block for up to ``seconds`` of wall time (or until ``until()``); (samples, next at)."""
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        out.append(q.read(BLOCK, at))
        at += BLOCK
        time.sleep(0.002)
    return (np.concatenate(out) if out else np.zeros(0, np.float32)), at


@pytest.fixture
def queue():
    tts = ScriptedTTS()
    q = SpeechQueue(tts, SpeechOptions(max_queued=3, ahead_seconds=0.25, max_text_chars=50_000))
    q.start()
    yield q, tts
    tts.release.set()
    q.close()


def test_sentences_play_in_order_and_utterances_record_their_span(queue):
    q, tts = queue
    a = q.say("One. Two.")
    b = q.say("Three.")
    audio, at = drain(q, 5, until=lambda: q.stats()["utterances"]["done"] == 2)
    values = np.round(audio[np.abs(audio) > 0] / 0.01).astype(int)
    assert list(dict.fromkeys(values)) == [1, 2, 3] and len(values) == 3 * 1600  # nothing lost or repeated
    ua, ub = q.utterance(a), q.utterance(b)
    assert tts.calls == ["One.", "Two.", "Three."]
    assert ua["state"] == ub["state"] == "done" and ua["sentences"] == 2
    assert ua["end_sample"] - ua["start_sample"] >= 3200 and ub["start_sample"] >= ua["end_sample"]
    assert q.at(ua["start_sample"]) == a and q.at(ub["start_sample"] + 10) == b and q.at(at + 10) is None
    # the emitted record holds what read() returned, by timeline sample
    assert np.array_equal(q.emitted.read(0, at), audio)


def test_first_sentence_plays_before_the_rest_is_synthesised(queue):
    q, tts = queue
    q.say("First sentence. WAIT here. Third.")
    assert tts.waiting.wait(5)
    audio, _ = drain(q, 0.2)  # the second sentence is still being synthesised
    assert np.count_nonzero(audio) == 1600 and tts.calls == ["First sentence.", "WAIT here."]
    assert q.stats()["speaking"] is not None
    tts.release.set()


def test_long_text_is_queued_and_synthesised_a_little_ahead(queue):
    q, tts = queue
    text = " ".join(f"Sentence {i}." for i in range(2000))  # 10,000+ characters
    assert len(text) > 10_000
    q.say(text)
    time.sleep(0.3)
    # 0.25 s may wait synthesised: the worker stops after a few sentences until they are read
    assert 1 <= len(tts.calls) <= 4, len(tts.calls)
    drain(q, 0.3)
    assert len(tts.calls) > 4


def test_bad_text_and_a_full_queue_are_refused_with_a_reason(queue):
    q, tts = queue
    for text, error, message in [(5, SpeechError, "must be a string, got int"), ("  ", SpeechError, "is empty"),
                                 (None, SpeechError, "got NoneType"),
                                 ("x" * 50_001, SpeechTooLong, "more than the 50000")]:
        with pytest.raises(error, match=message):
            q.say(text)
    q.say("WAIT one.")
    assert tts.waiting.wait(5)  # the first one is being synthesised: still queued (not in the timeline yet)
    q.say("Two.")
    q.say("Three.")
    with pytest.raises(SpeechQueueFull, match="3 utterances are already waiting"):
        q.say("Four.")
    assert q.stats()["queued"] == 3 and q.stats()["utterances"]["refused"] == 1
    assert SpeechQueue(None, tts_error="install it").stats()["tts"] is None
    with pytest.raises(TTSUnavailable, match="install it"):
        SpeechQueue(None, tts_error="install it").say("Hello.")


def test_interrupt_drops_speaking_queued_and_in_flight_speech(queue):
    q, tts = queue
    a = q.say("One. WAIT two. Three.")
    b = q.say("Four.")
    audio, at = drain(q, 5, until=lambda: tts.waiting.is_set() and q.stats()["ready_seconds"] == 0)
    assert q.stats()["speaking"] == a
    cut = q.interrupt()
    assert cut.dropped == [a, b] and cut.at == at
    tts.release.set()  # the synthesis in flight returns after the interrupt: thrown away
    after, at = drain(q, 0.3, at)
    assert not after.any()
    st = q.stats()
    assert st["queued"] == 0 and st["speaking"] is None and st["ready_seconds"] == 0
    assert st["utterances"] == {"said": 2, "done": 0, "interrupted": 2, "failed": 0, "refused": 0}
    assert q.utterance(a)["end_sample"] == cut.at and q.utterance(b)["start_sample"] is None
    assert tts.calls == ["One.", "WAIT two."]  # nothing more was synthesised
    # the queue takes new speech at once
    c = q.say("Again.")
    drain(q, 5, at, until=lambda: q.utterance(c)["state"] == "done")


def test_audio_from_another_tts_is_paced_resampled_and_interruptible(queue):
    q, tts = queue
    uid = q.open_audio()
    t = np.arange(24000) / 48000.0
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for part in np.split(tone, 4):  # a stream of pieces at 48 kHz
        assert q.feed_audio(uid, part, 48000)
    audio, at = drain(q, 0.5)
    assert q.utterance(uid)["state"] == "speaking"  # not closed: more may come
    spoken = audio[np.abs(audio) > 1e-4]
    assert abs(len(spoken) - 8000) <= 64  # 0.5 s at 16 kHz
    assert abs(np.sqrt(np.mean(spoken ** 2)) - 0.3 / np.sqrt(2)) < 0.01  # the tone, level kept
    q.interrupt()
    assert not q.feed_audio(uid, tone, 48000)  # the caller hears that it was interrupted
    with pytest.raises(SpeechError, match="no audio utterance"):
        q.feed_audio("nope", tone, 48000)
    whole = q.say_audio(tone, 48000)
    drain(q, 5, at, until=lambda: q.utterance(whole)["state"] == "done")


def test_a_failing_sentence_fails_its_utterance_and_the_next_one_speaks(queue):
    q, tts = queue
    bad = q.say("Fine. FAIL here. Never.")
    good = q.say("After.")
    drain(q, 5, until=lambda: q.utterance(good)["state"] == "done")
    u = q.utterance(bad)
    assert u["state"] == "failed" and "scripted failure" in u["error"] and u["sentences"] == 1
    assert q.stats()["utterances"]["failed"] == 1 and "Never." not in tts.calls


def test_read_keeps_the_timeline_in_order(queue):
    q, _ = queue
    q.read(BLOCK, 0)
    q.read(BLOCK, 2 * BLOCK)  # a gap is silence
    assert q.emitted.end == 3 * BLOCK
    with pytest.raises(ValueError, match="before the timeline's end"):
        q.read(BLOCK, BLOCK)
