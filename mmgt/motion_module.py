"""AnimateDiff v2 "Vanilla" motion module: a temporal transformer that mixes each pixel across frames.

Key names follow the release (``*.motion_modules.N.temporal_transformer.*``):
``norm`` (GroupNorm) -> ``proj_in`` (Linear) -> ``transformer_blocks.0``: for each of ``attention_blocks.{0,1}``
x += TemporalAttention(norms.i(x)), with a sinusoidal table ``pos_encoder.pe`` [1, max_frames, C] added to the
normalised tokens before q/k/v; then x += ff(ff_norm(x)) (GEGLU) -> ``proj_out`` (Linear, zero-initialised) ->
+ residual. The position table is a saved buffer with ``motion_max_frames`` (32) rows, so one temporal window
holds at most that many frames.

The denoiser hands over its folded layout (B*F, C, h, w), frames inner (sample-major). The module changes the layout
once, to pixel-major tokens (B*h*w, F, C) in which frames are the sequence axis, runs every norm, projection,
attention and feed-forward there (all of them act per token or along frames) and changes it back once at the end:
two full-tensor copies per module instead of two per attention block.
"""
from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from mmgt.attention import AttnProcessor


class PositionalEncoding(nn.Module):
    """Sinusoidal frame-position table (AnimateDiff layout: sin on even channels, cos on odd)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (T, 1)
        div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (C/2,)
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)  # persistent: the release checkpoint carries it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)  # (N, F, C)


class TemporalAttention(Attention):
    """Self-attention over frames at each pixel; keeps the diffusers key names and adds ``pos_encoder``."""

    def __init__(self, dim: int, heads: int, max_frames: int, backend: str = "sdpa"):
        super().__init__(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False,
                         processor=AttnProcessor(backend))
        self.max_frames = max_frames
        self.pos_encoder = PositionalEncoding(dim, max_frames)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(N, F, C) tokens, frames as the sequence axis -> (N, F, C)."""
        num_frames = hidden_states.shape[1]
        if num_frames > self.max_frames:
            raise ValueError(f"mmgt.motion_module: {num_frames} frames in one temporal window, but the position "
                             f"table has {self.max_frames} entries; render in chunks of at most {self.max_frames}")
        return self.processor(self, self.pos_encoder(hidden_states))  # (N, F, C)


class TemporalTransformerBlock(nn.Module):
    """Two pre-norm temporal self-attentions, then a pre-norm GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, max_frames: int, num_attention_blocks: int = 2,
                 backend: str = "sdpa"):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalAttention(dim, heads, max_frames, backend) for _ in range(num_attention_blocks)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attention_blocks)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            hidden_states = attention(norm(hidden_states)) + hidden_states  # (B*hw, F, C)
        return self.ff(self.ff_norm(hidden_states)) + hidden_states


class TemporalTransformer3DModel(nn.Module):
    """GroupNorm -> Linear proj_in -> temporal blocks -> zero-init Linear proj_out -> + residual."""

    def __init__(self, channels: int, heads: int, max_frames: int, norm_groups: int, num_layers: int = 1,
                 backend: str = "sdpa"):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups=norm_groups, num_channels=channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, heads, max_frames, backend=backend) for _ in range(num_layers)])
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # zero-init: a fresh module is an identity (AnimateDiff)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        rows, channels, height, width = hidden_states.shape  # (B*F, C, h, w)
        batch, tokens = rows // num_frames, height * width
        residual = hidden_states
        x = self.norm(hidden_states)  # per-frame GroupNorm (frames are folded into the batch)
        # 1. one layout change in: every pixel's frames become a sequence (the only copy on the way in)
        x = x.reshape(batch, num_frames, channels, tokens).permute(0, 3, 1, 2)  # (B, hw, F, C) view
        x = x.reshape(batch * tokens, num_frames, channels)  # (B*hw, F, C)
        # 2. everything per token or along frames, in that layout
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)  # (B*hw, F, C)
        x = self.proj_out(x)
        # 3. one layout change out, then the residual
        x = x.reshape(batch, tokens, num_frames, channels).permute(0, 2, 3, 1)  # (B, F, C, hw) view
        return x.reshape(rows, channels, height, width) + residual  # (B*F, C, h, w)


class MotionModule(nn.Module):
    """One motion module (``motion_modules.N``): holds ``temporal_transformer`` like the release checkpoint.

    ``forward(hidden (B*F, C, h, w), num_frames)`` -> (B*F, C, h, w). More than ``max_frames`` frames raise
    ``ValueError``.
    """

    def __init__(self, channels: int, heads: int = 8, max_frames: int = 32, norm_groups: int = 32,
                 backend: str = "sdpa"):
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"mmgt.motion_module: {channels} channels do not split into {heads} heads")
        self.max_frames = max_frames
        self.temporal_transformer = TemporalTransformer3DModel(channels, heads, max_frames, norm_groups,
                                                               backend=backend)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        if hidden_states.ndim != 4 or hidden_states.shape[0] % num_frames != 0:
            raise ValueError(f"mmgt.motion_module: expected folded (B*F, C, h, w) with F={num_frames}, got shape "
                             f"{tuple(hidden_states.shape)}")
        if num_frames > self.max_frames:
            raise ValueError(f"mmgt.motion_module: {num_frames} frames in one temporal window, but the position "
                             f"table has {self.max_frames} entries; render in chunks of at most {self.max_frames}")
        return self.temporal_transformer(hidden_states, num_frames)


__all__ = ["PositionalEncoding", "TemporalAttention", "TemporalTransformerBlock", "TemporalTransformer3DModel",
           "MotionModule"]
