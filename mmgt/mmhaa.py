"""MM-HAA: the motion-mask guided hierarchical audio attention module (``down_blocks.{0,1,2}.audio_modules.N``).

Per frame (frames folded into the batch), on the block's feature map of C channels:

    x = proj_in(GroupNorm(h))                                    1x1 conv C -> d (the inner width)
    x += attn1(norm1(x))                                         self-attention over the frame's pixels
    n = norm2(x)
    full = zero_conv_full(attn2_0(n, audio) * mask[:, 0])        each cross-attention reads only this
    face = zero_conv_face(attn2_1(n, audio) * mask[:, 1])        frame's 32 audio tokens; masks gate the
    lip  = zero_conv_lip (attn2_2(n, audio) * mask[:, 2])        query-token outputs before the 1x1 conv
    x = w_full * full + w_face * face + w_lip * lip + x          branch weights (1, 1, 2) from the config
    x += ff(norm3(x))                                            GEGLU
    out = proj_out(x) + h                                        1x1 conv d -> C, residual

The inner width d follows the reference quirk (MMGT_SPEC.md section 4): module j of down block i uses the
channels of the block's j-th resnet *input* (block_out_channels[max(i-1, 0)] for j = 0, block_out_channels[i]
after), heads = ``audio_heads``. The zero convs are zero-initialised, so a fresh module ignores the audio.
The reference reshapes tokens by sqrt(h*w) for the 1x1 convs; a 1x1 conv is per-pixel, so here the real (h, w)
is used and non-square maps work too.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from mmgt.attention import AttnProcessor
from mmgt.config import MASK_BRANCHES


def _zero_conv(dim: int) -> nn.Conv2d:
    conv = nn.Conv2d(dim, dim, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class AudioTransformerBlock(nn.Module):
    """``transformer_blocks.0`` of an MM-HAA module: self-attn, three masked audio cross-attns, FF."""

    def __init__(self, dim: int, heads: int, audio_dim: int, branch_weights: Sequence[float] = (1.0, 1.0, 2.0),
                 backend: str = "sdpa"):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"mmgt.mmhaa: inner width {dim} does not split into {heads} heads")
        if len(branch_weights) != 3:
            raise ValueError(f"mmgt.mmhaa: need 3 branch weights (full, face, lip), got {tuple(branch_weights)}")
        self.branch_weights = tuple(float(w) for w in branch_weights)
        # Registration order as in the reference (keys are what matter; order only affects listing).
        self.zero_conv_full = _zero_conv(dim)
        self.zero_conv_face = _zero_conv(dim)
        self.zero_conv_lip = _zero_conv(dim)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False,
                               processor=AttnProcessor(backend))
        self.norm1 = nn.LayerNorm(dim)
        self.attn2_0 = Attention(query_dim=dim, cross_attention_dim=audio_dim, heads=heads, dim_head=dim // heads,
                                 bias=False, processor=AttnProcessor(backend))
        self.attn2_1 = Attention(query_dim=dim, cross_attention_dim=audio_dim, heads=heads, dim_head=dim // heads,
                                 bias=False, processor=AttnProcessor(backend))
        self.attn2_2 = Attention(query_dim=dim, cross_attention_dim=audio_dim, heads=heads, dim_head=dim // heads,
                                 bias=False, processor=AttnProcessor(backend))
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor, audio_tokens: torch.Tensor, mask: torch.Tensor,
                height: int, width: int) -> torch.Tensor:
        rows, tokens, dim = hidden_states.shape  # (B*F, h*w, d)
        # 1. Self-attention over the frame's pixels
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        # 2. Three cross-attentions to this frame's audio tokens, each gated by its mask and its 1x1 conv
        normed = self.norm2(hidden_states)
        branches = ((self.attn2_0, self.zero_conv_full), (self.attn2_1, self.zero_conv_face),
                    (self.attn2_2, self.zero_conv_lip))
        audio_sum = None
        for b, ((attn, conv), weight) in enumerate(zip(branches, self.branch_weights)):
            gated = attn(normed, encoder_hidden_states=audio_tokens) * mask[:, b].unsqueeze(-1)  # (B*F, hw, d)
            gated = gated.reshape(rows, height, width, dim).permute(0, 3, 1, 2)  # (B*F, d, h, w)
            gated = conv(gated).permute(0, 2, 3, 1).reshape(rows, tokens, dim)  # (B*F, hw, d)
            audio_sum = weight * gated if audio_sum is None else audio_sum + weight * gated
        out = audio_sum + hidden_states  # same summation order as the reference
        # 3. Feed-forward
        return self.ff(self.norm3(out)) + out


class MMHAA(nn.Module):
    """One MM-HAA module (``audio_modules.N``): GroupNorm, 1x1 proj_in C -> d, the audio block, 1x1 proj_out.

    forward(hidden (B*F, C, h, w), audio_tokens (B*F, T, audio_dim), mask (B*F, 3, h*w): the full, face and lip
    masks of this level on the branch axis, MASK_BRANCHES order) -> (B*F, C, h, w).
    """

    def __init__(self, channels: int, inner_dim: int, heads: int, audio_dim: int, norm_groups: int,
                 branch_weights: Sequence[float] = (1.0, 1.0, 2.0), backend: str = "sdpa"):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups=norm_groups, num_channels=channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [AudioTransformerBlock(inner_dim, heads, audio_dim, branch_weights, backend)])
        self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor, audio_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, channels, height, width = hidden_states.shape  # (B*F, C, h, w)
        if audio_tokens.ndim != 3 or audio_tokens.shape[0] != rows:
            raise ValueError(f"mmgt.mmhaa: audio tokens must be (B*F={rows}, tokens, dim), "
                             f"got {tuple(audio_tokens.shape)}")
        if tuple(mask.shape) != (rows, len(MASK_BRANCHES), height * width):
            raise ValueError(f"mmgt.mmhaa: mask must be (B*F={rows}, {len(MASK_BRANCHES)} branches "
                             f"{'/'.join(MASK_BRANCHES)}, h*w={height * width}) at this level, got {tuple(mask.shape)}")
        mask = mask.to(hidden_states.dtype)
        residual = hidden_states
        x = self.proj_in(self.norm(hidden_states))  # (B*F, d, h, w); GroupNorm per frame
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(rows, height * width, inner)  # (B*F, hw, d)
        for block in self.transformer_blocks:
            x = block(x, audio_tokens, mask, height, width)  # (B*F, hw, d)
        x = x.reshape(rows, height, width, inner).permute(0, 3, 1, 2)  # (B*F, d, h, w)
        return self.proj_out(x) + residual


def audio_module_dims(block_out_channels: Sequence[int], block: int,
                      layers_per_block: int) -> Tuple[Tuple[int, int], ...]:
    """(channels, inner_dim) of each MM-HAA module in down block ``block`` (the reference's inner-width quirk)."""
    out_ch = block_out_channels[block]
    in_ch = block_out_channels[max(block - 1, 0)]
    return tuple((out_ch, in_ch if j == 0 else out_ch) for j in range(layers_per_block))


__all__ = ["AudioTransformerBlock", "MMHAA", "audio_module_dims"]
