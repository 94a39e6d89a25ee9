"""Frozen configuration dataclasses for every MMGT network, and the two presets.

Two presets build the *same architecture*:

* ``mmgt`` -- the release's sizes (``../shared/MMGT_SPEC.md``); weights come from ``--weights DIR``.
* ``tiny`` -- toy widths with seeded random weights so every command runs on a CPU in seconds. Its output is an
  untrained avatar (noise-like frames) and every artefact it produces says so.

Every network is built from its config alone, at any width, so tests and fidelity checks can use other sizes too.
CLI defaults come from these dataclasses: change a default here, not in the CLI.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Tuple

FPS = 25  # frame clock of everything in MMGT (pose, video, audio features)
AUDIO_SAMPLE_RATE = 16_000  # what the audio encoders (WavLM, wav2vec2) consume
N_KEYPOINTS = 134  # body 18 + feet 6 + face 68 + two hands 21 each
POSE_DIM = N_KEYPOINTS * 3  # 402 = (x, y, score) per keypoint
LIBROSA_DIM = 35  # onset env 1 + MFCC 20 + chroma_cens 12 + onset peak 1 + beat 1
# Motion-mask branches, in the order of every mask array's branch axis (mmgt.motion_masks -> UNet3D -> MM-HAA's
# attn2_0/1/2, zero_conv_* and branch weights -> the exported denoiser's mask inputs)
MASK_BRANCHES = ("full", "face", "lip")


@dataclass(frozen=True)
class SMGAConfig:
    """Stage I: the split face/body FiLM transformer and its pose diffusion."""

    window: int = 80  # frames per SMGA window (3.2 s at 25 fps); also the cond-token count
    latent_dim: int = 512  # transformer width
    ff_dim: int = 1024  # feed-forward width of decoder and cond-encoder layers
    num_layers: int = 8  # decoder layers
    num_heads: int = 8  # attention heads (decoder and cond encoder)
    cond_layers: int = 2  # pre-norm TransformerEncoder layers over the audio condition
    dropout: float = 0.1  # training-time dropout; inactive in eval
    audio_dim: int = 1024 + LIBROSA_DIM  # per-frame audio condition: WavLM hidden + librosa features
    time_tokens: int = 2  # extra memory tokens made from the diffusion time embedding
    diffusion_steps: int = 1000  # training timesteps of the cosine schedule
    cosine_s: float = 0.008  # cosine-schedule offset
    sample_steps: int = 50  # DDIM steps at inference (fewer for live use)
    eta: float = 1.0  # DDIM stochasticity (1.0 = the reference)
    guidance: float = 2.0  # classifier-free guidance weight with the null tokens (1.0 = no CFG pass)

    @property
    def time_hidden(self) -> int:  # width of the time MLP (4x latent, 2048 at release size)
        return 4 * self.latent_dim


@dataclass(frozen=True)
class WavLMConfig:
    """WavLM encoder for SMGA's audio condition (transformers WavLMModel sizes)."""

    hidden_size: int = 1024  # last hidden state width (feeds SMGA)
    num_layers: int = 24  # transformer layers
    num_heads: int = 16  # attention heads
    intermediate_size: int = 4096  # FF width
    conv_dim: Tuple[int, ...] = (512,) * 7  # CNN feature extractor channels
    num_buckets: int = 320  # relative position buckets
    max_bucket_distance: int = 800  # relative position range
    feat_extract_norm: str = "layer"  # WavLM-Large uses layer-norm conv features
    do_stable_layer_norm: bool = True  # pre-norm transformer (Large)


@dataclass(frozen=True)
class Wav2Vec2Config:
    """wav2vec2-base-960h for Stage II's audio tokens."""

    hidden_size: int = 768  # hidden width; every hidden state is used
    num_layers: int = 12  # transformer layers (12 hidden states are stacked)
    num_heads: int = 12  # attention heads
    intermediate_size: int = 3072  # FF width
    conv_dim: Tuple[int, ...] = (512,) * 7  # CNN feature extractor channels
    num_conv_pos_embeddings: int = 128  # positional conv kernel
    num_conv_pos_embedding_groups: int = 16  # positional conv groups


@dataclass(frozen=True)
class AudioProjConfig:
    """AudioProjModel: +-2 frames x all wav2vec2 hidden states -> 32 tokens per frame."""

    seq_len: int = 5  # frames in the audio window (+-2 around each video frame)
    blocks: int = 12  # wav2vec2 hidden states stacked per frame
    channels: int = 768  # wav2vec2 hidden width
    intermediate_dim: int = 512  # proj1/proj2 width
    context_tokens: int = 32  # tokens per video frame after projection
    output_dim: int = 768  # token width (= MM-HAA cross-attention dim)


@dataclass(frozen=True)
class UNetConfig:
    """SD1.5-style UNet shared by the ReferenceNet (2D) and the denoiser (3D, motion + MM-HAA modules)."""

    in_channels: int = 4  # latent channels
    out_channels: int = 4  # predicted (v) channels
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)  # per resolution level
    layers_per_block: int = 2  # resnets per down block (up blocks have one more)
    attention_heads: int = 8  # heads of spatial self/cross attention (SD1.5 attention_head_dim=8)
    cross_attention_dim: int = 768  # CLIP image-embedding width
    norm_num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon
    motion_heads: int = 8  # heads of the AnimateDiff temporal attentions
    motion_max_frames: int = 32  # entries of the saved temporal position table: frames per temporal window
    audio_heads: int = 8  # heads of the MM-HAA attentions
    audio_dim: int = 768  # audio-token width (AudioProjConfig.output_dim)
    audio_blocks: Tuple[int, ...] = (0, 1, 2)  # down blocks that carry MM-HAA modules
    branch_weights: Tuple[float, float, float] = (1.0, 1.0, 2.0)  # MM-HAA full / face / lip weights


@dataclass(frozen=True)
class PoseGuiderConfig:
    """Pose frames (RGB in [0, 1]) -> features added after the denoiser's conv_in."""

    conditioning_channels: int = 3  # pose image channels
    block_out_channels: Tuple[int, ...] = (16, 32, 96, 256)  # pairs of 3x3 convs, the 2nd of each pair strided
    embedding_channels: int = 320  # = UNet block_out_channels[0]


@dataclass(frozen=True)
class VAEConfig:
    """SD VAE (sd-vae-ft-mse): diffusers AutoencoderKL."""

    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)  # 3 downsamples: 8x spatial factor
    layers_per_block: int = 2  # resnets per block
    latent_channels: int = 4  # latent channels
    norm_num_groups: int = 32  # GroupNorm groups
    scaling_factor: float = 0.18215  # latent scale


@dataclass(frozen=True)
class CLIPConfig:
    """CLIPVisionModelWithProjection (sd-image-variations image_encoder, ViT-L/14)."""

    hidden_size: int = 1024  # ViT width
    num_layers: int = 24  # ViT layers
    num_heads: int = 16  # ViT heads
    intermediate_size: int = 4096  # ViT FF width
    image_size: int = 224  # input resolution
    patch_size: int = 14  # patch size
    projection_dim: int = 768  # image_embeds width (= UNet cross_attention_dim)


@dataclass(frozen=True)
class SamplerConfig:
    """Stage II DDIM (release scheduler settings) and the render defaults."""

    train_timesteps: int = 1000  # training timesteps
    beta_start: float = 0.00085  # linear beta schedule start
    beta_end: float = 0.012  # linear beta schedule end
    beta_schedule: str = "linear"  # MMGT's inference config (config/prompts/animation.yaml) uses "linear"
    prediction_type: str = "v_prediction"  # the UNet predicts v
    rescale_zero_terminal_snr: bool = True  # rescaled betas: SNR(T) = 0
    timestep_spacing: str = "trailing"  # DDIM timestep spacing
    steps_offset: int = 1  # release scheduler config
    steps: int = 4  # denoising steps (reference quality: 30)
    guidance: float = 1.0  # CFG scale (1.0 = a single unconditioned-free pass; reference quality: 3.5)
    eta: float = 0.0  # DDIM eta


@dataclass(frozen=True)
class MMGTConfig:
    """Everything that defines one MMGT model (both stages)."""

    name: str  # preset name ("tiny", "mmgt", or custom)
    trained: bool  # False: seeded random weights, output is not a real avatar
    resolution: int  # square frame size in pixels (MM-HAA needs square latents)
    smga: SMGAConfig = field(default_factory=SMGAConfig)
    wavlm: WavLMConfig = field(default_factory=WavLMConfig)
    wav2vec2: Wav2Vec2Config = field(default_factory=Wav2Vec2Config)
    audio_proj: AudioProjConfig = field(default_factory=AudioProjConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    pose_guider: PoseGuiderConfig = field(default_factory=PoseGuiderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0  # seed of the random weights of an untrained preset

    @property
    def latent_size(self) -> int:  # latent side: resolution / VAE factor (64 at 512 px)
        return self.resolution // 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def mask_levels(self) -> Tuple[int, ...]:  # MM-HAA mask sides per down block: 64, 32, 16, 8 at 512 px
        n = len(self.unet.block_out_channels)
        return tuple(max(1, self.latent_size // 2**i) for i in range(n))


MMGT = MMGTConfig(name="mmgt", trained=True, resolution=512)

TINY = MMGTConfig(
    name="tiny",
    trained=False,
    resolution=64,
    smga=SMGAConfig(latent_dim=64, ff_dim=128, num_layers=2, num_heads=4, cond_layers=1,
                    audio_dim=32 + LIBROSA_DIM, sample_steps=10),
    wavlm=WavLMConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
                      num_buckets=32, max_bucket_distance=64),
    wav2vec2=Wav2Vec2Config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
    audio_proj=AudioProjConfig(blocks=2, channels=32, intermediate_dim=64, context_tokens=4, output_dim=32),
    unet=UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_heads=2,
                    cross_attention_dim=32, norm_num_groups=8, motion_heads=2, audio_heads=2, audio_dim=32),
    pose_guider=PoseGuiderConfig(block_out_channels=(8, 8, 16, 16), embedding_channels=32),
    vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    clip=CLIPConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=32, patch_size=8,
                    projection_dim=32),
    sampler=SamplerConfig(steps=2),
)

PRESETS = {"tiny": TINY, "mmgt": MMGT}
DEFAULT_PRESET = "tiny"


def get_preset(name: str) -> MMGTConfig:
    """Return a preset by name, with an error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


__all__ = [
    "FPS", "AUDIO_SAMPLE_RATE", "N_KEYPOINTS", "POSE_DIM", "LIBROSA_DIM",
    "SMGAConfig", "WavLMConfig", "Wav2Vec2Config", "AudioProjConfig", "UNetConfig", "PoseGuiderConfig",
    "VAEConfig", "CLIPConfig", "SamplerConfig", "MMGTConfig", "MMGT", "TINY", "PRESETS", "DEFAULT_PRESET",
    "get_preset", "replace",
]
