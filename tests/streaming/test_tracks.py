"""streaming: the one media clock, the engine-audio ring, the frame stamp, offer validation, the shared-model lock,
the port range and `engine serve --help` (no network, no rendering)."""
import argparse
import asyncio

import numpy as np
import pytest

from engine.settings import LIVE
from streaming.server import BadRequest, check_offer, parse_port_range, restrict_udp_ports
from streaming.session import SessionOptions
from streaming.tracks import AudioRecord, MediaClock, read_stamp, stamp_frame

VIDEO_SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n" \
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\n"


# ----------------------------------------------------------------------------------------------------------------
# MediaClock
# ----------------------------------------------------------------------------------------------------------------
def test_clock_maps_slots_to_frames_holds_when_late_and_both_tracks_agree():
    produced = [0]
    clock = MediaClock(lambda: produced[0], start_margin=0.0, max_lead_frames=10, target_lead_frames=4)
    produced[0] = 3
    assert [clock.resolve(k) for k in range(3)] == [0, 1, 2]
    # the engine is late for slots 3 and 4: holds; slot 5 then shows frame 3 (nothing skipped, shift 2)
    assert clock.resolve(3) is None and clock.resolve(4) is None
    produced[0] = 4
    assert clock.resolve(5) == 3
    assert clock.holds == 2 and clock.shift == 2
    # a second caller (the other track) reads the same decisions, even after the engine moved on
    produced[0] = 100
    assert [clock.resolve(k) for k in range(6)] == [0, 1, 2, None, None, 3]


def test_clock_skips_ahead_when_too_many_frames_wait():
    produced = [50]
    clock = MediaClock(lambda: produced[0], start_margin=0.0, max_lead_frames=10, target_lead_frames=4)
    e = clock.resolve(0)  # 49 frames ready beyond frame 0 > 10: jump so that 4 remain ahead
    assert e == 45 and clock.skipped == 45 and clock.shift == -45
    assert clock.resolve(1) == 46  # then frame by frame again


def test_clock_drains_the_delay_of_holds_in_pauses_only():
    produced = [0]
    speech = set(range(0, 10)) | set(range(30, 40))  # frames with speech under them; the rest is silence
    clock = MediaClock(lambda: produced[0], start_margin=0.0, max_lead_frames=200, target_lead_frames=100,
                       quiet=lambda e: e not in speech, quiet_lead_frames=3)
    assert [clock.resolve(k) for k in range(4)] == [None] * 4  # the engine is late: 4 holds, 4 slots of delay
    produced[0] = 100  # then it catches up: 99 frames ready, under max_lead_frames but over the quiet lead
    shown = [clock.resolve(k) for k in range(4, 44)]
    assert shown[:10] == list(range(10))  # speech plays whole, frame by frame, late by the holds
    # in the pause after it, one silent frame in two is left out until the delay is back under the quiet lead ...
    assert clock.quiet_skipped > 0 and clock.skipped == clock.quiet_skipped
    # ... and the next speech plays whole again, every frame once and in order
    after = [e for e in shown if e is not None and e >= 30]
    assert after[:10] == list(range(30, 40))
    assert all(b > a for a, b in zip(shown[:-1], shown[1:]))


def test_clock_leaves_speech_alone_even_far_behind():
    produced = [0]
    clock = MediaClock(lambda: produced[0], start_margin=0.0, max_lead_frames=60, target_lead_frames=30,
                       quiet=lambda e: False, quiet_lead_frames=3)
    assert clock.resolve(0) is None and clock.resolve(1) is None
    produced[0] = 50
    assert [clock.resolve(k) for k in range(2, 12)] == list(range(10))  # nothing silent: nothing left out
    assert clock.quiet_skipped == 0 and clock.shift == 2


def test_clock_start_and_slot_times():
    clock = MediaClock(lambda: 0, start_margin=0.5)
    assert not clock.started.is_set()
    clock.start(now=100.0)
    clock.start(now=200.0)  # only the first start counts
    assert clock.t0 == 100.5 and clock.slot_time(25) == pytest.approx(101.5)
    assert clock.current_slot(now=101.5 + 0.039) == 25


def test_clock_av_offset_from_the_tracks_pts():
    clock = MediaClock(lambda: 0)
    assert clock.av_offset_ms() is None
    clock.last_video = (4.0, 2.0)  # slot at 4.0 s shows engine time 2.0 s
    clock.last_audio = (4.02, 2.02)
    assert clock.av_offset_ms() == pytest.approx(0.0)
    clock.last_video = (4.04, 2.0)  # frame 50 repeated in the next slot: the picture is 40 ms older than the sound
    assert clock.av_offset_ms() == pytest.approx(40.0)


def test_clock_rejects_inconsistent_leads():
    with pytest.raises(ValueError, match="max_lead_frames"):
        MediaClock(lambda: 0, max_lead_frames=4, target_lead_frames=4)


# ----------------------------------------------------------------------------------------------------------------
# AudioRecord
# ----------------------------------------------------------------------------------------------------------------
def test_audio_record_is_a_ring_on_the_engine_timeline():
    rec = AudioRecord(seconds=1.0, sample_rate=10)  # 10 samples kept
    rec.append(np.arange(6, dtype=np.float32))
    np.testing.assert_array_equal(rec.read(2, 8), [2, 3, 4, 5, 0, 0])  # past the end: zeros
    rec.append(np.arange(6, 13, dtype=np.float32))  # 13 samples total; samples 0..2 fell out
    assert rec.end == 13
    np.testing.assert_array_equal(rec.read(0, 5), [0, 0, 0, 3, 4])
    np.testing.assert_array_equal(rec.read(9, 13), [9, 10, 11, 12])
    rec.append(np.arange(13, 40, dtype=np.float32))  # longer than the ring: only its newest 10 stay
    np.testing.assert_array_equal(rec.read(28, 40), [0, 0] + list(range(30, 40)))
    # overwriting (an interrupt takes speech out): only the kept, already appended samples change
    rec.write(27, np.full(15, -1.0, np.float32))
    np.testing.assert_array_equal(rec.read(28, 40), [0, 0] + [-1] * 10)
    rec.write(35, np.zeros(2, np.float32))
    np.testing.assert_array_equal(rec.read(33, 40), [-1, -1, 0, 0, -1, -1, -1])
    assert rec.end == 40


# ----------------------------------------------------------------------------------------------------------------
# frame stamp (survives VP8 at the tiny size)
# ----------------------------------------------------------------------------------------------------------------
def test_stamp_round_trips_through_vp8():
    import av

    rng = np.random.default_rng(0)
    codec = av.CodecContext.create("libvpx", "w")
    codec.width = codec.height = 64
    codec.pix_fmt = "yuv420p"
    codec.bit_rate = 500_000
    dec = av.CodecContext.create("libvpx", "r")
    indices = [0, 1, 255, 256, 1234, 40000, 65535]
    got = []
    for i, idx in enumerate(indices):
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        stamped = stamp_frame(img, idx)
        assert read_stamp(stamped) == idx
        frame = av.VideoFrame.from_ndarray(stamped, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        for packet in codec.encode(frame):
            got += [read_stamp(f.to_ndarray(format="rgb24")) for f in dec.decode(packet)]
    for packet in codec.encode(None):
        got += [read_stamp(f.to_ndarray(format="rgb24")) for f in dec.decode(packet)]
    assert got == indices


# ----------------------------------------------------------------------------------------------------------------
# session layout
# ----------------------------------------------------------------------------------------------------------------
def test_session_options_reject_a_queue_smaller_than_a_burst():
    with pytest.raises(ValueError, match="queue_frames=40 is too small"):
        SessionOptions(settings=LIVE.with_(hop=40, chunk=32, overlap=4), queue_frames=40).layout()
    assert SessionOptions(settings=LIVE).layout()["swing"] == LIVE.structural().swing == 7


# ----------------------------------------------------------------------------------------------------------------
# offers
# ----------------------------------------------------------------------------------------------------------------
def test_check_offer_accepts_a_video_receiving_offer():
    sdp, sections = check_offer({"sdp": VIDEO_SDP, "type": "offer"})
    assert sdp == VIDEO_SDP and sections == [("audio", "sendrecv"), ("video", "recvonly")]


@pytest.mark.parametrize("body, message", [
    ([1, 2], "must be a JSON object"),
    ({"sdp": VIDEO_SDP, "type": "answer"}, "must be \"offer\""),
    ({"sdp": "hello", "type": "offer"}, "not an SDP"),
    ({"sdp": 5, "type": "offer"}, "not an SDP"),
    ({"sdp": VIDEO_SDP.split("m=video")[0], "type": "offer"}, "no video transceiver"),
    ({"sdp": VIDEO_SDP.replace("a=recvonly", "a=sendonly"), "type": "offer"}, "no video transceiver"),
])
def test_check_offer_rejects_with_a_message(body, message):
    with pytest.raises(BadRequest, match=message):
        check_offer(body)


# ----------------------------------------------------------------------------------------------------------------
# network flags
# ----------------------------------------------------------------------------------------------------------------
def test_parse_port_range():
    assert parse_port_range("40000-40100") == (40000, 40100)
    for bad in ("40000", "5-10", "50000-40000", "a-b", "40000-70000"):
        with pytest.raises(ValueError, match="UDP port range"):
            parse_port_range(bad)


def test_restrict_udp_ports_binds_in_range_and_skips_busy_ports():
    import socket

    async def main():
        loop = asyncio.get_running_loop()
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        lo, hi = port, port + 2
        restrict_udp_ports(loop, lo, hi)
        transports = []
        try:
            for _ in range(2):  # the busy port is skipped, the next two are used
                tr, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
                transports.append(tr)
            ports = sorted(tr.get_extra_info("sockname")[1] for tr in transports)
            assert ports == [port + 1, port + 2]
            with pytest.raises(OSError, match=f"no free UDP port in {lo}-{hi}"):
                await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        finally:
            busy.close()
            for tr in transports:
                tr.close()

    asyncio.run(main())


def test_serve_help_explains_remote_access_and_binds_localhost_by_default():
    from streaming.cli import add_serve_parser

    ap = argparse.ArgumentParser(prog="engine")
    serve = add_serve_parser(ap.add_subparsers(dest="command"))
    text = " ".join(serve.format_help().split())  # argparse wraps lines
    for needle in ("--host", "--port", "--udp-ports", "MIN-MAX", "another machine", "0.0.0.0", "firewall",
                   "default 127.0.0.1"):
        assert needle in text, needle
    args = ap.parse_args(["serve"])
    assert (args.host, args.port, args.udp_ports, args.mic) == ("127.0.0.1", 8080, None, False)
    args = ap.parse_args(["serve", "--host", "0.0.0.0", "--udp-ports", "40000-40100", "--max-sessions", "3"])
    assert (args.host, args.udp_ports, args.max_sessions) == ("0.0.0.0", (40000, 40100), 3)
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--udp-ports", "9-8"])


# ----------------------------------------------------------------------------------------------------------------
# --mic: the server's microphone feeds every session
# ----------------------------------------------------------------------------------------------------------------
def test_server_microphone_feeds_every_session(tiny_models, tiny_avatar, monkeypatch):
    import engine.sources
    from engine.sources import LiveSource
    from streaming.server import AvatarServer, ServerConfig

    class FakeMicrophone:  # MicrophoneSource's interface, without PortAudio
        def __init__(self, device=None, **kwargs):
            self.device, self.live, self.started = device, LiveSource(), False

        def start(self):
            self.started = True

        def close(self):
            self.live.close()

    class Listener:
        def __init__(self):
            self.got = []

        def push_input(self, samples, sample_rate, source):
            self.got.append((len(samples), sample_rate, source))

    monkeypatch.setattr(engine.sources, "MicrophoneSource", FakeMicrophone)
    server = AvatarServer(tiny_models, tiny_avatar, ServerConfig(mic=True, mic_device="3"))
    a, b = Listener(), Listener()
    server.sessions.update(a=a, b=b)
    server.start_mic()
    assert server.mic.started and server.mic.device == 3  # a numeric device is an index
    server.mic.live.push(np.zeros(4800, np.float32), 48000)  # 0.1 s at 48 kHz -> 1600 samples at 16 kHz
    server.mic.close()  # flushes the resampler; the pump forwards the rest and ends
    server._mic_thread.join(5)
    assert not server._mic_thread.is_alive()
    for listener in (a, b):
        assert sum(n for n, _, _ in listener.got) == 1600
        assert {(rate, src) for _, rate, src in listener.got} == {(16000, "server-mic")}


# ----------------------------------------------------------------------------------------------------------------
# the client-side A/V measurement the round-trip test relies on, on synthetic streams with a known answer
# ----------------------------------------------------------------------------------------------------------------
def test_av_offset_measurement_finds_a_known_offset():
    import librosa
    import stream_client as C

    rng = np.random.default_rng(1)
    engine = (rng.standard_normal(16000 * 8) * 0.2).astype(np.float32)  # 8 s of engine audio (noise: any signal)
    rec = C.Received()
    # audio: media time t carries engine time t - 0.3 s (300 ms late), in 20 ms packets at 48 kHz
    delayed = np.concatenate([np.zeros(int(0.3 * 16000), np.float32), engine])[:len(engine)]
    up = librosa.resample(delayed, orig_sr=16000, target_sr=48000)
    for p in range(0, len(up) - 960, 960):
        rec.add_audio(p, up[p:p + 960])
    # video: slot k shows engine frame k - 5 (200 ms late) for 4 s, then k - 7 (a 2-frame hold, 280 ms)
    rec.video = [(k * 3600, k - (5 if k < 100 else 7), 0.0) for k in range(5, 190)]
    rejected = {}
    windows = C.av_offsets(rec, engine, 0, window=1.0, rejected=rejected)
    assert [round(w["video_ms"]) for w in windows] == [200, 200, 200, 280, 280, 280]
    for w in windows:
        assert w["audio_ms"] == pytest.approx(300.0, abs=1.0)
        assert w["av_ms"] == pytest.approx(w["video_ms"] - 300.0, abs=1.0) and w["corr"] > 0.9
    assert rejected == {"hold or skip inside": 1}  # the window with the hold in it is left out


def test_start_up_speed_note_warns_under_real_time():
    import logging

    from streaming.server import speed_note

    level, text = speed_note(12.04)
    assert level == logging.WARNING and "12.0 fps" in text and "--steps" in text
    level, text = speed_note(50.0)
    assert level == logging.INFO and "2.0x real time" in text
