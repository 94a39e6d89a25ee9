"""The live presenter end to end, in-process: an aiortc client speaks to the server over real WebRTC (loopback ICE),
receives the avatar video and the rendered audio, and measures first-frame latency, fps and the A/V offset from
what it decoded. Then every kind of bad input, a full server and a client that vanishes mid-stream."""
import asyncio
import json
import re
import time

import numpy as np
import pytest

import stream_client as C
from stream_client import running_server

# librosa warns on the silent stretches the idle avatar renders (mmgt's audio features); expected here
pytestmark = pytest.mark.filterwarnings("ignore:Trying to estimate tuning")

_wait = C.wait_until


# ----------------------------------------------------------------------------------------------------------------
# (1) 10 s of speech in, avatar video + audio back, on one clock
# ----------------------------------------------------------------------------------------------------------------
def test_round_trip_fps_latency_and_av_offset(warm_models, loopback_ice, speech):
    models, avatar = warm_models
    speech10 = speech[:10 * 16000]

    async def main():
        async with running_server(models, avatar, max_sessions=2, udp_ports=(47000, 47100)) as (server, url):
            rec = await C.run_client(url, speech10, seconds=10.0)
            session = server.sessions[rec.session]  # still open: the client closes its peer after returning
            stats = session.stats()
            e0 = max(0, session.record.end - session.record.capacity)
            engine_audio = session.record.read(e0, session.record.end)
            await _wait(lambda: rec.session in server.closed_sessions, 15, "the session to close with its peer")
            return rec, stats, engine_audio, e0, session

    rec, stats, engine_audio, e0, session = asyncio.run(main())

    # media used the configured UDP range (ICE host candidates in the answer)
    ports = [int(m.group(1)) for m in re.finditer(r"a=candidate:\S+ 1 udp \d+ \S+ (\d+) typ host", rec.answer["sdp"])]
    assert ports and all(47000 <= p <= 47100 for p in ports), ports
    # the server heard the speech, and the session was freed with its threads joined when the client closed
    assert stats["input"]["source"] == "browser" and stats["input"]["received_seconds"] > 9.0
    assert stats["input"]["peak"] > 0.1
    assert session.closed and not session.threads_alive()
    # first-frame latency: the client saw a frame within a bounded time; the server's own figure is consistent
    ffl = rec.first_frame_latency
    assert ffl is not None and 1.0 < ffl < 12.0, ffl
    assert 0 < stats["first_frame_latency_ms"] <= ffl * 1000 + 100
    # 10 s at 25 fps +- 10 %, by arrival time and on the media clock
    assert 0.9 * 25 <= rec.fps() <= 1.1 * 25, rec.fps()
    assert rec.pts_fps() == pytest.approx(25.0, rel=0.01)
    assert len(rec.video) >= 225
    stamps = [v[1] for v in rec.video]
    assert len(set(stamps)) >= 0.6 * len(stamps)  # real rendered frames, not one picture repeated
    assert all(b >= a for a, b in zip(stamps, stamps[1:]))  # engine time never goes backwards on screen
    # the audio came back (at least 9 s of it), and it is the engine's audio
    assert rec.audio_packets * 0.02 >= 9.0
    windows = C.av_offsets(rec, engine_audio, e0, window=2.0)
    assert len(windows) >= 3, windows  # speech in at least three 2-second windows without a hold or skip
    for w in windows:
        assert w["corr"] > 0.5, w
        assert abs(w["av_ms"]) <= 40.0, w
    assert stats["av_offset_ms"] is not None and abs(stats["av_offset_ms"]) <= 40.0
    # where the engine's share of the delay went, per stage, while it ran
    budget = stats["latency_budget_ms"]
    assert budget["p50"]["audio_wait"] >= 0 and budget["p95"]["stage2"] > 0
    # per frame, the parts add up to the latency measured apart from them (issue 17: within 10 %)
    assert 90.0 <= budget["parts_over_measured_pct"] <= 110.0, budget


# ----------------------------------------------------------------------------------------------------------------
# (4) bad input, a full server, a client that vanishes, the page's /close: the others keep streaming
# ----------------------------------------------------------------------------------------------------------------
def _no_video_offer_sdp() -> str:
    async def make():
        from aiortc import RTCPeerConnection

        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def test_bad_input_full_server_vanishing_client(warm_models, loopback_ice):
    import aiohttp

    models, avatar = warm_models
    no_video = _no_video_offer_sdp()

    async def main():
        async with running_server(models, avatar, max_sessions=2, idle_timeout=3.0) as (server, url):
            # 1. a good client A streams throughout
            rec_a = C.Received()
            pc_a, tasks_a = await C.offer_and_connect(url, None, rec_a)
            await _wait(lambda: len(rec_a.video) > 10, 30, "client A's first frames")
            async with aiohttp.ClientSession() as http:
                # 2. bad bodies: 400 with a message, nothing created
                for body, kind, message in [
                    ("{not json", "text/plain", "not valid JSON"),
                    (json.dumps({"sdp": "hello there", "type": "offer"}), "application/json", "not an SDP"),
                    (json.dumps({"sdp": no_video, "type": "offer"}), "application/json", "no video transceiver"),
                    (json.dumps({"sdp": "v=0\r\nm=video 9 RTP/AVP 96\r\ngarbage", "type": "offer"}),
                     "application/json", "cannot use the SDP offer"),
                ]:
                    async with http.post(f"{url}/offer", data=body, headers={"Content-Type": kind}) as r:
                        assert r.status == 400, (body[:40], r.status)
                        assert message in (await r.json())["error"]
                assert len(server.sessions) == 1
                # 3. client B in a subprocess fills the server; a third offer gets 503
                proc = await C.spawn_client(url)
                try:
                    sid_b = (await C.read_json_line(proc, 60))["session"]
                    await _wait(lambda: server.sessions.get(sid_b) is not None
                                and server.sessions[sid_b].video.stats.sent > 10, 30, "client B streaming")
                    rec_c = C.Received()
                    with pytest.raises(RuntimeError, match="503.*server is full"):
                        await C.offer_and_connect(url, None, rec_c)
                    session_b = server.sessions[sid_b]
                    # 4. B vanishes without a goodbye (SIGKILL): the server notices the silence and frees it
                    proc.kill()
                    await _wait(lambda: sid_b in server.closed_sessions, 15, "the vanished client's session to end")
                finally:
                    if proc.returncode is None:
                        proc.kill()
                    await proc.wait()
                assert "silent" in server.closed_sessions[sid_b]["close_reason"]
                assert session_b.closed and not session_b.threads_alive()
                # 5. room again: client C connects, and the page's /close ends it
                rec_c = C.Received()
                pc_c, tasks_c = await C.offer_and_connect(url, None, rec_c)
                await _wait(lambda: len(rec_c.video) > 5, 30, "client C's first frames")
                session_c = server.sessions[rec_c.session]
                async with http.post(f"{url}/close/{rec_c.session}") as r:
                    assert r.status == 200
                assert rec_c.session not in server.sessions and not session_c.threads_alive()
                async with http.post(f"{url}/close/{rec_c.session}") as r:
                    assert r.status == 404
                await pc_c.close()
                # 6. A (sending silence all along) kept streaming through all of it, at full rate, and its avatar
                # idles: the pictures keep changing, they are neither frozen nor black
                assert np.mean(rec_a.level[5:]) > 10.0
                moving = np.array(rec_a.motion[5:]) > 0.5
                assert moving.mean() > 0.5, rec_a.motion[:50]
                # (4 s: long enough that the catch-up after a moment's stall on a busy machine averages out)
                n0, t0 = len(rec_a.video), time.monotonic()
                await asyncio.sleep(4.0)
                rate = (len(rec_a.video) - n0) / (time.monotonic() - t0)
                assert 0.8 * 25 <= rate <= 1.2 * 25, rate
                async with http.get(f"{url}/stats/{rec_a.session}") as r:
                    stats_a = await r.json()
                assert stats_a["state"] == "streaming" and stats_a["frames_sent"] > 100
                async with http.get(f"{url}/health") as r:
                    assert (await r.json())["sessions"] == 1
            await pc_a.close()
            for t in tasks_a:
                t.cancel()
            await _wait(lambda: rec_a.session in server.closed_sessions, 15, "client A's session to end")

    asyncio.run(main())


def test_page_and_static_files_are_served(warm_models):
    import aiohttp

    models, avatar = warm_models

    async def main():
        async with running_server(models, avatar) as (server, url):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/") as r:
                    page = await r.text()
                    assert r.status == 200 and 'id="avatar"' in page and "/static/app.js" in page
                async with http.get(f"{url}/static/app.js") as r:
                    js = await r.text()
                    assert r.status == 200 and "/offer" in js and "/stats/" in js
                async with http.get(f"{url}/stats/nope") as r:
                    assert r.status == 404
                async with http.get(f"{url}/health") as r:
                    h = await r.json()
                    assert h == {"sessions": 0, "max_sessions": 2, "preset": "tiny", "trained": False}

    asyncio.run(main())
