"""The eager reference pipeline: the whole model set, one avatar, one window in, frames out.

The pieces the engine's runner calls, in the order of the data:

    build_models / load_models   -> ModelSet   (every network, one device and dtype)
    prepare_avatar(image)        -> Avatar     (CLIP context, reference latent, ReferenceNet bank; once per image)
    smga_condition + generate_poses            Stage I: audio -> (W, 402) poses in SMGA space
    pose_conditions(keypoints)   -> pose frames + motion masks
    audio_tokens(wave)           -> (F, 32, D) MM-HAA tokens
    render_chunk(...)            -> final latents of <= 32 frames (overlap latents re-noised from the previous chunk)
    decode(latents)              -> uint8 frames

``MMGTPipeline.__call__`` chains them for one window (reference image + 3.2 s of audio -> 80 frames), the eager
reference the engine's runner is compared with.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import keypoints as K
from .audio import AudioProjModel, audio_windows, build_wav2vec2, build_wavlm, load_wav2vec2, load_wavlm
from .audio import smga_condition as _smga_condition
from .audio import wav2vec2_features
from .config import FPS, MMGT, MMGTConfig
from .image_encoder import build_clip, clip_embed, load_clip
from .init_pose import initial_pose
from .motion_masks import motion_masks
from .noise import DDIMSchedule
from .pose_guider import PoseGuider
from .pose_render import render_poses
from .reference_net import ReferenceNet
from .seeding import seeded
from .smga import SMGA, SMGADiffusion, build_smga
from .unet3d import UNet3D
from .vae import build_vae, decode_latents, encode_reference, load_vae, to_uint8
from .weights import ReleaseLayout, WeightsError, load_smga, load_stage2, stage2_builders

log = logging.getLogger(__name__)

UNTRAINED_NOTE = "untrained preset: random weights, the frames are not a real avatar"
BRANCHES = ("full", "face", "lip")


# ----------------------------------------------------------------------------------------------------------------
# The model set
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ModelSet:
    """Every network of MMGT on one device, in eval mode."""

    cfg: MMGTConfig
    smga: SMGA  # Stage I pose diffusion network
    wavlm: nn.Module  # transformers WavLMModel (SMGA's audio condition)
    wav2vec2: nn.Module  # transformers Wav2Vec2Model (Stage II audio tokens)
    audioproj: AudioProjModel  # wav2vec2 windows -> 32 tokens per frame
    pose_guider: PoseGuider  # pose frames -> features added after conv_in
    reference_unet: ReferenceNet  # reference image -> attention bank
    denoising_unet: UNet3D  # the video denoiser
    vae: nn.Module  # diffusers AutoencoderKL (or AutoencoderTiny as decoder)
    clip: nn.Module  # transformers CLIPVisionModelWithProjection
    decoder: Optional[nn.Module] = None  # a light decoder (AutoencoderTiny) used instead of the VAE's for decoding
    smga_denoise: Optional[Callable] = None  # stands in for smga.guided_denoise (the engine's CUDA-graphed replay)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # Stage II compute dtype (Stage I and audio stay fp32)

    def stage2_modules(self) -> Dict[str, nn.Module]:
        """The networks of net-32500.pth, under their checkpoint prefixes."""
        return {"reference_unet": self.reference_unet, "denoising_unet": self.denoising_unet,
                "pose_guider": self.pose_guider, "audioproj": self.audioproj}

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "ModelSet":
        self.device = torch.device(device)
        self.dtype = dtype or self.dtype
        for name in ("smga", "wavlm", "wav2vec2"):  # small or numerically delicate: fp32
            getattr(self, name).to(self.device)
        for name in ("audioproj", "pose_guider", "reference_unet", "denoising_unet", "vae", "clip", "decoder"):
            if getattr(self, name) is not None:
                getattr(self, name).to(self.device, self.dtype)
        return self


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


def build_models(cfg: MMGTConfig, device="cpu", dtype: torch.dtype = torch.float32) -> ModelSet:
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
        models = ModelSet(
            cfg=cfg, smga=build_smga(cfg.smga, seed=seed), wavlm=build_wavlm(cfg.wavlm, seed=seed + 1),
            wav2vec2=build_wav2vec2(cfg.wav2vec2, seed=seed + 2), vae=build_vae(cfg.vae, seed=seed + 3),
            clip=build_clip(cfg.clip, seed=seed + 4), **parts)
    for m in (models.audioproj, models.pose_guider, models.reference_unet, models.denoising_unet):
        m.eval()
    log.info("built %s preset with seeded random weights (%s)", cfg.name, UNTRAINED_NOTE)
    return models.to(device, dtype)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise WeightsError(f"{path}: not found ({what}); --weights must point at the release layout "
                           "(see `python -m mmgt.weights --help`)")
    return path


def check_unet_config(path: Path, cfg: MMGTConfig) -> None:
    """The SD1.5 unet/config.json must describe the UNet our config builds."""
    import json

    data = json.loads(_need(path, "SD1.5 UNet config").read_text())
    expect = {"block_out_channels": list(cfg.unet.block_out_channels), "layers_per_block": cfg.unet.layers_per_block,
              "cross_attention_dim": cfg.unet.cross_attention_dim, "in_channels": cfg.unet.in_channels}
    bad = {k: (data.get(k), v) for k, v in expect.items() if k in data and data[k] != v}
    if bad:
        raise WeightsError(f"{path}: UNet config differs from the {cfg.name} preset: "
                           + ", ".join(f"{k} file {a} vs preset {b}" for k, (a, b) in bad.items()))


def load_models(weights_dir, cfg: MMGTConfig = MMGT, device="cpu", dtype: torch.dtype = torch.float32) -> ModelSet:
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
    models = ModelSet(cfg=cfg, smga=smga, wavlm=wavlm,
                      wav2vec2=load_wav2vec2(_need(layout.wav2vec2, "wav2vec2-base-960h"), cfg.wav2vec2),
                      vae=load_vae(_need(layout.vae, "sd-vae-ft-mse")),
                      clip=load_clip(_need(layout.image_encoder, "CLIP image encoder")), **parts)
    log.info("loaded release weights from %s", layout.root)
    return models.to(device, dtype)


def save_models(models: ModelSet, root) -> ReleaseLayout:
    """Write a model set in the release layout (what ``load_models`` reads): for tests, and to turn a converted or
    fine-tuned set into a directory ``--weights`` accepts. WavLM is written as a transformers directory."""
    import json

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
    models.wavlm.save_pretrained(str(layout.root / "WavLM-Large"))
    return layout


# ----------------------------------------------------------------------------------------------------------------
# The avatar: everything that depends on the reference image only (computed once, reused by every window)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Avatar:
    image: np.ndarray  # (R, R, 3) uint8 reference at render resolution
    init_pose: np.ndarray  # (134, 3) pixel keypoints of the reference on the 512 canvas
    pose_method: str  # "pose_file" | "dwpose" | "template"
    context: torch.Tensor  # (1, 1, D) CLIP image embedding
    ref_latent: torch.Tensor  # (1, 4, h, w) VAE mean latent x scaling factor
    bank: Tuple[torch.Tensor, ...]  # ReferenceNet attention bank, denoiser read order


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
    cfg = models.cfg
    img = square_image(image, cfg.resolution)  # (R, R, 3)
    kps, method = initial_pose(square_image(image, K.CANVAS), weights_dir=weights_dir, pose_file=pose_file)
    context = clip_embed(models.clip, img).to(models.device, models.dtype)  # (1, 1, D)
    ref_latent = encode_reference(models.vae, img).to(models.device, models.dtype)  # (1, 4, h, w)
    bank = tuple(models.reference_unet(ref_latent, context))
    return Avatar(image=img, init_pose=kps.astype(np.float32), pose_method=method, context=context,
                  ref_latent=ref_latent, bank=bank)


# ----------------------------------------------------------------------------------------------------------------
# Stage I
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def smga_condition(models: ModelSet, wav16k: np.ndarray, n_frames: int) -> torch.Tensor:
    """(n_frames, audio_dim) SMGA audio condition of a waveform span (WavLM + librosa)."""
    return _smga_condition(models.wavlm, wav16k, n_frames).to(models.device, torch.float32)


@torch.no_grad()
def generate_poses(models: ModelSet, cond: torch.Tensor, init_pose: np.ndarray, steps: Optional[int] = None,
                   guidance: Optional[float] = None, generator: Optional[torch.Generator] = None) -> np.ndarray:
    """One SMGA window: (W, audio_dim) condition + initial pose (402,) in SMGA space -> (W, 402) SMGA-space poses.

    The first window starts from the reference image's pose (``keypoints.pixel_to_smga``); window k+1 from the
    last frame of window k (``smga.continue_from``)."""
    init = torch.as_tensor(np.asarray(init_pose, np.float32).reshape(1, -1), device=models.device)  # (1, 402)
    out = SMGADiffusion(models.cfg.smga).sample(models.smga, cond[None].float(), init, steps=steps,
                                                guidance=guidance, generator=generator,
                                                denoise=models.smga_denoise)  # (1, W, 402)
    return out[0].float().cpu().numpy()


def pose_conditions(cfg: MMGTConfig, kps_px: np.ndarray) -> Tuple[np.ndarray, Dict[str, List[np.ndarray]]]:
    """(F, 134, 3) pixel keypoints -> pose frames uint8 (F, R, R, 3) and masks {full, face, lip}: [(F, l*l)]."""
    unit = K.pixel_to_unit(K.apply_validity(kps_px))  # (F, 134, 3)
    frames = render_poses(unit, size=K.CANVAS, out_size=cfg.resolution)
    masks = motion_masks(unit, levels=cfg.mask_levels)
    return frames, masks


# ----------------------------------------------------------------------------------------------------------------
# Stage II
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def audio_tokens(models: ModelSet, wav16k: np.ndarray, n_frames: int) -> torch.Tensor:
    """(n_frames, tokens, D) MM-HAA audio tokens of a waveform span (wav2vec2 -> +-2 frames -> projection)."""
    feats = wav2vec2_features(models.wav2vec2, wav16k, n_frames)  # (F, L, C)
    win = audio_windows(feats).to(models.device, models.dtype)  # (F, 5, L, C)
    return models.audioproj(win[None])[0]  # (F, T, D)


def upload(x, device) -> torch.Tensor:
    """CPU data (array or tensor) -> ``device`` without a host sync: on a GPU through pinned memory, asynchronously.

    A copy from pageable memory blocks the calling thread until the stream has finished all earlier work, so the
    inputs of chunk j+1 would wait for chunk j's denoising and the GPU would idle while the host prepares the next
    chunk; an asynchronous copy from pinned memory is queued behind that work instead."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _masks_to_tensors(masks: Dict[str, List[np.ndarray]], device, dtype) -> Dict[str, List[torch.Tensor]]:
    return {b: [upload(m, device)[None].to(dtype) for m in masks[b]] for b in BRANCHES}  # each (1, F, l*l)


@dataclass
class ChunkInputs:
    """What one Stage II chunk needs beyond the avatar (all for the chunk's C frames)."""

    pose_frames: np.ndarray  # (C, R, R, 3) uint8
    masks: Dict[str, List[np.ndarray]]  # {full, face, lip}: per level (C, l*l) float32
    audio_tokens: torch.Tensor  # (C, T, D)
    first_frame: int  # global index of local frame 0 (seeds the per-frame noise)


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


@torch.no_grad()
def render_chunk(models: ModelSet, avatar: Avatar, inputs: ChunkInputs, steps: int, guidance: float, seed: int,
                 known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Denoise one chunk of C <= 32 frames; returns its final latents (1, 4, C, h, w).

    ``known`` (1, 4, O, h, w): final latents of the first O frames from the previous chunk. At every step they are
    re-noised to the current timestep and replace the chunk's own overlap latents, so the new frames are denoised
    in the context of frames already shown and the chunks join without a seam.
    """
    cfg, dev, dt = models.cfg, models.device, models.dtype
    n = len(inputs.pose_frames)
    sched = _schedule(cfg.sampler, steps, str(dev))
    cfg_on = guidance != 1.0
    # 1. Conditions: pose features, masks, audio tokens (CFG: unconditional audio and CLIP context are zeros)
    pose = upload(inputs.pose_frames, dev).permute(3, 0, 1, 2)[None].to(dt) / 255.0  # (1, 3, C, R, R)
    pose_feat = models.pose_guider(pose)  # (1, C0, C, h, w)
    masks = _masks_to_tensors(inputs.masks, dev, dt)
    tokens = upload(inputs.audio_tokens, dev).to(dt)[None]  # (1, C, T, D)
    context = avatar.context
    if cfg_on:
        pose_feat = torch.cat([pose_feat, pose_feat])
        masks = {b: [torch.cat([m, m]) for m in v] for b, v in masks.items()}
        tokens = torch.cat([torch.zeros_like(tokens), tokens])
        context = torch.cat([torch.zeros_like(context), context])
    # 2. Noise per global frame (chunking-independent), then DDIM
    lat_h = lat_w = cfg.latent_size
    noise = upload(frame_noise((cfg.unet.in_channels, lat_h, lat_w), inputs.first_frame, n, seed), dev).to(dt)
    x = noise.clone()  # (1, 4, C, h, w)
    n_known = 0 if known is None else known.shape[2]
    for i, t in enumerate(_schedule(cfg.sampler, steps, "cpu").timesteps.tolist()):  # host ints: no device read
        if n_known:  # overlap frames follow the previous chunk's result, re-noised to this step
            x[:, :, :n_known] = sched.add_noise(known.to(dt), noise[:, :, :n_known], t)
        inp = torch.cat([x, x]) if cfg_on else x
        out = models.denoising_unet(inp, torch.full((inp.shape[0],), t, device=dev), context, pose_features=pose_feat,
                                    audio_tokens=tokens, masks=masks, bank=avatar.bank,
                                    uncond_rows=1 if cfg_on else 0)  # (B, 4, C, h, w)
        if cfg_on:
            out = out[:1] + guidance * (out[1:] - out[:1])
        x = sched.step(out, i, x)
    if n_known:
        x[:, :, :n_known] = known.to(dt)
    return x


@torch.no_grad()
def decode(models: ModelSet, latents: torch.Tensor) -> np.ndarray:
    """(1, 4, F, h, w) latents -> (F, R, R, 3) uint8 frames."""
    frames = decode_latents(models.decoder or models.vae, latents.to(models.dtype))  # (1, 3, F, R, R) in [0, 1]
    return to_uint8(frames[0].permute(1, 0, 2, 3))  # (F, R, R, 3)


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
        tokens = audio_tokens(self.models, wav16k, n)  # (F, T, D)
        out, known, start = [], None, 0
        while True:
            end = min(start + self.chunk, n)
            idx = np.arange(start, start + self.chunk).clip(max=n - 1)  # pad the last chunk with its last frame
            inputs = ChunkInputs(pose_frames=frames[idx], masks={b: [m[idx] for m in v] for b, v in masks.items()},
                                 audio_tokens=tokens[torch.from_numpy(idx)], first_frame=start)
            lat = render_chunk(self.models, avatar, inputs, steps, guidance, seed, known)
            new_from = 0 if known is None else known.shape[2]
            out.append(decode(self.models, lat[:, :, new_from:end - start]))
            if end >= n:
                break
            known = lat[:, :, end - start - self.overlap:end - start]
            start = end - self.overlap
        return np.concatenate(out)

    def __call__(self, image: np.ndarray, wav16k: np.ndarray, steps=None, guidance=None, seed: int = 0,
                 smga_steps=None, smga_guidance=None, pose_file=None, keypoints: Optional[np.ndarray] = None
                 ) -> np.ndarray:
        """One window: (R, R, 3) frames for the audio (or for ``keypoints``: the pose-driven variant)."""
        avatar = prepare_avatar(self.models, image, pose_file=pose_file)
        n = len(keypoints) if keypoints is not None else min(self.models.cfg.smga.window,
                                                              max(1, round(len(wav16k) * FPS / 16000)))
        kps = keypoints if keypoints is not None else self.poses(avatar, wav16k, n, smga_steps, smga_guidance, seed)
        return self.render(avatar, kps, wav16k, steps, guidance, seed)
