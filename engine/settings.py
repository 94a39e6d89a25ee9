"""Run settings of the engine (scheduling and sampling), with the two presets the CLI defaults come from.

Model sizes live in ``mmgt.config``; this file holds what a run chooses: how windows and chunks tile the frame clock
and how many denoising steps each stage takes. ``None`` means "the model preset's own default".
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .rolling_plan import SCHEDULES, stage2_planner
from .scheduler import StructuralLatency, structural_latency


@dataclass(frozen=True)
class RenderSettings:
    window: int = 80  # SMGA window W in frames (3.2 s at 25 fps); the release trains on 80
    hop: int = 76  # frames between consecutive SMGA windows (offline: close to W)
    crossfade: int = 4  # seam frames blended between consecutive pose windows (<= window - hop)
    lookahead: Optional[int] = None  # live: audio frames a window may read past its hop (None: offline, all W)
    chunk: int = 16  # Stage II frames per render chunk (<= 32: the motion modules' position table)
    overlap: int = 4  # frames each chunk takes over (final latents) from the previous chunk
    steps: Optional[int] = None  # Stage II DDIM steps (None: preset default; reference quality 30)
    guidance: Optional[float] = None  # Stage II CFG scale (None: preset default; 1.0 = no CFG pass)
    smga_steps: Optional[int] = None  # Stage I DDIM steps (None: preset default; reference 50)
    smga_guidance: Optional[float] = None  # Stage I CFG weight (None: preset default; reference 2.0)
    seed: int = 0  # seeds both stages' noise; the same seed gives the same frames
    queue_size: int = 2  # pose windows Stage I may run ahead of Stage II
    schedule: str = "chunk"  # Stage II: "chunk" (chunks of `chunk` frames, `overlap` carried over, every step on the
    # whole chunk) or "rolling" (opt-in: each call holds `steps` groups of chunk / steps frames at as many noise
    # levels and emits the oldest group; nothing is denoised twice; engine/rolling_plan.py)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"RenderSettings.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    def with_(self, **changes) -> "RenderSettings":
        """A copy with the non-None ``changes`` applied (CLI flags left unset keep the preset's value)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def structural(self) -> StructuralLatency:
        """Frames of audio a live stream with these settings waits for beyond a frame before emitting it."""
        return structural_latency(self.window, self.hop, self.crossfade, self.lookahead,
                                  stage2_planner(self.schedule, self.chunk, self.overlap, self.steps))


OFFLINE = RenderSettings()
# Live, latency first: a window every 8 frames reading 2 frames past its hop, render chunks of one hop. The first frame
# waits for 10 frames (400 ms) of audio and no later frame waits longer (RenderSettings.structural()). Every hop runs a
# whole SMGA window, so live pose sampling uses 10 DDIM steps, not the reference's 50 (at the release size 50 eager
# steps take ~1.4 s per window on an H100: more than three windows' worth of real time at hop 8). Chunks take 4
# frames over from the previous one (each new frame is denoised twice: `--schedule rolling` avoids that).
LIVE = RenderSettings(hop=8, crossfade=4, lookahead=2, chunk=8, overlap=4, smga_steps=10)

# Live on a CPU (the tiny preset on two cores), latency first: the same 10-frame layout with one denoising step, two
# pose steps and no chunk overlap (every frame is denoised once: the CPU has no time to spare). ~40 fps flat out on two
# idle cores (Runner.probe).
LIVE_CPU = LIVE.with_(chunk=8, overlap=0, smga_steps=2, steps=1)

# Live on a CPU, capacity first (the CPU default before the latency work; `benchmarks/bench_latency.py`'s baseline):
# one SMGA window per 40 frames, the largest render chunk (32, 28 new). ~5x real time, but the first frame waits for
# 44 frames of audio and the worst for 68 (2.7 s).
LIVE_CPU_WIDE = LIVE.with_(hop=40, lookahead=4, chunk=32, overlap=4, smga_steps=2, steps=1)

SETTINGS = {"offline": OFFLINE, "live": LIVE, "live-cpu": LIVE_CPU, "live-cpu-wide": LIVE_CPU_WIDE}
