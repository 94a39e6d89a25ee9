"""Live settings chosen by measurement: the lowest-latency layout that this machine renders in real time.

    choice = choose_live_settings(models, avatar, base=LIVE_CPU, target_ms=400, sessions=2)

A live layout (hop, lookahead, render chunk, overlap) fixes the *structural* latency: the most audio any frame waits
for beyond its own time before the engine may emit it (``RenderSettings.structural``). Smaller layouts wait less but
pay more per frame (an SMGA window per hop, Python and network-call overheads per chunk), so which one a machine can
hold is a measurement. ``latency_candidates`` (pure, milliseconds) lists one layout per latency level, the cheapest
of that level by a cost model; ``choose_live_settings`` measures them (``engine.runner.probe_sessions``: the sessions
the server is to hold, streaming at once) from the lowest latency up, by bisection, and returns the first that holds
25 fps x ``margin`` in every session. Latency for one, capacity for many: the target bounds the schedule's share
(structural) and ``sessions`` says how many must fit at that latency; the log prints the choice and every measurement.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .settings import RenderSettings
from .types import FPS

log = logging.getLogger(__name__)

FRAME_MS = 1000 // FPS  # 40 ms of audio per frame
HOPS = (2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40)  # the layouts the search considers
LOOKAHEADS = (2,)  # a window reads at least 2 frames of audio past its hop (lip shapes lead the sound)
MAX_CHUNK = 32  # the motion modules' position table


def cost_per_frame(s: RenderSettings) -> float:
    """A unitless cost model of rendering one frame with layout ``s`` (only used to rank layouts of equal latency):
    an SMGA window per hop (~6 frames' worth of Stage II work on the tiny preset and on a GPU alike), every frame
    denoised chunk / (chunk - overlap) times, and a fixed overhead per chunk (~2 frames' worth)."""
    new = s.chunk - s.overlap
    return 6.0 / s.hop + s.chunk / new + 2.0 / new


def latency_candidates(base: RenderSettings, target_ms: Optional[float] = None,
                       fixed_chunk: Optional[int] = None) -> List[RenderSettings]:
    """One layout per structural latency level (ascending), the cheapest of the level by ``cost_per_frame``; only
    levels within ``target_ms`` (milliseconds of structural latency) when given. The hop and the render chunk vary;
    ``base`` gives everything else: its lookahead and chunk overlap (quality choices of the preset), steps, guidance,
    window, crossfade (capped at the hop); ``fixed_chunk``: the model set's calls are made for one
    chunk length (exported or compiled networks), so only layouts with that chunk."""
    best: Dict[int, RenderSettings] = {}
    la, overlap = base.lookahead if base.lookahead is not None else min(LOOKAHEADS), base.overlap
    for hop in HOPS:
        for new in sorted({hop, hop // 2, 2 * hop} - {0}):  # new frames per chunk: a hop, half of one, or two
            chunk = new + overlap
            if chunk > MAX_CHUNK or (fixed_chunk is not None and chunk != fixed_chunk):
                continue
            s = base.with_(hop=hop, lookahead=la, chunk=chunk, overlap=overlap, crossfade=min(base.crossfade, hop))
            frames = s.structural().max
            if target_ms is not None and frames * FRAME_MS > target_ms:
                continue
            if frames not in best or cost_per_frame(s) < cost_per_frame(best[frames]):
                best[frames] = s
    # keep a level only when it is cheaper than every level of lower latency: cost then falls as latency grows
    levels: List[RenderSettings] = []
    for frames in sorted(best):
        if not levels or cost_per_frame(best[frames]) < cost_per_frame(levels[-1]):
            levels.append(best[frames])
    return levels


@dataclass
class Choice:
    """What ``choose_live_settings`` picked, and what it measured on the way."""

    settings: RenderSettings
    structural_frames: int  # the chosen layout's structural latency (frames of 40 ms)
    fps: List[float]  # each probed session's steady fps with the chosen layout
    met_target: bool  # False: no layout within the target holds real time here; the fastest was taken
    measured: List[Dict] = field(default_factory=list)  # every probe: layout, structural frames, fps per session

    def describe(self) -> str:
        s = self.settings
        return (f"hop {s.hop}, lookahead {s.lookahead}, chunk {s.chunk}, overlap {s.overlap}: structural latency "
                f"{self.structural_frames} frames ({self.structural_frames * FRAME_MS} ms), "
                f"{min(self.fps):.1f} fps per session x {len(self.fps)}")


Probe = Callable[[RenderSettings, int], List[float]]  # (settings, sessions) -> fps of each session


def choose_live_settings(probe: Probe, base: RenderSettings, target_ms: Optional[float] = None, sessions: int = 1,
                         margin: float = 1.2, fixed_chunk: Optional[int] = None) -> Choice:
    """The lowest-latency layout (within ``target_ms`` when given) whose ``sessions`` concurrent streams each hold
    ``margin`` x 25 fps, found by bisection over ``latency_candidates`` (cost falls as latency grows, so a layout
    that holds makes every later one a candidate and one that fails rules out every earlier one). When none within
    the target holds, the largest layout within it (the cheapest to run) is measured once more against every level
    above the target, and the lowest level that holds is returned with ``met_target`` False; when nothing holds at
    all, the fastest layout measured."""
    need = margin * FPS
    measured: List[Dict] = []

    def measure(s: RenderSettings) -> List[float]:
        rates = probe(s, sessions)
        frames = s.structural().max
        measured.append({"hop": s.hop, "lookahead": s.lookahead, "chunk": s.chunk, "overlap": s.overlap,
                         "structural_frames": frames, "fps": [round(r, 2) for r in rates]})
        log.info("latency search: hop %d lookahead %d chunk %d overlap %d (%d frames, %d ms) -> %s fps x %d",
                 s.hop, s.lookahead, s.chunk, s.overlap, frames, frames * FRAME_MS,
                 ", ".join(f"{r:.1f}" for r in rates), sessions)
        return rates

    def bisect(levels: Sequence[RenderSettings]) -> Optional[Choice]:
        lo, hi, found = 0, len(levels) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            rates = measure(levels[mid])
            if min(rates) >= need:
                found, hi = Choice(levels[mid], levels[mid].structural().max, rates, True, measured), mid - 1
            else:
                lo = mid + 1
        return found

    within = latency_candidates(base, target_ms, fixed_chunk)
    if not within:
        raise ValueError(f"--latency-target {target_ms:g} ms: no live layout waits for less than "
                         f"{min(s.structural().max for s in latency_candidates(base, None, fixed_chunk)) * FRAME_MS}"
                         " ms of audio")
    choice = bisect(within)
    if choice is None:
        above = [s for s in latency_candidates(base, None, fixed_chunk) if s.structural().max > within[-1].structural().max]
        choice = bisect(above)
        if choice is not None:
            choice.met_target = False
    if choice is None:  # nothing holds real time: the fastest layout measured, said loudly
        fastest = max(measured, key=lambda m: min(m["fps"]))
        s = base.with_(hop=fastest["hop"], lookahead=fastest["lookahead"], chunk=fastest["chunk"],
                       overlap=fastest["overlap"], crossfade=min(base.crossfade, fastest["hop"]))
        choice = Choice(s, fastest["structural_frames"], fastest["fps"], False, measured)
    choice.measured = measured
    return choice


__all__ = ["latency_candidates", "cost_per_frame", "choose_live_settings", "Choice", "FRAME_MS"]
