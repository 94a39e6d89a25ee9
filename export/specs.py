"""One export contract per network: names, dtypes, static shapes, TensorRT profiles, parity tolerance.

A contract (``NetworkSpec``) says how a network of a ``ModelSet`` becomes an engine: a torch wrapper whose forward
takes the inputs positionally in ``inputs`` order and returns the outputs in ``outputs`` order (the named-tensor
form every backend speaks), the shapes fixed by ``ExportShapes`` (from the model config and the engine's
window/chunk settings), which config sections and weights define it (for the cache key), and how close
onnxruntime must come to torch.

    network            inputs -> outputs
    smga_step          x_t, t, init_pose, cond -> x0                        SMGA denoiser, audio condition
    smga_step_guided   x_t, t, init_pose, cond, guidance -> x0              both CFG halves in one pass (null tokens)
    wavlm              wave -> features                                     SMGA audio condition (without librosa)
    wav2vec2           wave -> hidden_states                                every layer, 25 fps
    audio_proj         audio_windows -> audio_tokens                        frames axis dynamic
    pose_guider        pose -> pose_features
    reference_unet     latent, context -> bank_00 .. bank_NN                t = 0
    denoising_unet     sample, timestep, context, pose_features, audio_tokens, mask_{full,face,lip}_{level},
                       bank_00 .. bank_NN -> v
    vae_encoder        image -> latent                                      posterior mean x scaling factor
    vae_decoder        latents -> frames                                    frames axis dynamic, [0, 1]

Every network listed exports (parity-checked on the tiny preset, the UNet3D step also at release size); the audio
encoders export cleanly, so none is left torch-only. What stays torch-side, and why: the CLIP image encoder (once
per avatar, not part of this contract set), the audio *preprocessing* around the encoders (numpy waveform checks,
the librosa features of SMGA's condition, the +-2-frame windowing) and the DDIM loops (a few tensor ops per step).

Exporter: the TorchScript exporter (``dynamo=False``) for every network but SMGA: it is about 4x faster than the
dynamo exporter on the UNets and gives the same parity. SMGA needs ``dynamo=True``: the TorchScript exporter
mis-infers the rank of the rotary embedding's output (``x * cos + rotate(x) * sin`` after ``unflatten``) and
either fails ("All tensors must have the same rank") or writes a graph onnxruntime rejects.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mmgt.speech_encoders import wav2vec2_hidden, wavlm_hidden
from mmgt.config import POSE_DIM, MMGTConfig
from mmgt.unet3d import audio_mask_levels, reference_bank_layout
from mmgt.vae import VAEDecoder

from .manifest import (BRANCHES, CONFIG_SECTIONS, DEFAULT_CHUNK, NETWORKS, STAGE2_NETWORKS, ExportShapes,
                       bank_name, mask_name)

log = logging.getLogger(__name__)

FLOAT = "float"  # an input/output dtype that follows the artifact's precision (float32 or float16)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


# ----------------------------------------------------------------------------------------------------------------
# Contract types
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dynamic:
    """One dynamic axis of a tensor: its TensorRT profile range and a symbol shared by the tensors it ties."""

    axis: int
    min: int
    max: int
    symbol: str  # outputs with the same symbol take the input's size on that axis


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output: shape at the export (= TensorRT opt) point, dtype, dynamic axes, sample range."""

    name: str
    shape: Tuple[int, ...]
    dtype: str = FLOAT  # FLOAT follows the precision; else a fixed dtype ("float32" for timesteps)
    dynamic: Tuple[Dynamic, ...] = ()
    low: Optional[float] = None  # parity inputs: uniform(low, high); None: standard normal
    high: Optional[float] = None

    def resolved_dtype(self, precision: str) -> str:
        if self.dtype != FLOAT:
            return self.dtype
        return "float16" if precision == "fp16" else "float32"

    def profile(self) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
        """TensorRT (min, opt, max) shapes; static tensors have min = opt = max."""
        lo, hi = list(self.shape), list(self.shape)
        for d in self.dynamic:
            lo[d.axis], hi[d.axis] = d.min, d.max
        return tuple(lo), tuple(self.shape), tuple(hi)

    def shape_at(self, sizes: Mapping[str, int]) -> Tuple[int, ...]:
        """Shape with the dynamic axes set from ``sizes`` ({symbol: size}); missing symbols keep the opt size."""
        shape = list(self.shape)
        for d in self.dynamic:
            shape[d.axis] = sizes.get(d.symbol, shape[d.axis])
        return tuple(shape)

    def to_json(self, precision: str, with_profile: bool) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.resolved_dtype(precision)}
        if self.dynamic:
            out["dynamic"] = [{"axis": d.axis, "min": d.min, "max": d.max, "symbol": d.symbol} for d in self.dynamic]
        if with_profile:
            out["profile"] = [list(s) for s in self.profile()]
        return out


@dataclass(frozen=True)
class NetworkSpec:
    """The export contract of one network."""

    name: str
    description: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    factory: Callable[[Any], nn.Module]  # ModelSet-like -> wrapper: forward(*inputs) -> output or tuple of outputs
    shape_fields: Tuple[str, ...]  # ExportShapes fields this network's shapes come from
    exporter: str = "torchscript"  # "torchscript" (torch.onnx.export dynamo=False) or "dynamo"
    export_attention: bool = False  # switch mmgt attention layers to the "export" math while exporting
    allow_fp16: bool = True  # False: always exported/built in fp32 (Stage I and the audio encoders)
    tolerance: float = 1e-3  # max abs diff onnxruntime vs torch, fp32
    tolerance_fp16: float = 5e-2  # the same for an fp16 artifact against the fp32 torch reference
    version: int = 1  # bump when the wrapper changes what the artifact computes
    meta: Mapping[str, Any] = field(default_factory=dict)  # extra facts for the runtime (e.g. uncond_rows)

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def config_sections(self) -> Tuple[str, ...]:
        return CONFIG_SECTIONS[self.name]

    def precision(self, requested: str) -> str:
        """The precision this network is actually exported in when ``requested`` is asked for."""
        return requested if self.allow_fp16 else "fp32"

    def tol(self, precision: str) -> float:
        return self.tolerance_fp16 if precision == "fp16" else self.tolerance

    def io_json(self, precision: str, with_profile: bool = True) -> Dict[str, Any]:
        return {"inputs": [t.to_json(precision, with_profile) for t in self.inputs],
                "outputs": [t.to_json(precision, with_profile) for t in self.outputs]}

    def shape_values(self, shapes: ExportShapes) -> Dict[str, int]:
        return {name: getattr(shapes, name) for name in self.shape_fields}

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """torch.onnx.export's dynamic_axes for the TorchScript exporter."""
        axes = {t.name: {d.axis: d.symbol for d in t.dynamic} for t in self.inputs + self.outputs if t.dynamic}
        return axes

    def sample_inputs(self, precision: str = "fp32", seed: int = 0,
                      sizes: Optional[Mapping[str, int]] = None) -> Dict[str, torch.Tensor]:
        """Seeded inputs in each input's range, at the opt shape (or ``sizes`` for the dynamic axes)."""
        gen = torch.Generator().manual_seed(seed)
        feeds = {}
        for t in self.inputs:
            shape = t.shape_at(sizes or {})
            if t.low is None:
                x = torch.randn(shape, generator=gen)
            else:
                x = t.low + (t.high - t.low) * torch.rand(shape, generator=gen)
            feeds[t.name] = x.to(TORCH_DTYPES[t.resolved_dtype(precision)])
        return feeds

    def profile_points(self) -> Tuple[Dict[str, int], ...]:
        """Sizes of the dynamic axes to check parity at: opt, and min when it differs."""
        points = [{}]
        mins = {d.symbol: d.min for t in self.inputs for d in t.dynamic}
        if any(d.min != t.shape[d.axis] for t in self.inputs for d in t.dynamic):
            points.append(mins)
        return tuple(points)


# ----------------------------------------------------------------------------------------------------------------
# Torch wrappers: flat positional forward in contract order
# ----------------------------------------------------------------------------------------------------------------
class SMGAStep(nn.Module):
    """SMGA with the audio condition: (x_t, t, init_pose, cond) -> x0."""

    def __init__(self, smga: nn.Module):
        super().__init__()
        self.smga = smga

    def forward(self, x_t, t, init_pose, cond):
        return self.smga(x_t, t, init_pose, cond)  # (B, W, 402)


class SMGAGuidedStep(nn.Module):
    """SMGA.guided_forward with the guidance weight as an input: both halves (audio, null tokens) in one pass."""

    def __init__(self, smga: nn.Module):
        super().__init__()
        self.smga = smga

    def forward(self, x_t, t, init_pose, cond, guidance):
        return self.smga.guided_forward(x_t, t, init_pose, cond, guidance.reshape(-1, 1, 1))  # (B, W, 402)


class SpeechFeatures(nn.Module):
    """A speech encoder's features as a graph: wave (1, L) -> its 25 fps features, by mmgt.audio's own tensor math
    (``wavlm_hidden``: (W, hidden), the SMGA condition; ``wav2vec2_hidden``: (W, layers, hidden), every layer)."""

    def __init__(self, encoder: nn.Module, n_frames: int, hidden: Callable[..., torch.Tensor]):
        super().__init__()
        self.encoder, self.n_frames, self.hidden = encoder, n_frames, hidden
        self.normalize = bool(getattr(encoder.config, "normalize_input", True))

    def forward(self, wave):
        return self.hidden(self.encoder, wave, self.n_frames, self.normalize)


class ReferenceBank(nn.Module):
    """ReferenceNet at t = 0: (latent, context) -> the bank as a tuple in the denoiser's read order."""

    def __init__(self, reference_unet: nn.Module):
        super().__init__()
        self.reference_unet = reference_unet

    def forward(self, latent, context):
        return tuple(self.reference_unet(latent, context))  # each (1, h_l*w_l, C_l)


class DenoiserStep(nn.Module):
    """UNet3D step with flat inputs: sample, timestep, context, pose_features, audio_tokens, masks, bank -> v."""

    def __init__(self, unet: nn.Module, mask_levels: Sequence[int], bank_size: int, uncond_rows: int):
        super().__init__()
        self.unet = unet
        self.mask_levels = tuple(mask_levels)
        self.bank_size = bank_size
        self.uncond_rows = uncond_rows

    def forward(self, sample, timestep, context, pose_features, audio_tokens, *masks_and_bank):
        n_masks = len(BRANCHES) * len(self.mask_levels)
        flat_masks, bank = masks_and_bank[:n_masks], masks_and_bank[n_masks:]
        # inputs are level-major (level a: full, face, lip; level b: ...); UNet3D wants {branch: [by level]}
        masks = {b: [None] * (max(self.mask_levels) + 1) for b in BRANCHES}
        for i, level in enumerate(self.mask_levels):
            for j, b in enumerate(BRANCHES):
                masks[b][level] = flat_masks[i * len(BRANCHES) + j]  # (B, C, h_l*w_l)
        return self.unet(sample, timestep, context, pose_features=pose_features, audio_tokens=audio_tokens,
                         masks=masks, bank=list(bank), uncond_rows=self.uncond_rows)  # (B, 4, C, h, w)


class VAEEncode(nn.Module):
    """image (1, 3, R, R) in [-1, 1] -> posterior mean x scaling factor (mmgt.vae.encode_reference's latent)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean * self.scale  # (1, 4, h, w)


# ----------------------------------------------------------------------------------------------------------------
# The contracts
# ----------------------------------------------------------------------------------------------------------------
def _f(name, shape, low=None, high=None, dtype=FLOAT, dynamic=()):
    return TensorSpec(name, tuple(int(s) for s in shape), dtype, tuple(dynamic), low, high)


def network_specs(cfg: MMGTConfig, shapes: ExportShapes) -> Dict[str, NetworkSpec]:
    """Every contract for this config and these shapes, by network name, in export order.

    ``smga_step_guided`` is left out when the SMGA window differs from the null condition's token count (the
    learned null tokens are (1, W, D) with the config's W); ``contract_notes`` says so.
    """
    u, ap, W = cfg.unet, cfg.audio_proj, shapes.smga_window
    C, R, h, B = shapes.chunk, shapes.resolution, shapes.latent, shapes.unet_batch
    levels = audio_mask_levels(u, h)
    bank = reference_bank_layout(u, h)
    c0 = u.block_out_channels[0]
    specs = [
        NetworkSpec(
            "smga_step", "SMGA denoiser with the audio condition (x0 prediction)",
            inputs=(_f("x_t", (1, W, POSE_DIM)), _f("t", (1,), 0, 999, "float32"),
                    _f("init_pose", (1, POSE_DIM), -1, 1), _f("cond", (1, W, cfg.smga.audio_dim))),
            outputs=(_f("x0", (1, W, POSE_DIM)),),
            factory=lambda m: SMGAStep(m.smga), shape_fields=("smga_window",), exporter="dynamo", allow_fp16=False),
        NetworkSpec(
            "smga_step_guided", "SMGA denoiser, classifier-free guided with the null tokens in one pass",
            inputs=(_f("x_t", (1, W, POSE_DIM)), _f("t", (1,), 0, 999, "float32"),
                    _f("init_pose", (1, POSE_DIM), -1, 1), _f("cond", (1, W, cfg.smga.audio_dim)),
                    _f("guidance", (1,), 2, 2, "float32")),
            outputs=(_f("x0", (1, W, POSE_DIM)),),
            factory=lambda m: SMGAGuidedStep(m.smga), shape_fields=("smga_window",), exporter="dynamo",
            allow_fp16=False),
        NetworkSpec(
            "wavlm", "WavLM last hidden state at 25 fps (the SMGA condition without the librosa columns)",
            inputs=(_f("wave", (1, shapes.wave_samples), dtype="float32"),),
            outputs=(_f("features", (W, cfg.wavlm.hidden_size), dtype="float32"),),
            factory=lambda m: SpeechFeatures(m.wavlm, W, wavlm_hidden), shape_fields=("smga_window",),
            allow_fp16=False),
        NetworkSpec(
            "wav2vec2", "wav2vec2 hidden states of every layer at 25 fps (input of the audio projection)",
            inputs=(_f("wave", (1, shapes.wave_samples), dtype="float32"),),
            outputs=(_f("hidden_states", (W, cfg.wav2vec2.num_layers, cfg.wav2vec2.hidden_size), dtype="float32"),),
            factory=lambda m: SpeechFeatures(m.wav2vec2, W, wav2vec2_hidden), shape_fields=("smga_window",),
            allow_fp16=False),
        NetworkSpec(
            "audio_proj", "AudioProjModel: +-2-frame wav2vec2 windows -> MM-HAA tokens per frame",
            inputs=(_f("audio_windows", (1, shapes.audio_frames_max, ap.seq_len, ap.blocks, ap.channels),
                       dynamic=(Dynamic(1, 1, shapes.audio_frames_max, "frames"),)),),
            outputs=(_f("audio_tokens", (1, shapes.audio_frames_max, ap.context_tokens, ap.output_dim),
                        dynamic=(Dynamic(1, 1, shapes.audio_frames_max, "frames"),)),),
            factory=lambda m: m.audioproj, shape_fields=("audio_frames_max",)),
        NetworkSpec(
            "pose_guider", "PoseGuider: pose frames in [0, 1] -> features added after conv_in",
            inputs=(_f("pose", (1, cfg.pose_guider.conditioning_channels, C, R, R), 0, 1),),
            outputs=(_f("pose_features", (1, cfg.pose_guider.embedding_channels, C, h, h)),),
            factory=lambda m: m.pose_guider, shape_fields=("chunk", "resolution")),
        NetworkSpec(
            "reference_unet", "ReferenceNet at t = 0: reference latent + CLIP context -> attention bank",
            inputs=(_f("latent", (1, u.in_channels, h, h)), _f("context", (1, 1, u.cross_attention_dim))),
            outputs=tuple(_f(bank_name(i), e.shape(1)) for i, e in enumerate(bank)),
            factory=lambda m: ReferenceBank(m.reference_unet), shape_fields=("resolution",),
            export_attention=True, meta={"bank": [e.name for e in bank]}),
        NetworkSpec(
            "denoising_unet", "UNet3D denoising step (v prediction) with bank, pose features, audio tokens, masks",
            inputs=(_f("sample", (B, u.in_channels, C, h, h)), _f("timestep", (B,), 0, 999, "float32"),
                    _f("context", (B, 1, u.cross_attention_dim)), _f("pose_features", (B, c0, C, h, h)),
                    _f("audio_tokens", (B, C, ap.context_tokens, u.audio_dim)))
            + tuple(_f(mask_name(b, lv.level), (B, C, lv.tokens), 0, 1) for lv in levels for b in BRANCHES)
            + tuple(_f(bank_name(i), e.shape(1)) for i, e in enumerate(bank)),
            outputs=(_f("v", (B, u.out_channels, C, h, h)),),
            factory=lambda m: DenoiserStep(m.denoising_unet, [lv.level for lv in levels], len(bank),
                                           shapes.uncond_rows),
            shape_fields=("chunk", "resolution", "unet_batch"), export_attention=True,
            meta={"uncond_rows": shapes.uncond_rows, "mask_levels": [lv.level for lv in levels],
                  "bank": [e.name for e in bank]}),
        NetworkSpec(
            "vae_encoder", "VAE encoder: image in [-1, 1] -> posterior mean x scaling factor",
            inputs=(_f("image", (1, 3, R, R), -1, 1),),
            outputs=(_f("latent", (1, cfg.vae.latent_channels, h, h)),),
            factory=lambda m: VAEEncode(m.vae), shape_fields=("resolution",)),
        NetworkSpec(
            "vae_decoder", "VAE decoder: diffusion-scale latents -> frames in [0, 1]",
            inputs=(_f("latents", (shapes.decode_frames_max, cfg.vae.latent_channels, h, h),
                       dynamic=(Dynamic(0, 1, shapes.decode_frames_max, "frames"),)),),
            outputs=(_f("frames", (shapes.decode_frames_max, 3, R, R),
                        dynamic=(Dynamic(0, 1, shapes.decode_frames_max, "frames"),)),),
            factory=lambda m: VAEDecoder(m.vae), shape_fields=("decode_frames_max", "resolution")),
    ]
    out = {s.name: s for s in specs}
    if W != cfg.smga.window:
        del out["smga_step_guided"]
    if tuple(out) != tuple(n for n in NETWORKS if n in out):
        raise AssertionError("export.specs: contracts out of NETWORKS order")
    return out


def contract_notes(cfg: MMGTConfig, shapes: ExportShapes) -> Dict[str, str]:
    """Networks without a contract under these shapes, and why."""
    notes = {}
    if shapes.smga_window != cfg.smga.window:
        notes["smga_step_guided"] = (f"SMGA's null condition has {cfg.smga.window} tokens; window "
                                     f"{shapes.smga_window} cannot run the guided step (use smga_step twice)")
    return notes


__all__ = ["FLOAT", "TORCH_DTYPES", "Dynamic", "TensorSpec", "NetworkSpec", "ExportShapes", "DEFAULT_CHUNK",
           "NETWORKS", "STAGE2_NETWORKS", "SMGAStep", "SMGAGuidedStep", "SpeechFeatures",
           "ReferenceBank", "DenoiserStep", "VAEEncode", "network_specs", "contract_notes"]
