"""Per-session avatars: images checked when registered (folder, upload), prepared once and cached; the routes that
list and add them; a session on the avatar it asked for; /metrics; admission by measured capacity."""
import asyncio
import io

import numpy as np
import pytest
from PIL import Image

import stream_client as C
from stream_client import running_server
from streaming.avatars import AvatarError, AvatarStore, decode_image

pytestmark = pytest.mark.filterwarnings("ignore:Trying to estimate tuning")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _face(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# checking images
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    (b"", "empty (0 bytes)"),
    (b"hello, this is a text file\n" * 20, "not an image"),
    (_png(_face(0))[:300], "truncated or corrupt"),
    (_png(Image.new("1", (7746, 7746))), "60.0 megapixels; the limit is 40"),
])
def test_bad_images_are_refused_naming_the_problem(data, message):
    import re

    with pytest.raises(AvatarError, match=re.escape(message)) as e:
        decode_image(data, "face.png")
    assert str(e.value).startswith("face.png: ")


def test_gray_and_transparent_images_become_rgb():
    gray = decode_image(_png(Image.new("L", (20, 10), 77)), "gray.png")
    assert gray.shape == (10, 20, 3) and (gray == 77).all()
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: white under it
    out = decode_image(_png(rgba), "logo.png")
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (255, 0, 0)


def test_store_folder_uploads_cache_and_unknown_ids(tmp_path):
    folder = tmp_path / "people"
    folder.mkdir()
    _face(1).save(folder / "alice.png")
    _face(2).save(folder / "bob.jpg")
    (folder / "notes.txt").write_text("not an avatar")
    prepared = []
    store = AvatarStore(lambda image: prepared.append(image.shape) or ("prepared", image.shape), cache_size=2)
    assert store.add_folder(folder) == ["alice", "bob"] and store.default_id == "alice"
    up = store.add_upload(_png(_face(3)), "carol.png")
    assert up.id.startswith("upload-") and store.add_upload(_png(_face(3))).id == up.id  # same bytes, same avatar
    assert [a["id"] for a in store.list()] == ["alice", "bob", up.id]
    store.prepared("alice"), store.prepared("bob"), store.prepared("alice")
    assert len(prepared) == 2  # alice was cached
    store.prepared(up.id)  # a third: the least recently used (bob) leaves the cache
    assert store.cached_ids() == ["alice", up.id] and store.prepared() == ("prepared", (96, 80, 3))
    with pytest.raises(AvatarError, match="unknown avatar 'dave'; known: alice, bob"):
        store.prepared("dave")
    with pytest.raises(AvatarError, match="no such avatar folder"):
        store.add_folder(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------------------------------
def test_routes_sessions_on_their_avatars_and_metrics(warm_models, loopback_ice, speech, tmp_path):
    """Two viewers, one on an avatar from --avatars and one on an upload, stream at once; bad uploads and an unknown
    avatar are refused with 400; /metrics reports the sessions."""
    import aiohttp

    from engine.models import prepare_avatar

    models, avatar = warm_models
    folder = tmp_path / "people"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(avatar.image[:, ::-1])).save(folder / "mirror.png")
    store = AvatarStore(lambda image: prepare_avatar(models, image))
    store.add("portrait", avatar.image, "default", default=True)
    store.seed("portrait", avatar)
    store.add_folder(folder)

    async def main():
        async with running_server(models, store, max_sessions=3) as (server, url):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/avatars") as r:
                    listed = await r.json()
                for data, message in ((b"", "empty"), (b"%PDF-1.4 not an image", "not an image"),
                                      (_png(_face(4))[:200], "truncated")):
                    form = aiohttp.FormData()
                    form.add_field("image", data, filename="bad.png", content_type="image/png")
                    async with http.post(f"{url}/avatars", data=form) as r:
                        assert r.status == 400 and message in (await r.json())["error"]
                form = aiohttp.FormData()
                form.add_field("image", _png(Image.fromarray(255 - avatar.image)), filename="negative.png")
                async with http.post(f"{url}/avatars", data=form) as r:
                    assert r.status == 200
                    uploaded = (await r.json())["avatar"]
                async with http.post(f"{url}/offer", json={"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
                                                                  "a=recvonly\r\n", "type": "offer",
                                                           "avatar": "nobody"}) as r:
                    assert r.status == 400 and "unknown avatar 'nobody'" in (await r.json())["error"]
            clients = asyncio.gather(C.run_client(url, speech[:6 * 16000], 4.0, avatar="mirror"),
                                     C.run_client(url, speech[:6 * 16000], 4.0, avatar=uploaded))
            while len(server.sessions) < 2 and not clients.done():  # scrape while both stream
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)
            # each session renders with the avatar it asked for (its prepared bank, not the default's)
            using = {server.session_avatars[sid]: session.runner.avatar for sid, session in server.sessions.items()}
            assert using["mirror"] is store.prepared("mirror") and using[uploaded] is store.prepared(uploaded)
            assert (using["mirror"].bank[-1] - using[uploaded].bank[-1]).abs().max() > 1e-3
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/metrics") as r:
                    metrics = await r.text()
            recs = await clients
            for _ in range(150):  # the sessions close with their peers
                if all(rec.session in server.closed_sessions for rec in recs):
                    break
                await asyncio.sleep(0.1)
            closed = dict(server.closed_sessions)
            avatars = {rec.session: closed[rec.session]["avatar"] for rec in recs}
            return listed, recs, metrics, avatars, closed

    listed, recs, metrics, avatars, closed = asyncio.run(main())
    assert listed["default"] == "portrait" and [a["id"] for a in listed["avatars"]] == ["portrait", "mirror"]
    assert avatars[recs[0].session] == "mirror" and avatars[recs[1].session].startswith("upload-")
    for rec in recs:
        assert len(rec.video) > 50 and not closed.get(rec.session, {}).get("error")
    for family in ("mmgt_sessions", "mmgt_max_sessions 3.0", "mmgt_session_fps", "mmgt_avatars 3.0",
                   "process_resident_memory_bytes"):
        assert family in metrics, family


def test_capacity_is_the_most_sessions_that_stay_real_time(warm_models, monkeypatch):
    """measure_capacity probes 1, 2, 4, ... sessions at once and then the counts in between; the answer is the most
    whose slowest session still renders 1.2 x 25 fps, lowered until that many live sessions (with their media) send
    25 fps."""
    import engine.runner as runner
    import streaming.capacity as capacity
    from streaming.server import AvatarServer, ServerConfig
    from streaming.session import SessionOptions

    models, avatar = warm_models
    aggregate = 100.0  # fps this pretend machine renders, shared by the sessions
    asked = []

    def fake(models_, avatar_, settings, n, seconds=2.0):
        asked.append(n)
        return [aggregate / n] * n

    live = []

    def fake_live(server_, n, seconds=4.0):  # the media path costs as much as a third of the engine's work
        live.append(n)
        return [min(25.0, aggregate / 1.33 / n)] * n

    monkeypatch.setattr(runner, "probe_sessions", fake)
    monkeypatch.setattr(capacity, "live_rates", fake_live)
    server = AvatarServer(models, avatar, ServerConfig(max_sessions=None, session=SessionOptions(
        settings=C.TEST_SETTINGS, queue_frames=C.QUEUE_FRAMES)))
    try:
        assert server.measure_capacity(limit=16) == 3  # engine: 100 / 3 = 33.3 >= 30 > 100 / 4; live: 25 each
        assert asked == [1, 2, 4, 3] and live == [3]
        aggregate, asked, live = 90.0, [], []
        assert server.measure_capacity(limit=16) == 2  # engine: 30 >= 30 at 3; live: 22.6 at 3, 25 at 2
        assert asked == [1, 2, 4, 3] and live == [3, 2]
        assert server.live_capacity[3] == [90.0 / 1.33 / 3] * 3
    finally:
        server.close()


def test_latency_target_sets_the_layout_of_later_sessions(tiny_models, tiny_avatar, monkeypatch):
    """serve --latency-target: the server measures layouts for its sessions and every later session runs the choice
    (a fake machine here: the search itself is tested in tests/engine/test_tuning.py)."""
    import engine.runner
    from engine.settings import LIVE_CPU
    from engine.tuning import cost_per_frame
    from streaming.server import AvatarServer, ServerConfig
    from streaming.session import SessionOptions, min_queue_frames

    probed = []

    def fake(models, avatar, settings, sessions, seconds=2.0):
        probed.append((settings, sessions))
        return [80.0 / cost_per_frame(settings) / sessions] * sessions

    monkeypatch.setattr(engine.runner, "probe_sessions", fake)
    server = AvatarServer(tiny_models, tiny_avatar, ServerConfig(session=SessionOptions(settings=LIVE_CPU)))
    choice = server.choose_settings(400, sessions=1)
    assert choice.met_target and probed and all(n == 1 for _, n in probed)
    s = server.config.session.settings
    assert s == choice.settings and s.structural().max * 40 <= 400 and 80.0 / cost_per_frame(s) >= 30
    assert server.config.session.queue_frames >= min_queue_frames(s)
    assert server.layout["max_frames"] == s.structural().max
