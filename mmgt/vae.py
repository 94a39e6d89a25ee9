"""SD VAE (sd-vae-ft-mse, diffusers AutoencoderKL): reference image -> latent, latents -> frames.

MMGT_SPEC.md section 4: the reference latent is the posterior MEAN of the image mapped to [-1, 1], times the
scaling factor 0.18215; frames are decode(latents / 0.18215) mapped from [-1, 1] to [0, 1] and clamped. The
reference pipeline decodes one frame at a time; :func:`decode_latents` decodes in chunks of frames, which gives the
same frames (the VAE has no cross-frame layers) with bounded memory.

Optional light decoder: diffusers AutoencoderTiny (TAESD layout). TAESD works on the *scaled* latents (its config's
scaling_factor is 1.0), so the same ``latents / vae.config.scaling_factor`` rule serves both decoders and every
decode function here accepts either.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mmgt.config import MMGTConfig, VAEConfig
from mmgt.contract import Contract, Dynamic, Shapes, tensor
from mmgt.seeding import seeded

log = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, torch.Tensor]




def _local_dir(path: Union[str, Path], what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {path} is not a local diffusers model directory (no config.json)")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------------------------
def build_vae(cfg: VAEConfig = VAEConfig(), seed: Optional[int] = None):
    """AutoencoderKL in the sd-vae-ft-mse layout at the config's widths; random weights (seeded), eval mode."""
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            act_fn="silu",
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            sample_size=256,  # only a hint for tiling; any size whose sides are multiples of 2^(n-1) works
            scaling_factor=cfg.scaling_factor,
        )
    return vae.eval().requires_grad_(False)


def load_vae(path: Union[str, Path], dtype: torch.dtype = torch.float32):
    """AutoencoderKL from a local diffusers directory (e.g. ``<weights>/sd-vae-ft-mse``); never downloads."""
    from diffusers import AutoencoderKL

    path = _local_dir(path, "VAE")
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    log.info("loaded VAE from %s (scaling_factor %s)", path, vae.config.scaling_factor)
    return vae.eval().requires_grad_(False)


def build_tiny_decoder(cfg: VAEConfig = VAEConfig(), channels: int = 64, num_blocks: Optional[Sequence[int]] = None,
                       seed: Optional[int] = None):
    """AutoencoderTiny (TAESD layout) with the same latent channels and spatial factor as ``cfg``; random weights.

    ``channels`` is the width of every level (TAESD: 64); ``num_blocks`` the decoder blocks per level
    (TAESD: 3, 3, 3, 1). The encoder mirrors it. Scaling factor 1.0: it decodes the diffusion-space latents.
    """
    from diffusers import AutoencoderTiny

    levels = len(cfg.block_out_channels)
    dec_blocks = tuple(num_blocks) if num_blocks is not None else (3,) * (levels - 1) + (1,)
    if len(dec_blocks) != levels:
        raise ValueError(f"build_tiny_decoder: num_blocks {dec_blocks} must have {levels} entries (one per level)")
    with seeded(seed):
        taesd = AutoencoderTiny(
            encoder_block_out_channels=(channels,) * levels,
            decoder_block_out_channels=(channels,) * levels,
            latent_channels=cfg.latent_channels,
            num_encoder_blocks=tuple(reversed(dec_blocks)),
            num_decoder_blocks=dec_blocks,
            scaling_factor=1.0,
        )
    return taesd.eval().requires_grad_(False)


def load_tiny_decoder(path: Union[str, Path], dtype: torch.dtype = torch.float32):
    """AutoencoderTiny from a local diffusers directory (e.g. a TAESD download); never downloads."""
    from diffusers import AutoencoderTiny

    path = _local_dir(path, "tiny VAE decoder")
    taesd = AutoencoderTiny.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    log.info("loaded tiny VAE decoder from %s", path)
    return taesd.eval().requires_grad_(False)


def downsample_factor(vae) -> int:
    """Pixels per latent cell along a side (8 for SD's VAE and TAESD)."""
    cfg = vae.config
    chans = getattr(cfg, "block_out_channels", None) or cfg.decoder_block_out_channels
    return 2 ** (len(chans) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Encoding the reference image
# ----------------------------------------------------------------------------------------------------------------
def image_to_tensor(image: ImageLike, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """RGB image (H, W, 3), uint8 or float in [0, 1] -> (1, 3, H, W) float32 in [-1, 1].

    ``size`` = (height, width) resizes first with PIL Lanczos, as the reference's VaeImageProcessor does.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"reference image: expected (H, W, 3) RGB, got shape {image.shape}")
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        from PIL import Image

        u8 = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        image = np.asarray(Image.fromarray(u8).resize((size[1], size[0]), resample=Image.LANCZOS))
    if image.dtype == np.uint8:
        x = image.astype(np.float32) / 255.0  # as VaeImageProcessor.pil_to_numpy
    else:
        x = image.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]  # (1, 3, H, W) in [0, 1]
    return t * 2.0 - 1.0  # (1, 3, H, W) in [-1, 1]


@torch.no_grad()
def encode_reference(vae, image: ImageLike, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Reference image (H, W, 3) -> latent (1, C, H/8, W/8): posterior mean x scaling_factor (AutoencoderKL)."""
    factor = downsample_factor(vae)
    x = image_to_tensor(image, size)  # (1, 3, H, W)
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"reference image: {h}x{w} is not a multiple of the VAE factor {factor}; pass size=")
    x = x.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(x).latent_dist
    return posterior.mean * vae.config.scaling_factor  # (1, C, h, w)


# ----------------------------------------------------------------------------------------------------------------
# Decoding latents to frames
# ----------------------------------------------------------------------------------------------------------------
class VAEDecoder(nn.Module):
    """Export wrapper: latents (N, C, h, w) in diffusion scale -> frames (N, 3, H, W) in [0, 1].

    Works for AutoencoderKL and AutoencoderTiny (each divides by its own config scaling factor).
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # "1 / 0.18215 * latents" as the reference writes it (a multiply, not a divide: same bits as the reference)
        image = self.vae.decode(self.inv_scale * latents).sample  # (N, 3, H, W) in about [-1, 1]
        return (image / 2 + 0.5).clamp(0, 1)  # (N, 3, H, W) in [0, 1]


class VAEEncode(nn.Module):
    """Contract call: image (1, 3, R, R) in [-1, 1] -> posterior mean x scaling factor (``encode_reference``'s latent)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean * self.scale  # (1, 4, h, w)


def vae_contracts(cfg: MMGTConfig, shapes: Shapes) -> Tuple[Contract, Contract]:
    """vae_encoder (the reference image, once per avatar) and vae_decoder (latents of new frames -> frames).

    The decoder is the one the model set decodes with (``frame_decoder``: the light AutoencoderTiny when set, else
    the VAE's own): it takes diffusion-scale latents and returns frames in [0, 1], so nothing converts scale or
    range around it.
    """
    r, h, n = shapes.resolution, shapes.latent, shapes.decode_frames_max
    frames = (Dynamic(0, 1, n, "frames"),)
    encoder = Contract(
        "vae_encoder", "VAE encoder: image in [-1, 1] -> posterior mean x scaling factor",
        inputs=(tensor("image", (1, 3, r, r), -1, 1),), outputs=(tensor("latent", (1, cfg.vae.latent_channels, h, h)),),
        module=lambda m: VAEEncode(m.vae), weights=("vae.encoder", "vae.quant_conv"), config_sections=("vae",),
        shape_fields=("resolution",))
    decoder = Contract(
        "vae_decoder", "frame decoder: diffusion-scale latents -> frames in [0, 1]",
        inputs=(tensor("latents", (n, cfg.vae.latent_channels, h, h), dynamic=frames),),
        outputs=(tensor("frames", (n, 3, r, r), dynamic=frames),),
        module=lambda m: VAEDecoder(m.frame_decoder), weights=("frame_decoder",), config_sections=("vae",),
        shape_fields=("decode_frames_max", "resolution"), version=2)
    return encoder, decoder


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk: int = 8,
                   out_device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Latents -> float32 frames in [0, 1], decoded ``chunk`` frames at a time.

    (B, C, F, h, w) -> (B, 3, F, H, W) (the reference's video layout); (N, C, h, w) -> (N, 3, H, W).
    Each chunk's frames move to ``out_device`` (default: the latents' device) as soon as they are decoded.
    """
    if latents.dim() not in (4, 5):
        raise ValueError(f"decode_latents: expected (B, C, F, h, w) or (N, C, h, w), got {tuple(latents.shape)}")
    if chunk < 1:
        raise ValueError(f"decode_latents: chunk must be >= 1, got {chunk}")
    out_device = torch.device(out_device) if out_device is not None else latents.device
    video = latents.dim() == 5
    if video:
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B*F, C, h, w), "(b f)" order
    else:
        flat = latents  # (N, C, h, w)
    decoder = VAEDecoder(vae)
    frames = []
    for start in range(0, flat.shape[0], chunk):
        part = flat[start:start + chunk].to(device=vae.device, dtype=vae.dtype)  # (n, C, h, w)
        frames.append(decoder(part).float().to(out_device))  # (n, 3, H, W)
    out = torch.cat(frames)  # (N, 3, H, W)
    if video:
        out = out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
    return out


def to_uint8(frames: Union[torch.Tensor, np.ndarray], rounding: bool = False) -> np.ndarray:
    """Frames in [0, 1], (N, 3, H, W) or (B, 3, F, H, W) -> np.uint8 (N or B*F, H, W, 3).

    Default truncates (x * 255 -> uint8) as the reference's save_videos_grid does; ``rounding=True`` rounds.
    A tensor is converted where it lives (on a GPU: a quarter of the bytes cross to the host, and no host-side float
    pass), in float32 with the same operations as the array path, so both give the same bytes.
    """
    if isinstance(frames, torch.Tensor):
        x = frames.detach().float()
        if x.ndim == 5:
            x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*F, 3, H, W)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"to_uint8: expected (N, 3, H, W) or (B, 3, F, H, W) frames, got {tuple(frames.shape)}")
        x = x.clamp(0.0, 1.0).permute(0, 2, 3, 1) * 255.0  # (N, H, W, 3)
        if rounding:
            x = torch.round(x)  # half to even, as np.round
        return x.to(torch.uint8).contiguous().cpu().numpy()
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim == 5:
        b, c, f, h, w = frames.shape
        frames = frames.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B*F, 3, H, W)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"to_uint8: expected (N, 3, H, W) or (B, 3, F, H, W) frames, got {frames.shape}")
    x = np.clip(frames, 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0  # (N, H, W, 3)
    if rounding:
        x = np.round(x)
    return np.ascontiguousarray(x.astype(np.uint8))


__all__ = [
    "build_vae", "load_vae", "build_tiny_decoder", "load_tiny_decoder", "downsample_factor", "image_to_tensor",
    "encode_reference", "VAEDecoder", "VAEEncode", "vae_contracts", "decode_latents", "to_uint8",
]
