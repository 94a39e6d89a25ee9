"""SlotPlayer (streaming/player.py) on a stand-in session: no engine, frames and audio put in by hand, so what each
slot plays is known exactly: the clock's frame and its audio together, holds repeat the picture, and after an
interrupt the frames of the speech are covered by idle pictures (cross-faded in and out) until the clock is past
them."""
import threading
import time
from types import SimpleNamespace

import numpy as np

from engine.types import FrameBatch
from streaming.player import PlayerOptions, SlotPlayer
from streaming.tracks import AudioRecord, MediaClock, TimedQueueSink, TrackStats, read_stamp, stamp_frame

SPF = 640


def stand_in(frames: int):
    """A session-shaped object with ``frames`` frames queued (picture stamped with its index) and audio that is
    silence for frames < 10 and a tone from frame 10 on (speech)."""
    sink = TimedQueueSink(200)
    for e in range(frames):
        sink.put(FrameBatch(stamp_frame(np.full((64, 64, 3), e, np.uint8), e)[None], e, 25))
    record = AudioRecord(30)
    audio = np.zeros(frames * SPF, np.float32)
    audio[10 * SPF:] = 0.3 * np.sin(np.arange(len(audio) - 10 * SPF) / 3.0)
    record.append(audio)
    clock = MediaClock(lambda: sink.put_frames, start_margin=0.0, max_lead_frames=190, target_lead_frames=100)
    speech = SimpleNamespace(emitted=AudioRecord(30))  # no speech from the queue: the audio alone says idle
    return SimpleNamespace(clock=clock, sink=sink, record=record, size=(64, 64), video_stats=TrackStats(),
                           audio_stats=TrackStats(), latency=SimpleNamespace(sent=lambda e, t: None),
                           interrupt_listeners=[], closed=False, speech=speech)


def test_slots_pair_each_frame_with_its_audio_and_hold_when_late():
    s = stand_in(5)
    player = SlotPlayer(s, PlayerOptions(stamp=True))
    assert player.wait_first_frame(1)
    t0 = s.clock.t0
    slots = [player.next(now=t0 + k / 25) for k in range(7)]
    assert [x.frame for x in slots] == [0, 1, 2, 3, 4, None, None]  # frames 5, 6 do not exist yet: holds
    assert [read_stamp(x.picture) for x in slots] == [0, 1, 2, 3, 4, 4, 4]  # a hold repeats the last picture
    for x in slots[:5]:
        assert np.array_equal(x.audio, s.record.read(x.frame * SPF, (x.frame + 1) * SPF))
    assert not slots[5].audio.any() and s.video_stats.repeats == 2 and s.clock.holds == 2


def test_interrupted_speech_is_covered_by_idle_pictures():
    s = stand_in(60)
    player = SlotPlayer(s, PlayerOptions(stamp=True, idle_frames=8, cover_margin_frames=2, fade_frames=3))
    assert player.wait_first_frame(1)
    t0 = s.clock.t0
    played = [player.next(now=t0 + k / 25) for k in range(20)]  # frames 0-9 idle, 10-19 speech
    for listener in s.interrupt_listeners:  # what SessionCore.interrupt says: samples of frames 20-39 muted
        listener(20 * SPF, 40 * SPF)
    played += [player.next(now=t0 + k / 25) for k in range(20, 50)]
    stamps = [read_stamp(x.picture) for x in played]
    assert stamps[:20] == list(range(20))
    covered = played[20:42]  # frames 20 .. 39 + 2 margin
    assert all(x.covered and not x.fresh for x in covered)
    assert all(2 <= st <= 9 for st in stamps[20:42]), stamps  # idle pictures (the last 8 silent frames) only
    assert stamps[20:25] == [9, 8, 7, 6, 5]  # the newest idle picture first, then back in time ...
    # cross-fades: the first covered slot is 3/4 the last speech picture (19) and 1/4 the idle one (9)
    body = lambda x: float(x.picture[40:, :, 0].mean())  # below the stamp rows
    assert abs(body(played[20]) - (0.75 * 19 + 0.25 * 9)) < 1.0
    assert stamps[42:] == list(range(42, 50)) and not any(x.covered for x in played[42:])
    assert abs(body(played[42]) - (0.75 * body(played[41]) + 0.25 * 42)) < 1.0  # faded back in
    assert player.covered_slots == 22


def test_pauses_inside_speech_are_not_idle_pictures():
    s = stand_in(40)
    audio = s.record.read(0, 40 * SPF)
    audio[20 * SPF:24 * SPF] = 0.0  # a pause of 4 frames (160 ms) inside the speech ...
    s.record.write(0, audio)
    s.speech.emitted.append(audio)  # ... which the speech queue put in: frames 20-23 are quiet but not idling
    player = SlotPlayer(s, PlayerOptions(idle_frames=50, idle_guard=0.2))
    assert player.wait_first_frame(1)
    for k in range(30):
        player.next(now=s.clock.t0 + k / 25)
    # speech from frame 10: frames 5-9 are within 0.2 s (5 frames) of it, the pause's frames inside it
    assert [e for e, _ in player._idle] == [0, 1, 2, 3, 4]


def test_play_emits_at_slot_times_until_stopped():
    s = stand_in(30)
    s.clock.start_margin = 0.05
    player = SlotPlayer(s)
    got, stop = [], threading.Event()
    thread = threading.Thread(target=player.play, args=(lambda x: got.append((time.monotonic(), x)), stop))
    thread.start()
    time.sleep(0.6)
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and 12 <= len(got) <= 16
    late = [t - x.time for t, x in got]
    assert max(late) < 0.03 and min(late) >= 0.0
