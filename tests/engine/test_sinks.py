"""engine.sinks: mp4 with audio (read back with PyAV), atomic failure paths, NullSink, QueueSink dropping."""
import asyncio
import os
from pathlib import Path
import threading
import time

import av
import numpy as np
import pytest

from engine.sinks import Mp4Sink, NullSink, QueueSink, SinkError
from engine.types import FrameBatch, FrameSink, RunMeta

SR = 16000


def _meta(w=64, h=48, samples=38400, fps=25):
    return RunMeta(fps=fps, width=w, height=h, audio_samples=samples, sample_rate=SR, preset="tiny", trained=False)


def _frames(first, n, w=64, h=48):
    """Frame i is a flat grey of level 4*i (so order and count are checkable after H.264)."""
    levels = (4 * np.arange(first, first + n)).astype(np.uint8)
    return FrameBatch(np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).copy(), first, 25)


def _tone(seconds):
    t = np.arange(int(round(seconds * SR))) / SR
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _write(sink, meta, total, batch=7, w=64, h=48):
    sink.open(meta)
    for first in range(0, total, batch):
        sink.write(_frames(first, min(batch, total - first), w, h))


def _read_back(path):
    with av.open(path) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        info = dict(rate=v.average_rate, width=v.width, height=v.height, audio_rate=a.rate,
                    audio_seconds=float(a.duration * a.time_base), audio_start=float(a.start_time * a.time_base),
                    video_start=float(v.start_time * v.time_base))
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return info, frames


def test_mp4_has_every_frame_at_25_fps_and_the_audio_duration(tmp_path):
    path = tmp_path / "out.mp4"
    sink = Mp4Sink(path, _tone(2.4), SR, fps=25)
    _write(sink, _meta(), 60)
    sink.close(ok=True)
    assert os.listdir(tmp_path) == ["out.mp4"]  # the temp file became the output
    info, frames = _read_back(str(path))
    assert len(frames) == 60
    assert info["rate"] == 25 and (info["width"], info["height"]) == (64, 48)
    assert info["audio_rate"] == SR
    assert abs(info["audio_seconds"] - 2.4) <= 0.040
    assert info["audio_start"] == 0 and info["video_start"] == 0  # one media clock
    means = np.array([f.mean() for f in frames])
    assert np.abs(means - 4 * np.arange(60)).max() < 3  # right frames, in order


def test_mp4_odd_size_is_padded_and_audio_outlasting_video_is_kept(tmp_path):
    path = tmp_path / "odd.mp4"
    sink = Mp4Sink(path, _tone(1.0), SR)  # 1 s of audio, only 10 frames (0.4 s) of video
    _write(sink, _meta(w=33, h=21, samples=SR), 10, w=33, h=21)
    sink.close(ok=True)
    info, frames = _read_back(str(path))
    assert (info["width"], info["height"]) == (34, 22) and len(frames) == 10
    assert abs(info["audio_seconds"] - 1.0) <= 0.040
    assert abs(float(frames[9][:21, :33].mean()) - 36) < 3  # padding did not shift the picture


def test_mp4_failure_leaves_no_file(tmp_path):
    path = tmp_path / "fail.mp4"
    sink = Mp4Sink(path, _tone(2.4), SR)
    _write(sink, _meta(), 20)
    assert len(os.listdir(tmp_path)) == 1  # only the hidden temp file so far
    sink.close(ok=False)
    assert os.listdir(tmp_path) == []

    with pytest.raises(RuntimeError, match="render blew up"):
        with Mp4Sink(path, _tone(2.4), SR) as s:
            _write(s, _meta(), 5)
            raise RuntimeError("render blew up")
    assert os.listdir(tmp_path) == []


def test_mp4_failure_keeps_an_existing_output_untouched(tmp_path):
    path = tmp_path / "keep.mp4"
    path.write_bytes(b"previous video")
    sink = Mp4Sink(path, _tone(0.4), SR)
    _write(sink, _meta(samples=6400), 10)
    sink.close(ok=False)
    assert path.read_bytes() == b"previous video" and os.listdir(tmp_path) == ["keep.mp4"]


def test_mp4_unwritable_destination_fails_at_open(tmp_path):
    missing = tmp_path / "no_such_dir" / "out.mp4"
    with pytest.raises(SinkError, match=r"no_such_dir.*does not exist"):
        Mp4Sink(missing, _tone(0.4), SR).open(_meta())
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    with pytest.raises(SinkError, match="file.txt"):
        Mp4Sink(not_a_dir / "out.mp4", _tone(0.4), SR).open(_meta())
    with pytest.raises(SinkError, match="is a directory"):
        Mp4Sink(tmp_path, _tone(0.4), SR).open(_meta())
    assert os.listdir(tmp_path) == ["file.txt"]


def test_mp4_read_only_directory_fails_at_open(tmp_path):
    """A directory the process may not write to fails at open(), before any frame. Root ignores directory modes,
    so as root the unwritable directory is /proc (no regular file can be created there by anyone)."""
    if os.geteuid() == 0:
        ro = Path("/proc/self")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    try:
        with pytest.raises(SinkError, match="not writable"):
            Mp4Sink(ro / "out.mp4", _tone(0.4), SR).open(_meta())
        assert not (ro / "out.mp4").exists()
    finally:
        if ro.parent == tmp_path:
            ro.chmod(0o755)


def test_mp4_rejects_gaps_and_empty_videos(tmp_path):
    sink = Mp4Sink(tmp_path / "gap.mp4", _tone(0.4), SR)
    _write(sink, _meta(), 5)
    with pytest.raises(ValueError, match="expected frame 5, got a batch starting at 7"):
        sink.write(_frames(7, 2))
    sink.close(ok=False)
    empty = Mp4Sink(tmp_path / "empty.mp4", _tone(0.4), SR)
    empty.open(_meta())
    with pytest.raises(SinkError, match="no frames were written"):
        empty.close(ok=True)
    assert os.listdir(tmp_path) == []


def test_sinks_follow_the_frame_sink_protocol(tmp_path):
    for sink in (Mp4Sink(tmp_path / "a.mp4", _tone(0.1), SR), NullSink(), QueueSink()):
        assert isinstance(sink, FrameSink)


def test_null_sink_counts_and_times():
    sink = NullSink()
    t0 = time.perf_counter()
    sink.open(_meta())
    assert sink.first_frame_time is None
    sink.write(_frames(0, 3))
    sink.write(_frames(3, 4))
    sink.close(ok=True)
    assert (sink.frames, sink.batches, sink.ok) == (7, 2, True)
    assert t0 <= sink.open_time <= sink.first_frame_time <= sink.last_frame_time <= time.perf_counter()


def test_queue_sink_drops_oldest_and_never_blocks():
    q = QueueSink(maxsize=5)
    q.open(_meta())
    q.write(_frames(0, 3))
    q.write(_frames(3, 5))  # 8 frames offered, room for 5
    assert (len(q), q.dropped, q.put_frames) == (5, 3, 8)
    got = [q.get_nowait() for _ in range(5)]
    assert [b.first_frame for b in got] == [3, 4, 5, 6, 7]  # the oldest three went
    assert all(b.n_frames == 1 for b in got) and got[0].frames[0, 0, 0, 0] == 12
    assert q.get_nowait() is None

    t = time.perf_counter()
    for i in range(100):  # no consumer at all: the producer still runs free
        q.put(_frames(8 + 10 * i, 10))
    assert time.perf_counter() - t < 5
    assert (len(q), q.dropped) == (5, 3 + 995)
    assert q.get_nowait().first_frame == 1003


def test_queue_sink_frames_are_copies():
    q = QueueSink(maxsize=4)
    batch = _frames(0, 2)
    q.put(batch)
    batch.frames[:] = 255  # the producer reuses its buffer
    assert q.get_nowait().frames.max() == 0


def test_queue_sink_async_get_from_another_thread():
    q = QueueSink(maxsize=50)

    def produce():
        for i in range(10):
            time.sleep(0.005)
            q.put(_frames(i, 1))
        q.close(ok=True)

    async def consume():
        with pytest.raises(TimeoutError):
            await q.get(timeout=0.02)  # nothing produced yet
        threading.Thread(target=produce).start()
        got = []
        while (item := await q.get(timeout=5)) is not None:
            got.append(item.first_frame)
        return got

    assert asyncio.run(consume()) == list(range(10))
    assert q.closed and q.ok is True and q.got_frames == 10
    with pytest.raises(SinkError, match="after close"):
        q.put(_frames(10, 1))


def test_queue_sink_blocking_get_waits_for_a_producer():
    q = QueueSink(maxsize=3)
    threading.Timer(0.02, lambda: q.put(_frames(0, 1))).start()
    assert q.get_blocking(timeout=5).first_frame == 0
    with pytest.raises(TimeoutError):
        q.get_blocking(timeout=0.01)
    q.close(ok=False)
    assert q.get_blocking(timeout=1) is None and q.ok is False
