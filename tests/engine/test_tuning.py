"""Latency of live layouts (pure scheduling, milliseconds) and the measured choice of live settings."""
import pytest

from engine.scheduler import StreamChunkPlanner, structural_latency
from engine.settings import LIVE, LIVE_CPU, LIVE_CPU_WIDE
from engine.tuning import FRAME_MS, choose_live_settings, cost_per_frame, latency_candidates


def test_structural_latency_of_known_layouts():
    # hop 40 with chunks of 32: the first chunk needs window 0 only (40 + 4 frames), the second needs window 1 for
    # its last frame (frame 59 -> audio to 84), so frame 28 waits 56 frames; the worst is 68
    st = structural_latency(80, 40, 4, 4, StreamChunkPlanner(32, 4))
    assert (st.first, st.max, st.min, st.swing) == (44, 68, 5, 63)
    # chunks of one hop: a chunk's first frame waits for the rest of its hop and the lookahead, and no longer
    st = structural_latency(80, 8, 4, 2, StreamChunkPlanner(8, 0))
    assert (st.first, st.max, st.min) == (10, 10, 3)
    assert LIVE_CPU_WIDE.structural().max == 68


def test_default_live_settings_wait_for_at_most_ten_frames():
    """Issue 17, acceptance 2: <= 10 frames (400 ms) of structural latency in the default live settings."""
    for preset in (LIVE, LIVE_CPU):
        assert preset.structural().max <= 10, preset


def test_six_frames_are_reachable_with_a_latency_target():
    """Issue 17, acceptance 2: a --latency-target of 240 ms has layouts to choose from, every one within it."""
    levels = latency_candidates(LIVE_CPU, target_ms=240)
    assert levels and all(s.structural().max * FRAME_MS <= 240 for s in levels)
    assert min(s.structural().max for s in levels) <= 6


def test_candidates_rise_in_latency_and_fall_in_cost():
    levels = latency_candidates(LIVE_CPU)
    frames = [s.structural().max for s in levels]
    costs = [cost_per_frame(s) for s in levels]
    assert frames == sorted(set(frames)) and costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    assert all(s.overlap == LIVE_CPU.overlap and s.lookahead == LIVE_CPU.lookahead for s in levels)
    assert all(s.steps == LIVE_CPU.steps and s.smga_steps == LIVE_CPU.smga_steps for s in levels)
    fixed = latency_candidates(LIVE, fixed_chunk=12)
    assert fixed and all(s.chunk == 12 for s in fixed)


def fake_probe(capacity: float, calls: list):
    """A machine that renders ``capacity`` cost units per second, shared by the sessions."""
    def probe(settings, sessions):
        calls.append(settings)
        return [capacity / cost_per_frame(settings) / sessions] * sessions
    return probe


def test_the_search_takes_the_lowest_latency_that_holds_real_time_for_every_session():
    levels = latency_candidates(LIVE_CPU, target_ms=1000)
    calls = []
    choice = choose_live_settings(fake_probe(100.0, calls), LIVE_CPU, target_ms=1000, sessions=1)
    holds = [s for s in levels if 100.0 / cost_per_frame(s) >= 1.2 * 25]
    assert choice.met_target and choice.settings == holds[0]
    assert len(calls) <= len(levels).bit_length() + 1  # bisection, not every level
    # two sessions need a cheaper layout: more latency
    two = choose_live_settings(fake_probe(100.0, []), LIVE_CPU, target_ms=1000, sessions=2)
    assert two.structural_frames > choice.structural_frames and min(two.fps) >= 30 and len(two.fps) == 2
    assert "structural latency" in two.describe()


def test_a_target_out_of_reach_takes_the_lowest_latency_above_it_and_says_so():
    choice = choose_live_settings(fake_probe(65.0, []), LIVE_CPU, target_ms=240, sessions=1)
    assert not choice.met_target and choice.structural_frames == 10 and min(choice.fps) >= 30
    slow = choose_live_settings(fake_probe(1.0, []), LIVE_CPU, target_ms=400)  # nothing holds: the fastest measured
    assert not slow.met_target and slow.fps == max((m["fps"] for m in slow.measured), key=min)
    with pytest.raises(ValueError, match="--latency-target 40 ms"):
        choose_live_settings(fake_probe(100.0, []), LIVE_CPU, target_ms=40)
