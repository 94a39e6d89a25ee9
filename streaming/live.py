"""`engine live`: the presenter on one machine, without a browser.

Input: the local microphone (sounddevice) and/or text (a file, lines typed on stdin) spoken by the TTS engine.
Output: a virtual camera (pyvirtualcam: v4l2loopback on Linux, OBS Virtual Camera on Windows and macOS) and/or a
preview window (tkinter), plus the matching audio on a sound device, which a call app can take as its microphone
(README: the PipeWire/PulseAudio null sink).

One SlotPlayer (streaming/player.py) pulls the session's slots; for slot k the playout thread writes its audio to the
sound device at once and sends its picture when that audio reaches the device's output (the device's buffer and
latency, measured from its callbacks: :meth:`AudioOut.when`). So the camera frame of slot k and the sound of slot k
leave together, and the pictures follow the sound card's clock, 25 a second.
"""
from __future__ import annotations

import logging
import math
import platform
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from engine.doctor import V4L2LOOPBACK_MODPROBE as MODPROBE
from engine.types import FPS, SAMPLE_RATE

from .speech import SpeechError
from .tts import split_sentences

if TYPE_CHECKING:  # kept light: `engine --help` reads MODPROBE from here, without torch
    from .player import SlotPlayer
    from .session import SessionCore

log = logging.getLogger(__name__)




class OutputError(RuntimeError):
    """An output (virtual camera, sound device, preview window) cannot be opened; the message says how to fix it."""


@dataclass(frozen=True)
class LiveOptions:
    """Where `engine live` sends the avatar (its flags fill these)."""

    camera: bool = True  # send the avatar to a virtual camera (pyvirtualcam)
    camera_device: Optional[str] = None  # /dev/videoN (Linux) or the camera's name; None: the first free one
    camera_backend: Optional[str] = None  # pyvirtualcam backend (v4l2loopback, obs, unitycapture); None: any
    camera_size: Optional[Tuple[int, int]] = None  # (width, height) the camera gets; None: the frame's own size
    preview: bool = False  # show the avatar in a window (tkinter)
    audio: bool = True  # play the matching audio on a sound device (sounddevice)
    audio_device: Optional[Union[int, str]] = None  # output device index or name; None: the system's default
    audio_block: int = 320  # samples per sound-device callback (20 ms at 16 kHz)
    audio_max_buffer: float = 0.5  # audio waiting beyond this many seconds is dropped (a device slower than the clock)


def no_camera_message(cause: object) -> str:
    """The one line `engine live` says when no virtual camera can be opened: the cause and how to create one."""
    if platform.system() == "Linux":
        how = (f"create one with `{MODPROBE}` (the module: apt-get install v4l2loopback-dkms), then use "
               "--camera-device /dev/video10")
    else:
        how = "install OBS Studio (28 or newer) and start its Virtual Camera once (Tools > Start Virtual Camera)"
    return f"no virtual camera ({str(cause).strip().splitlines()[-1]}): {how}; or run with --no-camera --preview"


def fit_picture(picture: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``picture`` (H, W, 3) scaled to fit ``size`` (width, height) keeping its aspect, the rest filled by
    stretching its edge pixels (no black bars); itself when it already has that size."""
    width, height = size
    h, w = picture.shape[:2]
    if (w, h) == (width, height):
        return picture
    import cv2

    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    inter = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(picture, (nw, nh), interpolation=inter)  # (nh, nw, 3)
    top, left = (height - nh) // 2, (width - nw) // 2
    return cv2.copyMakeBorder(scaled, top, height - nh - top, left, width - nw - left, cv2.BORDER_REPLICATE)


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------
class VirtualCamera:
    """A pyvirtualcam camera at 25 fps, RGB; OutputError (how to create one) when there is none."""

    def __init__(self, size: Tuple[int, int], device: Optional[str] = None, backend: Optional[str] = None) -> None:
        import pyvirtualcam

        self.size = size
        try:
            self.camera = pyvirtualcam.Camera(size[0], size[1], FPS, fmt=pyvirtualcam.PixelFormat.RGB, device=device,
                                              backend=backend)
        except (RuntimeError, KeyError, ValueError) as e:  # no device, device busy, unknown backend
            raise OutputError(no_camera_message(e)) from e
        self.sent = 0
        log.info("virtual camera: %s (%s backend), %dx%d at %d fps", self.camera.device, self.camera.backend,
                 size[0], size[1], FPS)

    @property
    def device(self) -> str:
        return self.camera.device

    def send(self, picture: np.ndarray) -> None:
        self.camera.send(np.ascontiguousarray(fit_picture(picture, self.size)))
        self.sent += 1

    def close(self) -> None:
        self.camera.close()


class AudioOut:
    """The avatar's audio on a sound device: a sounddevice OutputStream (16 kHz mono float32) whose callback takes
    what :meth:`write` queued, at the device's own pace (silence when nothing is queued).

    Every sample written has an index in the stream of written samples; :meth:`when` says when sample ``index``
    reaches the device's output (its DAC): the next callback's time, plus the output latency PortAudio reports for
    it, plus what is queued before it. Asked again at any moment, the answer follows what the device did since (a
    late callback, an underrun), so a picture sent at ``when(index of its audio)`` leaves with its sound.
    """

    def __init__(self, device: Optional[Union[int, str]] = None, block: int = 320, max_buffer: float = 0.5,
                 cushion: int = 640, quiet: float = 0.003) -> None:
        try:
            import sounddevice as sd  # needs the PortAudio shared library at import time
        except (ImportError, OSError) as e:
            raise OutputError(f"audio output needs sounddevice and the PortAudio library ({e}): pip install "
                              "'mmgt-engine[live]'; apt-get install libportaudio2; or run with --no-audio") from e
        self.block, self.max_buffer = block, int(max_buffer * SAMPLE_RATE)
        self.cushion = cushion  # silence queued before the first write: slots come every 40 ms, callbacks every
        # block, so a write a little late would leave a callback without samples (a gap in the sound) without it
        self.quiet = quiet  # queued samples below this level are silence that may be left out to catch up
        self._chunks: Deque[np.ndarray] = deque()
        self._buffered = 0  # samples queued, not yet taken
        self._queued = 0  # samples ever queued (the index of the next one written)
        self._gone = 0  # samples ever taken by the device, or left out of the queue (the index of the head)
        self._lock = threading.Lock()
        self._cb: Optional[Tuple[float, int, float]] = None  # (time of the last callback, its frames, DAC latency)
        self._stream_clock = True  # PortAudio's stream time is usable (some host APIs report 0: monotonic then)
        self.written = 0  # samples written
        self.underruns = 0  # callbacks that found less queued than they needed, after the first write
        self.dropped = 0  # samples thrown away because more than max_buffer waited
        self.trimmed = 0  # silent samples left out: after an underrun the queue (the delay) is back to the usual
        self.status_flags = 0  # callbacks PortAudio flagged (under/overflow on its side)
        name = "the default output device" if device is None else f"output device {device!r}"
        try:
            self.stream = sd.OutputStream(samplerate=SAMPLE_RATE, blocksize=block, channels=1, dtype="float32",
                                          device=device, latency="low", callback=self._callback)
        except (ValueError, sd.PortAudioError) as e:
            raise OutputError(f"cannot play audio on {name} at 16 kHz mono: {e}; pick one with --audio-device "
                              "(python -m sounddevice lists them) or run with --no-audio") from e
        self.name = name

    def start(self) -> None:
        self.stream.start()

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()

    def _now(self) -> float:
        return float(self.stream.time) if self._stream_clock else time.monotonic()

    def _callback(self, outdata: np.ndarray, frames: int, time_info, status) -> None:
        """PortAudio's thread: fill ``outdata`` (frames, 1) from the queue; never raise."""
        if status:
            self.status_flags += 1
        out = outdata[:, 0]
        pos = 0
        with self._lock:
            while pos < frames and self._chunks:
                chunk = self._chunks[0]
                take = min(frames - pos, len(chunk))
                out[pos:pos + take] = chunk[:take]
                if take == len(chunk):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = chunk[take:]
                pos += take
            self._buffered -= pos
            self._gone += pos
            if pos < frames and self.written:
                self.underruns += 1
            current, dac = float(time_info.currentTime), float(time_info.outputBufferDacTime)
            if current <= 0.0:  # no stream clock from this host API: ours, and the latency PortAudio promised
                self._stream_clock = False
                current, dac = time.monotonic(), time.monotonic() + float(self.stream.latency)
            self._cb = (current, frames, max(0.0, dac - current))
        out[pos:] = 0.0

    def when(self, index: int) -> float:
        """time.monotonic() at which written sample ``index`` reaches the device's output (past: already heard)."""
        with self._lock:
            return time.monotonic() + self._until_locked(index)

    def delay(self) -> float:
        """Seconds from now until a sample written now reaches the device's output."""
        with self._lock:
            return self._until_locked(self._queued)

    def _until_locked(self, index: int) -> float:
        if self._cb is None:  # not started yet: one block, the queue and the latency PortAudio expects
            return (self.block + index - self._gone) / SAMPLE_RATE + float(self.stream.latency)
        last, frames, latency = self._cb
        next_callback = max(0.0, last + frames / SAMPLE_RATE - self._now())
        return next_callback + latency + (index - self._gone) / SAMPLE_RATE

    def _leave_out_locked(self, n: int) -> None:
        """Take ``n`` samples off the queue's head unplayed."""
        while n > 0 and self._chunks:
            head = self._chunks[0]
            take = min(n, len(head))
            if take == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = head[take:]
            self._buffered -= take
            self._gone += take
            n -= take

    def _trim_silence_locked(self) -> None:
        """A callback that came too late (an underrun on the device's side) left its samples queued: everything
        after plays later. Leave silent samples at the queue's head out until it holds the usual (the cushion and a
        block) again; speech is never cut."""
        excess = self._buffered - (self.cushion + self.block)
        while excess > 0 and self._chunks:
            head = self._chunks[0]
            loud = np.flatnonzero(np.abs(head) >= self.quiet)
            take = min(len(head) if not len(loud) else int(loud[0]), excess)  # of its silent start
            if take == 0:
                return
            self._leave_out_locked(take)
            self.trimmed += take
            excess -= take

    def write(self, samples: np.ndarray) -> int:
        """Queue (n,) float32 samples at 16 kHz; returns the index of the first (for :meth:`when`)."""
        s = np.asarray(samples, np.float32)
        with self._lock:
            if not self.written and self.cushion:
                self._chunks.append(np.zeros(self.cushion, np.float32))
                self._buffered += self.cushion
                self._queued += self.cushion
            self._trim_silence_locked()
            index = self._queued
            self._chunks.append(s)
            self._buffered += len(s)
            self._queued += len(s)
            self.written += len(s)
            if self._buffered > self.max_buffer:  # the device fell far behind the clock: drop the oldest
                excess = self._buffered - self.max_buffer
                self._leave_out_locked(excess)
                self.dropped += excess
        return index


class PreviewWindow:
    """A window showing the avatar (tkinter; OpenCV's headless build has no windows). Its event loop runs on the
    thread that made it (:meth:`run`, the main thread); :meth:`show` may be called from any other."""

    def __init__(self, title: str, size: Tuple[int, int]) -> None:
        try:
            import tkinter
        except ImportError as e:
            raise OutputError(f"--preview needs tkinter ({e}): apt-get install python3-tk") from e
        try:
            self.root = tkinter.Tk()
        except tkinter.TclError as e:
            raise OutputError(f"--preview cannot open a window ({e}): run it in a desktop session (DISPLAY set)") \
                from e
        self.root.title(title)
        self.label = tkinter.Label(self.root, width=size[0], height=size[1])
        self.label.pack()
        self.size = size
        self._latest: Optional[np.ndarray] = None
        self._lock = threading.Lock()
        self.shown = 0

    def show(self, picture: np.ndarray) -> None:
        with self._lock:
            self._latest = picture

    def run(self, stop: threading.Event, poll_ms: int = 10) -> None:
        """Show the newest picture every ``poll_ms`` until ``stop`` is set (closing the window sets it)."""
        from PIL import Image, ImageTk

        def tick() -> None:
            if stop.is_set():
                self.root.destroy()
                return
            with self._lock:
                picture, self._latest = self._latest, None
            if picture is not None:
                photo = ImageTk.PhotoImage(Image.fromarray(fit_picture(picture, self.size)))
                self.label.configure(image=photo)
                self.label.image = photo  # keep a reference: Tk does not
                self.shown += 1
            self.root.after(poll_ms, tick)

        self.root.protocol("WM_DELETE_WINDOW", stop.set)
        self.root.after(poll_ms, tick)
        self.root.mainloop()


def preview_size(frame: Tuple[int, int], camera: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The preview shows what the camera gets; a small frame (the tiny preset's 64 px) is enlarged to >= 256 px."""
    if camera is not None:
        return camera
    scale = max(1, math.ceil(256 / max(frame)))
    return frame[0] * scale, frame[1] * scale


def open_outputs(options: LiveOptions, frame_size: Tuple[int, int]):
    """(camera, audio, preview) as ``options`` ask (None where not), opened before any model is loaded so a missing
    device costs nothing; OutputError says what is missing and how to get it."""
    opened: List = []
    try:
        camera = audio = preview = None
        if options.camera:
            camera = VirtualCamera(options.camera_size or frame_size, options.camera_device, options.camera_backend)
            opened.append(camera)
        if options.audio:
            audio = AudioOut(options.audio_device, options.audio_block, options.audio_max_buffer)
            opened.append(audio)
        if options.preview:
            preview = PreviewWindow("MMGT live", preview_size(frame_size, options.camera_size))
        return camera, audio, preview
    except BaseException:
        for out in opened:
            out.close()
        raise


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def text_parts(text: str, max_chars: int) -> List[str]:
    """``text`` in utterances of at most ``max_chars`` characters, cut between sentences."""
    parts: List[str] = []
    for sentence in split_sentences(text, min(max_chars, 250)):
        if parts and len(parts[-1]) + 1 + len(sentence) <= max_chars:
            parts[-1] += " " + sentence
        else:
            parts.append(sentence)
    return parts


class TextInput:
    """Text for the avatar to say: a file's text, then lines read from ``stdin`` as they are typed. A line starting
    with ``!`` interrupts first (a lone ``!`` only interrupts)."""

    def __init__(self, session: SessionCore, text: Optional[str] = None, stdin: Optional[IO[str]] = None) -> None:
        self.session, self.text, self.stdin = session, text, stdin
        self.said: List[str] = []  # utterance ids, in order
        self._eof = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.text:
            for part in text_parts(self.text, self.session.options.speech.max_text_chars):
                self.line(part)
        if self.stdin is None:
            self._eof.set()
            return
        self._thread = threading.Thread(target=self._read, name="live-stdin", daemon=True)
        self._thread.start()

    def line(self, line: str) -> Optional[str]:
        """Say ``line`` (``!`` first: interrupt); the utterance id, None when nothing was queued."""
        text = line.strip()
        if text.startswith("!"):
            self.session.interrupt()
            text = text[1:].strip()
        if not text:
            return None
        try:
            uid = self.session.say(text)
        except SpeechError as e:  # the queue is full, no TTS engine, ...: said, not fatal
            log.error("cannot say %r: %s", text[:40], e)
            return None
        self.said.append(uid)
        return uid

    def _read(self) -> None:
        try:
            for line in self.stdin:
                self.line(line)
        except (OSError, ValueError) as e:  # no readable stdin (closed, captured): no typed text
            log.debug("stdin: %s", e)
        finally:
            self._eof.set()

    def done(self) -> bool:
        """All text was read and spoken, and its last sample has been played."""
        if not self._eof.is_set():
            return False
        stats = self.session.speech.stats()
        if stats["queued"] or stats["speaking"]:
            return False
        ends = [u["end_sample"] for u in map(self.session.speech.utterance, self.said[-1:]) if u]
        return not ends or self.session.played_sample() >= (ends[0] or 0)


def start_microphone(session: SessionCore, device: Optional[Union[int, str]] = None):
    """The local microphone into ``session`` (a MicrophoneSource pumped by a thread); AudioDeviceError names the
    device and the cause. Close the returned source to stop it."""
    from engine.sources import MicrophoneSource

    mic = MicrophoneSource(device=device)
    mic.start()

    def pump() -> None:
        for chunk in mic.live:  # ends when the microphone is closed
            session.push_input(chunk.samples, chunk.sample_rate, source="local-mic")

    threading.Thread(target=pump, name="live-mic", daemon=True).start()
    return mic


# ----------------------------------------------------------------------------------------------------------------
# The presenter
# ----------------------------------------------------------------------------------------------------------------
class LivePresenter:
    """A session played to a virtual camera, a preview window and a sound device, in sync (module docstring)."""

    def __init__(self, session: SessionCore, player: SlotPlayer, camera: Optional[VirtualCamera] = None,
                 audio: Optional[AudioOut] = None, preview: Optional[PreviewWindow] = None) -> None:
        if camera is None and preview is None:
            raise ValueError("LivePresenter: a virtual camera or a preview window is needed")
        self.session, self.player, self.camera, self.audio, self.preview = session, player, camera, audio, preview
        self.stop = threading.Event()
        self.slots = 0  # slots played
        self.pictures = 0  # pictures sent to the camera / preview
        self.late_pictures = 0  # pictures sent more than a slot after their audio was heard (a busy machine)
        self.skipped_pictures = 0  # pictures not sent because the next one was due already
        self.lateness: Deque[Tuple[Optional[int], float]] = deque(maxlen=1500)  # (engine frame, s sent after due)
        self.delays: Deque[float] = deque(maxlen=250)  # audio write -> heard (s), the pictures' wait
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def start(self) -> None:
        if self.audio is not None:
            self.audio.start()
        self.session.start()
        self._thread = threading.Thread(target=self._playout, name="live-playout", daemon=True)
        self._thread.start()

    def _send(self, picture: np.ndarray) -> None:
        if self.camera is not None:
            self.camera.send(picture)
        if self.preview is not None:
            self.preview.show(picture)
        self.pictures += 1

    def _playout(self) -> None:
        """Slot k: its audio to the device now, its picture when that audio is heard (one thread, two deadlines)."""
        pending: Deque[Tuple[int, float, Optional[int], np.ndarray]] = deque()  # (audio index, slot time, frame,
        # picture), in order

        def due(item) -> float:  # when the picture's audio is heard (asked now: the device may have slipped)
            return self.audio.when(item[0]) if self.audio is not None else item[1]

        try:
            while not self.stop.is_set() and not self.player.clock.started.is_set():
                try:
                    if not self.player.wait_first_frame(0.5):
                        return
                except TimeoutError:
                    continue
            while not self.stop.is_set() and not self.session.closed:
                now = time.monotonic()
                slot_due = self.player.due()
                picture_due = due(pending[0]) if pending else math.inf
                if min(slot_due, picture_due) > now:
                    if self.stop.wait(min(slot_due, picture_due) - now):
                        break
                    continue
                if picture_due <= slot_due:  # 1. a picture whose audio is being heard now
                    item = pending.popleft()
                    if pending and due(pending[0]) <= now:  # the next is due too (this thread ran late, or silence
                        self.skipped_pictures += 1  # was left out of the audio): skip to it, no burst of stale ones
                        continue
                    if now - picture_due > 1.0 / FPS:
                        self.late_pictures += 1
                    self._send(item[3])
                    self.lateness.append((item[2], time.monotonic() - picture_due))
                    continue
                slot = self.player.next(now)  # 2. the next slot: its audio goes out now
                index = self.audio.write(slot.audio) if self.audio is not None else 0
                pending.append((index, slot.time, slot.frame, slot.picture))
                if self.audio is not None:
                    self.delays.append(self.audio.when(index) - time.monotonic())
                self.slots += 1
        except Exception as e:  # noqa: BLE001 - reported by run(), which stops the presenter
            log.exception("live: playout failed")
            self.error = e
            self.stop.set()

    def run(self, duration: Optional[float] = None, done=None) -> None:
        """Play until Ctrl-C, ``duration`` seconds, or ``done()`` is true (then stop and close everything)."""
        self.start()
        started = time.monotonic()

        def watch() -> None:
            while not self.stop.wait(0.2):
                if duration is not None and time.monotonic() - started >= duration:
                    self.stop.set()
                elif done is not None and self.player.clock.started.is_set() and done():
                    time.sleep(self.audio.delay() if self.audio is not None else 0.0)  # its audio is heard
                    self.stop.set()
                elif self.session.state == "error":
                    self.stop.set()

        watcher = threading.Thread(target=watch, name="live-watch", daemon=True)
        watcher.start()
        try:
            if self.preview is not None:
                self.preview.run(self.stop)
            else:
                while not self.stop.wait(0.5):
                    pass
        finally:
            self.stop.set()
            self.close()
        if self.error is not None:
            raise self.error
        if self.session.state == "error":
            raise RuntimeError(f"the engine failed: {self.session.error}")

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self.session.close("live presenter stopped")
        for out in (self.audio, self.camera):
            if out is not None:
                out.close()

    def summary(self) -> Dict:
        """What was played: slots, pictures, holds, the audio path's delay and its losses (JSON-ready)."""
        s = self.session
        out = {"slots": self.slots, "pictures": self.pictures, "late_pictures": self.late_pictures,
               "skipped_pictures": self.skipped_pictures,
               "holds": s.clock.holds, "frames_rendered": s.sink.put_frames, "frames_dropped": s.sink.dropped,
               "covered_slots": self.player.covered_slots, "speech": s.speech.stats()["utterances"]}
        if self.delays:
            out["audio_delay_ms"] = round(float(np.median(self.delays)) * 1000, 1)
        if self.audio is not None:
            out.update(audio_underruns=self.audio.underruns,
                       audio_dropped_ms=round(self.audio.dropped / SAMPLE_RATE * 1000, 1),
                       audio_silence_left_out_ms=round(self.audio.trimmed / SAMPLE_RATE * 1000, 1))
        return out


def stdin_or_none() -> Optional[IO[str]]:
    """sys.stdin when lines can be read from it (not closed, not an exhausted /dev/null), else None."""
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        return None
    return stdin


__all__ = ["LiveOptions", "LivePresenter", "VirtualCamera", "AudioOut", "PreviewWindow", "TextInput", "OutputError",
           "fit_picture", "no_camera_message", "open_outputs", "preview_size", "start_microphone", "text_parts",
           "MODPROBE", "stdin_or_none"]
