"""What a Stage II schedule costs: FLOPs per emitted frame, counted (not timed) at any preset's sizes.

``torch.utils.flop_counter.FlopCounterMode`` counts one call of each network that runs per denoiser call (the
denoiser step and the pose guider, through their contracts) on the meta device: no memory, no weights, seconds at
the release size. The rest of the frame's cost (Stage I, the audio tokens, the decoder) is the same per emitted frame
under both schedules and is left out.

* chunk schedule (chunk C, overlap O, S steps): every chunk runs S denoiser calls on C frames and the pose guider on
  C frames, and emits C - O new frames;
* rolling schedule (N = chunk = S * G frames per call): every call runs one denoiser call and the pose guider on N
  frames and emits G frames.

At the same latency (the most frames a frame waits for beyond itself: C - O for chunks, N for rolling calls) chunk 8 /
overlap 4 denoises every frame twice per step where rolling 4 x 1 does it once (``flops_per_frame``; the README and
benchmarks/bench_latency.py quote it).
"""
from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Optional

from .rolling_plan import group_size
from .settings import RenderSettings

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def call_flops(cfg, chunk: int, guidance: float) -> dict:
    """{network: FLOPs of one call} of the per-call Stage II networks (denoising_unet, pose_guider) at ``cfg``'s
    sizes for calls of ``chunk`` frames (and the CFG batch ``guidance`` needs), counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmgt.contract import Shapes
    from mmgt.pose_guider import PoseGuider, pose_guider_contract
    from mmgt.unet3d import UNet3D, denoiser_contract

    shapes = Shapes.from_config(cfg, chunk=chunk, guidance=guidance)
    with torch.device("meta"):
        nets = SimpleNamespace(denoising_unet=UNet3D(cfg.unet), pose_guider=PoseGuider(cfg.pose_guider))
    out = {}
    for contract in (denoiser_contract(cfg, shapes), pose_guider_contract(cfg, shapes)):
        feeds = [torch.empty(t.shape, device="meta") for t in contract.inputs]  # float32 (timesteps too)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            contract.module(nets)(*feeds)
        out[contract.name] = int(counter.get_total_flops())
    return out


def latency_frames(settings: RenderSettings, steps: int) -> int:
    """The most frames of poses a frame waits for beyond itself before Stage II can emit it: C - O for chunks (the
    first new frame of a chunk waits for its last), N = chunk for rolling calls (a group leaves S - 1 calls after it
    came in, and each call waits for a new group)."""
    if settings.schedule == "rolling":
        group_size(settings.chunk, steps)
        return settings.chunk
    return settings.chunk - settings.overlap


def flops_per_frame(cfg, settings: RenderSettings, steps: Optional[int] = None) -> float:
    """Stage II FLOPs per emitted frame of ``settings``' schedule at ``cfg``'s sizes (``steps``: the settings', else
    the preset's): the denoiser and pose-guider calls a frame needs, shared among the frames each call emits."""
    steps = int(steps or settings.steps or cfg.sampler.steps)
    guidance = cfg.sampler.guidance if settings.guidance is None else float(settings.guidance)
    per_call = call_flops(cfg, settings.chunk, guidance)
    unet, pose = per_call["denoising_unet"], per_call["pose_guider"]
    if settings.schedule == "rolling":
        return (unet + pose) / group_size(settings.chunk, steps)  # one step for every group, G frames leave
    return (steps * unet + pose) / (settings.chunk - settings.overlap)  # S steps on C frames, C - O frames leave


__all__ = ["call_flops", "latency_frames", "flops_per_frame"]
