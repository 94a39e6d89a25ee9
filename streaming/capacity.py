"""The live check of the start-up capacity: N sessions on the real media path at once, as viewers will get them.

The engine-only probe (engine.runner.probe_sessions: N runs flat out through the model set, no media) says how many
sessions the engine renders; a live session also paces its input, keeps its clock, encodes VP8 and Opus, packetises,
encrypts and sends on the event loop, and on a CPU all of that shares one Python interpreter with the engine's
threads. Measured on this project's 2-core machine (tiny preset, capacity-first CPU settings): the engine probe said 3
sessions at 36 fps each, yet 3 viewers got 13 fps each -- the media path (about half the engine's cost per session)
did not fit beside the engine, and the event loop fell behind for every viewer at once.

So :func:`live_rates` runs N real sessions (AvatarServer's own offer path: a Session, its tracks, an aiortc peer)
for viewers in this process over loopback WebRTC, and measures the fresh frames per second each session sent (a slot
the engine was late for repeats a picture; a slot the event loop was late for is never sent: neither counts). The
viewers receive and discard (their receivers drop the packets after SRTP, before decoding) and send no microphone:
their remaining cost (ICE, DTLS, SRTP) stands in for the server's decoding of a real viewer's microphone.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import List

from engine.types import FPS

log = logging.getLogger(__name__)

LIVE_FPS = 0.98 * FPS  # fresh frames per second a session must send in the live check (one repeat in 2 s)


async def _live_rates(server, n: int, seconds: float, settle: float, timeout: float) -> List[float]:
    import aioice.ice
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]  # nothing leaves the host
    viewers, sids = [], []
    try:
        # 1. n viewers, each answered by the server's own offer path (a session on the default avatar)
        for _ in range(n):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            viewers.append(pc)
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            answer = await server.loopback_offer(pc.localDescription.sdp)
            sids.append(answer["session"])
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            for receiver in pc.getReceivers():
                receiver._enabled = False  # received packets are dropped before the jitter buffer and decoder
        # 2. every session streaming, then settled; count the fresh frames each sends over `seconds`
        sessions = [server.sessions[sid] for sid in sids]
        deadline = time.monotonic() + timeout
        while not all(s.video.stats.sent for s in sessions):  # (the clock plays its first slot after a margin)
            if time.monotonic() > deadline or any(s.state == "error" for s in sessions):
                log.warning("capacity live check: %d session(s) did not start streaming within %.0f s", n, timeout)
                return [0.0] * n
            await asyncio.sleep(0.1)
        await asyncio.sleep(settle)

        def fresh() -> List[int]:
            return [s.video.stats.sent - s.video.stats.repeats for s in sessions]

        start, t0 = fresh(), time.monotonic()
        await asyncio.sleep(seconds)
        end, t1 = fresh(), time.monotonic()
        return [(b - a) / (t1 - t0) for a, b in zip(start, end)]
    finally:
        for sid in sids:
            await server.close_session(sid, "capacity check done")
            server.closed_sessions.pop(sid, None)  # not a viewer's session
        for pc in viewers:
            await pc.close()
        aioice.ice.get_host_addresses = original


def live_rates(server, n: int, seconds: float = 4.0, settle: float = 1.5, timeout: float = 30.0) -> List[float]:
    """Fresh frames per second each of ``n`` live sessions of ``server`` (an AvatarServer) sent at once to loopback
    viewers, over ``seconds`` after all of them streamed for ``settle`` seconds (zeros when they did not start within
    ``timeout``). Blocking: runs its own event loop; call it when no other loop of the server runs sessions."""
    return asyncio.run(_live_rates(server, n, seconds, settle, timeout))


__all__ = ["live_rates", "LIVE_FPS"]
