"""The torch backend: the eager mmgt networks behind the same named-tensor interface as the exported ones.

Each network's call maps the contract's input names (export/specs.py, recorded in every manifest) onto the mmgt
module's own signature and returns the contract's output names, so an adapter cannot tell it from onnxruntime or
TensorRT. Options: fp16 autocast on a CUDA device (for fp32 modules), and ``torch.compile`` of the call.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from engine.backends import Backend
from export.manifest import BRANCHES, ExportShapes, bank_name, mask_name

log = logging.getLogger(__name__)

Feeds = Mapping[str, torch.Tensor]
Call = Callable[[Feeds], Dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------------------
# Named calls, one per network: (models, shapes) -> feeds -> outputs
# ----------------------------------------------------------------------------------------------------------------
def _smga_step(m, s: ExportShapes) -> Call:
    return lambda x: {"x0": m.smga(x["x_t"], x["t"], x["init_pose"], x["cond"])}


def _smga_step_guided(m, s: ExportShapes) -> Call:
    def call(x: Feeds):
        guidance = float(x["guidance"].reshape(-1)[0])
        return {"x0": m.smga.guided_forward(x["x_t"], x["t"], x["init_pose"], x["cond"], guidance)}
    return call


def _wavlm(m, s: ExportShapes) -> Call:
    from mmgt.speech_encoders import wavlm_features

    return lambda x: {"features": wavlm_features(m.wavlm, x["wave"][0], s.smga_window)}


def _wav2vec2(m, s: ExportShapes) -> Call:
    from mmgt.speech_encoders import wav2vec2_features

    return lambda x: {"hidden_states": wav2vec2_features(m.wav2vec2, x["wave"][0], s.smga_window)}


def _audio_proj(m, s: ExportShapes) -> Call:
    return lambda x: {"audio_tokens": m.audioproj(x["audio_windows"])}


def _pose_guider(m, s: ExportShapes) -> Call:
    return lambda x: {"pose_features": m.pose_guider(x["pose"])}


def _reference_unet(m, s: ExportShapes) -> Call:
    def call(x: Feeds):
        bank = m.reference_unet(x["latent"], x["context"])
        return {bank_name(i): t for i, t in enumerate(bank)}
    return call


def _denoising_unet(m, s: ExportShapes) -> Call:
    from mmgt.unet3d import audio_mask_levels

    unet = m.denoising_unet
    levels = [lv.level for lv in audio_mask_levels(unet.cfg, s.latent)]
    n_bank = len(unet.bank_names)

    def call(x: Feeds):
        masks = {b: [None] * (max(levels) + 1 if levels else 0) for b in BRANCHES}
        for level in levels:
            for b in BRANCHES:
                masks[b][level] = x[mask_name(b, level)]  # (B, F, h_l*w_l)
        bank = [x[bank_name(i)] for i in range(n_bank)]
        v = unet(x["sample"], x["timestep"], x["context"], pose_features=x["pose_features"],
                 audio_tokens=x["audio_tokens"], masks=masks if levels else None, bank=bank,
                 uncond_rows=s.uncond_rows)
        return {"v": v}
    return call


def _vae_encoder(m, s: ExportShapes) -> Call:
    scale = float(m.vae.config.scaling_factor)
    return lambda x: {"latent": m.vae.encode(x["image"]).latent_dist.mean * scale}


def _vae_decoder(m, s: ExportShapes) -> Call:
    from mmgt.vae import VAEDecoder

    decoder = VAEDecoder(m.decoder if getattr(m, "decoder", None) is not None else m.vae)  # the decoder in use
    return lambda x: {"frames": decoder(x["latents"])}


CALLS: Dict[str, Callable[[Any, ExportShapes], Call]] = {
    "smga_step": _smga_step, "smga_step_guided": _smga_step_guided, "wavlm": _wavlm, "wav2vec2": _wav2vec2,
    "audio_proj": _audio_proj, "pose_guider": _pose_guider, "reference_unet": _reference_unet,
    "denoising_unet": _denoising_unet, "vae_encoder": _vae_encoder, "vae_decoder": _vae_decoder,
}


def _device_of(models, network: str) -> torch.device:
    from export.manifest import network_weights

    for module in network_weights(models, network).values():
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


class TorchBackend(Backend):
    """One eager mmgt network with named inputs and outputs.

    ``autocast_fp16``: run fp32 modules under CUDA fp16 autocast. ``compile``: wrap the call in torch.compile
    (static shapes; the first call compiles; True or a torch.compile mode such as "max-autotune-no-cudagraphs").
    ``cuda_graph``: replay the call as a CUDA graph per input signature (engine.backends.graphs.StaticGraph; on top
    of ``compile`` when both are set: the compiled kernels, launched by one replay).
    """

    kind = "torch"

    def __init__(self, network: str, models, shapes: ExportShapes, autocast_fp16: bool = False,
                 compile: Union[bool, str] = False, cuda_graph: bool = False, fixed_frames: Optional[int] = None):
        """``fixed_frames`` (vae_decoder only): declare a static input of that many frames, so the adapters split
        longer inputs into such calls and pad the last one (engine.backends._run_split): one shape to compile and
        capture instead of one per frame count."""
        if network not in CALLS:
            raise ValueError(f"engine.backends.torch: unknown network {network!r}; known: {', '.join(CALLS)}")
        inputs = None
        if fixed_frames is not None:
            if network != "vae_decoder":
                raise ValueError(f"engine.backends.torch: fixed_frames is for vae_decoder, not {network}")
            from engine.backends import IOSpec

            cfg = models.cfg
            dtype = str(getattr(models, "dtype", torch.float32)).replace("torch.", "")
            inputs = [IOSpec("latents", (int(fixed_frames), cfg.unet.in_channels, cfg.latent_size, cfg.latent_size),
                             dtype)]
        super().__init__(network, inputs=inputs, outputs=None,
                         meta={"uncond_rows": shapes.uncond_rows} if network == "denoising_unet" else {})
        self.device = _device_of(models, network)
        self.autocast_fp16 = autocast_fp16 and self.device.type == "cuda"
        call = CALLS[network](models, shapes)
        mode = compile if isinstance(compile, str) and compile != "default" else None
        self._call = torch.compile(call, dynamic=False, mode=mode) if compile else call
        self.graph = None
        if cuda_graph:
            from engine.backends.graphs import StaticGraph

            if self.device.type != "cuda":
                from engine.backends import BackendUnavailable

                raise BackendUnavailable(f"{network}: CUDA graphs need the network on a CUDA device, "
                                         f"it is on {self.device}")
            self.graph = StaticGraph(self._run, name=f"{network} (torch)", capture=True)

    def _run(self, feeds: Feeds) -> Dict[str, torch.Tensor]:
        context = torch.autocast("cuda", dtype=torch.float16) if self.autocast_fp16 else contextlib.nullcontext()
        with context:
            return self._call(feeds)

    @torch.no_grad()
    def __call__(self, feeds: Feeds) -> Dict[str, torch.Tensor]:
        feeds = {k: v.to(self.device) for k, v in feeds.items()}
        return (self.graph or self._run)(feeds)


__all__ = ["CALLS", "TorchBackend"]
