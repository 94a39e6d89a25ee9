"""Frame sinks: an mp4 file with the source's audio, a counting null sink, and a bounded drop-oldest queue.

Every sink follows ``engine.types.FrameSink``: ``open(meta)`` before any rendering (a bad output path fails there,
not after minutes of work), ``write(batch)`` with consecutive FrameBatches, ``close(ok)`` once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
import weakref
from collections import deque
from fractions import Fraction
from typing import Deque, List, Optional, Tuple, Union

import numpy as np

from engine.source_audio import AudioTrack, SourceAudio, open_track
from engine.types import FPS, SAMPLE_RATE, FrameBatch, RunMeta

logger = logging.getLogger(__name__)


SMALL_FRAME = 128  # frames narrower than this are encoded without x264's macroblock tree (see Mp4Sink.open)


class SinkError(RuntimeError):
    """A sink cannot write where or what it was asked to (the message names the path and the problem)."""


# ----------------------------------------------------------------------------------------------------------------
# mp4 file: H.264 + the source's audio, atomic
# ----------------------------------------------------------------------------------------------------------------
def _discard(closables: List[object], tmp_path: str) -> None:
    """Close a half-written container (and the audio input it reads) and delete its temp file (also run by the
    finalizer of a dropped sink)."""
    for c in closables:
        try:
            c.close()  # type: ignore[attr-defined]
        except Exception:  # the file is being thrown away; a failing close must not mask the original error
            logger.debug("closing %r of discarded %s failed", c, tmp_path, exc_info=True)
    try:
        os.remove(tmp_path)
    except FileNotFoundError:
        pass


def video_comment(meta: RunMeta) -> str:
    """The mp4's comment: what made the file; an untrained preset's video says so in its metadata."""
    return f"mmgt-engine, preset {meta.preset}" + ("" if meta.trained else ": UNTRAINED random weights, not a real "
                                                                         "avatar")


class Mp4Sink:
    """Writes frames to an H.264 (libx264, yuv420p) mp4 with the audio muxed beside them.

    ``audio`` is the input's ``SourceAudio`` (the render's case): the video carries the source's audio at its own rate
    and channel layout, its stream copied where mp4 takes the codec (aac, mp3, alac) and no ``audio_bitrate`` is
    given, else AAC at ``audio_bitrate`` (default by channels: ``engine.source_audio.default_aac_bitrate``). It starts
    at t = 0 with frame 0 and ends with the last frame (see engine/source_audio.py). ``audio`` may instead be 1-D
    float mono samples at ``sample_rate``: AAC, every sample written even past the last frame.

    The file is written to a hidden temp file in the output directory and renamed over ``path`` only on
    ``close(ok=True)``; ``close(ok=False)``, an exception inside a ``with`` block, or a failing close remove it, so
    ``path`` is either a complete video or untouched. Audio is read and written alongside the frames (up to the media
    time of the last written frame), so the two streams interleave and a long source is never held in memory; the
    video has exactly the frames written. ``audio=None`` writes the video alone (the segments of a resumable render).
    Odd frame sizes are padded by one edge-replicated row/column (yuv420p needs even sizes).
    """

    def __init__(self, path: str | os.PathLike, audio: Union[SourceAudio, np.ndarray, None],
                 sample_rate: int = SAMPLE_RATE, fps: int = FPS, crf: int = 18, preset: str = "veryfast",
                 audio_bitrate: Optional[int] = None, log_level: int = logging.INFO) -> None:
        self.path = os.fspath(path)
        if audio is not None and not isinstance(audio, SourceAudio):
            a = np.asarray(audio)
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"Mp4Sink({self.path}): audio must be a SourceAudio or 1-D float mono samples, "
                                 f"got {a.dtype} {a.shape}")
        self.audio = audio
        if sample_rate < 1 or fps < 1:
            raise ValueError(f"Mp4Sink({self.path}): sample_rate and fps must be >= 1, got {sample_rate}, {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"Mp4Sink({self.path}): crf must be in [0, 51], got {crf}")
        self.sample_rate, self.fps, self.crf, self.preset = sample_rate, fps, crf, preset
        self.audio_bitrate = audio_bitrate
        self.log_level = log_level  # of the open / finished lines (DEBUG for the segments of a resumable render)
        self.frames_written = 0
        self._tmp_path: Optional[str] = None
        self._container = None
        self._video = None
        self._audio: Optional[AudioTrack] = None
        self._closables: List[object] = []  # what the finalizer closes: the output container, the audio input
        self._size: Tuple[int, int] = (0, 0)  # (width, height) of the written frames before padding
        self._finalizer: Optional[weakref.finalize] = None
        self._closed = False

    # 1. open: fail here, before any rendering, if the file cannot be written
    def open(self, meta: RunMeta) -> None:
        if self._container is not None or self._closed:
            raise SinkError(f"Mp4Sink({self.path}): open() called twice")
        if meta.fps != self.fps:
            raise ValueError(f"Mp4Sink({self.path}): run fps {meta.fps} != sink fps {self.fps}")
        if os.path.isdir(self.path):
            raise SinkError(f"cannot write video to {self.path}: it is a directory")
        out_dir = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(out_dir):
            raise SinkError(f"cannot write video to {self.path}: output directory {out_dir} does not exist")
        import av  # PyAV: a hard dependency, imported here to keep `import engine.sinks` light

        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".part", dir=out_dir)
        except OSError as e:
            raise SinkError(f"cannot write video to {self.path}: output directory {out_dir} is not writable "
                            f"({e.strerror or e})") from e
        try:  # from here on anything, an interruption included, removes the temp file
            self._tmp_path = tmp
            os.close(fd)
            container = av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"})
            self._container = container
            self._closables.append(container)
            container.metadata["comment"] = video_comment(meta)
            self._finalizer = weakref.finalize(self, _discard, self._closables, tmp)
            w, h = meta.width + meta.width % 2, meta.height + meta.height % 2  # yuv420p: even sizes
            video = container.add_stream("libx264", rate=self.fps)
            video.width, video.height, video.pix_fmt = w, h, "yuv420p"
            video.time_base = Fraction(1, self.fps)  # pts = frame index
            options = {"crf": str(self.crf), "preset": self.preset}
            if min(w, h) < SMALL_FRAME:
                # x264's macroblock-tree rate control does not encode frames this small (the tiny preset's 64x64)
                # the same way twice (measured: every other run differed; 128x128 and up did not), and a resumed
                # render must encode its segments exactly as an uninterrupted one does
                options["x264-params"] = "mbtree=0"
            video.options = options
            audio = None if self.audio is None else open_track(container, self.audio, self.sample_rate,
                                                               self.audio_bitrate)
            if audio is not None:
                self._closables.append(audio)
        except BaseException as e:
            self._abort()
            if not isinstance(e, Exception):  # Ctrl-C, SIGTERM: as they are
                raise
            raise SinkError(f"cannot set up mp4 writing for {self.path}: {e}") from e
        self._video, self._audio, self._size = video, audio, (meta.width, meta.height)
        logger.log(self.log_level, "Mp4Sink %s: %dx%d @ %d fps; audio: %s", self.path, w, h, self.fps,
                   audio.what if audio is not None else "none")
        logger.debug("Mp4Sink %s: temp %s", self.path, tmp)

    # 2. write: frames in order, audio up to the same media time
    def write(self, batch: FrameBatch) -> None:
        if self._container is None:
            raise SinkError(f"Mp4Sink({self.path}): write() before open() or after close()")
        if batch.first_frame != self.frames_written:
            raise ValueError(f"Mp4Sink({self.path}): frames must arrive in order without gaps: expected frame "
                             f"{self.frames_written}, got a batch starting at {batch.first_frame}")
        if batch.size != self._size:
            raise ValueError(f"Mp4Sink({self.path}): frame size {batch.size} != opened size {self._size}")
        import av

        frames = batch.frames  # (T, H, W, 3) uint8
        pad_h, pad_w = self._video.height - frames.shape[1], self._video.width - frames.shape[2]
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # (T, H', W', 3)
        for i in range(frames.shape[0]):
            # converted to yuv420p here: left to the encoder (PyAV 18), the conversion made the same frames encode
            # differently from run to run (measured: 1 run in 3 differed), and a resumed render must encode its
            # segments exactly as an uninterrupted one does
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24").reformat(format="yuv420p")
            vf.pts = self.frames_written
            self._mux(self._video.encode(vf))
            self.frames_written += 1
        try:
            if self._audio is not None:
                self._audio.until(Fraction(self.frames_written, self.fps))
        except (av.FFmpegError, OSError) as e:
            raise SinkError(f"writing the audio of {self.path} ({self._audio.what}) failed: {e}") from e

    def _mux(self, packets: List) -> None:
        for p in packets:
            self._container.mux(p)

    # 3. close: finish and rename, or throw everything away
    def close(self, ok: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._container is None:  # never opened (or open failed): nothing on disk
            return
        if not ok:
            logger.info("Mp4Sink %s: discarded (run failed or was cancelled)", self.path)
            self._abort()
            return
        try:
            if self.frames_written == 0:
                raise SinkError(f"no frames were written to {self.path}; not saving an empty video")
            self._mux(self._video.encode(None))  # flush the video encoder
            if self._audio is not None:
                self._audio.finish(Fraction(self.frames_written, self.fps))  # the rest of the audio, flushed
            self._container.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp_path, 0o666 & ~umask)  # mkstemp made it 0600; a finished video gets normal modes
            os.replace(self._tmp_path, self.path)  # atomic on one filesystem: same directory
        except BaseException as e:
            self._abort()
            if isinstance(e, SinkError) or not isinstance(e, Exception):  # Ctrl-C, SIGTERM: as they are
                raise
            raise SinkError(f"finishing {self.path} failed: {e}") from e
        self._detach()
        logger.log(self.log_level, "Mp4Sink %s: %d frames (%.3f s)", self.path, self.frames_written,
                   self.frames_written / self.fps)

    def _abort(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # closes the container and removes the temp file, once
        elif self._tmp_path is not None:
            _discard(self._closables, self._tmp_path)
        self._detach()

    def _detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._audio is not None:
            self._audio.close()
        self._container = self._video = self._audio = None
        self._finalizer = None

    def __enter__(self) -> "Mp4Sink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


# ----------------------------------------------------------------------------------------------------------------
# null sink: counts, for benchmarks
# ----------------------------------------------------------------------------------------------------------------
class NullSink:
    """Keeps nothing; counts frames and records when the first and last frames arrived (time.perf_counter)."""

    def __init__(self) -> None:
        self.meta: Optional[RunMeta] = None
        self.frames = 0
        self.batches = 0
        self.open_time: Optional[float] = None
        self.first_frame_time: Optional[float] = None
        self.last_frame_time: Optional[float] = None
        self.ok: Optional[bool] = None  # set by close()

    def open(self, meta: RunMeta) -> None:
        self.meta = meta
        self.open_time = time.perf_counter()

    def write(self, batch: FrameBatch) -> None:
        now = time.perf_counter()
        if self.first_frame_time is None:
            self.first_frame_time = now
        self.last_frame_time = now
        self.frames += batch.n_frames
        self.batches += 1

    def close(self, ok: bool) -> None:
        self.ok = ok


# ----------------------------------------------------------------------------------------------------------------
# queue sink: the engine's side of a live track
# ----------------------------------------------------------------------------------------------------------------
def _wake(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


class QueueSink:
    """Bounded per-frame queue between the engine (a thread) and a consumer (an asyncio track or a thread).

    ``write``/``put`` never block: when the queue holds ``maxsize`` frames the OLDEST are dropped and counted, so
    a slow client loses old frames instead of stalling the engine. Items are single-frame FrameBatches (frames
    (1, H, W, 3), first_frame = the frame's global index, so a consumer can time-stamp it). ``get`` (async) and
    ``get_blocking`` (threads) return None once the sink is closed and drained.
    """

    def __init__(self, maxsize: int = 50) -> None:
        if maxsize < 1:
            raise ValueError(f"QueueSink maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.meta: Optional[RunMeta] = None
        self.put_frames = 0  # frames offered by the engine
        self.got_frames = 0  # frames taken by the consumer
        self.dropped = 0  # frames thrown away because the consumer was behind
        self.ok: Optional[bool] = None
        self._items: Deque[FrameBatch] = deque()
        self._cond = threading.Condition()
        self._waiters: List[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = []
        self._closed = False

    # producer side (any thread)
    def open(self, meta: RunMeta) -> None:
        self.meta = meta

    def put(self, batch: FrameBatch) -> None:
        """Thread-safe, never blocks; drops the oldest frames beyond maxsize."""
        with self._cond:
            if self._closed:
                raise SinkError("QueueSink.put() after close()")
            for i in range(batch.n_frames):
                # copy: the consumer may hold a frame long after the producer reused its buffer
                self._items.append(FrameBatch(batch.frames[i:i + 1].copy(), batch.first_frame + i, batch.fps))
            self.put_frames += batch.n_frames
            dropped_now = 0
            while len(self._items) > self.maxsize:
                self._items.popleft()
                dropped_now += 1
            if dropped_now:
                if self.dropped == 0:
                    logger.warning("QueueSink: consumer is behind, dropping oldest frames (maxsize %d)", self.maxsize)
                self.dropped += dropped_now
            self._notify_locked()

    write = put  # FrameSink

    def close(self, ok: bool = True) -> None:
        """End of stream: getters drain what is queued, then get None."""
        with self._cond:
            self._closed = True
            self.ok = ok
            self._notify_locked()

    def _notify_locked(self) -> None:
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that loop is closed; its getter is gone
                pass

    # consumer side
    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def get_nowait(self) -> Optional[FrameBatch]:
        """The oldest queued frame, or None if the queue is empty right now."""
        with self._cond:
            return self._pop_locked()

    def _pop_locked(self) -> Optional[FrameBatch]:
        if not self._items:
            return None
        self.got_frames += 1
        return self._items.popleft()

    def get_blocking(self, timeout: Optional[float] = None) -> Optional[FrameBatch]:
        """Wait (in a thread) for the next frame; None when closed and drained; TimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                item = self._pop_locked()
                if item is not None or self._closed:
                    return item
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"QueueSink: no frame within {timeout} s")
                self._cond.wait(remaining)

    async def get(self, timeout: Optional[float] = None) -> Optional[FrameBatch]:
        """Await the next frame without blocking the event loop; None when closed and drained."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._cond:
                item = self._pop_locked()
                if item is not None or self._closed:
                    return item
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                raise TimeoutError(f"QueueSink: no frame within {timeout} s") from None
            finally:
                with self._cond:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))


__all__ = ["SinkError", "video_comment", "Mp4Sink", "NullSink", "QueueSink"]
