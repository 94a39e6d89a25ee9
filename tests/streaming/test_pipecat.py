"""The Pipecat video service (issue 18, acceptance 4): a real Pipecat pipeline, text -> the engine's espeak-ng TTS as a
Pipecat TTS service -> MMGTVideoService -> a collecting sink, run by Pipecat's own WorkerRunner.

Measured at the sink: pictures at 25 fps; the speech's first sound arrives with the picture of the engine frame it
belongs to (the pictures carry their engine frame index as a stamp) within 40 ms; an InterruptionFrame queued into the
pipeline mid-speech silences the audio and takes the speech's frames off the video within 200 ms, the video going on
at 25 fps.
"""
import asyncio
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is missing (pip install 'mmgt-engine[pipecat]')")
pytestmark = [pytest.mark.filterwarnings("ignore:Trying to estimate tuning"),
              pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                 reason="espeak-ng is not installed (apt-get install espeak-ng)")]

TEXT = ("Hello, I am your presenter for today. We will talk about rivers, mountains and the sea. "
        "Thank you very much for listening to all of this.")
SILENT_RMS = 0.003  # a 40 ms slot quieter than this is silence (-50 dBFS)
SPEECH_RMS = 0.01


@pytest.fixture(scope="module")
def live_settings():
    from engine.settings import LIVE_CPU

    return LIVE_CPU.with_(hop=12, lookahead=2, chunk=12, overlap=0, steps=1, smga_steps=2)


def _collector():
    from pipecat.frames.frames import OutputImageRawFrame, SpeechOutputAudioRawFrame
    from pipecat.processors.frame_processor import FrameProcessor

    from streaming.tracks import read_stamp

    class Collector(FrameProcessor):
        """The end of the pipeline: keeps (arrival time, engine frame stamp) of every picture and (arrival time,
        int16 samples) of every audio frame."""

        def __init__(self):
            super().__init__()
            self.images, self.audio = [], []

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            now = time.monotonic()
            if isinstance(frame, OutputImageRawFrame):
                w, h = frame.size
                self.images.append((now, read_stamp(np.frombuffer(frame.image, np.uint8).reshape(h, w, 3))))
            elif isinstance(frame, SpeechOutputAudioRawFrame):
                assert frame.sample_rate == 16000 and frame.num_channels == 1
                self.audio.append((now, np.frombuffer(frame.audio, np.int16).astype(np.float32) / 32768.0))
            await self.push_frame(frame, direction)

    return Collector()


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def test_pipecat_pipeline_speaks_in_sync_and_stops_on_interruption(tiny_models, tiny_avatar, live_settings):
    from pipecat.frames.frames import EndFrame, InterruptionFrame, TTSSpeakFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.workers.runner import WorkerRunner

    import torch

    from streaming.pipecat import LocalTTSService, MMGTVideoService
    from streaming.player import PlayerOptions
    from streaming.session import SessionOptions, min_queue_frames

    torch.set_num_threads(1)
    options = SessionOptions(settings=live_settings, queue_frames=min_queue_frames(live_settings) + 5)
    avatar = MMGTVideoService(models=tiny_models, avatar=tiny_avatar, session_options=options,
                              player_options=PlayerOptions(stamp=True))
    sink = _collector()
    marks = {}

    async def scenario():
        task = PipelineWorker(Pipeline([LocalTTSService(), avatar, sink]),
                              params=PipelineParams(audio_out_sample_rate=16000))
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(task)
        running = asyncio.create_task(runner.run())
        await _until(lambda: len(sink.images) > 25, 60, "the avatar's first second of pictures")
        marks["session"] = avatar.session
        await task.queue_frame(TTSSpeakFrame(TEXT))
        await _until(lambda: any(_rms(a) > SPEECH_RMS for _, a in sink.audio[-5:]), 30, "the speech")
        await asyncio.sleep(1.0)  # 1 s into the speech
        marks["interrupt"] = time.monotonic()
        await task.queue_frame(InterruptionFrame())
        await asyncio.sleep(2.5)
        marks["end"] = time.monotonic()
        await task.queue_frame(EndFrame())
        await asyncio.wait_for(running, 60)

    asyncio.run(scenario())
    session, t_int = marks["session"], marks["interrupt"]
    assert session.closed  # the EndFrame closed the avatar's session
    # 1. pictures at 25 fps, before and after the interruption
    times = np.array([t for t, _ in sink.images])
    fps = (len(times) - 1) / (times[-1] - times[0])
    after = times[(times > t_int) & (times <= marks["end"])]
    fps_after = (len(after) - 1) / (after[-1] - after[0])
    print(f"pictures: {len(times)} at {fps:.2f} fps, {fps_after:.2f} fps after the interruption")
    assert abs(fps - 25.0) < 1.0 and abs(fps_after - 25.0) < 1.5, (fps, fps_after)
    # 2. the first sound of the speech and the picture of its engine frame arrive together
    uid = avatar.utterances[0]
    u = session.speech.utterance(uid)
    assert u["state"] == "interrupted" and u["start_sample"] is not None, u
    emitted = session.speech.emitted.read(u["start_sample"], u["start_sample"] + 16000)
    onset = u["start_sample"] + int(np.flatnonzero(np.abs(emitted) > 0.05)[0])  # engine sample
    audio_t = np.concatenate([t + np.arange(len(a)) / 16000 for t, a in sink.audio])
    audio_x = np.concatenate([a for _, a in sink.audio])
    t_audio = audio_t[np.flatnonzero(np.abs(audio_x) > 0.05)[0]]
    frame, within = divmod(onset, 640)
    t_video = next(t for t, stamp in sink.images if stamp == frame) + within / 16000
    offset_ms = (t_audio - t_video) * 1000
    print(f"speech onset: audio - video {offset_ms:.1f} ms")
    assert abs(offset_ms) <= 40.0
    # 3. the interruption: speech audio and speech frames stop within 200 ms
    before = [a for t, a in sink.audio if t_int - 0.3 < t <= t_int]
    assert _rms(np.concatenate(before)) > SPEECH_RMS  # it was speaking when interrupted
    loud = [t for t, a in sink.audio if t > t_int and _rms(a) >= SILENT_RMS]
    silent_after_ms = ((max(loud) - t_int) * 1000 + 40) if loud else 0.0
    first, last = u["start_sample"] // 640, -(-u["end_sample"] // 640)  # the speech's engine frames
    speech_frames = [t for t, stamp in sink.images if t > t_int and first <= stamp < last]
    frames_after_ms = ((max(speech_frames) - t_int) * 1000 + 40) if speech_frames else 0.0
    reached_ms = (avatar.interrupted_at - t_int) * 1000
    print(f"interruption: reached the avatar {reached_ms:.0f} ms after it was queued; audio silent "
          f"{silent_after_ms:.0f} ms after it, speech frames gone {frames_after_ms:.0f} ms after it "
          f"({len([t for t in times if t > t_int])} pictures since)")
    assert silent_after_ms <= 200.0 and frames_after_ms <= 200.0
