"""engine.scheduler: pose windows, render chunks, the live planners. Pure integer logic, milliseconds."""
import random
import subprocess
import sys

import pytest

from engine.scheduler import (
    RenderChunk, StreamChunkPlanner, StreamPlanner, Window, complete_frames, crossfade_weights, frame_to_sample,
    frames_for_samples, plan_chunks, plan_windows,
)

SPF = 640  # samples per frame at 16 kHz / 25 fps


def test_import_pulls_in_no_torch():
    code = "import sys, engine.scheduler; assert 'torch' not in sys.modules, 'engine.scheduler imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------
# clocks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_samples, frames", [
    (60 * 16000, 1500),  # a 60 s clip is a 1500-frame video
    (38400, 60),  # 2.4 s
    (0, 0), (319, 0), (320, 1),  # half a frame rounds up
    (38400 + 319, 60), (38400 + 320, 61),
])
def test_frames_for_samples_rounds(n_samples, frames):
    assert frames_for_samples(n_samples) == frames


def test_frame_clock_helpers():
    assert frame_to_sample(3) == 3 * SPF
    assert complete_frames(3 * SPF - 1) == 2 and complete_frames(3 * SPF) == 3
    assert frames_for_samples(44100, sample_rate=44100, fps=30) == 30
    assert crossfade_weights(3) == [0.25, 0.5, 0.75]
    assert crossfade_weights(0) == []


# ---------------------------------------------------------------------------------------------------------------
# pose windows
# ---------------------------------------------------------------------------------------------------------------
def _emitted(windows):
    return [f for w in windows for f in range(*w.emit_range)]


def test_first_window():
    w0 = plan_windows(200, window=80, hop=72, crossfade=8)[0]
    assert w0 == Window(index=0, start=0, n_frames=80, valid_frames=80, keep_from=0, keep_to=72, crossfade=0,
                        cond_frame=None, audio_start=0, audio_end=80 * SPF)
    assert w0.padded_frames == 0 and w0.seam_range == (0, 0)


def test_last_partial_window_is_padded():
    ws = plan_windows(150, window=80, hop=80, crossfade=0)
    assert [w.start for w in ws] == [0, 80]
    last = ws[-1]
    assert (last.n_frames, last.valid_frames, last.padded_frames) == (80, 70, 10)
    assert (last.keep_from, last.keep_to, last.emit_range) == (0, 70, (80, 150))
    assert last.cond_frame == 79  # the previous window's frame 79 (MMGT_SPEC.md)
    assert (last.audio_start, last.audio_end) == (80 * SPF, 150 * SPF)


def test_audio_shorter_than_one_window():
    (w,) = plan_windows(frames_for_samples(30 * SPF), window=80, hop=72, crossfade=8)
    assert (w.n_frames, w.valid_frames, w.padded_frames, w.keep_to, w.crossfade) == (80, 30, 50, 30, 0)
    assert plan_windows(0, 80, 80, 0) == []


def test_hop_equal_to_window_tiles_without_seam():
    ws = plan_windows(400, window=80, hop=80, crossfade=0)
    assert [w.emit_range for w in ws] == [(0, 80), (80, 160), (160, 240), (240, 320), (320, 400)]
    assert all(w.crossfade == 0 and w.valid_frames == 80 for w in ws)
    assert [w.cond_frame for w in ws] == [None, 79, 159, 239, 319]
    with pytest.raises(ValueError, match=r"crossfade must be <= window - hop \(80 - 80 = 0\), got crossfade=1"):
        plan_windows(400, window=80, hop=80, crossfade=1)


def test_small_hop():
    ws = plan_windows(100, window=80, hop=10, crossfade=4)
    assert len(ws) == 10
    assert [w.start for w in ws] == list(range(0, 100, 10))
    assert all(w.keep_to == 10 for w in ws)
    assert [w.crossfade for w in ws] == [0] + [4] * 9
    assert [w.valid_frames for w in ws] == [80, 80, 80, 70, 60, 50, 40, 30, 20, 10]
    assert ws[1].cond_frame == 79 and ws[9].cond_frame == 99  # last real frame of the previous window


def test_small_hop_live_lookahead_limits_audio():
    ws = plan_windows(100, window=80, hop=10, crossfade=8, lookahead_frames=5)
    assert all(w.valid_frames == 15 for w in ws[:-1])  # hop + lookahead frames of real audio, the rest padded
    assert ws[-1].valid_frames == 10
    assert [w.crossfade for w in ws] == [0] + [5] * 9  # seam capped: the previous window saw 5 frames past its hop
    assert ws[1].cond_frame == 14
    assert ws[1].audio_end == 25 * SPF


@pytest.mark.parametrize("total", [0, 1, 9, 10, 11, 79, 80, 81, 159, 160, 1500, 1501])
@pytest.mark.parametrize("hop, crossfade, lookahead", [(80, 0, None), (72, 8, None), (10, 4, None), (1, 0, None),
                                                       (10, 8, 3), (76, 4, 0), (40, 40, None)])
def test_every_frame_emitted_once_in_order_and_seams_are_real(total, hop, crossfade, lookahead):
    ws = plan_windows(total, window=80, hop=hop, crossfade=crossfade, lookahead_frames=lookahead)
    assert _emitted(ws) == list(range(total))
    assert [w.index for w in ws] == list(range(len(ws)))
    for prev, w in zip(ws, ws[1:]):
        assert w.start - prev.start == hop
        assert 0 <= w.crossfade <= min(crossfade, w.keep_to)
        # the seam lies inside frames the previous window predicted from real audio
        assert w.seam_range[1] <= prev.start + prev.valid_frames
        assert prev.start <= w.cond_frame < prev.start + prev.valid_frames
    for w in ws:
        assert w.n_frames == 80 and 1 <= w.keep_to <= w.valid_frames <= 80
        assert w.start + w.valid_frames <= total


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_frames=10, window=80, hop=81, crossfade=0), "hop must be <= window (80), got hop=81"),
    (dict(total_frames=10, window=80, hop=0, crossfade=0), "hop must be >= 1, got 0"),
    (dict(total_frames=-1, window=80, hop=10, crossfade=0), "total_frames must be >= 0, got -1"),
    (dict(total_frames=10, window=80, hop=10, crossfade=-2), "crossfade must be >= 0, got -2"),
    (dict(total_frames=10, window=0, hop=1, crossfade=0), "window must be >= 1, got 0"),
    (dict(total_frames=10, window=80, hop=10, crossfade=0, lookahead_frames=-1),
     "lookahead_frames must be >= 0, got -1"),
    (dict(total_frames=10.5, window=80, hop=10, crossfade=0), "total_frames must be an integer, got 10.5"),
])
def test_invalid_window_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        plan_windows(**kwargs)
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# render chunks
# ---------------------------------------------------------------------------------------------------------------
def test_chunks_fixed_size_with_overlap_and_padded_tail():
    cs = plan_chunks(101, chunk=16, overlap=4)
    assert [c.start for c in cs] == list(range(0, 97, 12))
    assert all(c.n_frames == 16 for c in cs)
    assert cs[0] == RenderChunk(index=0, start=0, n_frames=16, valid_frames=16, overlap=0)
    assert (cs[1].overlap, cs[1].new_from, cs[1].new_to, cs[1].emit_range) == (4, 4, 16, (16, 28))
    last = cs[-1]
    assert (last.start, last.valid_frames, last.padded_frames, last.emit_range) == (96, 5, 11, (100, 101))
    assert last.padding_mask == (False,) * 5 + (True,) * 11
    assert last.audio_range() == (96 * SPF, 101 * SPF)
    assert cs[1].audio_range(context_frames=2) == (10 * SPF, 30 * SPF)
    assert plan_chunks(0, 16, 4) == []
    (only,) = plan_chunks(7, 24, 8)
    assert (only.valid_frames, only.padded_frames, only.overlap, only.emit_range) == (7, 17, 0, (0, 7))


@pytest.mark.parametrize("total", [0, 1, 15, 16, 17, 28, 29, 100, 1500])
@pytest.mark.parametrize("chunk, overlap", [(16, 0), (16, 4), (32, 8), (32, 31), (1, 0), (24, 12)])
def test_chunks_emit_every_frame_once_in_order(total, chunk, overlap):
    cs = plan_chunks(total, chunk, overlap)
    assert [f for c in cs for f in range(*c.emit_range)] == list(range(total))
    assert all(c.new_to > c.new_from for c in cs)  # no chunk renders for nothing
    for prev, c in zip(cs, cs[1:]):
        assert c.start == prev.start + chunk - overlap and c.overlap == overlap


def test_chunk_limits():
    assert plan_chunks(64, 32, 0)[0].n_frames == 32  # 32 is the motion-module limit and allowed
    with pytest.raises(ValueError, match=r"chunk must be <= 32 frames .* got chunk=33"):
        plan_chunks(64, 33, 0)
    with pytest.raises(ValueError, match=r"overlap must be < chunk \(16\), got overlap=16"):
        plan_chunks(64, 16, 16)
    with pytest.raises(ValueError, match=r"overlap must be < chunk \(16\), got overlap=20"):
        plan_chunks(64, 16, 20)
    with pytest.raises(ValueError, match=r"overlap must be >= 0, got -1"):
        plan_chunks(64, 16, -1)
    with pytest.raises(ValueError, match=r"chunk must be >= 1, got 0"):
        plan_chunks(64, 0, 0)
    with pytest.raises(ValueError, match=r"overlap must be < chunk \(8\)"):
        StreamChunkPlanner(8, 8)


# ---------------------------------------------------------------------------------------------------------------
# open-ended planners equal the finite plans
# ---------------------------------------------------------------------------------------------------------------
def _stream_windows(n_samples, pieces, **kwargs):
    p = StreamPlanner(**kwargs)
    got, pos = [], 0
    for size in pieces:
        size = min(size, n_samples - pos)
        got += p.push(size)
        pos += size
        # a window handed out early never needs audio that has not arrived
        assert all(w.audio_end <= p.samples for w in got)
    assert pos == n_samples
    got += p.finish()
    assert p.finish() == []
    return got


@pytest.mark.parametrize("n_samples", [0, 100, 12345, 30 * SPF, 38400, 96000 + 320, 160 * SPF, 60 * 16000 + 1])
@pytest.mark.parametrize("hop, crossfade, lookahead", [(10, 4, 5), (10, 8, 3), (72, 8, 0), (80, 0, 0),
                                                       (80, 0, 3), (1, 0, 2)])
def test_stream_planner_matches_finite_plan(n_samples, hop, crossfade, lookahead):
    expected = plan_windows(frames_for_samples(n_samples), 80, hop, crossfade, lookahead_frames=lookahead)
    one_frame_at_a_time = [SPF] * (n_samples // SPF + 1)
    rng = random.Random(n_samples + hop)
    ragged = []
    while sum(ragged) < n_samples:
        ragged.append(rng.randint(0, 3000))  # includes empty pushes and pieces that end mid-frame
    for pieces in (one_frame_at_a_time, ragged, [n_samples]):
        got = _stream_windows(n_samples, pieces, window=80, hop=hop, crossfade=crossfade, lookahead_frames=lookahead)
        assert got == expected


@pytest.mark.parametrize("hop, crossfade", [(72, 8), (80, 0), (10, 4)])
def test_stream_planner_with_full_lookahead_matches_offline_plan(hop, crossfade):
    n = 200 * SPF + 17
    offline = plan_windows(frames_for_samples(n), 80, hop, crossfade)
    assert _stream_windows(n, [SPF] * 201, window=80, hop=hop, crossfade=crossfade,
                           lookahead_frames=80 - hop) == offline


def test_stream_planner_first_window_needs_hop_plus_lookahead():
    p = StreamPlanner(window=80, hop=10, crossfade=4, lookahead_frames=5)
    assert p.latency_frames == 15
    assert p.push(15 * SPF - 1) == []
    (w0,) = p.push(1)
    assert (w0.index, w0.emit_range, w0.valid_frames) == (0, (0, 10), 15)
    assert p.push(10 * SPF)[0].emit_range == (10, 20)
    p.finish()
    with pytest.raises(ValueError, match="after finish"):
        p.push(1)
    with pytest.raises(ValueError, match="n_new_samples must be >= 0, got -5"):
        StreamPlanner(80, 10, 0, 0).push(-5)


@pytest.mark.parametrize("total", [0, 5, 16, 17, 100, 333])
@pytest.mark.parametrize("chunk, overlap", [(16, 4), (32, 8), (12, 0)])
def test_stream_chunk_planner_matches_finite_plan(total, chunk, overlap):
    p = StreamChunkPlanner(chunk, overlap)
    got = []
    for _ in range(total):
        got += p.push(1)
        # a pushed chunk never covers frames that do not exist yet
        assert all(c.start + c.n_frames <= p.frames for c in got)
    got += p.finish()
    assert got == plan_chunks(total, chunk, overlap)


@pytest.mark.parametrize("total", [17, 100, 333])
@pytest.mark.parametrize("chunk, overlap, hop", [(16, 4, 76), (12, 4, 20), (32, 8, 40)])
def test_stream_chunk_planner_resumed_mid_stream_gives_the_tail_of_the_plan(total, chunk, overlap, hop):
    """A resumed run starts the planner at chunk j with the poses from the start of the window holding that chunk's
    first frame: it hands out exactly plan_chunks' chunks from j on."""
    plan = plan_chunks(total, chunk, overlap)
    for j in range(1, len(plan)):
        first = plan[j].start // hop * hop  # the pose window that holds chunk j's first frame
        p = StreamChunkPlanner(chunk, overlap, first_index=j, frames=first)
        got = []
        for start in range(first, total, hop):  # whole pose windows, as Stage I emits them
            got += p.push(min(hop, total - start))
        got += p.finish()
        assert got == plan[j:], (j, first)
    with pytest.raises(ValueError, match="past the start of chunk 2"):
        StreamChunkPlanner(16, 4, first_index=2, frames=30)
