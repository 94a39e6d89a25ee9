"""PoseGuider: drawn pose frames -> features added to the denoiser's conv_in output (MMGT_SPEC.md section 4).

AnimateAnyone's PoseGuider with ``InflatedConv3d`` layers, i.e. plain 2D convolutions applied to every frame on its
own (no temporal mixing)::

    conv_in  3 -> c0                               SiLU
    blocks   for each consecutive pair (a, b) of block_out_channels:
             a -> a (3x3)                          SiLU
             a -> b (3x3, stride 2)                SiLU
    conv_out c_last -> embedding_channels (3x3)    zero-initialised, no activation

At release size (16, 32, 96, 256) -> 320 this is 1.09 M parameters and three stride-2 convs: a 512x512 pose frame
becomes a 64x64 feature map, the latent size. State-dict keys are the release's with the ``pose_guider.`` prefix
stripped: ``conv_in.*``, ``blocks.{0..5}.*``, ``conv_out.*``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmgt.config import MMGTConfig, PoseGuiderConfig
from mmgt.contract import Contract, Shapes, tensor


class InflatedConv2d(nn.Conv2d):
    """A 2D convolution applied frame by frame to a video (B, C, F, H, W); plain 2D on (N, C, H, W).

    The reference calls this InflatedConv3d; it has exactly nn.Conv2d's parameters, so its weights load as they are.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x)
        b, c, f, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B*F, C, H, W), "b c f h w -> (b f) c h w"
        y = super().forward(frames)  # (B*F, C', H', W')
        return y.reshape(b, f, *y.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C', F, H', W')


class PoseGuider(nn.Module):
    """Pose video (B, 3, F, H, W) RGB in [0, 1] -> (B, embedding_channels, F, H/8, W/8) at the release layout.

    A 4D input (N, 3, H, W) is treated as N independent frames and gives (N, C, H/8, W/8). The spatial factor is
    2 ** (len(block_out_channels) - 1).
    """

    def __init__(self, cfg: PoseGuiderConfig):
        super().__init__()
        chans = tuple(cfg.block_out_channels)
        if len(chans) < 1:
            raise ValueError(f"PoseGuiderConfig.block_out_channels is empty: {cfg}")
        self.conditioning_channels = cfg.conditioning_channels
        self.conv_in = InflatedConv2d(cfg.conditioning_channels, chans[0], kernel_size=3, padding=1)
        # Two convs per resolution step; the second halves H and W. Their indices 0..2n-1 are the release's keys.
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            self.blocks.append(InflatedConv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(InflatedConv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = InflatedConv2d(chans[-1], cfg.embedding_channels, kernel_size=3, padding=1)
        # Zero init (ControlNet style): an untrained guider adds nothing to the denoiser's features.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downsample_factor(self) -> int:  # spatial reduction of the output (8 at the release layout)
        return 2 ** (len(self.blocks) // 2)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        if pose.dim() not in (4, 5) or pose.shape[1] != self.conditioning_channels:
            raise ValueError(
                f"PoseGuider input: expected (B, {self.conditioning_channels}, F, H, W) or "
                f"(N, {self.conditioning_channels}, H, W), got {tuple(pose.shape)}")
        h = F.silu(self.conv_in(pose))  # (B, c0, F, H, W)
        for block in self.blocks:
            h = F.silu(block(h))  # (B, c, F, H / 2^k, W / 2^k)
        return self.conv_out(h)  # (B, embedding_channels, F, H/8, W/8)


def pose_guider_contract(cfg: MMGTConfig, shapes: Shapes) -> Contract:
    """pose_guider: a render chunk's pose frames -> the features added after the denoiser's conv_in."""
    pg, c, r, h = cfg.pose_guider, shapes.chunk, shapes.resolution, shapes.latent
    return Contract(
        "pose_guider", "PoseGuider: pose frames in [0, 1] -> features added after conv_in",
        inputs=(tensor("pose", (1, pg.conditioning_channels, c, r, r), 0, 1),),
        outputs=(tensor("pose_features", (1, pg.embedding_channels, c, h, h)),),
        module=lambda m: m.pose_guider, weights=("pose_guider",), config_sections=("pose_guider",),
        shape_fields=("chunk", "resolution"))


__all__ = ["InflatedConv2d", "PoseGuider", "pose_guider_contract"]
