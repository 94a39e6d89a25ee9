"""ReferenceNet: an SD1.5 UNet2D (no conv_norm_out / conv_out) run once per avatar to fill the reference bank.

It runs at t = 0 on the reference image's VAE mean latent x 0.18215 with the CLIP image embedding as context.
Every spatial transformer block's self-attention input, norm1(hidden), is written into a list made for that call
(``cross_attention_kwargs["bank_out"]``, mmgt.attention) and returned as a tuple in ``reference_bank_layout`` order,
the order the denoiser's ``UNet3D`` reads it. Nothing is kept on the module: threads may share one ReferenceNet. The blocks are
diffusers' own (taken from a ``UNet2DConditionModel`` built from the ``UNetConfig``), so ``state_dict()`` has the
release's ``reference_unet.`` key names without the prefix.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple, Union

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from mmgt.attention import ReferenceWriteProcessor, check_backend, set_attention_backend
from mmgt.config import MMGTConfig, UNetConfig
from mmgt.contract import Contract, Shapes, tensor
from mmgt.unet3d import BankEntry, bank_name, reference_bank_layout

logger = logging.getLogger(__name__)


class ReferenceNet(nn.Module):
    """SD1.5 UNet2D body (conv_in, time embedding, down/mid/up blocks) whose forward returns the reference bank.

    ``forward(latent (B, in_ch, h, w), context (B, 1, cross_dim), timestep=0)`` -> tuple of (B, h_l*w_l, C_l)
    tensors, one per spatial transformer block, in ``bank_layout`` order.
    """

    def __init__(self, cfg: UNetConfig, attention_backend: str = "sdpa"):
        super().__init__()
        backend = check_backend(attention_backend)
        self.cfg = cfg
        n = len(cfg.block_out_channels)
        unet = UNet2DConditionModel(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps, cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=cfg.attention_heads,  # SD1.5's legacy name: this is the head count (8)
        )
        # Adopt the body; conv_norm_out / conv_act / conv_out are not part of the release's ReferenceNet.
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        self.up_blocks = unet.up_blocks
        del unet

        set_attention_backend(self, backend)
        self.bank_names = tuple(entry.name for entry in reference_bank_layout(cfg, 1))  # names only: size unused
        for index, name in enumerate(self.bank_names):
            self.get_submodule(name).attn1.set_processor(ReferenceWriteProcessor(index, backend))

    def bank_layout(self, latent_h: int, latent_w: Optional[int] = None) -> Tuple[BankEntry, ...]:
        """Names and shapes of the bank this network returns for a latent of that size."""
        return reference_bank_layout(self.cfg, latent_h, latent_w)

    def forward(self, latent: torch.Tensor, context: torch.Tensor,
                timestep: Union[torch.Tensor, float, int] = 0) -> Tuple[torch.Tensor, ...]:
        if latent.ndim != 4 or latent.shape[1] != self.cfg.in_channels:
            raise ValueError(f"mmgt.reference_net: latent must be (B, {self.cfg.in_channels}, h, w), "
                             f"got {tuple(latent.shape)}")
        batch, _, height, width = latent.shape
        if context.ndim != 3 or context.shape[0] != batch:
            raise ValueError(f"mmgt.reference_net: context must be (B={batch}, tokens, "
                             f"{self.cfg.cross_attention_dim}), got {tuple(context.shape)}")
        # 1. Time embedding (t = 0 for the reference image)
        timesteps = torch.as_tensor(timestep, device=latent.device).reshape(-1).expand(batch)
        emb = self.time_embedding(self.time_proj(timesteps).to(latent.dtype))  # (B, 4*C0)
        up_factor = 2 ** (len(self.up_blocks) - 1)
        force_size = height % up_factor != 0 or width % up_factor != 0

        bank_out: List[Optional[torch.Tensor]] = [None] * len(self.bank_names)  # this call's bank, filled by attn1
        kwargs = {"bank_out": bank_out}
        # 2. Down blocks, keeping the skips
        hidden = self.conv_in(latent)  # (B, C0, h, w)
        skips: Tuple[torch.Tensor, ...] = (hidden,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, block_skips = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context,
                                            cross_attention_kwargs=kwargs)
            else:
                hidden, block_skips = block(hidden_states=hidden, temb=emb)
            skips += block_skips
        # 3. Mid block
        hidden = self.mid_block(hidden, emb, encoder_hidden_states=context, cross_attention_kwargs=kwargs)
        # 4. Up blocks (the last one still runs: its transformer blocks write bank entries)
        for k, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            size = tuple(skips[-1].shape[-2:]) if force_size and k < len(self.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, res_hidden_states_tuple=block_skips, temb=emb,
                               encoder_hidden_states=context, cross_attention_kwargs=kwargs, upsample_size=size)
            else:
                hidden = block(hidden_states=hidden, res_hidden_states_tuple=block_skips, temb=emb,
                               upsample_size=size)
        missing = [self.bank_names[i] for i, t in enumerate(bank_out) if t is None]
        if missing:
            raise RuntimeError(f"mmgt.reference_net: bank entries {missing} were not written; the forward did not "
                               "reach every transformer block")
        return tuple(bank_out)


class ReferenceBank(nn.Module):
    """ReferenceNet at t = 0 as a contract call: (latent, context) -> the bank entries in the denoiser's read order."""

    def __init__(self, reference_unet: ReferenceNet):
        super().__init__()
        self.reference_unet = reference_unet

    def forward(self, latent, context):
        return tuple(self.reference_unet(latent, context))  # each (1, h_l*w_l, C_l)


def reference_contract(cfg: MMGTConfig, shapes: Shapes) -> Contract:
    """reference_unet: the reference latent + CLIP context -> the attention bank (once per avatar)."""
    u, h = cfg.unet, shapes.latent
    bank = reference_bank_layout(u, h)
    return Contract(
        "reference_unet", "ReferenceNet at t = 0: reference latent + CLIP context -> attention bank",
        inputs=(tensor("latent", (1, u.in_channels, h, h)), tensor("context", (1, 1, u.cross_attention_dim))),
        outputs=tuple(tensor(bank_name(i), e.shape(1)) for i, e in enumerate(bank)),
        module=lambda m: ReferenceBank(m.reference_unet), weights=("reference_unet",), config_sections=("unet",),
        shape_fields=("resolution",), version=2, meta={"bank": [e.name for e in bank]})


__all__ = ["ReferenceNet", "ReferenceBank", "reference_contract"]
