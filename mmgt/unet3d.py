"""The denoising UNet3D: SD1.5 inflated over frames, with AnimateDiff motion modules and MM-HAA audio modules.

Frames are folded into the batch (B*F, C, h, w), sample-major, for everything that is per frame in the reference
(convs, group norms, spatial attention, audio attention); only the motion modules mix frames. Blocks
(names = release keys, stripped of ``denoising_unet.``):

    conv_in (+ pose features) -> down_blocks.0-2 (CrossAttnDown) + down_blocks.3 (Down) -> mid_block
    -> up_blocks.0 (Up) + up_blocks.1-3 (CrossAttnUp) -> conv_norm_out, SiLU, conv_out

Per layer of a block: resnet -> spatial transformer (self-attn whose keys/values also hold the ReferenceNet bank,
cross-attn to the CLIP context) -> MM-HAA audio module (down blocks in ``audio_blocks`` only) -> motion module.
The mid block runs resnet, then (transformer -> motion module -> resnet) per layer, as the reference does.

Stateless: the bank, masks, audio tokens and CFG layout are arguments of ``forward``; each transformer block gets
its bank entry as a per-call attention argument (``cross_attention_kwargs={"reference": ReferenceRead(...)}``,
mmgt.attention). Any number of threads may call one UNet3D at once, each with its own avatar.

Building blocks come from diffusers where their key names are the release's: ResnetBlock2D, Transformer2DModel
(BasicTransformerBlock), Downsample2D, Upsample2D, Timesteps, TimestepEmbedding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from mmgt.attention import ReferenceRead, ReferenceReadProcessor, check_backend, set_attention_backend
from mmgt.config import MASK_BRANCHES, MMGTConfig, UNetConfig
from mmgt.contract import Contract, Shapes, tensor
from mmgt.mmhaa import MMHAA, audio_module_dims
from mmgt.motion_module import MotionModule

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Layout helpers: which resolution each block runs at, which mask level it reads, which bank entries exist.
# ----------------------------------------------------------------------------------------------------------------

def level_sizes(latent_h: int, latent_w: int, levels: int) -> Tuple[Tuple[int, int], ...]:
    """(h, w) of each resolution level: the stride-2, padding-1 downsample conv gives ceil(side / 2)."""
    sizes = [(latent_h, latent_w)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return tuple(sizes)


def cross_attention_down_blocks(cfg: UNetConfig) -> Tuple[int, ...]:
    """Down blocks with spatial transformers (all but the last, as in SD1.5)."""
    return tuple(range(len(cfg.block_out_channels) - 1))


@dataclass(frozen=True)
class AudioMaskLevel:
    """Which motion-mask level an MM-HAA down block reads, and its size."""

    block: int  # down block index (down_blocks.{block}.audio_modules)
    level: int  # index into each per-level mask list (the reference uses level = block index)
    height: int  # latent rows at that block
    width: int  # latent columns at that block

    @property
    def tokens(self) -> int:  # mask length per frame: height * width
        return self.height * self.width


def audio_mask_levels(cfg: UNetConfig, latent_h: int, latent_w: Optional[int] = None) -> Tuple[AudioMaskLevel, ...]:
    """Per MM-HAA down block: the mask level it uses and that level's size (64, 32, 16 at 512 px)."""
    sizes = level_sizes(latent_h, latent_h if latent_w is None else latent_w, len(cfg.block_out_channels))
    return tuple(AudioMaskLevel(block=i, level=i, height=sizes[i][0], width=sizes[i][1]) for i in cfg.audio_blocks)


@dataclass(frozen=True)
class BankEntry:
    """One reference-bank tensor: written by the ReferenceNet block ``name``, read by the denoiser block ``name``."""

    name: str  # transformer block name, e.g. "down_blocks.0.attentions.1.transformer_blocks.0"
    height: int  # reference latent rows at that block
    width: int  # reference latent columns at that block
    channels: int  # token width

    @property
    def tokens(self) -> int:  # tokens per reference image: height * width
        return self.height * self.width

    def shape(self, batch: int = 1) -> Tuple[int, int, int]:  # (batch, tokens, channels)
        return (batch, self.tokens, self.channels)


def reference_bank_layout(cfg: UNetConfig, latent_h: int, latent_w: Optional[int] = None) -> Tuple[BankEntry, ...]:
    """The bank in the order the denoiser reads it (= forward order): down blocks, mid block, up blocks.

    The reference code pairs writer and reader blocks by sorting both lists by width (a stable sort over the same
    module order), which pairs blocks of the same name; naming the pairs makes that explicit.
    """
    channels = cfg.block_out_channels
    n = len(channels)
    sizes = level_sizes(latent_h, latent_h if latent_w is None else latent_w, n)
    entries = []
    for i in cross_attention_down_blocks(cfg):
        for j in range(cfg.layers_per_block):
            entries.append(BankEntry(f"down_blocks.{i}.attentions.{j}.transformer_blocks.0", *sizes[i], channels[i]))
    entries.append(BankEntry("mid_block.attentions.0.transformer_blocks.0", *sizes[n - 1], channels[n - 1]))
    for k in range(1, n):  # up_blocks.0 has no attention
        level = n - 1 - k
        for j in range(cfg.layers_per_block + 1):
            entries.append(BankEntry(f"up_blocks.{k}.attentions.{j}.transformer_blocks.0", *sizes[level],
                                     channels[level]))
    return tuple(entries)


def bank_name(index: int) -> str:
    """Tensor name of bank entry ``index`` (an output of reference_unet, an input of denoising_unet)."""
    return f"bank_{index:02d}"


def mask_name(level: int) -> str:
    """Tensor name of the motion masks (full, face, lip on one axis) of mask level ``level``."""
    return f"mask_{level}"


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------

def _resnet(cfg: UNetConfig, in_ch: int, out_ch: int, temb_ch: int) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb_ch, eps=cfg.norm_eps,
                         groups=cfg.norm_num_groups, dropout=0.0, time_embedding_norm="default",
                         non_linearity="swish", output_scale_factor=1.0, pre_norm=True)


def _transformer(cfg: UNetConfig, channels: int) -> Transformer2DModel:
    if channels % cfg.attention_heads != 0:
        raise ValueError(f"mmgt.unet3d: {channels} channels do not split into {cfg.attention_heads} heads")
    return Transformer2DModel(num_attention_heads=cfg.attention_heads,
                              attention_head_dim=channels // cfg.attention_heads, in_channels=channels,
                              num_layers=1, cross_attention_dim=cfg.cross_attention_dim,
                              norm_num_groups=cfg.norm_num_groups, use_linear_projection=False)


def _motion(cfg: UNetConfig, channels: int, backend: str) -> MotionModule:
    return MotionModule(channels, heads=cfg.motion_heads, max_frames=cfg.motion_max_frames,
                        norm_groups=cfg.norm_num_groups, backend=backend)


@dataclass
class _Conditions:
    """Per-call conditioning in folded layout, handed to every block (made by ``UNet3D.forward`` for one call)."""

    temb: torch.Tensor  # (B*F, 4*C0)
    context: torch.Tensor  # (B*F, 1, cross_dim) CLIP context per frame
    audio: Optional[torch.Tensor]  # (B*F, T, audio_dim)
    masks: Dict[int, torch.Tensor]  # down block index -> (B*F, 3, h*w) masks of the level it reads
    bank: Optional[Sequence[torch.Tensor]]  # reference bank, reference_bank_layout order; None: no reference
    frames: int
    uncond_rows: int  # leading samples that are the CFG unconditional half (they ignore the bank)

    def attention_kwargs(self, bank_index: int) -> Optional[Dict[str, ReferenceRead]]:
        """The per-call attention arguments of the transformer block that reads bank entry ``bank_index``."""
        if self.bank is None:
            return None
        return {"reference": ReferenceRead(self.bank[bank_index], self.frames, self.uncond_rows)}


def _bank_indices(cfg: UNetConfig, prefix: str, count: int) -> Tuple[int, ...]:
    """Bank positions of the transformer blocks ``{prefix}.attentions.{0..count-1}`` (reference_bank_layout order)."""
    names = [e.name for e in reference_bank_layout(cfg, 1)]  # names only: the size is irrelevant
    return tuple(names.index(f"{prefix}.attentions.{j}.transformer_blocks.0") for j in range(count))


class DownBlock3D(nn.Module):
    """resnets (+ attentions, + audio_modules) + motion_modules, then an optional stride-2 downsampler."""

    def __init__(self, cfg: UNetConfig, index: int, in_ch: int, out_ch: int, temb_ch: int, cross_attention: bool,
                 audio: bool, add_downsample: bool, backend: str):
        super().__init__()
        layers = cfg.layers_per_block
        self.index = index
        self.resnets = nn.ModuleList([_resnet(cfg, in_ch if j == 0 else out_ch, out_ch, temb_ch)
                                      for j in range(layers)])
        self.attentions = nn.ModuleList([_transformer(cfg, out_ch) for _ in range(layers)] if cross_attention else [])
        dims = audio_module_dims(cfg.block_out_channels, index, layers) if audio else ()
        self.audio_modules = nn.ModuleList([
            MMHAA(channels, inner, cfg.audio_heads, cfg.audio_dim, cfg.norm_num_groups, cfg.branch_weights, backend)
            for channels, inner in dims])
        self.motion_modules = nn.ModuleList([_motion(cfg, out_ch, backend) for _ in range(layers)])
        self.downsamplers = nn.ModuleList(
            [Downsample2D(out_ch, use_conv=True, out_channels=out_ch, padding=1, name="op")] if add_downsample else [])
        self.bank_index = _bank_indices(cfg, f"down_blocks.{index}", layers) if cross_attention else ()

    def forward(self, hidden: torch.Tensor, cond: _Conditions) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        skips = ()
        for j, resnet in enumerate(self.resnets):
            hidden = resnet(hidden, cond.temb)  # (B*F, C, h, w)
            if len(self.attentions):
                hidden = self.attentions[j](hidden, encoder_hidden_states=cond.context, return_dict=False,
                                            cross_attention_kwargs=cond.attention_kwargs(self.bank_index[j]))[0]
            if len(self.audio_modules):
                hidden = self.audio_modules[j](hidden, cond.audio, cond.masks[self.index])
            hidden = self.motion_modules[j](hidden, cond.frames)
            skips += (hidden,)
        for downsampler in self.downsamplers:
            hidden = downsampler(hidden)  # (B*F, C, ceil(h/2), ceil(w/2))
            skips += (hidden,)
        return hidden, skips


class MidBlock3D(nn.Module):
    """resnet, then per layer: spatial transformer -> motion module -> resnet."""

    def __init__(self, cfg: UNetConfig, channels: int, temb_ch: int, backend: str):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(cfg, channels, channels, temb_ch) for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(cfg, channels)])
        self.motion_modules = nn.ModuleList([_motion(cfg, channels, backend)])
        self.bank_index = _bank_indices(cfg, "mid_block", 1)

    def forward(self, hidden: torch.Tensor, cond: _Conditions) -> torch.Tensor:
        hidden = self.resnets[0](hidden, cond.temb)
        for attn, motion, resnet, bank_index in zip(self.attentions, self.motion_modules, self.resnets[1:],
                                                    self.bank_index):
            hidden = attn(hidden, encoder_hidden_states=cond.context, return_dict=False,
                          cross_attention_kwargs=cond.attention_kwargs(bank_index))[0]
            hidden = motion(hidden, cond.frames)
            hidden = resnet(hidden, cond.temb)
        return hidden


class UpBlock3D(nn.Module):
    """Per layer: concat a skip, resnet (+ attention) + motion module; then an optional 2x nearest upsampler."""

    def __init__(self, cfg: UNetConfig, index: int, prev_ch: int, out_ch: int, skip_in_ch: int, temb_ch: int,
                 cross_attention: bool, add_upsample: bool, backend: str):
        super().__init__()
        layers = cfg.layers_per_block + 1
        resnets = []
        for j in range(layers):
            skip_ch = skip_in_ch if j == layers - 1 else out_ch
            resnets.append(_resnet(cfg, (prev_ch if j == 0 else out_ch) + skip_ch, out_ch, temb_ch))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([_transformer(cfg, out_ch) for _ in range(layers)] if cross_attention else [])
        self.motion_modules = nn.ModuleList([_motion(cfg, out_ch, backend) for _ in range(layers)])
        self.upsamplers = nn.ModuleList(
            [Upsample2D(out_ch, use_conv=True, out_channels=out_ch)] if add_upsample else [])
        self.bank_index = _bank_indices(cfg, f"up_blocks.{index}", layers) if cross_attention else ()

    def forward(self, hidden: torch.Tensor, skips: Tuple[torch.Tensor, ...], cond: _Conditions,
                upsample_size: Optional[Tuple[int, int]]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            hidden = torch.cat([hidden, skips[-1 - j]], dim=1)  # (B*F, C + C_skip, h, w)
            hidden = resnet(hidden, cond.temb)
            if len(self.attentions):
                hidden = self.attentions[j](hidden, encoder_hidden_states=cond.context, return_dict=False,
                                            cross_attention_kwargs=cond.attention_kwargs(self.bank_index[j]))[0]
            hidden = self.motion_modules[j](hidden, cond.frames)
        for upsampler in self.upsamplers:
            hidden = upsampler(hidden, output_size=upsample_size)  # (B*F, C, 2h, 2w)
        return hidden


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------

def _fold(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) -> (B*F, C, h, w), sample-major."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _repeat_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, ...) -> (B*F, ...): each sample's row repeated for its frames."""
    return x.unsqueeze(1).expand(x.shape[0], frames, *x.shape[1:]).reshape(x.shape[0] * frames, *x.shape[1:])


class UNet3D(nn.Module):
    """Denoising UNet3D built from a ``UNetConfig`` at any width; ``state_dict()`` uses the release key names.

    ``forward(sample, timestep, encoder_hidden_states, pose_features, audio_tokens, masks, bank, uncond_rows)``:

    * sample (B, in_ch, F, h, w) noisy latents; timestep scalar, (B,) or (B, F) (one per frame: the rolling
      schedule holds frames at several noise levels in one call); encoder_hidden_states (B, 1, cross_dim)
    * pose_features (B, C0, F, h, w) added after conv_in (optional)
    * audio_tokens (B, F, T, audio_dim)
    * masks: one tensor per MM-HAA level, in ``audio_mask_levels`` order, each (B, F, 3, h_l*w_l) with the full,
      face and lip masks on axis 2 (MASK_BRANCHES order; folded (B*F, 3, h_l*w_l) is accepted too)
    * bank: tensors in ``reference_bank_layout`` order, each (1 or B - uncond_rows, tokens, C), or None for
      no reference (plain self-attention)
    * uncond_rows: the first ``uncond_rows`` samples are the CFG unconditional half and ignore the bank
    Returns (B, out_ch, F, h, w). Every input is an argument: the module holds weights only.
    """

    def __init__(self, cfg: UNetConfig, attention_backend: str = "sdpa"):
        super().__init__()
        backend = check_backend(attention_backend)
        self.cfg = cfg
        channels = tuple(cfg.block_out_channels)
        n = len(channels)
        cross_down = set(cross_attention_down_blocks(cfg))
        bad = [i for i in cfg.audio_blocks if i not in cross_down]
        if bad:
            raise ValueError(f"mmgt.unet3d: audio_blocks {bad} are not cross-attention down blocks "
                             f"{sorted(cross_down)}")
        temb_ch = channels[0] * 4

        # 1. Input and time embedding
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch)

        # 2. Down, mid, up
        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i in range(n):
            in_ch, out_ch = out_ch, channels[i]
            self.down_blocks.append(DownBlock3D(cfg, i, in_ch, out_ch, temb_ch, cross_attention=i in cross_down,
                                                audio=i in cfg.audio_blocks, add_downsample=i < n - 1,
                                                backend=backend))
        self.mid_block = MidBlock3D(cfg, channels[-1], temb_ch, backend)
        self.up_blocks = nn.ModuleList()
        reversed_ch = list(reversed(channels))
        out_ch = reversed_ch[0]
        for k in range(n):
            prev_ch, out_ch = out_ch, reversed_ch[k]
            skip_in_ch = reversed_ch[min(k + 1, n - 1)]
            self.up_blocks.append(UpBlock3D(cfg, k, prev_ch, out_ch, skip_in_ch, temb_ch, cross_attention=k > 0,
                                            add_upsample=k < n - 1, backend=backend))

        # 3. Output
        self.conv_norm_out = nn.GroupNorm(num_groups=cfg.norm_num_groups, num_channels=channels[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, kernel_size=3, padding=1)

        # 4. Attention processors: ours everywhere, bank readers on the spatial self-attentions
        set_attention_backend(self, backend)
        self.bank_names = tuple(entry.name for entry in reference_bank_layout(cfg, 1))  # names only: size unused
        for name in self.bank_names:
            self.get_submodule(name).attn1.set_processor(ReferenceReadProcessor(backend))

    def bank_layout(self, latent_h: int, latent_w: Optional[int] = None) -> Tuple[BankEntry, ...]:
        """Names and shapes of the bank tensors this network reads, in ``forward``'s ``bank`` order."""
        return reference_bank_layout(self.cfg, latent_h, latent_w)

    def mask_levels(self, latent_h: int, latent_w: Optional[int] = None) -> Tuple[AudioMaskLevel, ...]:
        """Which mask level (and size) each MM-HAA down block reads."""
        return audio_mask_levels(self.cfg, latent_h, latent_w)

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                encoder_hidden_states: torch.Tensor, pose_features: Optional[torch.Tensor] = None,
                audio_tokens: Optional[torch.Tensor] = None, masks: Optional[Sequence[torch.Tensor]] = None,
                bank: Optional[Sequence[torch.Tensor]] = None, uncond_rows: int = 0) -> torch.Tensor:
        # 0. Check the inputs
        if sample.ndim != 5:
            raise ValueError(f"mmgt.unet3d: sample must be (B, C, F, h, w), got {tuple(sample.shape)}")
        batch, _, frames, height, width = sample.shape
        if frames > self.cfg.motion_max_frames:
            raise ValueError(f"mmgt.unet3d: {frames} frames in one window; the motion modules take at most "
                             f"{self.cfg.motion_max_frames}")
        if not 0 <= uncond_rows <= batch:
            raise ValueError(f"mmgt.unet3d: uncond_rows={uncond_rows} outside [0, batch={batch}]")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"mmgt.unet3d: encoder_hidden_states must be (B={batch}, tokens, "
                             f"{self.cfg.cross_attention_dim}), got {tuple(encoder_hidden_states.shape)}")
        if bank is not None and len(bank) != len(self.bank_names):
            raise ValueError(f"mmgt.unet3d: reference bank has {len(bank)} tensors, the denoiser reads "
                             f"{len(self.bank_names)}")
        dtype = sample.dtype

        # 1. Time embedding, one per frame: every block reads it folded (B*F, ...), so frames of one call may sit
        #    at different noise levels (the rolling schedule); a scalar or (B,) timestep is the same t on every frame
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(1, 1).expand(batch, frames)
        elif timesteps.shape == (batch,):
            timesteps = timesteps[:, None].expand(batch, frames)
        if timesteps.shape != (batch, frames):
            raise ValueError(f"mmgt.unet3d: timestep must be a scalar, (B={batch},) or (B={batch}, F={frames}), got "
                             f"{tuple(timesteps.shape)}")
        temb = self.time_embedding(self.time_proj(timesteps.reshape(-1)).to(dtype))  # (B*F, 4*C0)

        # 2. Conditions of this call in folded layout
        cond = _Conditions(temb=temb, context=_repeat_frames(encoder_hidden_states, frames),
                           audio=self._fold_audio(audio_tokens, batch, frames),
                           masks=self._fold_masks(masks, batch, frames, height, width), bank=bank, frames=frames,
                           uncond_rows=uncond_rows)

        # 3. conv_in + pose features
        hidden = self.conv_in(_fold(sample))  # (B*F, C0, h, w)
        if pose_features is not None:
            if pose_features.shape[0] != batch or pose_features.shape[2] != frames:
                raise ValueError(f"mmgt.unet3d: pose_features must be (B={batch}, C0, F={frames}, h, w), got "
                                 f"{tuple(pose_features.shape)}")
            hidden = hidden + _fold(pose_features).to(dtype)

        # 4. UNet body
        up_factor = 2 ** (len(self.up_blocks) - 1)
        force_size = height % up_factor != 0 or width % up_factor != 0
        skips: Tuple[torch.Tensor, ...] = (hidden,)
        for block in self.down_blocks:
            hidden, block_skips = block(hidden, cond)
            skips += block_skips
        hidden = self.mid_block(hidden, cond)
        for k, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            size = tuple(skips[-1].shape[-2:]) if force_size and k < len(self.up_blocks) - 1 else None
            hidden = block(hidden, block_skips, cond, size)

        # 5. Output head, unfolded to (B, C, F, h, w)
        hidden = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))  # (B*F, out, h, w)
        return hidden.reshape(batch, frames, -1, height, width).permute(0, 2, 1, 3, 4)

    def _fold_audio(self, audio_tokens: Optional[torch.Tensor], batch: int, frames: int) -> Optional[torch.Tensor]:
        if not self.cfg.audio_blocks:
            return None
        if audio_tokens is None or audio_tokens.ndim != 4 or audio_tokens.shape[:2] != (batch, frames) \
                or audio_tokens.shape[3] != self.cfg.audio_dim:
            got = None if audio_tokens is None else tuple(audio_tokens.shape)
            raise ValueError(f"mmgt.unet3d: audio_tokens must be (B={batch}, F={frames}, tokens, "
                             f"{self.cfg.audio_dim}), got {got}")
        return audio_tokens.reshape(batch * frames, audio_tokens.shape[2], audio_tokens.shape[3])

    def _fold_masks(self, masks: Optional[Sequence[torch.Tensor]], batch: int, frames: int, height: int,
                    width: int) -> Dict[int, torch.Tensor]:
        """-> {down block: folded (B*F, 3, h_l*w_l) mask} for every block with an MM-HAA module."""
        levels = audio_mask_levels(self.cfg, height, width)
        if not levels:
            return {}
        if masks is None or len(masks) != len(levels):
            got = None if masks is None else len(masks)
            raise ValueError(f"mmgt.unet3d: masks must be {len(levels)} tensors, one per MM-HAA level "
                             f"{[lv.level for lv in levels]}, got {got}")
        folded = {}
        for lv, mask in zip(levels, masks):
            branches = len(MASK_BRANCHES)
            if tuple(mask.shape) not in ((batch, frames, branches, lv.tokens), (batch * frames, branches, lv.tokens)):
                raise ValueError(f"mmgt.unet3d: mask of level {lv.level} must be (B={batch}, F={frames}, "
                                 f"{branches}, {lv.height}*{lv.width}), got {tuple(mask.shape)}")
            folded[lv.block] = mask.reshape(batch * frames, branches, lv.tokens)
        return folded


# ----------------------------------------------------------------------------------------------------------------
# The contract: one denoising step with flat named inputs
# ----------------------------------------------------------------------------------------------------------------
class DenoiserStep(nn.Module):
    """UNet3D step, inputs in contract order: sample, timestep, context, pose_features, audio_tokens, one mask per
    MM-HAA level, the bank entries -> v (B, 4, C, h, w). The CFG layout (``uncond_rows``) is part of the contract."""

    def __init__(self, unet: UNet3D, n_masks: int, uncond_rows: int):
        super().__init__()
        self.unet, self.n_masks, self.uncond_rows = unet, n_masks, uncond_rows

    def forward(self, sample, timestep, context, pose_features, audio_tokens, *masks_and_bank):
        masks, bank = masks_and_bank[:self.n_masks], masks_and_bank[self.n_masks:]
        return self.unet(sample, timestep, context, pose_features=pose_features, audio_tokens=audio_tokens,
                         masks=masks, bank=bank, uncond_rows=self.uncond_rows)  # (B, 4, C, h, w)


def denoiser_contract(cfg: MMGTConfig, shapes: Shapes) -> Contract:
    """denoising_unet: one UNet3D step (v prediction) of a render chunk, with bank, pose features, tokens, masks.

    ``timestep`` is (B, C), one per frame, for every schedule: the chunk schedule repeats one t over the frames, the
    rolling schedule gives each group of frames its own; one exported artifact serves both."""
    u, ap = cfg.unet, cfg.audio_proj
    b, c, h = shapes.unet_batch, shapes.chunk, shapes.latent
    levels = audio_mask_levels(u, h)
    bank = reference_bank_layout(u, h)
    return Contract(
        "denoising_unet", "UNet3D denoising step (v prediction) with bank, pose features, audio tokens, masks",
        inputs=(tensor("sample", (b, u.in_channels, c, h, h)), tensor("timestep", (b, c), 0, 999, "float32"),
                tensor("context", (b, 1, u.cross_attention_dim)),
                tensor("pose_features", (b, u.block_out_channels[0], c, h, h)),
                tensor("audio_tokens", (b, c, ap.context_tokens, u.audio_dim)))
        + tuple(tensor(mask_name(lv.level), (b, c, len(MASK_BRANCHES), lv.tokens), 0, 1) for lv in levels)
        + tuple(tensor(bank_name(i), e.shape(1)) for i, e in enumerate(bank)),
        outputs=(tensor("v", (b, u.out_channels, c, h, h)),),
        module=lambda m: DenoiserStep(m.denoising_unet, len(levels), shapes.uncond_rows),
        weights=("denoising_unet",), config_sections=("unet",), shape_fields=("chunk", "resolution", "unet_batch"),
        version=3, meta={"uncond_rows": shapes.uncond_rows, "mask_levels": [lv.level for lv in levels],
                         "bank": [e.name for e in bank]})


__all__ = ["bank_name", "mask_name", "DenoiserStep", "denoiser_contract", "level_sizes", "cross_attention_down_blocks", "AudioMaskLevel", "audio_mask_levels", "BankEntry",
           "reference_bank_layout", "DownBlock3D", "MidBlock3D", "UpBlock3D", "UNet3D"]
