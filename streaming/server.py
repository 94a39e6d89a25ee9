"""The live presenter's server: aiohttp serves the demo page and signalling, aiortc carries the media.

Routes (the signalling contract):

* ``GET /`` -- the demo page (streaming/static/); ``GET /static/<file>`` its script and style.
* ``GET /avatars`` -- the avatars a session can use: ``{"avatars": [{id, source, width, height}], "default": ID}``.
* ``POST /avatars`` -- multipart field ``image``: a new avatar -> ``{"avatar": ID}``; 400 naming the problem for a
  file that is not an image, empty, truncated, or over the pixel limit (streaming/avatars.py).
* ``POST /offer`` -- JSON ``{"sdp": "...", "type": "offer"}`` -> JSON ``{"sdp": "...", "type": "answer",
  "session": ID}``. The offer must have a video m-line the client receives on (the avatar), and may have an audio
  m-line (the microphone, or a file the page plays, goes up; the rendered audio comes back); ``"avatar": ID`` picks
  the session's avatar (the default when absent). Errors: 400 with a message for a body that is not JSON, not an SDP
  offer, has no video to receive, does not parse, or names an unknown avatar; 503 when ``max_sessions`` sessions are
  running (the capacity measured at start-up unless ``--max-sessions`` says otherwise).
* ``POST /say/<session>`` -- JSON ``{"text": "...", "interrupt": false}`` -> 202 ``{"utterance": ID, "queued": N}``:
  the avatar speaks the text (text to speech, streaming/tts.py, sentence by sentence) after what is already queued,
  or at once after an interrupt with ``"interrupt": true``. Errors, each with a message: 400 for a body that is not
  JSON or not an object, a "text" that is missing, not a string or empty, an "interrupt" that is not a boolean; 404
  for an unknown session; 413 for a text over the length limit; 429 when the session's speech queue is full (a
  flood is refused, never dropped silently); 503 when no TTS engine can run here (the message says how to install
  one).
* ``POST /interrupt/<session>`` -- stop the avatar's speech now: queued utterances and the speech not yet played are
  dropped, the returned audio is silent from the next packet on, the avatar goes on idling. -> ``{"interrupted":
  [IDs], "muted_ms": ...}``; 404 for an unknown session.
* ``GET /stats/<session>`` -- the session's live stats (state, first-frame latency, fps, A/V offset, drops, and the
  speech queue: queued, speaking, playing, utterances said/done/interrupted/failed/refused).
* ``POST /close/<session>`` -- end a session now (the page sends it when it is left).
* ``GET /health`` -- sessions running and the limit.
* ``GET /metrics`` -- Prometheus text: sessions, per-session fps, output latency, drops, batch sizes, memory.

The models are loaded once and shared; every session has its own avatar, Runner, LiveSource, QueueSink and tracks
(streaming/session.py). The model set is stateless (the reference bank, masks and audio tokens are call arguments), so
sessions call it at the same time with no lock around a network, and the calls that coincide run as one batched call
(engine/backends/batching.py: a row per session, each with its own bank and masks; its frames are its solo frames).

A session ends when its peer connection closes or fails (ICE failure), when the page leaves (``/close``), when the
client goes silent (no RTCP receiver report for ``idle_timeout`` seconds: it vanished), or when ICE does not connect
within ``connect_timeout`` seconds. Ending it stops the runner and joins its threads.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import errno
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from engine.types import FPS

from .avatars import AvatarError, AvatarStore
from .session import Session, SessionOptions
from .speech import SpeechError, SpeechQueueFull, SpeechTooLong
from .tts import TTSUnavailable, make_tts

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # HTTP bind address (signalling and the page); 0.0.0.0 to serve other machines
    port: int = 8080
    max_sessions: Optional[int] = 2  # concurrent sessions; None: serve() measures this machine's capacity
    udp_ports: Optional[Tuple[int, int]] = None  # media (ICE host candidates) only from this range
    media_addresses: Optional[Tuple[str, ...]] = None  # ICE host candidates only on these addresses
    idle_timeout: float = 15.0  # no RTCP from the client for this long: it vanished, free the session
    connect_timeout: float = 30.0  # ICE not connected this long after the offer: free the session
    mic: bool = False  # feed every session from the server's microphone instead of the browser's
    mic_device: Optional[str] = None
    session: SessionOptions = field(default_factory=SessionOptions)
    batch: Optional[bool] = None  # run the coinciding calls of the sessions as one batched call (torch networks);
    # None: on a GPU (where one wide call beats several narrow ones); on a CPU the sessions' own threads use the cores
    # better (measured: 3 tiny sessions render ~100 fps together unbatched, ~80 batched on two cores)
    max_batch: int = 8  # rows of one batched call
    avatar_cache: int = 8  # prepared avatars kept (CLIP context, bank, initial pose)
    voice: Optional[str] = None  # text to speech for /say: an espeak-ng voice name, or a piper FILE.onnx (tts.py);
    # None: espeak-ng's default voice
    latency_target_ms: Optional[float] = None  # set: serve() picks the lowest-latency live layout within this many
    # ms of structural latency that max_sessions (or 1) sessions render in real time here (engine/tuning.py)


class BadRequest(Exception):
    """A client error: answered with HTTP 400 and this message."""


# ----------------------------------------------------------------------------------------------------------------
# Network: which addresses and UDP ports the media uses
# ----------------------------------------------------------------------------------------------------------------
def parse_port_range(text: str) -> Tuple[int, int]:
    """``"MIN-MAX"`` -> (MIN, MAX); ValueError naming the problem."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text or "")
    if not m:
        raise ValueError(f"UDP port range {text!r}: expected MIN-MAX, e.g. 40000-40100")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"UDP port range {text!r}: need 1024 <= MIN <= MAX <= 65535")
    return lo, hi


def restrict_udp_ports(loop: asyncio.AbstractEventLoop, lo: int, hi: int) -> None:
    """Make the ICE host candidates created on ``loop`` bind ports in [lo, hi] (aioice itself asks for port 0).

    Only datagram endpoints bound to port 0 with no remote address are redirected (that is how aioice gathers host
    candidates); every other use of the loop is untouched. Ports are tried round-robin; busy ones are skipped."""
    original = loop.create_datagram_endpoint
    span = hi - lo + 1
    cursor = [0]

    async def create_datagram_endpoint(protocol_factory, local_addr=None, remote_addr=None, **kwargs):
        if local_addr is None or remote_addr is not None or local_addr[1] != 0:
            return await original(protocol_factory, local_addr=local_addr, remote_addr=remote_addr, **kwargs)
        for i in range(span):
            port = lo + (cursor[0] + i) % span
            try:
                result = await original(protocol_factory, local_addr=(local_addr[0], port), **kwargs)
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            cursor[0] = (port - lo + 1) % span
            return result
        raise OSError(errno.EADDRINUSE, f"no free UDP port in {lo}-{hi} on {local_addr[0]} for WebRTC media")

    loop.create_datagram_endpoint = create_datagram_endpoint  # type: ignore[method-assign]


def pin_media_addresses(addresses: Sequence[str]) -> None:
    """ICE host candidates only on ``addresses`` (aioice would offer every non-loopback address of the machine)."""
    import aioice.ice

    pinned = list(addresses)
    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: list(pinned)


# ----------------------------------------------------------------------------------------------------------------
# Offers
# ----------------------------------------------------------------------------------------------------------------
def _media_sections(sdp: str) -> List[Tuple[str, str]]:
    """[(kind, direction)] per m-line of an SDP (direction as the offerer states it; sendrecv by default)."""
    sections: List[Tuple[str, str]] = []
    for line in sdp.splitlines():
        line = line.strip()
        if line.startswith("m="):
            sections.append((line[2:].split(" ", 1)[0], "sendrecv"))
        elif sections and line in ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"):
            sections[-1] = (sections[-1][0], line[2:])
    return sections


def check_offer(body: object) -> Tuple[str, List[Tuple[str, str]]]:
    """Validate a decoded /offer body; returns (sdp, media sections). BadRequest says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest(f"offer must be a JSON object {{\"sdp\", \"type\"}}, got {type(body).__name__}")
    sdp, kind = body.get("sdp"), body.get("type")
    if kind != "offer":
        raise BadRequest(f"offer \"type\" must be \"offer\", got {kind!r}")
    if not isinstance(sdp, str) or not sdp.lstrip().startswith("v=0"):
        raise BadRequest("offer \"sdp\" is not an SDP session description (it must start with \"v=0\")")
    sections = _media_sections(sdp)
    if not any(k == "video" and d in ("sendrecv", "recvonly") for k, d in sections):
        raise BadRequest("offer has no video transceiver that receives (m=video, sendrecv or recvonly): "
                         "add one, e.g. pc.addTransceiver('video', {direction: 'recvonly'})")
    return sdp, sections


def _to_samples(frame) -> Tuple[np.ndarray, int]:
    """A decoded aiortc AudioFrame -> ((N,) or (N, channels) samples, sample rate)."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:  # (channels, N)
        arr = arr.T
    else:  # packed: (1, N * channels), interleaved
        arr = arr.reshape(-1, channels)
    return arr, frame.sample_rate


# ----------------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------------
class AvatarServer:
    """Sessions over one shared model set; build the aiohttp app with :meth:`app`.

    ``avatars``: an AvatarStore, or one prepared avatar (it becomes the default of a store). ``tts``: the text-to-speech
    engine every session's /say uses (streaming.tts.TTSEngine); None: ``make_tts(config.voice)``, and when that
    cannot run here (espeak-ng not installed) the server still serves and /say answers 503 saying why."""

    def __init__(self, models, avatars, config: ServerConfig = ServerConfig(), tts=None):
        from engine.backends.batching import batched
        from engine.models import for_settings, prepare_avatar

        self.config = config
        self.layout = config.session.layout()  # bad live settings fail here, not at the first viewer
        shaped = for_settings(models, config.session.settings)  # every session runs these settings' shapes
        batch = config.batch if config.batch is not None else models.device.type == "cuda"
        self.models = batched(shaped, config.max_batch) if batch else shaped
        if not isinstance(avatars, AvatarStore):
            default = avatars
            avatars = AvatarStore(lambda image: prepare_avatar(self.models, image), config.avatar_cache)
            avatars.add("default", default.image, "default", default=True)
            avatars.seed("default", default)  # already prepared: no second ReferenceNet pass
        self.avatars = avatars
        self.tts, self.tts_error = tts, None
        if tts is None:
            try:
                self.tts = make_tts(config.voice)
            except TTSUnavailable as e:
                if config.voice:  # asked for by name: the caller must hear it
                    raise
                self.tts_error = str(e)
                log.warning("POST /say is unavailable: %s", e)
        self.sessions: Dict[str, Session] = {}
        self.session_avatars: Dict[str, str] = {}  # session -> its avatar id
        self._pcs: Dict[str, object] = {}
        self._tasks: Dict[str, List[asyncio.Task]] = {}
        self._reserved = 0  # offers being answered (counted against max_sessions)
        self.closed_sessions: Dict[str, Dict] = {}  # last stats of ended sessions (bounded), for /stats
        self.capacity: Dict[int, List[float]] = {}  # measured: sessions at once -> each one's fps (measure_capacity)
        self.live_capacity: Dict[int, List[float]] = {}  # live checks: sessions at once -> each one's fresh fps
        self.mic = None
        self._mic_thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @property
    def avatar(self):
        """The default avatar, prepared."""
        return self.avatars.prepared()

    def warmup(self) -> float:
        """Render one pose window and one chunk of silence with the session settings (engine.runner.Runner.warm_up):
        first calls allocate, pick kernels, compile and capture CUDA graphs here, so the first viewer does not pay
        for them in first-frame latency. Returns the wall time it took."""
        from engine.runner import Runner

        return Runner(self.models, self.avatar, self.config.session.settings).warm_up()

    def probe(self, seconds: float = 2.0) -> float:
        """Frames per second the session settings render at on this machine (engine.runner.Runner.probe)."""
        from engine.runner import Runner

        return Runner(self.models, self.avatar, self.config.session.settings).probe(seconds)

    def choose_settings(self, target_ms: float, sessions: int):
        """Measure live layouts within ``target_ms`` (engine.tuning.choose_live_settings) for ``sessions`` sessions at
        once; the chosen one (an engine.tuning.Choice) becomes the settings of every later session (its queue grown
        when it needs more)."""
        import dataclasses

        from engine.runner import probe_sessions
        from engine.tuning import choose_live_settings

        from .session import min_queue_frames

        base = self.config.session.settings
        fixed = self.models.shapes.chunk if self.models.executors else None  # batched/exported: one chunk length
        choice = choose_live_settings(lambda s, n: probe_sessions(self.models, self.avatar, s, n), base,
                                      target_ms=target_ms, sessions=sessions, fixed_chunk=fixed)
        options = dataclasses.replace(self.config.session, settings=choice.settings,
                                      queue_frames=max(self.config.session.queue_frames,
                                                       min_queue_frames(choice.settings)))
        self.layout = options.layout()
        self.config = dataclasses.replace(self.config, session=options)
        return choice

    def admit_measured(self) -> int:
        """``max_sessions`` None (the default): measure this machine's capacity (measure_capacity), admit that many
        from now on and log it; returns the count."""
        import dataclasses

        n = self.measure_capacity()
        self.config = dataclasses.replace(self.config, max_sessions=n)
        table = "; ".join(f"{k} at once: {min(v):.1f} fps each" for k, v in sorted(self.capacity.items()))
        live = "; ".join(f"{k} at once: {min(v):.1f}" for k, v in sorted(self.live_capacity.items()))
        log.info("admitting up to %d session(s): the most that stay real time here (engine flat out, 20%% margin: "
                 "%s; live with media, fresh fps: %s); --max-sessions overrides", n, table, live)
        return n

    def measure_capacity(self, limit: int = 16, margin: float = 1.2, seconds: float = 2.0,
                         live_seconds: float = 4.0) -> int:
        """The most sessions this machine serves in real time with a margin, measured as sessions will run: 1, 2,
        4, ... sessions streaming at once through the (batched) model set, each needing ``margin`` x 25 fps, up to
        the first count that falls short (or ``limit``), then the counts between the last that held and that one.
        That count is then checked live (streaming/capacity.py: that many real sessions sending to loopback viewers
        for ``live_seconds``, each needing 24.5 fresh fps; the media path costs as much again as half the engine on
        a CPU) and lowered until it holds. Returns it (at least 1); ``self.capacity`` keeps the engine's
        measurements, ``self.live_capacity`` the live checks'."""
        from engine.runner import probe_sessions

        from .capacity import LIVE_FPS, live_rates

        def holds(n: int) -> bool:
            rates = probe_sessions(self.models, self.avatar, self.config.session.settings, n, seconds)
            self.capacity[n] = rates
            log.info("capacity probe: %d session(s) at once -> %s fps each", n, ", ".join(f"{r:.1f}" for r in rates))
            return min(rates) >= margin * FPS

        best, n = 1, 1
        while n <= limit and holds(n):
            best, n = n, n * 2
        for m in range(best + 1, min(n, limit + 1)):  # between the last power of two that held and the next
            if not holds(m):
                break
            best = m
        while live_seconds > 0:  # the engine's count, checked with the media path (each count once)
            rates = self.live_capacity[best] = live_rates(self, best, live_seconds)
            log.info("capacity live check: %d session(s) sent %s fresh fps each", best,
                     ", ".join(f"{r:.1f}" for r in rates))
            if min(rates) >= LIVE_FPS or best == 1:
                break
            best -= 1
        return best

    async def loopback_offer(self, sdp: str) -> Dict[str, str]:
        """A session for an offer made in this process (the capacity check's viewers), on the default avatar:
        {"sdp", "type", "session"} as POST /offer answers, without HTTP and admission."""
        sdp, sections = check_offer({"sdp": sdp, "type": "offer"})
        return json.loads((await self._answer(sdp, sections, self.avatars.default_id)).body)

    def close(self) -> None:
        """Stop the batched calls' workers (after the sessions are closed)."""
        from engine.backends.batching import close_batchers

        close_batchers(self.models)

    # ------------------------------------------------------------------------------------------------------------
    def app(self):
        from aiohttp import web

        from .avatars import MAX_UPLOAD_BYTES

        app = web.Application(client_max_size=MAX_UPLOAD_BYTES + (1 << 20))  # an avatar upload, with its form
        app.router.add_get("/", self._index)
        app.router.add_get("/avatars", self._list_avatars)
        app.router.add_post("/avatars", self._upload_avatar)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/stats/{sid}", self._stats)
        app.router.add_post("/say/{sid}", self._say)
        app.router.add_post("/interrupt/{sid}", self._interrupt)
        app.router.add_post("/close/{sid}", self._close)
        app.router.add_get("/health", self._health)
        app.router.add_static("/static/", STATIC_DIR)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app) -> None:
        self._loop = asyncio.get_running_loop()
        c = self.config
        if c.media_addresses:
            pin_media_addresses(c.media_addresses)
        if c.udp_ports:
            restrict_udp_ports(self._loop, *c.udp_ports)

    async def _on_shutdown(self, app) -> None:
        await asyncio.gather(*(self.close_session(sid, "server shutting down") for sid in list(self.sessions)))
        await asyncio.get_running_loop().run_in_executor(None, self.close)
        if self.mic is not None:
            self.mic.close()
            if self._mic_thread is not None:
                self._mic_thread.join(5)

    # ------------------------------------------------------------------------------------------------------------
    def start_mic(self) -> None:
        """The server's microphone feeds every session (the browser's audio is then ignored); AudioDeviceError
        (engine.sources) names the device and the cause when it cannot be opened."""
        from engine.sources import MicrophoneSource

        device = self.config.mic_device
        if device is not None and device.isdigit():
            device = int(device)
        self.mic = MicrophoneSource(device=device)
        self.mic.start()  # AudioDeviceError names the device and the cause

        def pump() -> None:
            for chunk in self.mic.live:  # ends when the microphone is closed
                for s in list(self.sessions.values()):
                    s.push_input(chunk.samples, chunk.sample_rate, source="server-mic")

        self._mic_thread = threading.Thread(target=pump, name="server-mic", daemon=True)
        self._mic_thread.start()

    # ------------------------------------------------------------------------------------------------------------
    async def _index(self, request):
        from aiohttp import web

        return web.FileResponse(STATIC_DIR / "index.html")

    async def _health(self, request):
        from aiohttp import web

        return web.json_response({"sessions": len(self.sessions), "max_sessions": self.config.max_sessions,
                                  "preset": self.models.cfg.name, "trained": self.models.cfg.trained})

    async def _list_avatars(self, request):
        from aiohttp import web

        return web.json_response({"avatars": self.avatars.list(), "default": self.avatars.default_id})

    async def _upload_avatar(self, request):
        """POST /avatars, multipart field ``image`` -> {"avatar": ID}; 400 naming the problem of a bad file."""
        from aiohttp import web

        try:
            if not request.content_type.startswith("multipart/"):
                raise AvatarError(f"POST /avatars takes a multipart form with an 'image' field, got "
                                  f"{request.content_type or 'no content type'}")
            form = await request.post()
            field_ = form.get("image")
            if field_ is None or not hasattr(field_, "file"):
                raise AvatarError("POST /avatars: the form has no 'image' file field")
            data = field_.file.read()
            loop = asyncio.get_running_loop()
            entry = await loop.run_in_executor(None, self.avatars.add_upload, data, field_.filename or "upload")
        except AvatarError as e:
            log.info("POST /avatars from %s: 400 %s", request.remote, e)
            return web.json_response({"error": str(e)}, status=400)
        log.info("POST /avatars from %s: avatar %s (%dx%d)", request.remote, entry.id, entry.image.shape[1],
                 entry.image.shape[0])
        return web.json_response({"avatar": entry.id, **entry.describe()})

    async def _metrics(self, request):
        from aiohttp import web

        from .metrics import render_metrics

        body, content_type = render_metrics(self)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _stats(self, request):
        from aiohttp import web

        sid = request.match_info["sid"]
        s = self.sessions.get(sid)
        if s is not None:
            return web.json_response(s.stats())
        if sid in self.closed_sessions:
            return web.json_response(self.closed_sessions[sid])
        return web.json_response({"error": f"no session {sid!r}"}, status=404)

    async def _say(self, request):
        """POST /say/<session> {"text", "interrupt"} -> 202 {"utterance": ID}; see the module docstring."""
        from aiohttp import web

        sid = request.match_info["sid"]
        session = self.sessions.get(sid)
        if session is None:
            return web.json_response({"error": f"no session {sid!r}"}, status=404)
        status, headers = 400, None
        try:
            try:
                body = json.loads(await request.text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SpeechError(f"say body is not valid JSON: {e}") from e
            if not isinstance(body, dict) or "text" not in body:
                got = "an object without \"text\"" if isinstance(body, dict) else f"a JSON {type(body).__name__}"
                raise SpeechError(f"say body must be a JSON object {{\"text\": \"...\", \"interrupt\": false}}, "
                                  f"got {got}")
            interrupt = body.get("interrupt", False)
            if not isinstance(interrupt, bool):
                raise SpeechError(f"\"interrupt\" must be true or false, got {interrupt!r}")
            uid = session.say(body["text"], interrupt=interrupt)
        except (SpeechError, SpeechQueueFull, TTSUnavailable) as e:
            if isinstance(e, SpeechTooLong):
                status = 413
            elif isinstance(e, SpeechQueueFull):
                status, headers = 429, {"Retry-After": "5"}
            elif isinstance(e, TTSUnavailable):
                status = 503
            log.info("POST /say/%s from %s: %d %s", sid, request.remote, status, e)
            return web.json_response({"error": str(e)}, status=status, headers=headers)
        return web.json_response({"utterance": uid, "queued": session.speech.stats()["queued"]}, status=202)

    async def _interrupt(self, request):
        from aiohttp import web

        sid = request.match_info["sid"]
        session = self.sessions.get(sid)
        if session is None:
            return web.json_response({"error": f"no session {sid!r}"}, status=404)
        return web.json_response(session.interrupt())

    async def _close(self, request):
        from aiohttp import web

        sid = request.match_info["sid"]
        if sid not in self.sessions:
            return web.json_response({"error": f"no session {sid!r}"}, status=404)
        await self.close_session(sid, "closed by the page")
        return web.json_response({"closed": sid})

    async def _offer(self, request):
        from aiohttp import web

        try:
            try:
                body = json.loads(await request.text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"offer body is not valid JSON: {e}") from e
            sdp, sections = check_offer(body)
            try:
                avatar_id = self.avatars.resolve(body.get("avatar"))
            except AvatarError as e:
                raise BadRequest(str(e)) from e
        except BadRequest as e:
            log.info("POST /offer from %s: 400 %s", request.remote, e)
            return web.json_response({"error": str(e)}, status=400)
        if len(self.sessions) + self._reserved >= self.config.max_sessions:
            why = ("the most this machine renders in real time, measured at start-up" if self.capacity
                   else "the --max-sessions limit")
            msg = f"server is full: {self.config.max_sessions} session(s) running ({why}); try again later"
            log.info("POST /offer from %s: 503 %s", request.remote, msg)
            return web.json_response({"error": msg}, status=503, headers={"Retry-After": "10"})
        self._reserved += 1
        try:
            return await self._answer(sdp, sections, avatar_id)
        except BadRequest as e:
            log.info("POST /offer from %s: 400 %s", request.remote, e)
            return web.json_response({"error": str(e)}, status=400)
        except Exception as e:  # noqa: BLE001 - one failing session must not stop the server
            log.exception("POST /offer from %s: session set-up failed", request.remote)
            return web.json_response({"error": f"session set-up failed: {type(e).__name__}: {e}"}, status=500)
        finally:
            self._reserved -= 1

    async def _answer(self, sdp: str, sections, avatar_id: str):
        from aiohttp import web
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        # 1. the session (its own avatar, Runner, LiveSource, QueueSink, tracks; the models are shared)
        loop = asyncio.get_running_loop()

        def make() -> Session:
            return Session(self.models, self.avatars.prepared(avatar_id), self.config.session, tts=self.tts,
                           tts_error=self.tts_error)

        session = await loop.run_in_executor(None, make)
        sid = session.id
        self.session_avatars[sid] = avatar_id
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN/TURN: nothing leaves for a third host
        tasks: List[asyncio.Task] = []

        # 2. handlers first: setRemoteDescription fires "track" for the offer's audio
        @pc.on("track")
        def on_track(track) -> None:
            if track.kind != "audio":
                return
            if self.config.mic:
                log.info("session %s: browser audio ignored (--mic: the server's microphone drives it)", sid)
                return
            tasks.append(asyncio.ensure_future(self._read_audio(session, track)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: connection %s", sid, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close_session(sid, f"peer connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as e:  # aiortc raises ValueError and others for SDP it cannot use
            await pc.close()
            await loop.run_in_executor(None, session.close, "bad offer")
            raise BadRequest(f"cannot use the SDP offer: {type(e).__name__}: {e}") from e
        # 3. our tracks on the offer's transceivers: the avatar video, and the rendered audio if it wants audio
        pc.addTrack(session.video)
        if any(k == "audio" and d in ("sendrecv", "recvonly") for k, d in sections):
            pc.addTrack(session.audio)

        try:
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as e:
            await pc.close()
            await loop.run_in_executor(None, session.close, "offer failed")
            raise BadRequest(f"cannot answer the SDP offer: {type(e).__name__}: {e}") from e
        self.sessions[sid], self._pcs[sid], self._tasks[sid] = session, pc, tasks
        session.start()
        tasks.append(asyncio.ensure_future(self._watch(sid)))
        log.info("session %s: started (%d/%s)", sid, len(self.sessions), self.config.max_sessions)
        desc = pc.localDescription
        return web.json_response({"sdp": desc.sdp, "type": desc.type, "session": sid})

    async def _read_audio(self, session: Session, track) -> None:
        """Browser audio (microphone or the page's file) -> the session's input, until the track ends."""
        from aiortc.mediastreams import MediaStreamError

        try:
            while not session.closed:
                frame = await track.recv()
                samples, rate = _to_samples(frame)
                session.push_input(samples, rate, source="browser")
        except MediaStreamError:
            log.debug("session %s: browser audio ended", session.id)

    async def _watch(self, sid: str) -> None:
        """Free the session when ICE never connects, the client goes silent, or the engine failed."""
        c = self.config
        connected_at: Optional[float] = None
        while sid in self.sessions:
            await asyncio.sleep(0.5)
            session, pc = self.sessions.get(sid), self._pcs.get(sid)
            if session is None or pc is None:
                return
            now = time.monotonic()
            if session.state == "error":
                await self.close_session(sid, f"engine failed: {session.error}")
                return
            if pc.connectionState != "connected":
                if connected_at is None and now - session.created > c.connect_timeout:
                    await self.close_session(sid, f"ICE did not connect within {c.connect_timeout:.0f} s")
                    return
                continue
            connected_at = connected_at or now
            # the client is alive while it reports on our media (RTCP) or sends its own; before our first frame
            # there is nothing to report on, so the silence counts from when we started sending
            heard = [connected_at, session.last_client_audio]
            if session.clock.t0 is not None:
                heard.append(session.clock.t0)
            ago = await self._last_heard(pc)  # seconds since the last RTCP receiver report
            if ago is not None:
                heard.append(now - ago)
            silent = now - max(h for h in heard if h is not None)
            if silent > c.idle_timeout:
                await self.close_session(sid, f"client silent for {silent:.1f} s (vanished)")
                return

    @staticmethod
    async def _last_heard(pc) -> Optional[float]:
        """Seconds since the client's last RTCP report on any of our senders (None before the first)."""
        newest = None
        for sender in pc.getSenders():
            if sender.track is None:
                continue
            report = await sender.getStats()
            for st in report.values():
                if getattr(st, "type", None) == "remote-inbound-rtp":
                    newest = st.timestamp if newest is None else max(newest, st.timestamp)
        if newest is None:
            return None
        return (dt.datetime.now(dt.timezone.utc) - newest).total_seconds()

    async def close_session(self, sid: str, reason: str) -> None:
        """End one session: the peer connection, its tasks, the engine and feeder threads (joined)."""
        session = self.sessions.pop(sid, None)
        pc = self._pcs.pop(sid, None)
        tasks = self._tasks.pop(sid, [])
        avatar_id = self.session_avatars.pop(sid, None)
        if session is None:
            return
        current = asyncio.current_task()
        for t in tasks:
            if t is not current:
                t.cancel()
        if pc is not None:
            await pc.close()
        await asyncio.get_running_loop().run_in_executor(None, session.close, reason)
        stats = session.stats()
        stats["close_reason"] = reason
        stats["avatar"] = avatar_id
        self.closed_sessions[sid] = stats
        while len(self.closed_sessions) > 32:
            self.closed_sessions.pop(next(iter(self.closed_sessions)))
        log.info("session %s: closed (%s); %d running", sid, reason, len(self.sessions))


# ----------------------------------------------------------------------------------------------------------------
# Entry point used by `engine serve` (and tests)
# ----------------------------------------------------------------------------------------------------------------
def speed_note(fps: float) -> Tuple[int, str]:
    """The start-up line about the measured render speed: (logging level, message); a warning under real time."""
    if fps < FPS:
        return logging.WARNING, (
            f"this machine renders {fps:.1f} fps with these settings, under the {FPS} fps of a live stream: viewers "
            "will see the picture hold. Lower --steps or raise --hop/--chunk; on a GPU add --tiny-decoder, --compile "
            "and --cuda-graphs")
    return logging.INFO, f"renders {fps:.1f} fps with these settings ({fps / FPS:.1f}x real time)"


def serve(models, avatars, config: ServerConfig, tts=None) -> None:
    """Run the server until interrupted (blocking). ``config.max_sessions`` None: measured first (measure_capacity).
    ``tts``: the /say engine (None: AvatarServer makes it from ``config.voice``)."""
    from aiohttp import web

    server = AvatarServer(models, avatars, config, tts=tts)
    if config.mic:
        server.start_mic()
    log.info("warm-up render took %.1f s", server.warmup())
    if config.latency_target_ms is not None:  # latency first: the layout for the sessions it must hold
        choice = server.choose_settings(config.latency_target_ms, config.max_sessions or 1)
        config = server.config
        log.log(logging.INFO if choice.met_target else logging.WARNING,
                "live settings for --latency-target %g ms and %d session(s): %s%s", config.latency_target_ms,
                config.max_sessions or 1, choice.describe(),
                "" if choice.met_target else " (no layout within the target renders in real time here: the lowest "
                "latency that does)")
    if config.max_sessions is None:
        server.admit_measured()
        config = server.config
        fps = min(server.capacity[1])
    else:
        fps = server.probe()
    log.log(*speed_note(fps))
    log.info("serving http://%s:%d/ (max %d sessions)", config.host, config.port, config.max_sessions)
    web.run_app(server.app(), host=config.host, port=config.port, print=None, handle_signals=True)


__all__ = ["AvatarServer", "ServerConfig", "BadRequest", "parse_port_range", "restrict_udp_ports",
           "pin_media_addresses", "check_offer", "serve", "speed_note"]
