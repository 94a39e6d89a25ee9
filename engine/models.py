"""Loading a model set: the one place `engine render`, `engine demo`, `engine batch`, `engine serve` and `engine
export` get their networks (and an avatar's reference features) from.

* :class:`ModelOptions` -- the model flags of a command, as one frozen value (``ModelOptions.from_args(args)``).
* :func:`load_model_set` -- the ModelSet those options ask for, with the chosen backend applied.
* :class:`ExportSource` -- the networks ``engine export`` traces: the release weights, the seeded preset, or
  (``--random-weights``) only the networks asked for, each from its own seed; the identity of their weights without
  building them (the cache keys of a re-run that builds nothing).
* :func:`prepare_avatar` -- an avatar's reference features for a model set (streaming goes through here, not mmgt).

The command line's parser imports engine modules, so this one stays light at module level: torch and the networks
are imported inside the functions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

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

    @property
    def config(self):
        """The model config of :attr:`preset_name` (its sizes: resolution, ...), without building a network."""
        from mmgt.config import get_preset

        return get_preset(self.preset_name)


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
    _check_backend_library(opts.backend)  # before a model is loaded: a missing extra costs nothing
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


def _check_backend_library(backend: str) -> None:
    """CLIError naming the extra to install when ``backend``'s library is absent."""
    from engine.extras import missing_modules

    if backend == "onnxruntime" and missing_modules(("onnxruntime",)):
        from engine.backends.onnxruntime_backend import ORT_MISSING

        raise CLIError(ORT_MISSING)
    if backend == "tensorrt" and missing_modules(("tensorrt",)):
        from engine.backends.tensorrt_backend import INSTALL_HINT

        raise CLIError(f"--backend tensorrt needs the tensorrt extra (tensorrt not installed): {INSTALL_HINT}")


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
@dataclass(frozen=True)
class ExportSource:
    """The networks ``engine export`` traces (``export.cli.ModelSource``), as its flags ask: the release weights
    (``--weights DIR``); else the preset (default tiny) with the same seeded weights the engine builds; a trained
    preset without weights only with ``--random-weights`` (only the networks exported, each module from its own seed).

    The identity of each network's weights is known without building a model -- the digest of its release files
    (cached by size and mtime beside them), or the seeded builder's inputs -- so a re-run with every artifact cached
    loads nothing; the networks are loaded (on the CPU, fp32) only when an artifact must be built. Each artifact's
    manifest still records the digest of the modules it was built from, which the engine's backends check at run
    time."""

    cfg: Any  # MMGTConfig of the networks
    weights: Optional[Path] = None  # release weights directory (None: seeded random weights)
    random_weights: bool = False  # a trained preset's graphs from seeded weights, module by module (random_networks)
    parity: bool = True  # each artifact is compared with torch in onnxruntime (needs the ort extra)

    @classmethod
    def from_args(cls, args) -> "ExportSource":
        """The source ``engine export``'s flags (``weights``, ``preset``, ``random_weights``, ``skip_parity``) ask
        for; CLIError for a trained preset without weights."""
        from mmgt.config import get_preset

        parity = not getattr(args, "skip_parity", False)
        try:
            cfg = get_preset(args.preset or ("mmgt" if args.weights is not None else "tiny"))
        except ValueError as e:
            raise CLIError(f"--preset: {e}") from None
        if args.weights is not None:
            return cls(cfg, weights=Path(args.weights), parity=parity)
        if cfg.trained and not args.random_weights:
            raise CLIError(f"preset {cfg.name!r} has trained weights: pass --weights DIR (or --random-weights "
                           "to export its graphs with seeded random weights)")
        return cls(cfg, random_weights=cfg.trained, parity=parity)

    def weights_identity(self, contract=None) -> Dict[str, Any]:
        """What decides the weights of ``contract``'s network (None: of every network), found without building
        it: the digest of its release files; or, for seeded weights, the preset, its config, the seed and the
        version of the builder (the same inputs always give the same weights)."""
        from export.manifest import code_version, config_hash, files_digest

        if self.weights is not None:
            from mmgt.weights import RELEASE_PARTS, ReleaseLayout

            layout = ReleaseLayout(self.weights)
            parts = weight_parts([contract]) if contract is not None else RELEASE_PARTS
            return {"files": files_digest(self.weights, sorted({p for part in parts for p in layout.sources(part)}))}
        sections = [f.name for f in fields(self.cfg) if is_dataclass(getattr(self.cfg, f.name))]
        return {"preset": self.cfg.name, "config_hash": config_hash(self.cfg, sections), "seed": self.cfg.seed,
                "builder": "random_networks" if self.random_weights else "build_models",
                "code": code_version(("mmgt",), files=(Path(__file__),), dists=("torch", "diffusers", "transformers"))}

    def load(self, networks: Sequence[str]):
        """The model set holding ``networks`` (the export and ort extras are checked first: one line each)."""
        from engine.extras import require_extra
        from mmgt import pipeline as P

        require_extra("export")
        if self.parity:
            require_extra("ort", "the parity check (or pass --skip-parity)")
        if self.weights is not None:
            return P.load_models(self.weights, self.cfg)
        if not self.random_weights:
            return P.build_models(self.cfg)  # the same seeded weights the engine builds for this preset
        return random_networks(self.cfg, networks)


def weight_parts(contracts) -> List[str]:
    """The ModelSet attributes holding the weights of ``contracts``, sorted ("vae.decoder" -> "vae"; the frame
    decoder of a model set without a light decoder is its VAE's)."""
    attrs = {path.split(".")[0] for c in contracts for path in c.weights}
    return sorted({"vae" if attr == "frame_decoder" else attr for attr in attrs})


def random_seeds(cfg) -> Dict[str, int]:
    """The seed of every module ``random_networks`` builds: the config's seed + the module's place in
    ``RELEASE_PARTS``, so a module's weights do not depend on which networks an export asks for."""
    from mmgt.weights import RELEASE_PARTS

    return {part: cfg.seed + i for i, part in enumerate(RELEASE_PARTS)}


def random_networks(cfg, networks: Sequence[str]):
    """Only the modules the asked networks need, each from its own seed (``random_seeds``: release-size graphs on a
    CPU); a ModelSet-like namespace with ``cfg`` and those modules. Which modules a network needs is its contract's
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
    seeds = random_seeds(cfg)
    attrs = {}
    for attr in weight_parts(contracts[n] for n in networks):
        if attr in builders:
            attrs[attr] = builders[attr](seeds[attr])
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seeds[attr])
                attrs[attr] = stage2[attr]().eval()
        log.info("built %s with random weights (seed %d)", attr, seeds[attr])
    return SimpleNamespace(cfg=cfg, frame_decoder=attrs.get("vae"), **attrs)


__all__ = ["for_settings", "with_preset_steps", "ModelOptions", "resolve_device", "load_model_set",
           "accelerate_models", "prepare_avatar", "ExportSource", "weight_parts", "random_seeds", "random_networks"]
