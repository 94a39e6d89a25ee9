"""An MMGT avatar for a Pipecat voice agent: one processor after the agent's TTS.

    from streaming.pipecat import MMGTVideoService

    avatar = MMGTVideoService.load(image="me.png")          # or MMGTVideoService(models=..., avatar=...)
    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts, avatar, transport.output(),
                         assistant_aggregator])
    # the transport: TransportParams(audio_out_enabled=True, video_out_enabled=True, video_out_is_live=True,
    #                                video_out_width=avatar.size[0], video_out_height=avatar.size[1],
    #                                video_out_framerate=25)

It follows Pipecat's own video services (SimliVideoService, TavusVideoService, HeyGenVideoService): an AIService that
takes the TTS's ``TTSAudioRawFrame``s (they go no further: the avatar's audio replaces them) and pushes downstream,
every 40 ms, the avatar's picture (``OutputImageRawFrame``, RGB) and the audio that goes with that picture
(``SpeechOutputAudioRawFrame``, 16 kHz mono: a continuous stream, silence while the avatar idles, which the output
transport's bot-speaking detection reads as it does Tavus' and HeyGen's). Both come from one slot of the session's
media clock (streaming/player.py), so they leave together; the audio is the TTS's, delayed by the avatar's render
latency. ``InterruptionFrame`` (what Pipecat pushes when the user barges in): the speech not yet played is dropped,
its audio is silent from the next slot on and the frames rendered from it are replaced by the idling avatar
(cross-faded over 3 frames), then the frame goes on downstream. ``TTSStartedFrame`` starts the TTFB metric,
``BotStartedSpeakingFrame`` stops it; every other frame passes through.

:class:`LocalTTSService` is the engine's own offline TTS (espeak-ng, or a piper voice: streaming/tts.py) as a Pipecat
TTS service, for agents (and tests) without a cloud TTS.

The pipecat extra: ``pip install 'mmgt-engine[pipecat]'`` (pipecat-ai).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncGenerator, Deque, Optional

import numpy as np

from engine.extras import extra_problem
from engine.types import SAMPLE_RATE

try:
    from pipecat.frames.frames import (BotStartedSpeakingFrame, CancelFrame, EndFrame, ErrorFrame, Frame,
                                       InterruptionFrame, OutputImageRawFrame, SpeechOutputAudioRawFrame, StartFrame,
                                       TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame)
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings, TTSSettings
    from pipecat.services.tts_service import TTSService
except ModuleNotFoundError as e:  # one line naming the extra
    raise ImportError(extra_problem("pipecat", "streaming.pipecat") or str(e)) from e

from .player import PlayerOptions, Slot, SlotPlayer
from .session import SessionCore, SessionOptions, min_queue_frames
from .tts import TTSError, make_tts

log = logging.getLogger(__name__)


@dataclass
class MMGTVideoSettings(ServiceSettings):
    """Settings of the MMGT video service (runtime-updatable: none yet; the session's are given to the
    constructor)."""


class MMGTVideoService(AIService):
    """TTS audio in, the avatar's video plus the matching audio out (module docstring)."""

    Settings = MMGTVideoSettings
    _settings: Settings

    def __init__(self, *, models, avatar, session_options: Optional[SessionOptions] = None,
                 player_options: PlayerOptions = PlayerOptions(), settings: Optional[Settings] = None,
                 **kwargs) -> None:
        """``models`` and ``avatar``: a model set and a prepared avatar (engine.models.load_model_set /
        prepare_avatar, or :meth:`load`); ``session_options``: the live layout (default: SessionOptions() with a
        queue that fits its settings); ``player_options``: stamping, the idle cover after interruptions."""
        default_settings = self.Settings(model=None)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(settings=default_settings, **kwargs)
        if session_options is None:
            base = SessionOptions()
            session_options = SessionOptions(queue_frames=max(base.queue_frames, min_queue_frames(base.settings)))
        self._models, self._avatar = models, avatar
        self._session_options, self._player_options = session_options, player_options
        self.size = (models.cfg.resolution, models.cfg.resolution)  # (width, height) of the pictures
        self.session: Optional[SessionCore] = None  # made at StartFrame, closed at EndFrame / CancelFrame
        self.player: Optional[SlotPlayer] = None
        self.utterances: Deque[str] = deque(maxlen=100)  # speech queue ids of the TTS audio, newest last
        self._utterance: Optional[str] = None  # the one being fed
        self._context: Optional[str] = None  # its TTS context id
        self._play_task: Optional[asyncio.Task] = None
        self.interrupted_at: Optional[float] = None  # time.monotonic() of the last InterruptionFrame handled

    @classmethod
    def load(cls, image: Optional[Path] = None, *, preset: Optional[str] = None, weights: Optional[Path] = None,
             device: Optional[str] = None, settings=None, **kwargs) -> "MMGTVideoService":
        """Load a model set (``preset`` / ``weights`` as the engine's flags; default: the tiny preset) and the avatar
        of ``image`` (default: the bundled portrait), with the live layout ``settings`` (default: engine/settings.py
        LIVE on a GPU, LIVE_CPU on a CPU)."""
        from engine.models import ModelOptions, load_model_set, prepare_avatar, resolve_device, with_preset_steps
        from engine.options import ASSETS, read_image
        from engine.settings import LIVE, LIVE_CPU

        options = ModelOptions(preset=preset, weights=weights, device=device)
        base = settings or (LIVE if resolve_device(device).startswith("cuda") else LIVE_CPU)
        live = with_preset_steps(base, options)
        models = load_model_set(options, live)
        avatar = prepare_avatar(models, read_image(Path(image) if image else ASSETS / "portrait.jpg"),
                                weights_dir=weights)
        queue = max(SessionOptions().queue_frames, min_queue_frames(live))
        return cls(models=models, avatar=avatar, session_options=SessionOptions(settings=live, queue_frames=queue),
                   **kwargs)

    def can_generate_metrics(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------------------------
    async def start(self, frame: StartFrame):
        """Start the avatar's session (it idles until speech comes) and the task that plays its slots."""
        await super().start(frame)
        if self.session is not None:
            return

        def make() -> SessionCore:
            return SessionCore(self._models, self._avatar, self._session_options, session_id=f"pipecat-{self.id}")

        self.session = await asyncio.to_thread(make)
        self.player = SlotPlayer(self.session, self._player_options)
        self.session.start()
        self._play_task = self.create_task(self._play())

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        await self._teardown()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._teardown()

    async def cleanup(self):
        await super().cleanup()
        await self._teardown()

    async def _teardown(self) -> None:
        """Idempotent: stop playing, close the session (its engine threads are joined off the event loop)."""
        if self._play_task is not None:
            await self.cancel_task(self._play_task)
            self._play_task = None
        session, self.session = self.session, None
        if session is not None:
            await asyncio.to_thread(session.close, "pipeline ended")

    async def _play(self) -> None:
        """Every 40 ms: the slot's picture and its audio, pushed downstream together."""
        width, height = self.size

        async def emit(slot: Slot) -> None:
            pcm = (np.clip(slot.audio, -1.0, 1.0) * 32767.0).astype(np.int16)  # (640,)
            await self.push_frame(SpeechOutputAudioRawFrame(audio=pcm.tobytes(), sample_rate=SAMPLE_RATE,
                                                            num_channels=1))
            await self.push_frame(OutputImageRawFrame(image=slot.picture.tobytes(), size=(width, height),
                                                      format="RGB"))

        await self.player.aplay(emit)

    # ------------------------------------------------------------------------------------------------------------
    def _feed(self, frame: TTSAudioRawFrame) -> None:
        """TTS audio into the session's speech queue: one utterance per TTS context (any rate, int16)."""
        speech = self.session.speech
        pcm = np.frombuffer(frame.audio, np.int16).reshape(-1, max(1, frame.num_channels))  # (n, channels)
        if self._utterance is not None and frame.context_id != self._context:
            self._end_utterance()
        for _ in range(2):  # an utterance interrupted meanwhile takes no more: the audio starts a new one
            if self._utterance is None:
                self._utterance, self._context = speech.open_audio(), frame.context_id
                self.utterances.append(self._utterance)
            if speech.feed_audio(self._utterance, pcm, frame.sample_rate):
                return
            self._utterance = None

    def _end_utterance(self) -> None:
        if self._utterance is not None and self.session is not None:
            self.session.speech.close_audio(self._utterance)
        self._utterance = self._context = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            if self.session is not None:
                self._feed(frame)  # consumed: the avatar's own audio goes downstream instead
        elif isinstance(frame, InterruptionFrame):
            self.interrupted_at = time.monotonic()
            self._utterance = self._context = None
            if self.session is not None:
                self.session.interrupt()  # the player covers the frames of the speech it took out
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStartedFrame):
            await self.start_ttfb_metrics()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStoppedFrame):
            self._end_utterance()
            await self.push_frame(frame, direction)
        elif isinstance(frame, BotStartedSpeakingFrame):
            await self.stop_ttfb_metrics()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)


@dataclass
class LocalTTSSettings(TTSSettings):
    """Settings of the local TTS service (the voice is fixed at construction)."""


class LocalTTSService(TTSService):
    """The engine's offline TTS (streaming/tts.py: espeak-ng, or a piper voice ``FILE.onnx``) as a Pipecat TTS
    service; TTSUnavailable (from make_tts) says what is missing."""

    Settings = LocalTTSSettings
    _settings: Settings

    def __init__(self, *, voice: Optional[str] = None, settings: Optional[Settings] = None, **kwargs) -> None:
        default_settings = self.Settings(model=None, voice=voice, language=None)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(push_start_frame=True, push_stop_frames=True, settings=default_settings, **kwargs)
        self._engine = make_tts(voice)

    def can_generate_metrics(self) -> bool:
        return True

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        """Synthesise ``text`` (off the event loop), then yield it as TTSAudioRawFrames at the pipeline's rate."""
        await self.start_tts_usage_metrics(text)
        try:
            samples = await asyncio.to_thread(self._engine.synthesize, text)  # (n,) float32 at 16 kHz
        except TTSError as e:
            yield ErrorFrame(error=f"{self._engine.describe()}: {e}")
            return
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16).tobytes()

        async def one_piece():
            yield pcm

        async for frame in self._stream_audio_frames_from_iterator(one_piece(), in_sample_rate=SAMPLE_RATE,
                                                                   context_id=context_id):
            await self.stop_ttfb_metrics()
            yield frame


__all__ = ["MMGTVideoService", "MMGTVideoSettings", "LocalTTSService", "LocalTTSSettings"]
