"""An aiortc test client for the live presenter: sends speech as its microphone, receives the avatar video and the
rendered audio, and measures first-frame latency, fps and the A/V offset from what it received.

Used in-process by tests/streaming/test_server.py, by benchmarks/bench_stream.py, and as a subprocess
(``python stream_client.py URL``) that a test kills to play a client that vanishes mid-stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional, Tuple

import numpy as np

from engine.settings import LIVE_CPU_WIDE

# The CPU live settings made for capacity (hop 40, chunk 32, overlap 4, 1 step, 2 pose steps): about 5x real time for
# the tiny preset on two idle cores, so a session keeps up while other tests run beside it. Structural latency: 44
# frames of audio before the first frame, 68 in the worst steady-state case (the output clock starts late enough).
TEST_SETTINGS = LIVE_CPU_WIDE
QUEUE_FRAMES = 120  # holds a burst of this layout (swing 63 + 28 new frames + margin)


def pin_loopback() -> None:
    """aioice skips 127.0.0.1 when it gathers host candidates; offer loopback only (this process, both peers)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]


@dataclass
class Received:
    """What the client got back; times are time.monotonic()."""

    offer_sent: float = 0.0
    connected: Optional[float] = None
    video: List[Tuple[int, int, float]] = field(default_factory=list)  # (pts 90 kHz, stamped engine frame, arrival)
    level: List[float] = field(default_factory=list)  # mean brightness of each picture below the stamp rows
    motion: List[float] = field(default_factory=list)  # mean |difference| from the previous picture (same area)
    keep_audio_seconds: float = 60.0  # only the newest audio is kept (long benchmark sessions)
    audio_pts: deque = field(default_factory=deque)  # 48 kHz pts of each received packet
    audio: deque = field(default_factory=deque)  # (n,) float32 mono 48 kHz per packet
    audio_arrival: deque = field(default_factory=deque)  # time.monotonic() each packet was decoded
    audio_packets: int = 0
    session: Optional[str] = None
    answer: Optional[dict] = None

    @property
    def first_frame_latency(self) -> Optional[float]:
        """Seconds from sending the offer (the microphone starts with the connection) to the first decoded frame."""
        return None if not self.video else self.video[0][2] - self.offer_sent

    def between(self, t0: float, t1: float) -> "Received":
        """The video that arrived in [t0, t1] (time.monotonic()), as a Received of its own (fps, fresh_fps)."""
        part = Received(offer_sent=self.offer_sent, connected=self.connected, session=self.session)
        part.video = [v for v in self.video if t0 <= v[2] <= t1]
        return part

    def fps(self, skip_seconds: float = 1.0) -> float:
        """Received video frame rate from the pts-independent arrival times, after the first ``skip_seconds``."""
        t = np.array([v[2] for v in self.video])
        t = t[t >= t[0] + skip_seconds]
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0

    def fresh_fps(self, skip_seconds: float = 1.0) -> float:
        """New pictures per second of arrival time after the first ``skip_seconds``: frames whose stamped engine
        frame differs from the previous one (a slot the engine was late for repeats the last picture and does not
        count). Needs ``stamp_frames`` on the server."""
        t = np.array([v[2] for v in self.video])
        stamps = np.array([v[1] for v in self.video])
        keep = t >= t[0] + skip_seconds if len(t) else t.astype(bool)
        t, stamps = t[keep], stamps[keep]
        if len(t) < 2:
            return 0.0
        return int(np.count_nonzero(np.diff(stamps))) / (t[-1] - t[0])

    def pts_fps(self) -> float:
        """Frame rate on the sender's media clock (pts): frames per second of media time."""
        pts = np.array([v[0] for v in self.video], np.float64)
        return (len(pts) - 1) / ((pts[-1] - pts[0]) / 90000.0) if len(pts) > 1 else 0.0

    def add_audio(self, pts: int, mono: np.ndarray) -> None:
        self.audio_pts.append(pts)
        self.audio.append(mono)
        self.audio_arrival.append(time.monotonic())
        self.audio_packets += 1
        while self.audio_pts and pts - self.audio_pts[0] > self.keep_audio_seconds * 48000:
            self.audio_pts.popleft()
            self.audio.popleft()
            self.audio_arrival.popleft()

    def packets(self, since: float = 0.0) -> List[Tuple[int, float, float]]:
        """(pts 48 kHz, RMS, arrival) of each kept audio packet decoded at or after ``since`` (time.monotonic())."""
        return [(p, float(np.sqrt(np.mean(np.square(a)))) if len(a) else 0.0, t)
                for p, a, t in zip(self.audio_pts, self.audio, self.audio_arrival) if t >= since]

    def audio_signal(self) -> Tuple[int, np.ndarray]:
        """(first pts, the kept audio placed on its pts timeline from there: 48 kHz, gaps zero-filled)."""
        if not self.audio:
            return 0, np.zeros(0, np.float32)
        first = self.audio_pts[0]
        end = max(p + len(a) for p, a in zip(self.audio_pts, self.audio))
        out = np.zeros(end - first, np.float32)
        for p, a in zip(self.audio_pts, self.audio):
            out[p - first:p - first + len(a)] = a
        return first, out


def audio_lag(seg16k: np.ndarray, seg_start: float, eng16k: np.ndarray, eng_start: float, center: float,
              radius: float = 0.5) -> Tuple[float, float]:
    """(lag seconds, normalised correlation): the received audio ``seg16k`` (starting at media time ``seg_start``)
    carries the engine audio of engine time ``t - lag``; searched in ``center +- radius`` by cross-correlation
    with the audio the engine was given (``eng16k``, starting at engine time ``eng_start``)."""
    sr = 16000
    n, r = len(seg16k), int(radius * sr)
    a = int(round((seg_start - center - radius - eng_start) * sr))  # engine index that aligns at lag center+radius
    e = np.zeros(n + 2 * r, np.float32)
    lo, hi = max(a, 0), min(a + n + 2 * r, len(eng16k))
    if hi > lo:
        e[lo - a:hi - a] = eng16k[lo:hi]
    size = 1 << int(np.ceil(np.log2(len(e) + n)))
    corr = np.fft.irfft(np.fft.rfft(e, size) * np.conj(np.fft.rfft(seg16k, size)), size)[:2 * r + 1]
    j = int(np.argmax(corr))  # c[j] = sum_t seg[t] e[t + j]
    norm = float(corr[j] / (np.linalg.norm(seg16k) * np.linalg.norm(e[j:j + n]) + 1e-9))
    return seg_start - (eng_start + (a + j) / sr), norm


def av_offsets(received: "Received", eng16k: np.ndarray, eng_start_sample: int, window: float = 2.0,
               skip: float = 0.0, rejected: Optional[dict] = None) -> List[dict]:
    """A/V offset per ``window`` seconds of media time, measured from what the client received:

    * video: each decoded frame's pts (90 kHz) minus the engine time stamped in its pixels;
    * audio: the lag that best aligns the received audio (on its pts) with the engine's input audio.

    Both pts count from the first packet of their track, which the server sends at the same slot 0, so they share
    one origin. Windows where the video offset changes (a hold or a skip inside), without speech, or outside the
    audio kept are left out (counted by reason in ``rejected``). ``av_ms`` > 0: the picture shows older engine
    time than the sound."""
    import librosa

    rejected = {} if rejected is None else rejected
    first_pts, sig = received.audio_signal()
    sig16 = librosa.resample(sig, orig_sr=48000, target_sr=16000)
    start16 = first_pts / 3.0  # 16 kHz sample of sig16[0] on the media clock
    eng_start = eng_start_sample / 16000.0
    pts = np.array([v[0] for v in received.video], np.float64) / 90000.0
    # offset in 90 kHz ticks, in integers: a constant offset compares exactly (floats of k/25 do not)
    ticks = np.array([v[0] - v[1] * 3600 for v in received.video], np.int64)
    voff = ticks / 90000.0
    out = []
    t = float(pts[0]) + skip if len(pts) else 0.0
    while len(pts) and t + window <= pts[-1]:
        m = (pts >= t) & (pts < t + window)
        a0, a1 = int(t * 16000 - start16), int((t + window) * 16000 - start16)
        seg = sig16[max(a0, 0):max(a1, 0)]
        reason = None
        if m.sum() < window * 20:
            reason = "few video frames"
        elif np.ptp(ticks[m]) != 0:
            reason = "hold or skip inside"
        elif a0 < 0 or len(seg) < a1 - a0:
            reason = "audio not kept"
        elif np.abs(seg).max() <= 0.02:
            reason = "no speech"
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
        else:
            lag, corr = audio_lag(seg, t, eng16k, eng_start, center=float(voff[m][0]))
            out.append({"t": round(t, 2), "video_ms": float(voff[m][0] * 1000), "audio_ms": lag * 1000,
                        "av_ms": float((voff[m][0] - lag) * 1000), "corr": corr})
        t += window
    return out


def make_speech_track(speech16k: Optional[np.ndarray], loop: bool = False):
    """A microphone stand-in: ``speech16k`` as 20 ms 48 kHz packets at real-time pace, then silence (or again from
    the start with ``loop``)."""
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    pcm = np.zeros(0, np.float32)
    if speech16k is not None and len(speech16k):
        import librosa

        pcm = librosa.resample(np.asarray(speech16k, np.float32), orig_sr=16000, target_sr=48000)

    class SpeechTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.pos = 0
            self.t0: Optional[float] = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self.t0 is None:
                self.t0 = time.monotonic()
            delay = self.t0 + self.pos / 48000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = np.zeros(960, np.float32)
            if loop and len(pcm):
                chunk[:] = pcm[np.arange(self.pos, self.pos + 960) % len(pcm)]
            else:
                part = pcm[self.pos:self.pos + 960]
                chunk[:len(part)] = part
            frame = av.AudioFrame.from_ndarray((np.clip(chunk, -1, 1) * 32767).astype(np.int16)[None, :],
                                               format="s16", layout="mono")
            frame.sample_rate = 48000
            frame.pts = self.pos
            frame.time_base = Fraction(1, 48000)
            self.pos += 960
            return frame

    return SpeechTrack()


async def offer_and_connect(url: str, speech16k: Optional[np.ndarray], received: Received, send_audio: bool = True,
                            loop: bool = False, avatar: Optional[str] = None, receive_audio: bool = True):
    """Create the peer, post the offer, apply the answer; frames are collected into ``received`` by tasks. Without
    ``send_audio`` the client has no microphone: it only receives the audio (unless ``receive_audio`` is False)."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if send_audio:
        pc.addTransceiver(make_speech_track(speech16k, loop=loop), direction="sendrecv")
    elif receive_audio:
        pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    from streaming.tracks import read_stamp

    tasks = []

    async def read_video(track) -> None:
        previous = None
        try:
            while True:
                f = await track.recv()
                img = f.to_ndarray(format="rgb24")  # (H, W, 3)
                received.video.append((int(f.pts), read_stamp(img), time.monotonic()))
                body = img[img.shape[0] // 4:].astype(np.float32)  # below the two stamp rows (H / 8 each)
                received.level.append(float(body.mean()))
                received.motion.append(0.0 if previous is None else float(np.abs(body - previous).mean()))
                previous = body
        except MediaStreamError:
            pass

    async def read_audio(track) -> None:
        try:
            while True:
                f = await track.recv()
                a = f.to_ndarray()  # (1, n * channels) packed s16
                ch = len(f.layout.channels)
                mono = a.reshape(-1, ch).astype(np.float32).mean(axis=1) / 32768.0
                received.add_audio(int(f.pts), mono)
        except MediaStreamError:
            pass

    @pc.on("track")
    def on_track(track) -> None:
        tasks.append(asyncio.ensure_future(read_video(track) if track.kind == "video" else read_audio(track)))

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected" and received.connected is None:
            received.connected = time.monotonic()

    await pc.setLocalDescription(await pc.createOffer())
    received.offer_sent = time.monotonic()
    async with aiohttp.ClientSession() as http:
        offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        if avatar is not None:
            offer["avatar"] = avatar
        async with http.post(f"{url}/offer", json=offer) as resp:
            body = await resp.json()
            if resp.status != 200:
                await pc.close()
                raise RuntimeError(f"/offer answered {resp.status}: {body}")
    received.answer, received.session = body, body["session"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    return pc, tasks


async def run_client(url: str, speech16k: Optional[np.ndarray], seconds: float,
                     avatar: Optional[str] = None) -> Received:
    """Connect, stream for ``seconds`` after the first video frame (or the connection), close, return what came."""
    received = Received()
    pc, tasks = await offer_and_connect(url, speech16k, received, avatar=avatar)
    deadline = time.monotonic() + seconds + 30.0  # generous wait for the first frame on a busy machine
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if received.video and time.monotonic() - received.video[0][2] >= seconds:
                break
    finally:
        await pc.close()
        for t in tasks:
            t.cancel()
    return received


async def wait_until(predicate, timeout: float, what: str, poll: float = 0.02) -> None:
    """Poll ``predicate()`` until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(poll)


@contextlib.asynccontextmanager
async def running_server(models, avatar, **config):
    """An AvatarServer on 127.0.0.1:<free port> in the running loop; yields (server, base url)."""
    from aiohttp import web

    from streaming.server import AvatarServer, ServerConfig
    from streaming.session import SessionOptions

    session = config.pop("session", SessionOptions(settings=TEST_SETTINGS, queue_frames=QUEUE_FRAMES,
                                                   stamp_frames=True))
    server = AvatarServer(models, avatar, ServerConfig(port=0, session=session, **config))
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()  # on_shutdown closes every session


async def spawn_client(url: str, *args: str):
    """This module as a subprocess client of ``url`` (own process, own interpreter: as a browser is); its stdout
    carries the JSON lines of :func:`main`. Returns the asyncio subprocess."""
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return await asyncio.create_subprocess_exec(sys.executable, str(Path(__file__).resolve()), url, *args, env=env,
                                                stdout=asyncio.subprocess.PIPE)


async def read_json_line(proc, timeout: float) -> dict:
    """The next JSON line a :func:`spawn_client` process prints (AssertionError when none comes in time)."""
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise AssertionError(f"client process {proc.pid} ended without output (exit {await proc.wait()})")
    return json.loads(line)


def main(argv: List[str]) -> int:
    """Subprocess mode: connect to URL, print {"session": ID}, then {"frames": N} every 0.5 s; with ``--seconds S``,
    stream S seconds after the first frame, close, and print what came ({"fps", "fresh_fps", "frames", ...});
    without, stream until killed (a test kills this process)."""
    import argparse

    ap = argparse.ArgumentParser(prog="stream_client.py")
    ap.add_argument("url")
    ap.add_argument("--seconds", type=float, default=None, help="stream this long after the first frame, then close")
    ap.add_argument("--avatar", default=None, help="the offer's avatar id")
    args = ap.parse_args(argv[1:])
    pin_loopback()

    async def stream() -> None:
        received = Received()
        try:
            pc, tasks = await offer_and_connect(args.url, None, received, avatar=args.avatar)
        except RuntimeError as e:  # refused (503, 400): say so on stdout
            print(json.dumps({"refused": str(e)}), flush=True)
            return
        print(json.dumps({"session": received.session}), flush=True)
        while args.seconds is None or not received.video or time.monotonic() - received.video[0][2] < args.seconds:
            await asyncio.sleep(0.5)
            if received.video:
                print(json.dumps({"frames": len(received.video)}), flush=True)
        await pc.close()
        for t in tasks:
            t.cancel()
        print(json.dumps({"fps": received.fps(), "fresh_fps": received.fresh_fps(), "frames": len(received.video),
                          "first_frame_latency": received.first_frame_latency}), flush=True)

    asyncio.run(stream())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
