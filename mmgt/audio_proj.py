"""Stage II's audio tokens: +-2 frame windows of wav2vec2 states and their projection (Hallo's recipe).

Owns ``audio_windows`` ((T, L, C) -> (T, 5, L, C), clamped at the edges) and ``AudioProjModel`` (release keys
audioproj.proj1/proj2/proj3/norm): windowed states -> 32 tokens of 768 per frame at release size
(``MMGT_SPEC.md`` section 4). The states come from ``mmgt.speech_encoders.wav2vec2_features``.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import nn

from mmgt.audio_io import AudioError
from mmgt.config import AudioProjConfig, MMGTConfig
from mmgt.contract import Contract, Dynamic, Shapes, tensor


def audio_windows(feats: Union[torch.Tensor, np.ndarray], radius: int = 2) -> Union[torch.Tensor, np.ndarray]:
    """(T, ...) -> (T, 2 * radius + 1, ...): frame t gets frames t-radius .. t+radius, clamped at the edges."""
    if feats.shape[0] < 1:
        raise AudioError("audio_windows: no frames")
    n = feats.shape[0]
    idx = np.clip(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], 0, n - 1)  # (T, 2r+1)
    if isinstance(feats, torch.Tensor):
        return feats[torch.from_numpy(idx).to(feats.device)]  # (T, 2r+1, ...)
    return np.asarray(feats)[idx]


# ----------------------------------------------------------------------------------------------------------------
# Stage II: audio projection (release keys audioproj.proj1/proj2/proj3/norm)
# ----------------------------------------------------------------------------------------------------------------

class AudioProjModel(nn.Module):
    """Windowed wav2vec2 states -> ``context_tokens`` tokens per frame (Hallo's AudioProjModel).

    (B, F, seq_len, blocks, channels) -> flatten -> proj1 -> ReLU -> proj2 -> ReLU -> proj3
    -> (B, F, context_tokens, output_dim) -> LayerNorm.
    """

    def __init__(self, cfg: AudioProjConfig):
        super().__init__()
        self.cfg = cfg
        self.input_dim = cfg.seq_len * cfg.blocks * cfg.channels  # 5 * 12 * 768 = 46080 at release size
        self.proj1 = nn.Linear(self.input_dim, cfg.intermediate_dim)
        self.proj2 = nn.Linear(cfg.intermediate_dim, cfg.intermediate_dim)
        self.proj3 = nn.Linear(cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim)
        self.norm = nn.LayerNorm(cfg.output_dim)

    def forward(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        expected = (cfg.seq_len, cfg.blocks, cfg.channels)
        if audio_embeds.dim() != 5 or tuple(audio_embeds.shape[2:]) != expected:
            raise ValueError(f"AudioProjModel: expected (B, F, {', '.join(map(str, expected))}), "
                             f"got {tuple(audio_embeds.shape)}")
        b, f = audio_embeds.shape[:2]
        x = audio_embeds.reshape(b * f, self.input_dim)  # (B*F, W*L*C)
        x = torch.relu(self.proj1(x))  # (B*F, I)
        x = torch.relu(self.proj2(x))  # (B*F, I)
        tokens = self.proj3(x).reshape(b * f, cfg.context_tokens, cfg.output_dim)  # (B*F, K, D)
        tokens = self.norm(tokens)  # (B*F, K, D)
        return tokens.reshape(b, f, cfg.context_tokens, cfg.output_dim)  # (B, F, K, D)


def audio_proj_contract(cfg: MMGTConfig, shapes: Shapes) -> Contract:
    """audio_proj: +-2-frame wav2vec2 windows -> MM-HAA tokens, any number of frames up to ``audio_frames_max``."""
    ap, n = cfg.audio_proj, shapes.audio_frames_max
    frames = (Dynamic(1, 1, n, "frames"),)
    return Contract(
        "audio_proj", "AudioProjModel: +-2-frame wav2vec2 windows -> MM-HAA tokens per frame",
        inputs=(tensor("audio_windows", (1, n, ap.seq_len, ap.blocks, ap.channels), dynamic=frames),),
        outputs=(tensor("audio_tokens", (1, n, ap.context_tokens, ap.output_dim), dynamic=frames),),
        module=lambda m: m.audioproj, weights=("audioproj",), config_sections=("audio_proj",),
        shape_fields=("audio_frames_max",))


__all__ = ["audio_proj_contract", "audio_windows", "AudioProjModel"]
