"""Stage I of MMGT: SMGA, the split face/body FiLM transformer, and its pose diffusion (MMGT_SPEC.md section 2).

SMGA is EDGE's FiLM transformer diffusion (Tseng et al., "EDGE") with the decoder split into a face stream and a
body stream. It predicts x0 (an 80-frame pose window in SMGA space, (W, 402)) from a noisy window x_t, the diffusion
time, the initial pose (the reference image's pose, or the last frame of the previous window) and the per-frame audio
condition (WavLM + librosa features).

Layout of the module (state-dict keys are the release's, so a release checkpoint loads strictly):

    rotary                      one RotaryEmbedding buffer `freqs` [latent/2], shared by every attention layer
                                (it appears again as cond_encoder.{i}.rotary.freqs and seqTransDecoder.stack.{i}...)
    time_mlp.1                  sinusoidal(latent) -> Linear(latent -> 4 latent) -> Mish
    to_time_cond.0              Linear(4 latent -> latent): FiLM vector (+ cond_hidden)
    to_time_tokens.0            Linear(4 latent -> 2 latent): 2 time tokens of the cross-attention memory
    null_cond_embed/_hidden     learned null condition for classifier-free guidance
    input_projection            Linear(804 -> latent), shared by both streams
    cond_projection             Linear(audio_dim -> latent) -> cond_encoder.{i} (pre-norm encoder layers, rotary q/k)
    non_attn_cond_projection    LayerNorm, Linear, SiLU, Linear on the mean-pooled cond tokens -> cond_hidden
    norm_cond                   LayerNorm over the memory cat(cond tokens, time tokens)
    seqTransDecoder.stack.{i}   split FiLM decoder layers
    final_layer                 Linear(latent -> 402) = predicted x0

What the reference does and this file keeps (it is what the released weights were trained in):
    * rotary is applied to the full latent-width vectors BEFORE the attention's in-projection (lucidrains' layout:
      interleaved pairs, positions 0..N-1 along the sequence); cross-attention rotates the queries and the memory
      keys (memory positions 0..81), never the values.
    * decoder and cond-encoder layers are pre-norm; FiLM is (scale + 1) * y + shift applied to the sub-block output
      before its residual add.
    * the merged face + body output feeds the next layer's face stream; the body stream re-reads the layer-0 body
      input at every layer.
    * `self_attn`, `norm_*_3`, `film_*_3` exist in the checkpoint but are never used.

Attention math is F.scaled_dot_product_attention (export friendly) under nn.MultiheadAttention's parameter names;
tests check it equals nn.MultiheadAttention numerically.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MMGTConfig, POSE_DIM, SMGAConfig
from .seeding import seeded
from .keypoints import FACE_STREAM

logger = logging.getLogger(__name__)

__all__ = [
    "RotaryEmbedding", "RotaryMultiheadAttention", "DenseFiLM", "CondEncoderLayer", "SplitFiLMDecoderLayer",
    "DecoderLayerStack", "SMGA", "SMGADiffusion", "cosine_betas", "ddim_time_pairs", "stream_masks",
    "split_streams", "continue_from", "crossfade", "build_smga", "release_state_dict", "SMGACondition",
    "SMGADenoise", "smga_contracts",
]


# ---------------------------------------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    """Rotary position embedding (lucidrains' rotary_embedding_torch, freqs_for="lang", theta 10000).

    `freqs` [dim/2] = 1 / 10000^(arange(0, dim, 2) / dim) is a persistent buffer because the release saves it.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"smga.RotaryEmbedding: dim must be even, got {dim}")
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))  # (dim/2,)
        self.register_buffer("freqs", freqs)

    def rotate_queries_or_keys(self, x: Tensor) -> Tensor:
        """Rotate (..., N, dim) by positions 0..N-1 along dim -2 (pairs (2i, 2i+1) share frequency i)."""
        n = x.shape[-2]
        pos = torch.arange(n, device=x.device, dtype=self.freqs.dtype)  # (N,)
        angles = pos[:, None] * self.freqs[None, :]  # (N, dim/2)
        angles = angles.repeat_interleave(2, dim=-1)  # (N, dim): [f0, f0, f1, f1, ...]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        # interleaved rotate_half: (x0, x1) -> (-x1, x0) for every pair
        pairs = x.unflatten(-1, (-1, 2))  # (..., N, dim/2, 2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (..., N, dim)
        return x * cos + rotated * sin


class RotaryMultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj) with SDPA math, batch-first.

    forward(query, key, value) takes the already-rotated query/key inputs, as the reference passes them to
    nn.MultiheadAttention; the rotation itself is done by the caller.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"smga attention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # same initialisation as nn.MultiheadAttention
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        b, n, d = query.shape
        h = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3, dim=0)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3, dim=0)
        q = F.linear(query, w_q, b_q).unflatten(-1, (h, d // h)).transpose(1, 2)  # (B, H, N, d/H)
        k = F.linear(key, w_k, b_k).unflatten(-1, (h, d // h)).transpose(1, 2)  # (B, H, M, d/H)
        v = F.linear(value, w_v, b_v).unflatten(-1, (h, d // h)).transpose(1, 2)  # (B, H, M, d/H)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, N, d/H)
        return self.out_proj(out.transpose(1, 2).flatten(-2))  # (B, N, d)


class DenseFiLM(nn.Module):
    """FiLM generator: Mish -> Linear(d -> 2d) -> (scale, shift), each (B, 1, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(nn.Mish(), nn.Linear(dim, 2 * dim))

    def forward(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        scale_shift = self.block(t)[:, None, :]  # (B, 1, 2d)
        scale, shift = scale_shift.chunk(2, dim=-1)
        return scale, shift


def featurewise_affine(x: Tensor, scale_shift: Tuple[Tensor, Tensor]) -> Tensor:
    """FiLM: (scale + 1) * x + shift."""
    scale, shift = scale_shift
    return (scale + 1) * x + shift


class CondEncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer over the audio tokens; rotary q/k; GELU feed-forward."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = RotaryMultiheadAttention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.rotary = rotary  # shared module: its buffer is saved under this layer's name too

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)  # (B, W, D)
        qk = self.rotary.rotate_queries_or_keys(h)
        x = x + self.dropout1(self.self_attn(qk, qk, h))
        h = self.norm2(x)
        x = x + self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(h)))))
        return x  # (B, W, D)


class SplitFiLMDecoderLayer(nn.Module):
    """One SMGA decoder layer: face and body streams (self-attn + cross-attn, FiLM-modulated), merged FF.

    Unused in the reference forward but saved in the release: self_attn, norm_{face,body}_3, film_{face,body}_3.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, rotary: RotaryEmbedding):
        super().__init__()
        self.face_self_attn = RotaryMultiheadAttention(dim, heads, dropout)
        self.face_cross_attn = RotaryMultiheadAttention(dim, heads, dropout)
        self.body_self_attn = RotaryMultiheadAttention(dim, heads, dropout)
        self.body_cross_attn = RotaryMultiheadAttention(dim, heads, dropout)
        self.self_attn = RotaryMultiheadAttention(dim, heads, dropout)  # unused (release key)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm_face_1 = nn.LayerNorm(dim)
        self.norm_face_2 = nn.LayerNorm(dim)
        self.norm_face_3 = nn.LayerNorm(dim)  # unused (release key)
        self.norm_body_1 = nn.LayerNorm(dim)
        self.norm_body_2 = nn.LayerNorm(dim)
        self.norm_body_3 = nn.LayerNorm(dim)  # unused (release key)
        self.norm_final = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.film_face_1 = DenseFiLM(dim)
        self.film_face_2 = DenseFiLM(dim)
        self.film_face_3 = DenseFiLM(dim)  # unused (release key)
        self.film_body_1 = DenseFiLM(dim)
        self.film_body_2 = DenseFiLM(dim)
        self.film_body_3 = DenseFiLM(dim)  # unused (release key)
        self.film_final = DenseFiLM(dim)
        self.rotary = rotary

    def _stream(self, x: Tensor, self_attn: RotaryMultiheadAttention, cross_attn: RotaryMultiheadAttention,
                norm1: nn.LayerNorm, norm2: nn.LayerNorm, film1: DenseFiLM, film2: DenseFiLM,
                memory: Tensor, t: Tensor) -> Tensor:
        # 1. self-attention (rotary q/k) -> FiLM -> residual
        h = norm1(x)  # (B, W, D)
        qk = self.rotary.rotate_queries_or_keys(h)
        x = x + featurewise_affine(self.dropout1(self_attn(qk, qk, h)), film1(t))
        # 2. cross-attention to the memory (rotary on queries and memory keys) -> FiLM -> residual
        h = norm2(x)
        q = self.rotary.rotate_queries_or_keys(h)
        k = self.rotary.rotate_queries_or_keys(memory)  # (B, W + 2, D)
        x = x + featurewise_affine(self.dropout2(cross_attn(q, k, memory)), film2(t))
        return x  # (B, W, D)

    def forward(self, x_face: Tensor, x_body: Tensor, memory: Tensor, t: Tensor) -> Tensor:
        face = self._stream(x_face, self.face_self_attn, self.face_cross_attn, self.norm_face_1,
                            self.norm_face_2, self.film_face_1, self.film_face_2, memory, t)  # (B, W, D)
        body = self._stream(x_body, self.body_self_attn, self.body_cross_attn, self.norm_body_1,
                            self.norm_body_2, self.film_body_1, self.film_body_2, memory, t)  # (B, W, D)
        merged = face + body
        ff = self.dropout3(self.linear2(self.dropout(F.gelu(self.linear1(self.norm_final(merged))))))
        return merged + featurewise_affine(ff, self.film_final(t))  # (B, W, D)


class DecoderLayerStack(nn.Module):
    """The merged output becomes the next face input; every layer re-reads the layer-0 body input."""

    def __init__(self, stack: nn.ModuleList):
        super().__init__()
        self.stack = stack

    def forward(self, x_face: Tensor, x_body: Tensor, memory: Tensor, t: Tensor) -> Tensor:
        for layer in self.stack:
            x_face = layer(x_face, x_body, memory, t)
        return x_face


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """EDGE's SinusoidalPosEmb: cat(sin, cos) of t * exp(-log(10000) * i / (dim/2 - 1)), (B,) -> (B, dim)."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device) * -scale)  # (dim/2,)
    args = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat((args.sin(), args.cos()), dim=-1)  # (B, dim)


class _Sinusoidal(nn.Module):
    """time_mlp.0: parameter-free sinusoidal embedding (kept as a module so time_mlp's indices match)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        return sinusoidal_embedding(t, self.dim)


# ---------------------------------------------------------------------------------------------------------------
# Stream masking
# ---------------------------------------------------------------------------------------------------------------

def stream_masks() -> Tuple[np.ndarray, np.ndarray]:
    """(face, body) float32 masks over the 402 SMGA values: 1 where the stream keeps the value (all 3 per point)."""
    face = np.repeat(FACE_STREAM.astype(np.float32), 3)  # (402,): keypoints 24-91 -> values 72..275
    return face, 1.0 - face


def split_streams(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(..., 402) -> (face, body): each with the other stream's keypoints zeroed (x, y and score)."""
    if x.shape[-1] != POSE_DIM:
        raise ValueError(f"smga.split_streams: expected last dim {POSE_DIM}, got shape {tuple(x.shape)}")
    face, body = stream_masks()
    face_m = torch.as_tensor(face, dtype=x.dtype, device=x.device)  # (402,)
    body_m = torch.as_tensor(body, dtype=x.dtype, device=x.device)
    return x * face_m, x * body_m


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------

def _single_pass(guidance: Union[float, Tensor]) -> bool:
    """guidance == 1 needs only the conditional pass; a tensor weight is an input whose value is not known here."""
    return not isinstance(guidance, Tensor) and guidance == 1.0


class SMGA(nn.Module):
    """SMGA GestureDecoder: (x_t, t, init_pose, audio cond) -> predicted x0, all (B, W, 402) in SMGA space."""

    def __init__(self, cfg: SMGAConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.latent_dim
        if d % 2 or d % cfg.num_heads:
            raise ValueError(f"smga: latent_dim {d} must be even and divisible by num_heads {cfg.num_heads}")

        # one rotary buffer, registered here and again under every layer that uses it (as the release saves it)
        self.rotary = RotaryEmbedding(d)
        self.time_mlp = nn.Sequential(_Sinusoidal(d), nn.Linear(d, cfg.time_hidden), nn.Mish())
        self.to_time_cond = nn.Sequential(nn.Linear(cfg.time_hidden, d))
        self.to_time_tokens = nn.Sequential(nn.Linear(cfg.time_hidden, cfg.time_tokens * d))
        self.null_cond_embed = nn.Parameter(torch.randn(1, cfg.window, d))
        self.null_cond_hidden = nn.Parameter(torch.randn(1, d))
        self.norm_cond = nn.LayerNorm(d)
        self.input_projection = nn.Linear(2 * POSE_DIM, d)
        self.cond_encoder = nn.Sequential(*[
            CondEncoderLayer(d, cfg.num_heads, cfg.ff_dim, cfg.dropout, self.rotary) for _ in range(cfg.cond_layers)
        ])
        self.cond_projection = nn.Linear(cfg.audio_dim, d)
        self.non_attn_cond_projection = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.seqTransDecoder = DecoderLayerStack(nn.ModuleList([
            SplitFiLMDecoderLayer(d, cfg.num_heads, cfg.ff_dim, cfg.dropout, self.rotary)
            for _ in range(cfg.num_layers)
        ]))
        self.final_layer = nn.Linear(d, POSE_DIM)

        face, body = stream_masks()
        # not persistent: the release has no such keys and strict loading must see exactly its 473
        self.register_buffer("face_mask", torch.from_numpy(face), persistent=False)  # (402,)
        self.register_buffer("body_mask", torch.from_numpy(body), persistent=False)  # (402,)

    # -- pieces, public so the runtime/export can cache or split them ----------------------------------------

    def stream_inputs(self, x_t: Tensor, init_pose: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, W, 402), (B, 402) -> face and body stream inputs (B, W, 804) before input_projection."""
        w = x_t.shape[1]
        face_m, body_m = self.face_mask.to(x_t.dtype), self.body_mask.to(x_t.dtype)
        pose = init_pose[:, None, :].expand(-1, w, -1)  # (B, W, 402): the initial pose on every frame
        face_in = torch.cat([x_t * face_m, pose * face_m], dim=-1)  # (B, W, 804)
        body_in = torch.cat([x_t * body_m, pose * body_m], dim=-1)  # (B, W, 804)
        return face_in, body_in

    def encode_condition(self, cond: Optional[Tensor], batch: int) -> Tuple[Tensor, Tensor]:
        """Audio (B, W, audio_dim) -> (cond tokens (B, W, D), cond_hidden (B, D)); None -> the null condition."""
        if cond is None:
            tokens = self.null_cond_embed.expand(batch, -1, -1)  # (B, W, D)
            hidden = self.null_cond_hidden.expand(batch, -1)  # (B, D)
            return tokens, hidden
        if cond.ndim != 3 or cond.shape[-1] != self.cfg.audio_dim:
            raise ValueError(f"smga: audio condition must be (B, W, {self.cfg.audio_dim}), got {tuple(cond.shape)}")
        tokens = self.cond_encoder(self.cond_projection(cond))  # (B, W, D)
        hidden = self.non_attn_cond_projection(tokens.mean(dim=-2))  # (B, D)
        return tokens, hidden

    def denoise(self, x_t: Tensor, t: Tensor, init_pose: Tensor, cond_tokens: Tensor, cond_hidden: Tensor) -> Tensor:
        """The decoder given an encoded condition: -> predicted x0 (B, W, 402)."""
        # 1. two streams through the shared input projection
        face_in, body_in = self.stream_inputs(x_t, init_pose)
        x_face = self.input_projection(face_in)  # (B, W, D)
        x_body = self.input_projection(body_in)  # (B, W, D)
        # 2. time: FiLM vector (+ cond_hidden) and 2 memory tokens
        emb = self.time_mlp[0](t).to(self.time_mlp[1].weight.dtype)  # (B, D): angles in fp32, then the model dtype
        t_hidden = self.time_mlp[2](self.time_mlp[1](emb))  # (B, 4D)
        film = self.to_time_cond(t_hidden) + cond_hidden  # (B, D)
        t_tokens = self.to_time_tokens(t_hidden).unflatten(-1, (self.cfg.time_tokens, -1))  # (B, 2, D)
        # 3. cross-attention memory
        memory = self.norm_cond(torch.cat([cond_tokens, t_tokens.to(cond_tokens.dtype)], dim=-2))  # (B, W+2, D)
        # 4. decoder and output head
        out = self.seqTransDecoder(x_face, x_body, memory, film)  # (B, W, D)
        return self.final_layer(out)  # (B, W, 402)

    def _check_inputs(self, x_t: Tensor, t: Tensor, init_pose: Tensor, cond: Optional[Tensor]) -> None:
        if x_t.ndim != 3 or x_t.shape[-1] != POSE_DIM:
            raise ValueError(f"smga: x_t must be (B, W, {POSE_DIM}), got {tuple(x_t.shape)}")
        b, w = x_t.shape[:2]
        if init_pose.shape != (b, POSE_DIM):
            raise ValueError(f"smga: init_pose must be ({b}, {POSE_DIM}), got {tuple(init_pose.shape)}")
        if t.shape != (b,):
            raise ValueError(f"smga: t must be ({b},), got {tuple(t.shape)}")
        if cond is None and w != self.null_cond_embed.shape[1]:
            raise ValueError(f"smga: the null condition has {self.null_cond_embed.shape[1]} tokens; x_t has {w} frames")
        if cond is not None and cond.shape[:2] != (b, w):
            raise ValueError(f"smga: audio condition {tuple(cond.shape)} does not match x_t {tuple(x_t.shape)}")

    def forward(self, x_t: Tensor, t: Tensor, init_pose: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """x_t (B, W, 402), t (B,), init_pose (B, 402), cond (B, W, audio_dim) or None -> x0 (B, W, 402)."""
        self._check_inputs(x_t, t, init_pose, cond)
        tokens, hidden = self.encode_condition(cond, x_t.shape[0])
        return self.denoise(x_t, t, init_pose, tokens, hidden)

    def guided_condition(self, cond: Tensor, batch: int, guidance: Union[float, Tensor]) -> Tuple[Tensor, Tensor]:
        """The encoded condition ``guided_denoise`` takes: (tokens, hidden) of the audio, and under guidance != 1
        the null condition's stacked after them ((2B, W, D), (2B, D)). It does not depend on x_t or t, so a sampler
        encodes it once per window instead of once per step."""
        tok_c, hid_c = self.encode_condition(cond, batch)  # (B, W, D), (B, D)
        if _single_pass(guidance):
            return tok_c, hid_c
        tok_u, hid_u = self.encode_condition(None, batch)
        return torch.cat([tok_c, tok_u.to(tok_c.dtype)]), torch.cat([hid_c, hid_u.to(hid_c.dtype)])

    def guided_denoise(self, x_t: Tensor, t: Tensor, init_pose: Tensor, cond_tokens: Tensor, cond_hidden: Tensor,
                       guidance: Union[float, Tensor]) -> Tensor:
        """Classifier-free guidance on an encoded condition (``guided_condition``): uncond + (cond - uncond) *
        guidance, both halves in ONE decoder pass; guidance == 1 is the conditional prediction alone. A tensor
        guidance (an exported graph's input, broadcastable to (B, W, 402)) always takes the two-half pass. Fixed
        shapes and no host syncs: the engine replays this as a CUDA graph."""
        if _single_pass(guidance):
            return self.denoise(x_t, t, init_pose, cond_tokens, cond_hidden)  # (B, W, 402)
        b = x_t.shape[0]
        out = self.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([init_pose, init_pose]),
                           cond_tokens, cond_hidden)  # (2B, W, 402)
        conditioned, uncond = out[:b], out[b:]  # (B, W, 402) each
        return uncond + (conditioned - uncond) * guidance

    def guided_forward(self, x_t: Tensor, t: Tensor, init_pose: Tensor, cond: Tensor,
                       guidance: Union[float, Tensor]) -> Tensor:
        """Classifier-free guidance from the raw audio condition (one step as exported): encode, then
        ``guided_denoise``."""
        self._check_inputs(x_t, t, init_pose, cond)
        tokens, hidden = self.guided_condition(cond, x_t.shape[0], guidance)
        return self.guided_denoise(x_t, t, init_pose, tokens, hidden, guidance)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion: cosine schedule and DDIM sampling (x0 prediction)
# ---------------------------------------------------------------------------------------------------------------

def cosine_betas(steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule betas (float64, as EDGE computes them): f(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    ts = torch.arange(steps + 1, dtype=torch.float64) / steps + s  # (T+1,)
    f = torch.cos(ts / (1 + s) * math.pi / 2).pow(2)
    f = f / f[0]
    return (1 - f[1:] / f[:-1]).clamp(0.0, max_beta)  # (T,)


def ddim_time_pairs(steps: int, total: int = 1000) -> List[Tuple[int, int]]:
    """EDGE's DDIM times: linspace(-1, T-1, steps+1) truncated to int, reversed, as (t, t_next) pairs."""
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= total:
        raise ValueError(f"smga.ddim_time_pairs: steps must be an int in 1..{total}, got {steps!r}")
    times = torch.linspace(-1, total - 1, steps=int(steps) + 1).int().tolist()  # float32 linspace, as the reference
    times = list(reversed(times))
    return list(zip(times[:-1], times[1:]))


class SMGADiffusion:
    """The pose diffusion of SMGA: cosine schedule (float32 tables like the reference) and DDIM sampling."""

    def __init__(self, cfg: SMGAConfig):
        self.cfg = cfg
        self.num_timesteps = cfg.diffusion_steps
        betas = cosine_betas(cfg.diffusion_steps, cfg.cosine_s).float()  # the reference stores float32
        self.betas = betas  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1)

    def predict_noise_from_start(self, x_t: Tensor, t: int, x0: Tensor) -> Tensor:
        """eps = (sqrt(1/a_t) x_t - x0) / sqrt(1/a_t - 1)."""
        return (self.sqrt_recip_alphas_cumprod[t] * x_t - x0) / self.sqrt_recipm1_alphas_cumprod[t]

    def ddim_step(self, x_t: Tensor, x0: Tensor, t: int, t_next: int, eta: float,
                  noise: Optional[Tensor]) -> Tensor:
        """One DDIM update from time t to t_next >= 0 given the (clamped) x0 prediction."""
        eps = self.predict_noise_from_start(x_t, t, x0)
        alpha, alpha_next = self.alphas_cumprod[t], self.alphas_cumprod[t_next]
        sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
        # analytically >= 0; clamp so float32 rounding can never give a NaN
        c = (1 - alpha_next - sigma ** 2).clamp_min(0).sqrt()
        x = x0 * alpha_next.sqrt() + c * eps
        if noise is not None:
            x = x + sigma * noise
        return x

    @torch.no_grad()
    def sample(self, model: SMGA, cond: Tensor, init_pose: Tensor, steps: Optional[int] = None,
               guidance: Optional[float] = None, eta: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """DDIM sampling of one window with ``model``: cond (B, W, audio_dim), init_pose (B, 402) -> (B, W, 402).

        The audio condition is encoded once per window (``guided_condition``), then ``sample_encoded`` runs the
        steps with ``guided_denoise``. The engine calls ``sample_encoded`` with its own (named, backend) calls.
        """
        guidance = self.cfg.guidance if guidance is None else float(guidance)
        if cond.ndim != 3:
            raise ValueError(f"smga.sample: cond must be (B, W, audio_dim), got {tuple(cond.shape)}")
        b, w = cond.shape[:2]
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        cond = cond.to(device, dtype)
        init_pose = init_pose.to(device, dtype)
        model._check_inputs(torch.zeros(b, w, POSE_DIM, dtype=dtype, device=device),
                            torch.zeros(b, dtype=torch.long, device=device), init_pose, cond)
        tokens, hidden = model.guided_condition(cond, b, guidance)  # (B or 2B, W, D), (B or 2B, D): once per window

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            return model.guided_denoise(x.to(dtype), t, init_pose, tokens, hidden, guidance)

        return self.sample_encoded(denoise, b, w, device, steps=steps, eta=eta, generator=generator)

    @torch.no_grad()
    def sample_encoded(self, denoise: Callable[[Tensor, Tensor], Tensor], batch: int, window: int, device,
                       steps: Optional[int] = None, eta: Optional[float] = None,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """The DDIM loop: ``denoise(x_t (B, W, 402) float32, t (B,) long) -> x0`` per step -> (B, W, 402) in [-1, 1].

        ``denoise`` holds the encoded condition and the guidance (a closure over a model or over named calls).
        Noise draws follow the reference order (x_T, then one draw per step except the last), so a generator seeded
        like the reference's global RNG reproduces its samples.
        """
        steps = self.cfg.sample_steps if steps is None else steps
        eta = self.cfg.eta if eta is None else float(eta)
        pairs = ddim_time_pairs(steps, self.num_timesteps)

        def randn() -> Tensor:  # on the generator's device so a CPU generator works for any model device
            g_device = generator.device if generator is not None else device
            return torch.randn((batch, window, POSE_DIM), generator=generator, device=g_device).to(device)

        x = randn()  # (B, W, 402) float32
        for t, t_next in pairs:
            time = torch.full((batch,), t, device=device, dtype=torch.long)
            x0 = denoise(x, time).float().clamp(-1.0, 1.0)  # (B, W, 402)
            if t_next < 0:
                x = x0
                continue
            noise = randn() if eta > 0 else None
            x = self.ddim_step(x, x0, t, t_next, eta, noise)
        logger.debug("smga: sampled %d window(s) of %d frames with %d DDIM steps, eta %.2f", batch, window, steps, eta)
        return x

    def to(self, device: Union[str, torch.device]) -> "SMGADiffusion":
        """Move the schedule tables (float32) to a device."""
        for name in ("betas", "alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
            setattr(self, name, getattr(self, name).to(device))
        return self


# ---------------------------------------------------------------------------------------------------------------
# Window continuation
# ---------------------------------------------------------------------------------------------------------------

ArrayLike = Union[np.ndarray, Tensor]


def continue_from(prev_window: ArrayLike) -> ArrayLike:
    """Init pose of the next window = the LAST frame (W-1) of the previous one (spec Decision: not frame 59).

    (W, 402) -> (402,); (B, W, 402) -> (B, 402). numpy in, numpy out; tensor in, tensor out.
    """
    if prev_window.ndim not in (2, 3) or prev_window.shape[-1] != POSE_DIM or prev_window.shape[-2] < 1:
        raise ValueError(f"smga.continue_from: expected (W, {POSE_DIM}) or (B, W, {POSE_DIM}), "
                         f"got {tuple(prev_window.shape)}")
    return prev_window[..., -1, :]


def crossfade(prev_tail: ArrayLike, next_head: ArrayLike) -> ArrayLike:
    """Linear blend over an n-frame seam: frame i = (1 - w_i) prev_tail[i] + w_i next_head[i], w_i = (i+1)/(n+1).

    The weights stay strictly inside (0, 1) so the seam moves away from the previous window and towards the next
    one without repeating either end frame; n = 1 is the plain average. Shapes (n, 402) or (B, n, 402).
    """
    if prev_tail.shape != next_head.shape or prev_tail.ndim not in (2, 3) or prev_tail.shape[-1] != POSE_DIM:
        raise ValueError(f"smga.crossfade: expected two equal (n, {POSE_DIM}) arrays, got "
                         f"{tuple(prev_tail.shape)} and {tuple(next_head.shape)}")
    n = prev_tail.shape[-2]
    w = (np.arange(n, dtype=np.float32) + 1) / (n + 1)  # (n,)
    if isinstance(prev_tail, Tensor):
        w = torch.from_numpy(w).to(prev_tail.device, prev_tail.dtype)
    else:
        w = w.astype(prev_tail.dtype, copy=False) if np.issubdtype(prev_tail.dtype, np.floating) else w
    w = w[:, None]  # (n, 1)
    return prev_tail * (1 - w) + next_head * w


# ---------------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------------

def build_smga(cfg: Union[SMGAConfig, MMGTConfig], seed: Optional[int] = None) -> SMGA:
    """An eval-mode SMGA with deterministic random weights (seed None: MMGTConfig.seed, or 0 for an SMGAConfig).

    The global RNG state is left untouched.
    """
    if isinstance(cfg, MMGTConfig):
        seed = cfg.seed if seed is None else seed
        cfg = cfg.smga
    seed = 0 if seed is None else seed
    with seeded(seed):
        model = SMGA(cfg)
    return model.eval()


def release_state_dict(model: SMGA) -> dict:
    """The release's `ema_state_dict` layout: the module's own keys already are the release names."""
    return model.state_dict()


# ---------------------------------------------------------------------------------------------------------------
# Contracts: the condition encoder (once per window) and one guided decoder step
# ---------------------------------------------------------------------------------------------------------------

class SMGACondition(nn.Module):
    """Contract call: audio condition (1, W, audio_dim) -> encoded tokens (Bs, W, D) and hidden (Bs, D); with
    guidance (Bs = 2) the null condition's row follows the audio's (what ``guided_denoise`` takes)."""

    def __init__(self, smga: SMGA, batch: int):
        super().__init__()
        self.smga, self.batch = smga, batch

    def forward(self, cond: Tensor) -> Tuple[Tensor, Tensor]:
        tokens, hidden = self.smga.encode_condition(cond, cond.shape[0])  # (1, W, D), (1, D)
        if self.batch == 1:
            return tokens, hidden
        null_tokens, null_hidden = self.smga.encode_condition(None, cond.shape[0])
        return torch.cat([tokens, null_tokens.to(tokens.dtype)]), torch.cat([hidden, null_hidden.to(hidden.dtype)])


class SMGADenoise(nn.Module):
    """Contract call: one decoder step on an encoded condition: (x_t, t, init_pose, tokens, hidden[, guidance]) -> x0.
    With the null row (guidance as an input, (1,)) both halves run in one pass: uncond + (cond - uncond) * guidance."""

    def __init__(self, smga: SMGA):
        super().__init__()
        self.smga = smga

    def forward(self, x_t: Tensor, t: Tensor, init_pose: Tensor, tokens: Tensor, hidden: Tensor,
                guidance: Optional[Tensor] = None) -> Tensor:
        weight = 1.0 if guidance is None else guidance.reshape(-1, 1, 1)
        return self.smga.guided_denoise(x_t, t, init_pose, tokens, hidden, weight)  # (1, W, 402)


def smga_contracts(cfg: MMGTConfig, shapes) -> Tuple:
    """smga_condition and smga_denoise for these shapes; () when the window cannot hold the null condition.

    Both export with the dynamo exporter: the TorchScript exporter mis-infers the rank of the rotary embedding's
    output (``x * cos + rotate(x) * sin`` after ``unflatten``) and fails or writes a graph onnxruntime rejects.
    """
    from .contract import Contract, tensor

    s, w, bs = cfg.smga, shapes.smga_window, shapes.smga_batch
    if bs == 2 and w != s.window:
        return ()  # the learned null condition has cfg.window tokens (contract_notes says so)
    common = dict(weights=("smga",), config_sections=("smga",), shape_fields=("smga_window", "smga_batch"),
                  exporter="dynamo", allow_fp16=False, version=2)
    encoded = (tensor("tokens", (bs, w, s.latent_dim), dtype="float32"),
               tensor("hidden", (bs, s.latent_dim), dtype="float32"))
    condition = Contract(
        "smga_condition", "SMGA condition encoder: audio condition -> encoded tokens (+ the null row under guidance)",
        inputs=(tensor("cond", (1, w, s.audio_dim), dtype="float32"),), outputs=encoded,
        module=lambda m: SMGACondition(m.smga, bs), **common)
    denoise = Contract(
        "smga_denoise", "SMGA decoder step on the encoded condition (x0 prediction, guided in one pass)",
        inputs=(tensor("x_t", (1, w, POSE_DIM), dtype="float32"), tensor("t", (1,), 0, 999, "float32"),
                tensor("init_pose", (1, POSE_DIM), -1, 1, "float32")) + encoded
        + ((tensor("guidance", (1,), 2, 2, "float32"),) if bs == 2 else ()),
        outputs=(tensor("x0", (1, w, POSE_DIM), dtype="float32"),),
        module=lambda m: SMGADenoise(m.smga), **common)
    return condition, denoise
