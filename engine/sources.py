"""Audio sources: a file, a live push source (browser or any producer), and the local microphone.

Every source yields ``engine.types.AudioChunk`` (float32 mono 16 kHz) with ``start_sample`` on one sample clock that
starts at 0, the clock the scheduler and the sinks count on.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Deque, Iterator, Optional

import numpy as np

from engine.extras import install_hint
from engine.types import SAMPLE_RATE, AudioChunk

logger = logging.getLogger(__name__)


class AudioDeviceError(RuntimeError):
    """The microphone cannot be opened (no PortAudio library, no input device, device busy)."""


# ----------------------------------------------------------------------------------------------------------------
# file
# ----------------------------------------------------------------------------------------------------------------
class FileSource:
    """A whole audio file, decoded once at construction (so a bad file fails before rendering), then yielded in
    ``chunk_ms`` pieces. ``realtime=True`` paces the chunks at wall-clock speed, as a live source would deliver
    them (the chunk covering [t, t + chunk) is yielded at t + chunk after the first one)."""

    def __init__(self, path: str | os.PathLike, chunk_ms: float = 40.0, realtime: bool = False) -> None:
        from mmgt.audio_io import AudioError, load_audio  # imported here: mmgt.audio_io imports torch

        self.path = os.fspath(path)
        if chunk_ms <= 0:
            raise ValueError(f"FileSource({self.path}): chunk_ms must be > 0, got {chunk_ms}")
        self.sample_rate = SAMPLE_RATE
        samples = np.asarray(load_audio(self.path, sample_rate=self.sample_rate))
        if samples.ndim != 1:
            raise AudioError(f"{self.path}: load_audio returned shape {samples.shape}, expected mono (N,)")
        self.samples = samples.astype(np.float32, copy=False)  # (N,) float32 mono at 16 kHz
        self.chunk_samples = max(1, int(round(self.sample_rate * chunk_ms / 1000.0)))
        self.realtime = realtime
        logger.debug("FileSource %s: %d samples (%.2f s)", self.path, self.n_samples, self.duration)

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        return self.n_samples / self.sample_rate

    def __iter__(self) -> Iterator[AudioChunk]:
        t0 = time.monotonic()
        for start in range(0, self.n_samples, self.chunk_samples):
            end = min(start + self.chunk_samples, self.n_samples)
            if self.realtime:  # a live source has a chunk only once its last sample has been spoken
                delay = t0 + end / self.sample_rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield AudioChunk(self.samples[start:end], start, self.sample_rate)


# ----------------------------------------------------------------------------------------------------------------
# live push source
# ----------------------------------------------------------------------------------------------------------------
def _to_mono_float32(samples: np.ndarray) -> np.ndarray:
    """float or int16 samples, (N,) or (N, channels) -> (N,) float32 in [-1, 1] (channels averaged)."""
    a = np.asarray(samples)
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
    else:
        raise TypeError(f"LiveSource.push: samples must be float32 or int16, got {a.dtype}")
    if a.ndim == 2:
        a = a.mean(axis=1, dtype=np.float32)  # (N, C) -> (N,)
    elif a.ndim != 1:
        raise ValueError(f"LiveSource.push: samples must be (N,) or (N, channels), got shape {a.shape}")
    return a


class LiveSource:
    """Thread-safe push source: producers ``push`` chunks of any size and rate; the consumer iterates 16 kHz
    AudioChunks in order. Resampling is streaming (one libswresample state per input rate, via PyAV), so chunk
    boundaries leave no clicks and the sample count does not drift. Nothing is ever dropped: audio is the clock.

    Iteration ends after ``close()`` once everything pushed has been read; with ``timeout`` set, waiting longer
    than that for audio raises TimeoutError (a dead producer must not hang the engine).
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, timeout: Optional[float] = None) -> None:
        self.sample_rate = sample_rate  # output rate
        self.timeout = timeout
        self.pushed_samples = 0  # output samples produced so far (the next chunk's start_sample)
        self._chunks: Deque[AudioChunk] = deque()
        self._cond = threading.Condition()
        self._push_lock = threading.Lock()  # serialises resampling so chunks keep their order
        self._resampler = None
        self._in_rate: Optional[int] = None
        self._closed = False

    def push(self, samples: np.ndarray, sample_rate: int) -> None:
        """Add audio at ``sample_rate`` Hz (float32 in [-1, 1] or int16; mono or (N, channels))."""
        if sample_rate < 1:
            raise ValueError(f"LiveSource.push: sample_rate must be >= 1, got {sample_rate}")
        mono = _to_mono_float32(samples)  # (N,) float32
        with self._push_lock:
            if self._closed:
                raise RuntimeError("LiveSource.push() after close()")
            out = self._resample(mono, int(sample_rate))
            self._emit(out)

    def _resample(self, mono: np.ndarray, rate: int) -> np.ndarray:
        if rate != self._in_rate:  # a new input rate: finish the old stream's tail, start a new state
            tail = self._flush_resampler()
            self._in_rate = rate
            self._resampler = None
            if rate != self.sample_rate:
                import av

                self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate)
            body = self._resample(mono, rate)  # same rate now: resample with the new state
            return np.concatenate([tail, body])
        if self._resampler is None or mono.size == 0:
            return mono
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        parts = [f.to_ndarray()[0] for f in self._resampler.resample(frame)]  # each (n,) float32
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _flush_resampler(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.float32)
        parts = [f.to_ndarray()[0] for f in self._resampler.resample(None)]
        self._resampler = None
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _emit(self, out: np.ndarray) -> None:
        if out.size == 0:
            return
        with self._cond:
            self._chunks.append(AudioChunk(out.astype(np.float32, copy=False), self.pushed_samples, self.sample_rate))
            self.pushed_samples += int(out.size)
            self._cond.notify_all()

    def close(self) -> None:
        """No more audio: flush the resampler; readers get what is left, then the end of the stream."""
        with self._push_lock:
            if self._closed:
                return
            self._emit(self._flush_resampler())
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, timeout: Optional[float] = None) -> Optional[AudioChunk]:
        """The next chunk; None at the end of the stream; TimeoutError if none arrives within ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._chunks:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"LiveSource: no audio within {timeout} s")
                self._cond.wait(remaining)
            return self._chunks.popleft()

    def __iter__(self) -> Iterator[AudioChunk]:
        while True:
            chunk = self.read(self.timeout)
            if chunk is None:
                return
            yield chunk


# ----------------------------------------------------------------------------------------------------------------
# microphone
# ----------------------------------------------------------------------------------------------------------------
class MicrophoneSource:
    """The local microphone through sounddevice (PortAudio), feeding a LiveSource; iterate it like one.

    ``start()`` (or entering a ``with`` block, or the first iteration) opens the device; errors name the device
    and the cause. ``sample_rate=None`` records at the device's default rate and resamples to 16 kHz.
    """

    def __init__(self, device: Optional[int | str] = None, sample_rate: Optional[int] = None, block_ms: float = 20.0,
                 channels: int = 1, timeout: Optional[float] = None) -> None:
        if block_ms <= 0 or channels < 1:
            raise ValueError(f"MicrophoneSource: block_ms must be > 0 and channels >= 1, got {block_ms}, {channels}")
        self.device, self.sample_rate, self.block_ms, self.channels = device, sample_rate, block_ms, channels
        self.live = LiveSource(timeout=timeout)
        self.overflows = 0  # PortAudio input overflows (audio lost before it reached us)
        self._stream = None

    def start(self) -> None:
        if self._stream is not None:
            return
        try:
            import sounddevice as sd  # needs the PortAudio shared library at import time
        except ImportError as e:
            raise AudioDeviceError(f"microphone input needs the mic extra ({e}): {install_hint('mic')}") from e
        except OSError as e:
            raise AudioDeviceError(f"microphone input needs the PortAudio library (e.g. apt-get install "
                                   f"libportaudio2): {e}") from e
        name = "the default input device" if self.device is None else f"input device {self.device!r}"
        try:
            info = sd.query_devices(self.device, kind="input")
        except (ValueError, sd.PortAudioError) as e:
            raise AudioDeviceError(f"no usable audio input: cannot open {name}: {e}") from e
        rate = int(self.sample_rate or info["default_samplerate"])
        blocksize = max(1, int(rate * self.block_ms / 1000))

        def callback(indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
            if status:  # called on PortAudio's thread: count and log, never raise
                self.overflows += 1
                logger.warning("MicrophoneSource: %s", status)
            self.live.push(indata.copy(), rate)  # (frames, channels) float32

        try:
            stream = sd.InputStream(device=self.device, channels=self.channels, samplerate=rate, dtype="float32",
                                    blocksize=blocksize, callback=callback)
            stream.start()
        except (ValueError, sd.PortAudioError) as e:
            raise AudioDeviceError(f"cannot record from {name} at {rate} Hz, {self.channels} channel(s): {e}") from e
        self._stream = stream
        logger.info("MicrophoneSource: recording from %s (%s) at %d Hz", name, info.get("name", "?"), rate)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            stream.close()
        self.live.close()

    def read(self, timeout: Optional[float] = None) -> Optional[AudioChunk]:
        self.start()
        return self.live.read(timeout)

    def __iter__(self) -> Iterator[AudioChunk]:
        self.start()
        return iter(self.live)

    def __enter__(self) -> "MicrophoneSource":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


__all__ = ["AudioDeviceError", "FileSource", "LiveSource", "MicrophoneSource"]
