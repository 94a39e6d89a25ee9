"""The model set and the stage functions of MMGT, and the eager reference pipeline built from them.

The pieces the engine's runner calls, in the order of the data:

    build_models / load_models   -> ModelSet   (every network; one named call per network contract)
    prepare_avatar(image)        -> Avatar     (CLIP context, reference latent, ReferenceNet bank; once per image)
    smga_condition + generate_poses            Stage I: audio -> (W, 402) poses in SMGA space
    pose_conditions(keypoints)   -> pose frames + motion masks (one layout: per level (F, 3, h*w))
    audio_tokens(wave)           -> (F, 32, D) MM-HAA tokens, on the model's device
    render_chunk(StageIIChunk)   -> final latents of <= 32 frames (overlap latents re-noised from the previous chunk)
    decode(latents)              -> uint8 frames

Every network is reached through ``ModelSet.call(name, feeds)``: named tensors in, named tensors out, as its contract
(mmgt/contracts.py) declares. By default a call runs the contract's torch module; the engine swaps in other executors
per network (onnxruntime, TensorRT, compiled or CUDA-graphed torch) with ``dataclasses.replace(models,
executors=...)``. Nothing a call needs is kept on a module or on the model set: avatars, banks, masks and tokens are
arguments, so one ModelSet serves any number of threads, avatars and sessions at once.

``MMGTPipeline.__call__`` chains the stage functions for one window (reference image + 3.2 s of audio -> 80 frames),
the eager reference the engine's runner is compared with.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import keypoints as K
from .acoustic import librosa_features
from .audio_io import frames_for_samples
from .audio_proj import AudioProjModel, audio_windows
from .config import MMGT, MMGTConfig
from .contract import SAMPLES_PER_FRAME, Contract, Executor, Feeds, Shapes, TorchCall
from .contracts import network_contracts
from .image_encoder import build_clip, clip_preprocess, load_clip
from .init_pose import initial_pose
from .motion_masks import motion_masks
from .noise import DDIMSchedule
from .pose_guider import PoseGuider
from .pose_render import render_poses
from .reference_net import ReferenceNet
from .seeding import seeded
from .smga import SMGA, SMGADiffusion, build_smga
from .speech_encoders import build_wav2vec2, build_wavlm, load_wav2vec2, load_wavlm
from .unet3d import UNet3D, audio_mask_levels, bank_name, mask_name
from .vae import build_vae, image_to_tensor, load_vae, to_uint8
from .weights import ReleaseLayout, WeightsError, load_smga, load_stage2, stage2_builders

log = logging.getLogger(__name__)

UNTRAINED_NOTE = "untrained preset: random weights, the frames are not a real avatar"


# ----------------------------------------------------------------------------------------------------------------
# The model set
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSet:
    """Every network of MMGT on one device, in eval mode, and one named call per network contract.

    Immutable: derive a variant with ``dataclasses.replace`` (other executors, another decoder); the modules are
    shared, nothing is copied.
    """

    cfg: MMGTConfig
    smga: SMGA  # Stage I pose diffusion network
    wavlm: nn.Module  # transformers WavLMModel (SMGA's audio condition)
    wav2vec2: nn.Module  # transformers Wav2Vec2Model (Stage II audio tokens)
    audioproj: AudioProjModel  # wav2vec2 windows -> 32 tokens per frame
    pose_guider: PoseGuider  # pose frames -> features added after conv_in
    reference_unet: ReferenceNet  # reference image -> attention bank
    denoising_unet: UNet3D  # the video denoiser
    vae: nn.Module  # diffusers AutoencoderKL
    clip: nn.Module  # transformers CLIPVisionModelWithProjection
    decoder: Optional[nn.Module] = None  # a light decoder (AutoencoderTiny) used instead of the VAE's for decoding
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # Stage II compute dtype (Stage I and the speech encoders stay fp32)
    shapes: Optional[Shapes] = None  # static shapes of the calls (chunk, CFG layouts); None: the config's defaults
    executors: Mapping[str, Executor] = field(default_factory=dict)  # network -> executor replacing its torch call
    contracts: Dict[str, Contract] = field(init=False, repr=False)  # network -> its contract at these shapes
    calls: Dict[str, Executor] = field(init=False, repr=False)  # network -> executor: `executors`, else torch

    def __post_init__(self) -> None:
        shapes = self.shapes or Shapes.from_config(self.cfg)
        object.__setattr__(self, "shapes", shapes)
        contracts = network_contracts(self.cfg, shapes)
        unknown = sorted(set(self.executors) - set(contracts))
        if unknown:
            raise ValueError(f"ModelSet: executors for unknown networks {unknown}; known: {', '.join(contracts)}")
        calls = {name: self.executors.get(name) or TorchCall(c, c.module(self)) for name, c in contracts.items()}
        object.__setattr__(self, "contracts", contracts)
        object.__setattr__(self, "calls", calls)

    @property
    def frame_decoder(self) -> nn.Module:
        """The decoder frames are made with: the light one when set, else the VAE's."""
        return self.decoder if self.decoder is not None else self.vae

    def call(self, network: str, feeds: Feeds) -> Dict[str, torch.Tensor]:
        """Run ``network`` on named inputs -> named outputs (its contract's names)."""
        try:
            executor = self.calls[network]
        except KeyError:
            raise KeyError(f"ModelSet: no network {network!r} for these shapes; known: {', '.join(self.calls)}") \
                from None
        return executor(feeds)

    def backends(self) -> Dict[str, str]:
        """network -> the kind of executor that runs it ("torch", "onnxruntime", "tensorrt", ...)."""
        return {name: getattr(ex, "kind", type(ex).__name__) for name, ex in self.calls.items()}

    def stage2_modules(self) -> Dict[str, nn.Module]:
        """The networks of net-32500.pth, under their checkpoint prefixes."""
        return {"reference_unet": self.reference_unet, "denoising_unet": self.denoising_unet,
                "pose_guider": self.pose_guider, "audioproj": self.audioproj}

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "ModelSet":
        """The modules moved (in place) to ``device`` (Stage II in ``dtype``); returns the model set for them."""
        device, dtype = torch.device(device), dtype or self.dtype
        for name in ("smga", "wavlm", "wav2vec2"):  # small or numerically delicate: fp32
            getattr(self, name).to(device)
        for name in ("audioproj", "pose_guider", "reference_unet", "denoising_unet", "vae", "clip", "decoder"):
            if getattr(self, name) is not None:
                getattr(self, name).to(device, dtype)
        return dataclasses.replace(self, device=device, dtype=dtype)


def _randomise_zero_init(module: nn.Module, generator: torch.Generator, std: float = 0.05) -> int:
    """Give zero-initialised weights small random values (untrained presets only).

    Zero-init layers (PoseGuider conv_out, MM-HAA zero convs, motion-module proj_out) make a freshly built network
    ignore poses, audio and time; the tiny preset must show that every input matters, so its output has to depend
    on them. Returns the number of tensors changed.
    """
    changed = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2 and not torch.any(p):
                p.copy_(torch.randn(p.shape, generator=generator, device="cpu").to(p.device) * std)
                changed += 1
    return changed


def build_models(cfg: MMGTConfig, device="cpu", dtype: torch.dtype = torch.float32,
                 shapes: Optional[Shapes] = None) -> ModelSet:
    """Every network with seeded random weights (the untrained presets: runs anywhere, no download)."""
    seed = cfg.seed
    gen = torch.Generator().manual_seed(seed + 1000)
    # On an accelerator the weights are made there (a CPU init of 2.5 B parameters takes minutes); the CPU path
    # stays bit-identical across machines.
    where = torch.device(device) if torch.device(device).type != "cpu" else contextlib.nullcontext()
    with where:
        with seeded(seed):
            parts = {name: build() for name, build in stage2_builders(cfg).items()}
    for module in parts.values():  # outside the device context: the CPU generator draws on the CPU
        _randomise_zero_init(module, gen)
    with where:
        modules = dict(smga=build_smga(cfg.smga, seed=seed), wavlm=build_wavlm(cfg.wavlm, seed=seed + 1),
                       wav2vec2=build_wav2vec2(cfg.wav2vec2, seed=seed + 2), vae=build_vae(cfg.vae, seed=seed + 3),
                       clip=build_clip(cfg.clip, seed=seed + 4), **parts)
    for m in parts.values():
        m.eval()
    log.info("built %s preset with seeded random weights (%s)", cfg.name, UNTRAINED_NOTE)
    return ModelSet(cfg=cfg, shapes=shapes, **modules).to(device, dtype)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise WeightsError(f"{path}: not found ({what}); --weights must point at the release layout "
                           "(see `python -m mmgt.weights --help`)")
    return path


def check_unet_config(path: Path, cfg: MMGTConfig) -> None:
    """The SD1.5 unet/config.json must describe the UNet our config builds."""
    data = json.loads(_need(path, "SD1.5 UNet config").read_text())
    expect = {"block_out_channels": list(cfg.unet.block_out_channels), "layers_per_block": cfg.unet.layers_per_block,
              "cross_attention_dim": cfg.unet.cross_attention_dim, "in_channels": cfg.unet.in_channels}
    bad = {k: (data.get(k), v) for k, v in expect.items() if k in data and data[k] != v}
    if bad:
        raise WeightsError(f"{path}: UNet config differs from the {cfg.name} preset: "
                           + ", ".join(f"{k} file {a} vs preset {b}" for k, (a, b) in bad.items()))


def load_models(weights_dir, cfg: MMGTConfig = MMGT, device="cpu", dtype: torch.dtype = torch.float32,
                shapes: Optional[Shapes] = None) -> ModelSet:
    """Every network from the release layout under ``weights_dir`` (strict; nothing is downloaded)."""
    layout = ReleaseLayout(Path(weights_dir))
    if not layout.root.is_dir():
        raise WeightsError(f"{layout.root}: weights directory not found")
    check_unet_config(layout.unet_config, cfg)
    # 1. Stage I
    smga = load_smga(SMGA(cfg.smga), _need(layout.smga, "SMGA checkpoint"))
    wavlm = load_wavlm(_need(layout.wavlm, "WavLM-Large"), cfg.wavlm)
    # 2. Stage II trained weights, then the frozen encoders
    parts = {name: build() for name, build in stage2_builders(cfg).items()}
    load_stage2(parts, _need(layout.net, "Stage II checkpoint"))
    models = ModelSet(cfg=cfg, smga=smga, wavlm=wavlm, shapes=shapes,
                      wav2vec2=load_wav2vec2(_need(layout.wav2vec2, "wav2vec2-base-960h"), cfg.wav2vec2),
                      vae=load_vae(_need(layout.vae, "sd-vae-ft-mse")),
                      clip=load_clip(_need(layout.image_encoder, "CLIP image encoder")), **parts)
    log.info("loaded release weights from %s", layout.root)
    return models.to(device, dtype)


def save_models(models: ModelSet, root) -> ReleaseLayout:
    """Write a model set in the release layout (what ``load_models`` reads): for tests, and to turn a converted or
    fine-tuned set into a directory ``--weights`` accepts. WavLM is written as a transformers directory."""
    from .weights import save_smga, save_stage2

    layout = ReleaseLayout(Path(root))
    save_smga(models.smga, layout.smga)
    save_stage2(models.stage2_modules(), layout.net)
    u = models.cfg.unet
    layout.unet_config.parent.mkdir(parents=True, exist_ok=True)
    layout.unet_config.write_text(json.dumps({
        "_class_name": "UNet2DConditionModel", "in_channels": u.in_channels, "out_channels": u.out_channels,
        "block_out_channels": list(u.block_out_channels), "layers_per_block": u.layers_per_block,
        "attention_head_dim": u.attention_heads, "cross_attention_dim": u.cross_attention_dim,
        "norm_num_groups": u.norm_num_groups}, indent=2))
    models.vae.save_pretrained(str(layout.vae))
    models.clip.save_pretrained(str(layout.image_encoder))
    models.wav2vec2.save_pretrained(str(layout.wav2vec2))
    # the release directory (wav2vec2-base-960h) has its feature extractor's settings too; do_normalize is read back
    from transformers import Wav2Vec2FeatureExtractor

    Wav2Vec2FeatureExtractor(do_normalize=bool(getattr(models.wav2vec2.config, "normalize_input", True)),
                             return_attention_mask=False).save_pretrained(str(layout.wav2vec2))
    models.wavlm.save_pretrained(str(layout.root / "WavLM-Large"))
    return layout


# ----------------------------------------------------------------------------------------------------------------
# The avatar: everything that depends on the reference image only (computed once, reused by every window)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Avatar:
    """A prepared reference image: data, not module state. Any number of avatars share one ModelSet."""

    image: np.ndarray  # (R, R, 3) uint8 reference at render resolution
    init_pose: np.ndarray  # (134, 3) pixel keypoints of the reference on the 512 canvas
    pose_method: str  # "pose_file" | "dwpose" | "template"
    context: torch.Tensor  # (1, 1, D) CLIP image embedding, on the model's device and dtype
    ref_latent: torch.Tensor  # (1, 4, h, w) VAE mean latent x scaling factor
    bank: Tuple[torch.Tensor, ...]  # ReferenceNet attention bank, denoiser read order, each (1, tokens, C)


def square_image(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize (PIL Lanczos) to ``size``; MMGT renders square frames only."""
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.uint8)
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[top:top + side, left:left + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))


@torch.no_grad()
def prepare_avatar(models: ModelSet, image: np.ndarray, pose_file=None, weights_dir=None) -> Avatar:
    """Reference image -> Avatar: initial pose, CLIP context, reference latent and the ReferenceNet bank."""
    dev, dt = models.device, models.dtype
    img = square_image(image, models.cfg.resolution)  # (R, R, 3)
    kps, method = initial_pose(square_image(image, K.CANVAS), weights_dir=weights_dir, pose_file=pose_file)
    pixels = clip_preprocess(img, models.cfg.clip.image_size).to(dev, dt)  # (1, 3, 224, 224)
    context = models.call("image_encoder", {"pixels": pixels})["context"].to(dev, dt)  # (1, 1, D)
    image_in = image_to_tensor(img).to(dev, dt)  # (1, 3, R, R) in [-1, 1]
    ref_latent = models.call("vae_encoder", {"image": image_in})["latent"].to(dev, dt)  # (1, 4, h, w)
    out = models.call("reference_unet", {"latent": ref_latent, "context": context})
    bank = tuple(out[bank_name(i)].to(dev, dt) for i in range(len(out)))
    return Avatar(image=img, init_pose=kps.astype(np.float32), pose_method=method, context=context,
                  ref_latent=ref_latent, bank=bank)


# ----------------------------------------------------------------------------------------------------------------
# Stage I
# ----------------------------------------------------------------------------------------------------------------
def _frames_of_wave(wav16k: np.ndarray, n_frames: int) -> torch.Tensor:
    """A 16 kHz waveform as the speech encoders take it: (1, n_frames, 640) float32, zero-padded or cut to whole
    frames (frame f covers samples [640 f, 640 (f + 1)))."""
    wav = np.asarray(wav16k, np.float32).reshape(-1)
    out = np.zeros(n_frames * SAMPLES_PER_FRAME, np.float32)
    out[:min(len(wav), len(out))] = wav[:len(out)]
    return torch.from_numpy(out).reshape(1, n_frames, SAMPLES_PER_FRAME)


@torch.no_grad()
def smga_condition(models: ModelSet, wav16k: np.ndarray, n_frames: int) -> torch.Tensor:
    """(n_frames, audio_dim) SMGA audio condition of a waveform span: WavLM features ++ librosa features."""
    wave = _frames_of_wave(wav16k, n_frames)  # (1, F, 640)
    wavlm = models.call("wavlm", {"wave": wave.to(models.device)})["features"].float()  # (F, H)
    extra = torch.from_numpy(librosa_features(wave.reshape(-1).numpy(), n_frames)).to(wavlm.device)  # (F, 35)
    return torch.cat([wavlm, extra], dim=1)  # (F, H + 35)


@torch.no_grad()
def generate_poses(models: ModelSet, cond: torch.Tensor, init_pose: np.ndarray, steps: Optional[int] = None,
                   guidance: Optional[float] = None, generator: Optional[torch.Generator] = None) -> np.ndarray:
    """One SMGA window: (W, audio_dim) condition + initial pose (402,) in SMGA space -> (W, 402) SMGA-space poses.

    The condition is encoded once (``smga_condition``), then every DDIM step is one ``smga_denoise`` call. The first
    window starts from the reference image's pose (``keypoints.pixel_to_smga``); window k+1 from the last frame of
    window k (``smga.continue_from``)."""
    guidance = models.cfg.smga.guidance if guidance is None else float(guidance)
    if (guidance != 1.0) != (models.shapes.smga_batch == 2):
        raise ValueError(f"generate_poses: SMGA guidance {guidance} needs the model set's calls prepared for it "
                         f"(they take batch {models.shapes.smga_batch}); make the model set with this smga_guidance")
    dev = models.device
    window = cond.shape[0]
    init = torch.as_tensor(np.asarray(init_pose, np.float32).reshape(1, -1), device=dev)  # (1, 402)
    encoded = models.call("smga_condition", {"cond": cond[None].to(dev, torch.float32)})  # tokens, hidden
    extra = {"guidance": torch.tensor([guidance], device=dev)} if guidance != 1.0 else {}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {"x_t": x, "t": t.float(), "init_pose": init, **encoded, **extra}
        return models.call("smga_denoise", feeds)["x0"]  # (1, W, 402)

    out = SMGADiffusion(models.cfg.smga).sample_encoded(denoise, 1, window, dev, steps=steps,
                                                         generator=generator)  # (1, W, 402)
    return out[0].float().cpu().numpy()


def pose_conditions(cfg: MMGTConfig, kps_px: np.ndarray) -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
    """(F, 134, 3) pixel keypoints -> pose frames uint8 (F, R, R, 3) and motion masks per level (F, 3, l*l).

    The keypoints are drawn as given: a pose that SMGA generated keeps its predicted neck (the neck is recomputed
    from the shoulders only when a pose is detected in an image, mmgt.init_pose); points under the score threshold
    are left out by the drawing and the masks themselves."""
    unit = K.pixel_to_unit(kps_px)  # (F, 134, 3)
    frames = render_poses(unit, size=K.CANVAS, out_size=cfg.resolution)
    return frames, motion_masks(unit, levels=cfg.mask_levels)


def unet_masks(cfg: MMGTConfig, masks: Sequence[np.ndarray]) -> Tuple[np.ndarray, ...]:
    """The mask levels the UNet3D reads (one per MM-HAA down block), out of ``pose_conditions``' levels."""
    return tuple(masks[lv.level] for lv in audio_mask_levels(cfg.unet, cfg.latent_size))


# ----------------------------------------------------------------------------------------------------------------
# Stage II
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def audio_tokens(models: ModelSet, wav16k: np.ndarray, n_frames: int) -> torch.Tensor:
    """(n_frames, tokens, D) MM-HAA audio tokens of a waveform span, on the model's device and dtype.

    wav2vec2 (every layer, 25 fps) -> +-2 frame windows -> audio projection."""
    wave = _frames_of_wave(wav16k, n_frames).to(models.device)  # (1, F, 640)
    feats = models.call("wav2vec2", {"wave": wave})["hidden_states"]  # (F, L, C)
    win = audio_windows(feats).to(models.device, models.dtype)  # (F, 5, L, C)
    return models.call("audio_proj", {"audio_windows": win[None]})["audio_tokens"][0].to(models.dtype)  # (F, T, D)


def upload(x, device) -> torch.Tensor:
    """CPU data (array or tensor) -> ``device`` without a host sync: on a GPU through pinned memory, asynchronously.

    A copy from pageable memory blocks the calling thread until the stream has finished all earlier work, so the
    inputs of chunk j+1 would wait for chunk j's denoising and the GPU would idle while the host prepares the next
    chunk; an asynchronous copy from pinned memory is queued behind that work instead."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True, eq=False)
class StageIIChunk:
    """Everything one render chunk of C frames needs beyond the avatar: the one object the runner hands Stage II.

    Window arrays are sliced for the chunk (no per-frame lists); the audio tokens are already on the model's device.
    """

    index: int  # chunk number j (scheduler RenderChunk.index)
    first_frame: int  # global frame of local frame 0 (seeds the per-frame noise)
    pose_frames: np.ndarray  # (C, R, R, 3) uint8 skeleton drawings
    masks: Tuple[np.ndarray, ...]  # one per MM-HAA level (unet_masks): (C, 3, h_l*w_l) float32
    audio_tokens: torch.Tensor  # (C, T, D) on the model's device
    known: Optional[torch.Tensor] = None  # (1, 4, O, h, w) final latents of the first O frames, from the previous chunk
    emit_from: int = 0  # local frames [emit_from, emit_to) are new: decode turns them into output
    emit_to: int = 0

    @property
    def n_frames(self) -> int:
        return int(self.pose_frames.shape[0])


@dataclass(frozen=True, eq=False)
class StageIIResult:
    """Stage II's output for one chunk, the one object decode takes."""

    index: int  # the chunk's number
    first_frame: int  # global frame of latents' local frame 0
    latents: torch.Tensor  # (1, 4, C, h, w) final latents (on a GPU: possibly still being computed on its stream)
    emit_from: int  # local frames [emit_from, emit_to) become output frames
    emit_to: int
    ready: Optional[object] = None  # GPU: a CUDA event on Stage II's stream after which ``latents`` exist
    newest_frame: Optional[int] = None  # global frame of the newest real frame the call read, when it is not the
    # last emitted one (the rolling schedule emits older frames than it takes in)

    @property
    def new_latents(self) -> torch.Tensor:
        return self.latents[:, :, self.emit_from:self.emit_to]  # (1, 4, n_new, h, w)


def frame_noise(shape_per_frame: Sequence[int], first_frame: int, n_frames: int, seed: int) -> torch.Tensor:
    """Initial noise (1, C, F, h, w) drawn per GLOBAL frame from (seed, frame): the same frame gets the same noise
    whatever chunk it falls in, so chunking does not change the render."""
    out = []
    for f in range(first_frame, first_frame + n_frames):
        g = torch.Generator().manual_seed((seed * 1_000_003 + f) % (2**63 - 1))
        out.append(torch.randn(tuple(shape_per_frame), generator=g))  # (C, h, w)
    return torch.stack(out, dim=1)[None]  # (1, C, F, h, w)


@functools.lru_cache(maxsize=8)
def _schedule(sampler, steps: int, device: str) -> DDIMSchedule:
    """The DDIM tables of one (sampler, steps, device): built once, not for every chunk."""
    return DDIMSchedule(sampler, steps).to(device)


def _check_guidance(models: ModelSet, guidance: float, who: str) -> bool:
    """True when ``guidance`` needs the CFG pass; the model set's calls must have been made for that layout."""
    cfg_on = guidance != 1.0
    if cfg_on != (models.shapes.unet_batch == 2):
        raise ValueError(f"{who}: guidance {guidance} needs the model set's calls prepared for it (they take "
                         f"denoiser batch {models.shapes.unet_batch}); make the model set with this guidance")
    return cfg_on


def _denoiser_feeds(models: ModelSet, avatar: Avatar, pose_frames: np.ndarray, masks: Sequence[np.ndarray],
                    tokens: torch.Tensor, cfg_on: bool) -> Dict[str, torch.Tensor]:
    """The denoiser inputs of a call's frames besides sample and timestep: pose features, masks, audio tokens,
    CLIP context and the avatar's bank (CFG: the unconditional row has zero audio tokens and a zero context)."""
    cfg, dev, dt = models.cfg, models.device, models.dtype
    pose = upload(pose_frames, dev).permute(3, 0, 1, 2)[None].to(dt) / 255.0  # (1, 3, N, R, R)
    pose_feat = models.call("pose_guider", {"pose": pose})["pose_features"].to(dt)  # (1, C0, N, h, w)
    masks = [upload(m, dev)[None].to(dt) for m in masks]  # each (1, N, 3, h_l*w_l)
    tokens = tokens.to(dev, dt)[None]  # (1, N, T, D)
    context = avatar.context
    if cfg_on:
        pose_feat = torch.cat([pose_feat, pose_feat])
        masks = [torch.cat([m, m]) for m in masks]
        tokens = torch.cat([torch.zeros_like(tokens), tokens])
        context = torch.cat([torch.zeros_like(context), context])
    levels = audio_mask_levels(cfg.unet, cfg.latent_size)
    return {"context": context, "pose_features": pose_feat, "audio_tokens": tokens,
            **{mask_name(lv.level): m for lv, m in zip(levels, masks)},
            **{bank_name(i): t for i, t in enumerate(avatar.bank)}}


def _velocity(models: ModelSet, feeds: Mapping[str, torch.Tensor], x: torch.Tensor, timestep: torch.Tensor,
              guidance: float, cfg_on: bool) -> torch.Tensor:
    """One denoiser call on latents x (1, 4, N, h, w) with a timestep per frame (N,) -> v (1, 4, N, h, w), CFG
    combined."""
    sample = torch.cat([x, x]) if cfg_on else x
    timestep = timestep.float().repeat(sample.shape[0], 1)  # (B, N) float32, as the contract says
    out = models.call("denoising_unet", {"sample": sample, "timestep": timestep, **feeds})["v"].to(models.dtype)
    return out[:1] + guidance * (out[1:] - out[:1]) if cfg_on else out


@torch.no_grad()
def render_chunk(models: ModelSet, avatar: Avatar, chunk: StageIIChunk, steps: int, guidance: float,
                 seed: int) -> StageIIResult:
    """Denoise one chunk of C <= 32 frames; returns its final latents (1, 4, C, h, w) as a StageIIResult.

    ``chunk.known`` (1, 4, O, h, w): at every step those final latents of the previous chunk are re-noised to the
    current timestep and replace the chunk's own overlap latents, so the new frames are denoised in the context of
    frames already shown and the chunks join without a seam.
    """
    cfg, dev, dt = models.cfg, models.device, models.dtype
    cfg_on = _check_guidance(models, guidance, "render_chunk")
    n = chunk.n_frames
    sched = _schedule(cfg.sampler, steps, str(dev))
    # 1. Conditions: pose features, masks, audio tokens (CFG: unconditional audio and CLIP context are zeros)
    feeds = _denoiser_feeds(models, avatar, chunk.pose_frames, chunk.masks, chunk.audio_tokens, cfg_on)
    # 2. Noise per global frame (chunking-independent), then DDIM
    noise = upload(frame_noise((cfg.unet.in_channels, cfg.latent_size, cfg.latent_size), chunk.first_frame, n,
                               seed), dev).to(dt)
    x = noise.clone()  # (1, 4, C, h, w)
    known = None if chunk.known is None else chunk.known.to(dt)
    n_known = 0 if known is None else known.shape[2]
    for i, t in enumerate(_schedule(cfg.sampler, steps, "cpu").timesteps.tolist()):  # host ints: no device read
        if n_known:  # overlap frames follow the previous chunk's result, re-noised to this step
            x[:, :, :n_known] = sched.add_noise(known, noise[:, :, :n_known], t)
        out = _velocity(models, feeds, x, torch.full((n,), float(t), device=dev), guidance, cfg_on)
        x = sched.step(out, i, x)
    if n_known:
        x[:, :, :n_known] = known
    return StageIIResult(index=chunk.index, first_frame=chunk.first_frame, latents=x, emit_from=chunk.emit_from,
                         emit_to=chunk.emit_to)


@dataclass(frozen=True, eq=False)
class RollingChunk:
    """One denoiser call of the rolling schedule (engine/rolling_plan.py plans them): S groups of G frames in frame
    order, group g at DDIM step index S-1-g. Arrays are sliced for the call's N = S * G frames."""

    index: int  # call number k
    first_frame: int  # global frame of local frame 0 (negative while warm-up slots lead the call)
    group_size: int  # G: frames per group
    pose_frames: np.ndarray  # (N, R, R, 3) uint8 skeleton drawings
    masks: Tuple[np.ndarray, ...]  # one per MM-HAA level (unet_masks): (N, 3, h_l*w_l) float32
    audio_tokens: torch.Tensor  # (N, T, D) on the model's device
    carried: Optional[torch.Tensor] = None  # (1, 4, N - G, h, w) the previous call's latents of the groups still in
    # flight (its result's latents[:, :, G:]); None: the first call, whose leading groups are all warm-up slots
    warmup_groups: int = 0  # leading groups before the stream: the reference latent re-noised to their timestep
    emit_to: int = 0  # the first group's local frames [0, emit_to) leave after this call (0: nothing leaves)
    newest_frame: Optional[int] = None  # global frame of the newest real frame the call reads (latency accounting)

    @property
    def n_frames(self) -> int:
        return int(self.pose_frames.shape[0])


@torch.no_grad()
def render_rolling(models: ModelSet, avatar: Avatar, call: RollingChunk, steps: int, guidance: float,
                   seed: int) -> StageIIResult:
    """One call of the rolling schedule: every group of G frames takes one DDIM step at its own timestep.

    The latents are the carried groups plus the new group's noise (per global frame, as ``render_chunk`` draws it);
    the result's latents (1, 4, N, h, w) are after the step: the first group's are final (its last step lands on x0)
    and leave as ``new_latents``, the next call carries ``latents[:, :, G:]``. With one step (S = 1) a call is one
    group of pure noise denoised once: ``render_chunk`` of that group without overlap, to the bit.
    """
    cfg, dev, dt = models.cfg, models.device, models.dtype
    cfg_on = _check_guidance(models, guidance, "render_rolling")
    g, n = call.group_size, call.n_frames
    if g < 1 or n != steps * g:
        raise ValueError(f"render_rolling: call {call.index} holds {n} frames, not {steps} steps x {g} frames")
    if call.carried is None and call.warmup_groups != steps - 1:
        raise ValueError(f"render_rolling: call {call.index} has no carried latents but only {call.warmup_groups} "
                         f"of its {steps - 1} older groups are warm-up slots")
    sched = _schedule(cfg.sampler, steps, str(dev))
    ts = _schedule(cfg.sampler, steps, "cpu").timesteps.tolist()  # host ints: no device read
    level = [steps - 1 - k for k in range(steps)]  # step index of group k: the oldest group takes the last step
    shape = (cfg.unet.in_channels, cfg.latent_size, cfg.latent_size)
    # 1. Conditions of the call's frames
    feeds = _denoiser_feeds(models, avatar, call.pose_frames, call.masks, call.audio_tokens, cfg_on)
    # 2. Latents: the groups in flight, then the new group as pure noise per global frame
    fresh = upload(frame_noise(shape, call.first_frame + n - g, g, seed), dev).to(dt)  # (1, 4, G, h, w)
    older = call.carried.to(dt) if call.carried is not None else fresh.new_zeros((1, shape[0], n - g, *shape[1:]))
    x = torch.cat([older, fresh], dim=2)  # (1, 4, N, h, w)
    for k in range(call.warmup_groups):  # slots before the stream: the reference image at the slot's noise level
        noise = upload(frame_noise(shape, call.first_frame + k * g, g, seed), dev).to(dt)
        ref = avatar.ref_latent.to(dt)[:, :, None].expand(-1, -1, g, -1, -1)  # (1, 4, G, h, w)
        x[:, :, k * g:(k + 1) * g] = sched.add_noise(ref, noise, ts[level[k]])
    # 3. One denoiser call, a timestep per frame
    timestep = torch.cat([torch.full((g,), float(ts[level[k]]), device=dev) for k in range(steps)])  # (N,)
    out = _velocity(models, feeds, x, timestep, guidance, cfg_on)
    # 4. DDIM: each group one step further along at its own step index
    x = torch.cat([sched.step(out[:, :, k * g:(k + 1) * g], level[k], x[:, :, k * g:(k + 1) * g])
                   for k in range(steps)], dim=2)  # (1, 4, N, h, w)
    return StageIIResult(index=call.index, first_frame=call.first_frame, latents=x, emit_from=0, emit_to=call.emit_to,
                         newest_frame=call.newest_frame)


@torch.no_grad()
def decode(models: ModelSet, latents: torch.Tensor) -> np.ndarray:
    """(1, 4, F, h, w) diffusion-scale latents -> (F, R, R, 3) uint8 frames (one ``vae_decoder`` call; the decoder
    takes diffusion-scale latents and returns [0, 1] frames, so nothing is rescaled around it)."""
    flat = latents[0].permute(1, 0, 2, 3).to(models.dtype)  # (F, 4, h, w)
    frames = models.call("vae_decoder", {"latents": flat})["frames"]  # (F, 3, R, R) in [0, 1]
    return to_uint8(frames)  # (F, R, R, 3), converted where the frames are


# ----------------------------------------------------------------------------------------------------------------
# One window, eagerly
# ----------------------------------------------------------------------------------------------------------------
class MMGTPipeline:
    """Reference image + audio of one window -> frames, both stages, no scheduling tricks.

    ``chunk``/``overlap`` split the window into Stage II temporal windows (the motion modules take <= 32 frames).
    """

    def __init__(self, models: ModelSet, chunk: int = 16, overlap: int = 4):
        if not 0 <= overlap < chunk <= models.cfg.unet.motion_max_frames:
            raise ValueError(f"need 0 <= overlap ({overlap}) < chunk ({chunk}) <= "
                             f"{models.cfg.unet.motion_max_frames}")
        self.models, self.chunk, self.overlap = models, chunk, overlap

    def poses(self, avatar: Avatar, wav16k: np.ndarray, n_frames: Optional[int] = None, steps=None, guidance=None,
              seed: int = 0) -> np.ndarray:
        """Stage I for one window: -> (W, 134, 3) pixel keypoints."""
        w = self.models.cfg.smga.window
        cond = smga_condition(self.models, wav16k, w)  # (W, audio_dim)
        gen = torch.Generator(device=self.models.device).manual_seed(seed)
        init = K.pixel_to_smga(avatar.init_pose)[0]  # (402,)
        vec = generate_poses(self.models, cond, init, steps, guidance, gen)  # (W, 402)
        kps = K.smga_to_pixel(vec)
        return kps if n_frames is None else kps[:n_frames]

    def render(self, avatar: Avatar, kps_px: np.ndarray, wav16k: np.ndarray, steps: Optional[int] = None,
               guidance: Optional[float] = None, seed: int = 0) -> np.ndarray:
        """Stage II for given poses: (F, 134, 3) pixel keypoints + audio -> (F, R, R, 3) uint8."""
        cfg = self.models.cfg
        steps = steps or cfg.sampler.steps
        guidance = cfg.sampler.guidance if guidance is None else guidance
        n = len(kps_px)
        frames, masks = pose_conditions(cfg, kps_px)
        masks = unet_masks(cfg, masks)
        tokens = audio_tokens(self.models, wav16k, n)  # (F, T, D)
        out, known, start, j = [], None, 0, 0
        while True:
            end = min(start + self.chunk, n)
            idx = np.arange(start, start + self.chunk).clip(max=n - 1)  # pad the last chunk with its last frame
            new_from = 0 if known is None else known.shape[2]
            chunk = StageIIChunk(index=j, first_frame=start, pose_frames=frames[idx], masks=tuple(m[idx] for m in masks),
                                 audio_tokens=tokens[torch.from_numpy(idx).to(tokens.device)], known=known,
                                 emit_from=new_from, emit_to=end - start)
            result = render_chunk(self.models, avatar, chunk, steps, guidance, seed)
            out.append(decode(self.models, result.new_latents))
            if end >= n:
                break
            known = result.latents[:, :, end - start - self.overlap:end - start]
            start, j = end - self.overlap, j + 1
        return np.concatenate(out)

    def __call__(self, image: np.ndarray, wav16k: np.ndarray, steps=None, guidance=None, seed: int = 0,
                 smga_steps=None, smga_guidance=None, pose_file=None, keypoints: Optional[np.ndarray] = None
                 ) -> np.ndarray:
        """One window: (R, R, 3) frames for the audio (or for ``keypoints``: the pose-driven variant)."""
        avatar = prepare_avatar(self.models, image, pose_file=pose_file)
        n = len(keypoints) if keypoints is not None else min(self.models.cfg.smga.window,
                                                              max(1, frames_for_samples(len(wav16k))))
        kps = keypoints if keypoints is not None else self.poses(avatar, wav16k, n, smga_steps, smga_guidance, seed)
        return self.render(avatar, kps, wav16k, steps, guidance, seed)


__all__ = ["UNTRAINED_NOTE", "ModelSet", "build_models", "load_models", "save_models", "check_unet_config", "Avatar",
           "square_image", "prepare_avatar", "smga_condition", "generate_poses", "pose_conditions", "unet_masks",
           "audio_tokens", "upload", "StageIIChunk", "StageIIResult", "frame_noise", "render_chunk", "RollingChunk",
           "render_rolling", "decode",
           "MMGTPipeline"]
