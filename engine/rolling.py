"""Stage II under the rolling schedule (``--schedule rolling``): PoseWindows -> rolling calls -> RenderedChunks.

engine/rolling_plan.py plans the calls; mmgt.pipeline.render_rolling runs one. This stage keeps, between calls, the
latents of the groups still in flight and the conditions of the frames the next call reads, and hands the decode
stage only the calls that emit a group (warm-up calls emit nothing), so frames reach the sink in order with their
global frame numbers. The runner builds it (``Runner._execute``) and hands it the frame store and the CUDA-stream
helpers it shares with the chunk schedule's stage: engine/runner.py imports this module, so it cannot import
runner back.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Optional

import torch

from mmgt import pipeline as P

from .rolling_plan import RollingCall, StreamRollingPlanner, group_size
from .types import PoseWindow, RenderedChunk

log = logging.getLogger(__name__)


class RollingRenderStage:
    """Stage II of one run under the rolling schedule (the worker interface of runner._RenderStage).

    ``store``: the runner's frame store (push, take with the frames outside it repeating its oldest / newest, and
    drop_before); ``after(event, *tensors)``: a context in which this stream waits for another stage's output;
    ``event()``: a CUDA event recorded now (None on a CPU)."""

    def __init__(self, runner: Any, metrics: Any, store: Any, after: Callable, event: Callable[[], Any]):
        s = runner.settings
        self.runner, self.metrics, self.store, self.after, self.event = runner, metrics, store, after, event
        self.group = group_size(s.chunk, runner.steps)
        self.planner = StreamRollingPlanner(runner.steps, self.group,
                                            max_frames=runner.models.cfg.unet.motion_max_frames)
        self.carried: Optional[torch.Tensor] = None  # (1, 4, N - G, h, w) latents of the groups still in flight
        log.info("rolling schedule: %d steps x %d frames per denoiser call, %d new frames per call", runner.steps,
                 self.group, self.group)

    def __call__(self, pw: PoseWindow) -> Iterator[RenderedChunk]:
        with self.after(pw.ready, pw.audio_tokens):
            self.store.push(pw)
        for call in self.planner.push(pw.n_frames):
            yield from self._render(call)

    def flush(self) -> Iterator[RenderedChunk]:
        for call in self.planner.finish():
            yield from self._render(call)

    @torch.no_grad()
    def _render(self, call: RollingCall) -> Iterator[RenderedChunk]:
        r, s = self.runner, self.runner.settings
        # warm-up slots read frame 0's conditions, tail slots the newest frame's (the store repeats its ends)
        frames, masks, tokens = self.store.take(call.start, call.n_frames)
        first, end = call.emit_range
        work = P.RollingChunk(index=call.index, first_frame=call.start, group_size=call.group_size,
                              pose_frames=frames, masks=masks, audio_tokens=tokens, carried=self.carried,
                              warmup_groups=call.warmup_groups, emit_to=end - first, newest_frame=call.newest_frame)
        with self.metrics.gpu_span("stage2"):
            result = P.render_rolling(r.models, r.avatar, work, r.steps, r.guidance, s.seed)
        self.carried = result.latents[:, :, call.group_size:]
        self.store.drop_before(call.start + call.group_size)  # the next call starts one group later
        if end > first:  # warm-up calls leave nothing to decode
            # decode waits for the event; a rolling call keeps no resume point (a rolling render resumes from its start)
            yield RenderedChunk(dataclasses.replace(result, ready=self.event()))


__all__ = ["RollingRenderStage"]
