"""CLIP image embedding of the reference image (MMGT_SPEC.md section 4): the UNets' cross-attention context.

transformers CLIPVisionModelWithProjection (sd-image-variations-diffusers/image_encoder, ViT-L/14, projection 768).
Preprocessing as the reference pipeline: ``CLIPImageProcessor().preprocess(ref_image.resize((224, 224)))``, i.e. a
PIL resize to the model's square input size with PIL's default filter for RGB (bicubic), then x / 255 and the OpenAI
CLIP mean/std. (The processor's own resize and centre crop are no-ops on an image already at 224x224.)
The context is ``image_embeds`` (1, D) -> (1, 1, D); the unconditional context is zeros of that shape.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from torch import nn

from mmgt.config import CLIPConfig, MMGTConfig
from mmgt.contract import Contract, Shapes, tensor
from mmgt.seeding import seeded

log = logging.getLogger(__name__)

# OpenAI CLIP normalisation (sd-image-variations' feature_extractor and CLIPImageProcessor defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[np.ndarray, torch.Tensor]




def build_clip(cfg: CLIPConfig = CLIPConfig(), seed: Optional[int] = None):
    """CLIPVisionModelWithProjection at the config's sizes (ViT-L/14 layout: quick_gelu, LayerNorm eps 1e-5);
    random weights (seeded), eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_channels=3,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    with seeded(seed):
        model = CLIPVisionModelWithProjection(config)
    return model.eval().requires_grad_(False)


def load_clip(path: Union[str, Path], dtype: torch.dtype = torch.float32):
    """CLIPVisionModelWithProjection from a local directory (``<weights>/sd-image-variations-diffusers/
    image_encoder``); never downloads."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"CLIP image encoder: {path} is not a local transformers model directory "
                                "(no config.json)")
    model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    log.info("loaded CLIP image encoder from %s", path)
    return model.eval().requires_grad_(False)


def clip_preprocess(image: ImageLike, size: int = 224) -> torch.Tensor:
    """RGB image (H, W, 3), uint8 or float in [0, 1] -> CLIP pixel values (1, 3, size, size) float32."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CLIP input image: expected (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        # The reference works on 8-bit PIL images: quantise float input the same way first.
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    pil = Image.fromarray(image)
    if pil.size != (size, size):
        pil = pil.resize((size, size), resample=Image.BICUBIC)  # PIL's default filter for RGB, as the reference
    x = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S) in [0, 1]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std)[None]  # (1, 3, S, S)


@torch.no_grad()
def clip_embed(model, image: ImageLike) -> torch.Tensor:
    """Reference image (H, W, 3) -> cross-attention context (1, 1, projection_dim), on the model's device/dtype."""
    pixels = clip_preprocess(image, int(model.config.image_size))  # (1, 3, S, S)
    param = next(model.parameters())
    embeds = model(pixel_values=pixels.to(device=param.device, dtype=param.dtype)).image_embeds  # (1, D)
    return embeds.unsqueeze(1)  # (1, 1, D)


class CLIPContext(nn.Module):
    """Contract call: CLIP pixel values (1, 3, S, S) -> the cross-attention context (1, 1, projection_dim)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=pixels).image_embeds.unsqueeze(1)  # (1, 1, D)


def image_encoder_contract(cfg: MMGTConfig, shapes: Shapes) -> Contract:
    """image_encoder: the reference image's CLIP embedding, the denoiser's cross-attention context (once per avatar).
    Preprocessing (resize, CLIP normalisation) stays on the host: ``clip_preprocess``."""
    s = cfg.clip.image_size
    return Contract(
        "image_encoder", "CLIP vision encoder + projection: preprocessed pixels -> cross-attention context",
        inputs=(tensor("pixels", (1, 3, s, s)),), outputs=(tensor("context", (1, 1, cfg.clip.projection_dim)),),
        module=lambda m: CLIPContext(m.clip), weights=("clip",), config_sections=("clip",), shape_fields=())


def unconditional_context(context: torch.Tensor) -> torch.Tensor:
    """The CFG unconditional context: zeros shaped like the image context (the reference's zeros_like)."""
    return torch.zeros_like(context)


__all__ = ["CLIP_MEAN", "CLIP_STD", "build_clip", "load_clip", "clip_preprocess", "clip_embed", "CLIPContext",
           "image_encoder_contract", "unconditional_context"]
