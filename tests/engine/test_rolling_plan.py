"""The rolling schedule's plan (engine/rolling_plan.py): pure, milliseconds."""
from collections import defaultdict

import pytest

from engine.rolling_plan import (RollingGroup, StreamRollingPlanner, group_size, plan_rolling, stage2_planner)
from engine.scheduler import StreamChunkPlanner, plan_chunks

CASES = [(4, 1), (4, 2), (2, 3), (1, 4), (3, 5), (8, 4), (1, 32), (32, 1)]


def _steps_per_frame(calls):
    """global frame -> the step indices it took, in call order (every slot, warm-up and tail ones included)."""
    seen = defaultdict(list)
    for call in calls:
        assert call.frame_steps == tuple(g.step for g in call.groups for _ in range(call.group_size))
        for group in call.groups:
            for f in range(group.start, group.start + call.group_size):
                seen[f].append(group.step)
    return seen


@pytest.mark.parametrize("total", [0, 1, 2, 3, 7, 8, 9, 31, 100])
@pytest.mark.parametrize("steps, group", CASES)
def test_every_frame_gets_its_steps_in_order_once_and_leaves_in_order(total, steps, group):
    calls = plan_rolling(total, steps, group)
    n_groups = -(-total // group)
    assert len(calls) == (n_groups + steps - 1 if total else 0)
    assert [c.index for c in calls] == list(range(len(calls)))
    # every real frame: steps 0, 1, ..., S-1 in consecutive calls, each once (nothing is denoised twice)
    seen = _steps_per_frame(calls)
    for f in range(total):
        assert seen[f] == list(range(steps)), f"frame {f}: steps {seen[f]}"
    # frames leave in order, each once, after their last step; nothing else leaves (warm-up, tail, padding)
    emitted = [f for c in calls for f in range(*c.emit_range)]
    assert emitted == list(range(total))
    for c in calls:
        first, end = c.emit_range
        assert end == first or (c.groups[0].step == steps - 1 and first >= 0 and end <= total)
    # one static shape; groups in frame order, oldest (last step) first
    for c in calls:
        assert c.n_frames == steps * group and len(c.groups) == steps
        assert [g.step for g in c.groups] == list(range(steps - 1, -1, -1))
        assert [g.start for g in c.groups] == list(range(c.start, c.start + c.n_frames, group))


@pytest.mark.parametrize("steps, group", CASES)
def test_warm_up_fills_the_slots_before_the_stream_and_emits_nothing(steps, group):
    calls = plan_rolling(50, steps, group)
    for k in range(steps - 1):  # call k: the groups before the stream are warm-up slots
        c = calls[k]
        assert c.warmup_groups == steps - 1 - k and c.start == (k - steps + 1) * group
        assert all(g.warmup and g.valid == 0 for g in c.groups[:c.warmup_groups])
        assert c.emit_range[0] == c.emit_range[1]
    assert calls[steps - 1].warmup_groups == 0 and calls[steps - 1].emit_range == (0, min(group, 50))
    assert all(c.warmup_groups == 0 for c in calls[steps - 1:])


def test_tail_the_last_group_is_partial_and_the_drain_takes_in_no_frame():
    calls = plan_rolling(10, 4, 3)  # groups 0..3, the last with 1 real frame; 3 drain calls
    assert len(calls) == 4 + 3
    last_in = calls[3].groups[-1]
    assert last_in == RollingGroup(index=3, start=9, step=0, valid=1)
    for c in calls[4:]:
        assert c.groups[-1].valid == 0 and c.groups[-1].index >= 4  # tail slots: never emitted
        assert c.newest_frame == 9
    assert calls[-1].emit_range == (9, 10)
    assert [c.newest_frame for c in calls[:4]] == [2, 5, 8, 9]


@pytest.mark.parametrize("total", [0, 1, 5, 17, 64])
@pytest.mark.parametrize("group", [1, 2, 3, 8])
def test_one_step_is_the_chunk_schedule_without_overlap(total, group):
    """With one noise level a call is one group of pure noise denoised once: chunk = group, overlap 0."""
    rolling, chunks = plan_rolling(total, 1, group), plan_chunks(total, group, 0)
    assert [(c.start, c.n_frames, c.emit_range) for c in rolling] == \
           [(c.start, c.n_frames, c.emit_range) for c in chunks]
    assert all(c.warmup_groups == 0 and c.frame_steps == (0,) * group for c in rolling)


@pytest.mark.parametrize("total", [0, 1, 9, 40, 123])
@pytest.mark.parametrize("pieces", [[1], [7], [40], [3, 50, 1]])
@pytest.mark.parametrize("steps, group", [(4, 1), (4, 2), (3, 5), (1, 4)])
def test_stream_planner_equals_the_finite_plan(total, pieces, steps, group):
    p = StreamRollingPlanner(steps, group)
    got, pos, i = [], 0, 0
    while pos < total:
        n = min(pieces[i % len(pieces)], total - pos)
        ready = p.push(n)
        pos += n
        i += 1
        assert all(c.groups[-1].start + group <= pos for c in ready)  # a call never waits for a frame not in
        got += ready
    got += p.finish()
    assert p.finish() == []
    assert got == plan_rolling(total, steps, group)
    with pytest.raises(ValueError, match="after finish"):
        p.push(1)


def _waits(planner, frames=200):
    """Frames of poses a frame waits for beyond itself before the call or chunk that emits it can run."""
    ready = {}
    for have in range(1, frames + 1):
        for c in planner.push(1):
            for f in range(*c.emit_range):
                ready[f] = have
    return [ready[f] - f for f in sorted(ready)]


def test_same_latency_as_chunks_whose_new_frames_fill_a_rolling_call():
    """Rolling calls of N frames make frames wait at most N frames, as chunks with C - O = N new frames do in steady
    state, but evenly (G frames leave per call, no burst of C - O) and from the first frame on (the first chunk waits
    for all C of its frames)."""
    rolling = _waits(StreamRollingPlanner(4, 1))
    chunks = _waits(StreamChunkPlanner(8, 4))
    assert max(rolling) == max(chunks[8:]) == 4
    assert min(rolling) == 4 and min(chunks) == 1
    assert rolling[0] == 4 and chunks[0] == 8
    two = _waits(StreamRollingPlanner(4, 2))
    assert (max(two), min(two)) == (8, 7)


def test_planner_choice_and_arguments():
    assert isinstance(stage2_planner("chunk", 12, 4, None), StreamChunkPlanner)
    p = stage2_planner("rolling", 12, 4, 4)
    assert isinstance(p, StreamRollingPlanner) and (p.steps, p.group) == (4, 3)
    with pytest.raises(ValueError, match="needs the number of denoising steps"):
        stage2_planner("rolling", 12, 4, None)
    with pytest.raises(ValueError, match="--schedule must be one of chunk, rolling, got 'fifo'"):
        stage2_planner("fifo", 12, 4, 4)
    assert group_size(8, 4) == 2
    with pytest.raises(ValueError, match="--chunk 10 must be a multiple of --steps 4"):
        group_size(10, 4)
    with pytest.raises(ValueError, match=r"steps \* group must be <= 32 frames .* got 4 \* 9"):
        plan_rolling(10, 4, 9)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        StreamRollingPlanner(0, 1)
    with pytest.raises(ValueError, match="total_frames must be >= 0, got -1"):
        plan_rolling(-1, 2, 2)
