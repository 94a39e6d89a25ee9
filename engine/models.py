"""Loading a model set: the one place `engine render`, `engine demo`, `engine batch`, `engine serve` and `engine
export` get their networks (and an avatar's reference features) from.

* :class:`ModelOptions` -- the model flags of a command, as one frozen value (``ModelOptions.from_args(args)``).
* :func:`load_model_set` -- the ModelSet those options ask for, with the chosen backend applied.
* :func:`export_model_set` -- the networks ``engine export`` traces: the release weights, the seeded preset, or
  (``--random-weights``) only the networks asked for, each from its own seed.
* :func:`prepare_avatar` -- an avatar's reference features for a model set (streaming goes through here, not mmgt).

The command line's parser imports engine modules, so this one stays light at module level: torch and the networks
are imported inside the functions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from engine.options import CLIError
from engine.settings import RenderSettings

log = logging.getLogger("engine")


@dataclass(frozen=True)
class ModelOptions:
    """What a command asks of its model set (the flags of engine/options.py add_model_flags and add_backend_flags)."""

    preset: Optional[str] = None  # built-in preset, the sizes (None: 'mmgt' with weights, else DEFAULT_PRESET)
    weights: Optional[Path] = None  # release weights directory, loaded at the preset's sizes
    device: Optional[str] = None  # torch device (None: cuda if available, else cpu)
    dtype: Optional[str] = None  # Stage II compute dtype fp32 / fp16 / bf16 (None: fp16 on a GPU, fp32 on a CPU)
    tiny_decoder: Optional[Path] = None  # local AutoencoderTiny directory that decodes instead of the SD VAE
    backend: str = "torch"  # runtime of every network: torch, onnxruntime or tensorrt
    artifacts: Optional[Path] = None  # directory written by `engine export` (onnxruntime / tensorrt)
    compile: Union[str, bool, None] = None  # torch.compile mode ("default", ...); None or False: eager
    cuda_graphs: bool = False  # replay the hot calls as CUDA graphs (torch backend, CUDA only)
    threads: Optional[int] = None  # torch CPU threads (None: 1 for the tiny preset on a CPU, else torch's choice)

    @classmethod
    def from_args(cls, args) -> "ModelOptions":
        """The options among parsed flags (a command without a flag gets the field's default)."""
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})

    @property
    def preset_name(self) -> str:
        """The preset that gives the networks' sizes: --preset, else the release's ('mmgt') with --weights, else the
        default preset."""
        from mmgt.config import DEFAULT_PRESET

        return self.preset or ("mmgt" if self.weights is not None else DEFAULT_PRESET)


def resolve_device(device: Optional[str]) -> str:
    """``device``, or the default one: cuda when torch sees a GPU, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model_set(options: Union[ModelOptions, Any], settings: RenderSettings):
    """The ModelSet ``options`` (a ModelOptions or parsed flags) ask for, its calls shaped for ``settings`` (chunk,
    both CFG layouts, window): the static shapes exported artifacts and compiled/graphed calls are chosen for. The
    backend is chosen here, once per network; every later call goes through it."""
    import dataclasses

    import torch

    from mmgt import pipeline as P
    from mmgt.config import get_preset
    from mmgt.contract import Shapes

    opts = options if isinstance(options, ModelOptions) else ModelOptions.from_args(options)
    device = resolve_device(opts.device)
    threads = opts.threads or (1 if device == "cpu" and opts.preset_name == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        opts.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    cfg = get_preset(opts.preset_name)
    try:
        shapes = Shapes.from_settings(cfg, settings)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if opts.weights is not None:
        models = P.load_models(opts.weights, cfg, device=device, dtype=dtype, shapes=shapes)
    else:
        models = P.build_models(cfg, device=device, dtype=dtype, shapes=shapes)
    if not models.cfg.trained and opts.weights is None:
        log.warning("preset %r: %s", models.cfg.name, P.UNTRAINED_NOTE)
    if opts.tiny_decoder is not None:
        from mmgt.vae import load_tiny_decoder

        try:
            decoder = load_tiny_decoder(opts.tiny_decoder).to(models.device, models.dtype)
            models = dataclasses.replace(models, decoder=decoder)
        except (OSError, ValueError) as e:
            raise CLIError(f"--tiny-decoder {opts.tiny_decoder}: {e}") from e
        log.info("decoding with the tiny decoder from %s", opts.tiny_decoder)
    compile_, graphs = opts.compile or False, opts.cuda_graphs
    if opts.backend != "torch":
        from engine.backends import use_backend

        if compile_ or graphs:
            raise CLIError(f"--compile / --cuda-graphs are options of the torch backend, not of --backend "
                           f"{opts.backend}")
        if opts.artifacts is None:
            raise CLIError(f"--backend {opts.backend} needs --artifacts DIR (made by `engine export`)")
        models = use_backend(models, opts.backend, opts.artifacts)
    elif compile_ or graphs:
        models = accelerate_models(models, compile=compile_, cuda_graphs=graphs)
        log.info("torch path: %s (paid in the warm-up before the run)",
                 " + ".join(n for n, on in (("torch.compile", compile_), ("CUDA graphs", graphs)) if on))
    return models


def with_preset_steps(settings: RenderSettings, options: Union[ModelOptions, Any]) -> RenderSettings:
    """``settings`` with the preset's Stage II steps filled in when the rolling schedule leaves them to the preset:
    its call layout (steps groups of chunk / steps frames) must be known before the models are loaded."""
    if settings.schedule != "rolling" or settings.steps is not None:
        return settings
    from mmgt.config import get_preset

    opts = options if isinstance(options, ModelOptions) else ModelOptions.from_args(options)
    return settings.with_(steps=get_preset(opts.preset_name).sampler.steps)


def for_settings(models, settings: RenderSettings):
    """``models`` with calls for the shapes ``settings`` need (chunk, both CFG layouts, window).

    Torch calls are rebound freely (they take any shape); executors fixed to other shapes (exported artifacts,
    compiled or graphed calls) cannot serve these settings: that is an error naming both."""
    import dataclasses

    from mmgt.contract import Shapes

    shapes = Shapes.from_settings(models.cfg, settings)
    if models.shapes == shapes:
        return models
    if models.executors:
        raise ValueError(f"the model set's executors ({', '.join(sorted(models.executors))}) were made for "
                         f"{models.shapes}; these settings need {shapes}: make the model set with the run's settings "
                         "(engine.models.load_model_set(..., settings))")
    return dataclasses.replace(models, shapes=shapes)


def accelerate_models(models, compile: Union[str, bool] = False, cuda_graphs: bool = False):
    """``models`` with torch.compile and/or CUDA graphs for its shapes (built on their first call)."""
    from engine.backends import BackendUnavailable, accelerate

    try:
        return accelerate(models, compile=compile, cuda_graphs=cuda_graphs)
    except BackendUnavailable as e:
        raise CLIError(f"--cuda-graphs: {e}") from e


def prepare_avatar(models, image, pose_file: Optional[Path] = None, weights_dir: Optional[Path] = None):
    """The avatar of ``image`` (uint8 RGB (H, W, 3)) for ``models``: reference features, CLIP context, initial pose
    (from ``pose_file``, else DWPose from ``weights_dir``, else the template). Computed once per image and shared."""
    from mmgt import pipeline as P

    return P.prepare_avatar(models, image, pose_file=pose_file, weights_dir=weights_dir)


# ----------------------------------------------------------------------------------------------------------------
# engine export
# ----------------------------------------------------------------------------------------------------------------
def export_model_set(args, networks: Sequence[str]):
    """The model set ``engine export`` traces ``networks`` (mmgt.contracts.NETWORKS names) from, on the CPU in fp32,
    as its flags (``args.weights``, ``.preset``, ``.random_weights``) ask: the release weights; else the preset
    (default tiny) with the same seeded weights the engine builds; a trained preset without weights only with
    --random-weights. ``functools.partial(export_model_set, args)`` is the loader export.cli.run_export takes."""
    from mmgt import pipeline as P
    from mmgt.config import get_preset

    if args.weights is not None:
        return P.load_models(args.weights, get_preset(args.preset or "mmgt"))
    cfg = get_preset(args.preset or "tiny")
    if cfg.trained and not args.random_weights:
        raise CLIError(f"preset {cfg.name!r} has trained weights: pass --weights DIR (or --random-weights "
                       "to export its graphs with seeded random weights)")
    if not cfg.trained:
        return P.build_models(cfg)  # the same seeded weights the engine builds for this preset
    return random_networks(cfg, networks)


def random_networks(cfg, networks: Sequence[str]):
    """Only the modules the asked networks need, each from its own seed (release-size graphs on a CPU); a
    ModelSet-like namespace with ``cfg`` and those modules. Which modules a network needs is its contract's
    ``weights``."""
    from types import SimpleNamespace

    import torch

    from mmgt.contract import Shapes
    from mmgt.contracts import network_contracts
    from mmgt.image_encoder import build_clip
    from mmgt.smga import build_smga
    from mmgt.speech_encoders import build_wav2vec2, build_wavlm
    from mmgt.vae import build_vae
    from mmgt.weights import stage2_builders

    stage2 = stage2_builders(cfg)
    builders = {"smga": lambda s: build_smga(cfg.smga, seed=s), "wavlm": lambda s: build_wavlm(cfg.wavlm, seed=s),
                "wav2vec2": lambda s: build_wav2vec2(cfg.wav2vec2, seed=s), "vae": lambda s: build_vae(cfg.vae, seed=s),
                "clip": lambda s: build_clip(cfg.clip, seed=s)}
    contracts = network_contracts(cfg, Shapes.from_config(cfg))
    # the ModelSet attributes holding each network's weights ("vae.decoder" -> "vae"; a model set without a light
    # decoder decodes with its VAE), in a fixed order: the seeds
    needed = {path.split(".")[0] for n in networks for path in contracts[n].weights}
    needed = sorted({"vae" if attr == "frame_decoder" else attr for attr in needed})
    attrs = {}
    for i, attr in enumerate(needed):
        if attr in builders:
            attrs[attr] = builders[attr](cfg.seed + i)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + i)
                attrs[attr] = stage2[attr]().eval()
        log.info("built %s with random weights", attr)
    return SimpleNamespace(cfg=cfg, frame_decoder=attrs.get("vae"), **attrs)


__all__ = ["for_settings", "with_preset_steps", "ModelOptions", "resolve_device", "load_model_set",
           "accelerate_models", "prepare_avatar", "export_model_set", "random_networks"]
