"""The network contracts of MMGT, in one registry: each is declared beside its network, listed here.

    network          declared in                   inputs -> outputs
    smga_condition   mmgt/smga.py                  cond -> tokens, hidden                   once per SMGA window
    smga_denoise     mmgt/smga.py                  x_t, t, init_pose, tokens, hidden[, guidance] -> x0
    wavlm            mmgt/speech_encoders.py       wave (1, W, 640) -> features             SMGA condition
    wav2vec2         mmgt/speech_encoders.py       wave (1, F, 640) -> hidden_states        every layer, 25 fps
    audio_proj       mmgt/audio_proj.py            audio_windows -> audio_tokens
    image_encoder    mmgt/image_encoder.py         pixels -> context                        once per avatar
    vae_encoder      mmgt/vae.py                   image -> latent                          once per avatar
    reference_unet   mmgt/reference_net.py         latent, context -> bank_00 .. bank_NN    once per avatar
    pose_guider      mmgt/pose_guider.py           pose -> pose_features
    denoising_unet   mmgt/unet3d.py                sample, timestep, context, pose_features, audio_tokens,
                                                   mask_<level> .., bank_00 .. bank_NN -> v
    vae_decoder      mmgt/vae.py                   latents -> frames                        [0, 1]

Every one exports (parity-checked in onnxruntime on the tiny preset) and every one is called by name at run time,
so a backend chosen for a network serves it wherever the pipeline needs it. What stays on the host: the audio
preprocessing around the encoders (waveform checks, librosa's features, the +-2-frame windowing), the CLIP image
preprocessing, the drawing of poses and masks, and the DDIM loops (a few tensor ops per step).
"""
from __future__ import annotations

from typing import Dict

from .config import MMGTConfig
from .contract import Contract, Shapes

# Every network, in export order (small and independent first)
NETWORKS = ("smga_condition", "smga_denoise", "wavlm", "wav2vec2", "audio_proj", "image_encoder", "vae_encoder",
            "reference_unet", "pose_guider", "denoising_unet", "vae_decoder")


def network_contracts(cfg: MMGTConfig, shapes: Shapes) -> Dict[str, Contract]:
    """Every contract for this config and these shapes, by network name, in ``NETWORKS`` order.

    The SMGA contracts are left out when the window cannot hold the learned null condition under guidance
    (``contract_notes`` says why)."""
    from .audio_proj import audio_proj_contract
    from .image_encoder import image_encoder_contract
    from .pose_guider import pose_guider_contract
    from .reference_net import reference_contract
    from .smga import smga_contracts
    from .speech_encoders import speech_contracts
    from .unet3d import denoiser_contract
    from .vae import vae_contracts

    found = [*smga_contracts(cfg, shapes), *speech_contracts(cfg, shapes), audio_proj_contract(cfg, shapes),
             image_encoder_contract(cfg, shapes), *vae_contracts(cfg, shapes), reference_contract(cfg, shapes),
             pose_guider_contract(cfg, shapes), denoiser_contract(cfg, shapes)]
    by_name = {c.name: c for c in found}
    if set(by_name) - set(NETWORKS):
        raise AssertionError(f"mmgt.contracts: contracts {sorted(set(by_name) - set(NETWORKS))} are not in NETWORKS")
    return {name: by_name[name] for name in NETWORKS if name in by_name}


def contract_notes(cfg: MMGTConfig, shapes: Shapes) -> Dict[str, str]:
    """Networks without a contract under these shapes, and why."""
    notes = {}
    if shapes.smga_batch == 2 and shapes.smga_window != cfg.smga.window:
        why = (f"SMGA's learned null condition has {cfg.smga.window} tokens; a guided window of "
               f"{shapes.smga_window} frames cannot use it (SMGA guidance 1.0 or the trained window)")
        notes = {"smga_condition": why, "smga_denoise": why}
    return notes


__all__ = ["NETWORKS", "network_contracts", "contract_notes"]
