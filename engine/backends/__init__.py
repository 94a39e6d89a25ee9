"""Backends: one per network, named tensors in, named tensors out; chosen once per run.

    torch         engine.backends.torch_backend.TorchBackend             the eager mmgt modules
    onnxruntime   engine.backends.onnxruntime_backend.OnnxRuntimeBackend  model.onnx (CPU or CUDA provider)
    tensorrt      engine.backends.tensorrt_backend.TensorRTBackend        model.plan (CUDA, fixed buffers)

The names, shapes and dtypes come from the export contracts (export/specs.py) through the manifest beside each
artifact. ``apply_backend`` turns a ``ModelSet`` into one whose Stage II networks (pose guider, ReferenceNet,
denoiser, audio projection, VAE decode) are adapters with the call signatures mmgt/pipeline.py uses, each calling
its backend: the pipeline and the runner run unchanged, and the denoising loop holds no backend branch.

Artifacts are found by what the run needs (network, format, precision, config, shapes, weights) among
``<artifacts>/<network>/*/manifest.json`` and fully validated (sha256 of every file) before use; a missing or
invalid one is refused with the `engine export` command that makes it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from export.manifest import (BRANCHES, CONFIG_SECTIONS, ONNX_NAME, PLAN_NAME, STAGE2_NETWORKS, ArtifactError,
                             ExportShapes, bank_name, config_hash, find_artifact, mask_name, module_float_dtype,
                             network_weights, weights_digest)

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
TORCH_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")


class BackendUnavailable(ValueError):
    """The chosen backend cannot run here (library or device missing); one line says what to install or pass."""


# ----------------------------------------------------------------------------------------------------------------
# Named-tensor interface
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IOSpec:
    """A named tensor of an artifact, read from its manifest: opt shape, dtype, dynamic axes."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    dynamic: Tuple[Tuple[int, int, int, str], ...] = ()  # (axis, min, max, symbol)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "IOSpec":
        dyn = tuple((int(d["axis"]), int(d["min"]), int(d["max"]), str(d["symbol"])) for d in data.get("dynamic", ()))
        return cls(str(data["name"]), tuple(int(s) for s in data["shape"]), str(data["dtype"]), dyn)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def axis_range(self, axis: int) -> Tuple[int, int]:
        for a, lo, hi, _ in self.dynamic:
            if a == axis:
                return lo, hi
        return self.shape[axis], self.shape[axis]

    def problem(self, shape: Sequence[int]) -> Optional[str]:
        """None when ``shape`` fits this tensor, else what is wrong."""
        if len(shape) != len(self.shape):
            return f"{self.name} has rank {len(shape)}, the artifact takes rank {len(self.shape)} {self.shape}"
        for axis, (got, want) in enumerate(zip(shape, self.shape)):
            lo, hi = self.axis_range(axis)
            if not lo <= got <= hi:
                span = f"{lo}..{hi}" if lo != hi else f"{want}"
                return f"{self.name} axis {axis} is {got}, the artifact takes {span} (full shape {self.shape})"
        return None

    def shape_for(self, sizes: Mapping[str, int]) -> Tuple[int, ...]:
        shape = list(self.shape)
        for axis, _, _, symbol in self.dynamic:
            shape[axis] = sizes.get(symbol, shape[axis])
        return tuple(shape)


class Backend:
    """One network behind named tensors. ``inputs``/``outputs`` are None when any shape works (torch)."""

    kind = "base"

    def __init__(self, network: str, inputs: Optional[Sequence[IOSpec]], outputs: Optional[Sequence[IOSpec]],
                 meta: Optional[Mapping[str, Any]] = None, source: Optional[Path] = None):
        self.network = network
        self.inputs = tuple(inputs) if inputs is not None else None
        self.outputs = tuple(outputs) if outputs is not None else None
        self.meta = dict(meta or {})
        self.source = source  # artifact directory (None for torch)

    def input_spec(self, name: str) -> Optional[IOSpec]:
        if self.inputs is None:
            return None
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.network}: no input named {name!r}")

    def check_feeds(self, feeds: Mapping[str, Any]) -> Dict[str, int]:
        """Names and shapes of ``feeds`` against the artifact; returns the sizes of the dynamic symbols."""
        names = [s.name for s in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise ValueError(f"{self.network} ({self.source}): inputs missing {missing}, unexpected {extra}")
        sizes: Dict[str, int] = {}
        for spec in self.inputs:
            shape = tuple(feeds[spec.name].shape)
            why = spec.problem(shape)
            if why:
                raise ValueError(f"{self.network} ({self.source}): {why}; re-run `engine export` with the "
                                 "chunk/guidance/window this run uses")
            for axis, _, _, symbol in spec.dynamic:
                sizes[symbol] = shape[axis]
        return sizes

    def __call__(self, feeds: Mapping[str, Any]) -> Dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.network!r}, source={self.source})"


# ----------------------------------------------------------------------------------------------------------------
# Adapters: the pipeline's call signatures on top of a backend
# ----------------------------------------------------------------------------------------------------------------
class _Adapter:
    """Common part: target device/dtype of the outputs, and no-op module methods the ModelSet calls."""

    def __init__(self, backend: Backend, cfg: Any, device, dtype):
        self.backend, self.cfg, self.device, self.dtype = backend, cfg, device, dtype

    def to(self, *args, **kwargs) -> "_Adapter":  # the engine fixed the device when it chose the backend
        return self

    def eval(self) -> "_Adapter":
        return self

    def _out(self, t):
        return t.to(self.device, self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend!r})"


def _run_split(backend: Backend, name_in: str, name_out: str, x, axis: int):
    """Run a per-frame network over any number of frames: pieces of at most the artifact's max, short ones padded
    (by repeating their last frame) up to its min; outputs are cut back and joined along ``axis``."""
    import torch

    spec = backend.input_spec(name_in)
    if spec is None:
        return backend({name_in: x})[name_out]
    lo, hi = spec.axis_range(axis)
    n = x.shape[axis]
    pieces = []
    for start in range(0, n, hi):
        part = x.narrow(axis, start, min(hi, n - start))
        k = part.shape[axis]
        if k < lo:
            pad = part.narrow(axis, k - 1, 1).expand(*[lo - k if a == axis else -1 for a in range(part.dim())])
            part = torch.cat([part, pad], dim=axis)
        pieces.append(backend({name_in: part})[name_out].narrow(axis, 0, k))
    return torch.cat(pieces, dim=axis)


class PoseGuiderAdapter(_Adapter):
    """``pose_guider(pose (1, 3, C, R, R))`` -> (1, C0, C, h, w)."""

    def __call__(self, pose):
        return self._out(self.backend({"pose": pose})["pose_features"])


class AudioProjAdapter(_Adapter):
    """``audioproj(windows (B, F, 5, L, C))`` -> (B, F, T, D), any F (split into the artifact's frame range)."""

    def __call__(self, audio_embeds):
        return self._out(_run_split(self.backend, "audio_windows", "audio_tokens", audio_embeds, axis=1))


class ReferenceNetAdapter(_Adapter):
    """``reference_unet(latent, context)`` -> the bank tuple (t = 0 is baked into the exported graph)."""

    def __init__(self, backend: Backend, cfg, device, dtype, bank_size: int):
        super().__init__(backend, cfg, device, dtype)
        self.bank_size = bank_size

    def __call__(self, latent, context, timestep=0):
        if float(timestep) != 0.0:
            raise ValueError(f"reference_unet adapter: the exported ReferenceNet runs at t = 0, got {timestep}")
        out = self.backend({"latent": latent, "context": context})
        return tuple(self._out(out[bank_name(i)]) for i in range(self.bank_size))


class DenoiserAdapter(_Adapter):
    """``denoising_unet(sample, timestep, context, pose_features=, audio_tokens=, masks=, bank=, uncond_rows=)``."""

    def __init__(self, backend: Backend, cfg, device, dtype, mask_levels: Sequence[int], bank_size: int):
        super().__init__(backend, cfg, device, dtype)
        self.mask_levels = tuple(mask_levels)
        self.bank_size = bank_size
        self.uncond_rows = int(backend.meta.get("uncond_rows", 0))

    def __call__(self, sample, timestep, encoder_hidden_states, pose_features=None, audio_tokens=None, masks=None,
                 bank=None, uncond_rows: int = 0):
        import torch

        if uncond_rows != self.uncond_rows:
            raise ValueError(f"denoising_unet adapter: the call has uncond_rows={uncond_rows}, the network was "
                             f"prepared for {self.uncond_rows} (export/choose it with the guidance this run uses)")
        if pose_features is None or bank is None or (self.mask_levels and (masks is None or audio_tokens is None)):
            raise ValueError("denoising_unet adapter: pose_features, bank, audio_tokens and masks are inputs of the "
                             "exported step; all must be given")
        if len(bank) != self.bank_size:
            raise ValueError(f"denoising_unet adapter: bank has {len(bank)} tensors, expected {self.bank_size}")
        batch, frames = sample.shape[0], sample.shape[2]
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch).float()  # (B,)
        feeds = {"sample": sample, "timestep": timestep, "context": encoder_hidden_states,
                 "pose_features": pose_features, "audio_tokens": audio_tokens}
        per_branch = masks if isinstance(masks, Mapping) else dict(zip(BRANCHES, masks or ()))
        for level in self.mask_levels:
            for branch in BRANCHES:
                feeds[mask_name(branch, level)] = per_branch[branch][level].reshape(batch, frames, -1)
        for i, t in enumerate(bank):
            feeds[bank_name(i)] = t
        return self.backend(feeds)["v"].to(sample.device, sample.dtype)


class VAEAdapter(_Adapter):
    """Stands in for the diffusers VAE: ``decode`` runs the exported decoder, ``encode`` stays the torch VAE's.

    mmgt.vae.decode_latents calls ``vae.decode(latents / scale).sample`` and maps [-1, 1] to [0, 1]; the exported
    decoder takes diffusion-scale latents and returns [0, 1] frames, so both ends are converted here (exact up to
    one float rounding). ``frames`` is the direct call a pipeline-side decoder hook would use instead.
    """

    def __init__(self, backend: Backend, vae, device, dtype):
        super().__init__(backend, vae.config, device, dtype)
        self.vae = vae
        self.config = vae.config
        self.scale = float(vae.config.scaling_factor)

    def encode(self, *args, **kwargs):
        return self.vae.encode(*args, **kwargs)

    def decode(self, z, return_dict: bool = True):
        frames = _run_split(self.backend, "latents", "frames", z * self.scale, axis=0)  # (N, 3, H, W) in [0, 1]
        sample = self._out(frames) * 2.0 - 1.0
        return SimpleNamespace(sample=sample) if return_dict else (sample,)

    def frames(self, latents):
        """Diffusion-scale latents (N, C, h, w) -> frames in [0, 1], no round trip (what decode should call)."""
        return self._out(_run_split(self.backend, "latents", "frames", latents, axis=0))


# ----------------------------------------------------------------------------------------------------------------
# Opening backends and applying them to a ModelSet
# ----------------------------------------------------------------------------------------------------------------
def _export_hint(models, backend: str, artifacts: Path, shapes: ExportShapes, precision: str) -> str:
    cfg = models.cfg
    source = f"--preset {cfg.name}" if not cfg.trained else "--weights DIR"
    fmt = "onnx" if backend == "onnxruntime" else "tensorrt"
    cmd = f"engine export {source} --out {artifacts} --format {fmt} --chunk {shapes.chunk}"
    if precision == "fp16":
        cmd += " --fp16"
    if shapes.unet_batch == 2:
        cmd += " --guidance <the CFG scale of this run>"
    return f"run `{cmd}`"


def _weights_check(models, network: str):
    """A manifest veto: the artifact must come from the weights this ModelSet holds (compared in its dtype)."""
    cache: Dict[str, str] = {}

    def check(manifest: Mapping[str, Any]) -> Optional[str]:
        if "digest" not in cache:
            mods = network_weights(models, network)
            cache["dtype"] = module_float_dtype(mods)
            cache["digest"] = weights_digest(mods, cache["dtype"])
        recorded = manifest.get("info", {}).get("weights_digests", {}).get(cache["dtype"])
        if recorded != cache["digest"]:
            return f"exported from other weights (the {cache['dtype']} weights digest differs)"
        return None
    return check


def open_backend(kind: str, network: str, models, shapes: ExportShapes, artifacts: Optional[Path] = None,
                 precision: Optional[str] = None, verify_weights: bool = True, provider: Optional[str] = None,
                 compile: bool = False, autocast_fp16: bool = False, cuda_graph: bool = False) -> Backend:
    """The backend of one network: torch (eager), or the matching validated artifact under ``artifacts``."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if kind == "torch":
        from engine.backends.torch_backend import TorchBackend

        return TorchBackend(network, models, shapes, autocast_fp16=autocast_fp16, compile=compile,
                            cuda_graph=cuda_graph)
    if artifacts is None:
        raise ArtifactError(f"--backend {kind} needs --artifacts DIR (written by `engine export`)")
    artifacts = Path(artifacts)
    precision = precision or ("fp16" if kind == "tensorrt" else "fp32")
    want: Dict[str, Any] = {"network": network, "format": "onnx" if kind == "onnxruntime" else "tensorrt",
                            "precision": precision, "config_hash": config_hash(models.cfg, CONFIG_SECTIONS[network]),
                            "shapes": shapes.to_dict()}
    require: Tuple[str, ...] = (ONNX_NAME,)
    if kind == "tensorrt":
        from engine.backends.tensorrt_backend import runtime_environment

        env = runtime_environment()  # raises BackendUnavailable without TensorRT / a GPU
        want["tensorrt"] = {"version": env["version"], "compute_capability": env["compute_capability"]}
        require = (ONNX_NAME, PLAN_NAME)
    directory, manifest = find_artifact(
        artifacts, network, want, check=_weights_check(models, network) if verify_weights else None,
        require=require, hint=_export_hint(models, kind, artifacts, shapes, precision))
    log.info("%s: %s artifact %s", network, kind, directory)
    if kind == "onnxruntime":
        from engine.backends.onnxruntime_backend import OnnxRuntimeBackend

        device = getattr(models, "device", None)
        return OnnxRuntimeBackend(directory, manifest, device=device, provider=provider)
    from engine.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(directory, manifest, device=getattr(models, "device", None), cuda_graph=cuda_graph)


def apply_backend(models, backend: str = "torch", artifacts: Optional[Path] = None,
                  shapes: Optional[ExportShapes] = None, *, settings=None, precision: Optional[str] = None,
                  networks: Sequence[str] = STAGE2_NETWORKS, verify_weights: bool = True,
                  provider: Optional[str] = None, compile: bool = False, autocast_fp16: bool = False,
                  cuda_graph: bool = False):
    """A ModelSet whose Stage II networks run on ``backend``; the other networks stay the eager modules.

    ``shapes`` (or ``settings``: chunk, guidance, window of an engine RenderSettings) fix the static shapes the
    artifacts must have. ``precision``: the artifacts' precision (default fp32 for onnxruntime, fp16 for TensorRT).
    ``verify_weights`` refuses artifacts exported from other weights (one digest of each replaced network).
    """
    if shapes is None:
        shapes = ExportShapes.from_settings(models.cfg, settings) if settings is not None \
            else ExportShapes.from_config(models.cfg)
    unknown = [n for n in networks if n not in STAGE2_NETWORKS]
    if unknown:
        raise ValueError(f"apply_backend: {unknown} are not Stage II networks ({', '.join(STAGE2_NETWORKS)})")
    opened = {n: open_backend(backend, n, models, shapes, artifacts, precision, verify_weights, provider, compile,
                              autocast_fp16, cuda_graph) for n in networks}
    device, dtype = models.device, models.dtype
    changes: Dict[str, Any] = {}
    if "pose_guider" in opened:
        changes["pose_guider"] = PoseGuiderAdapter(opened["pose_guider"], models.cfg.pose_guider, device, dtype)
    if "audio_proj" in opened:
        changes["audioproj"] = AudioProjAdapter(opened["audio_proj"], models.cfg.audio_proj, device, dtype)
    if "reference_unet" in opened or "denoising_unet" in opened:
        from mmgt.unet3d import audio_mask_levels, reference_bank_layout

        levels = [lv.level for lv in audio_mask_levels(models.cfg.unet, shapes.latent)]
        bank_size = len(reference_bank_layout(models.cfg.unet, shapes.latent))
        if "reference_unet" in opened:
            changes["reference_unet"] = ReferenceNetAdapter(opened["reference_unet"], models.cfg.unet, device, dtype,
                                                            bank_size)
        if "denoising_unet" in opened:
            changes["denoising_unet"] = DenoiserAdapter(opened["denoising_unet"], models.cfg.unet, device, dtype,
                                                        levels, bank_size)
    if "vae_decoder" in opened:
        changes["vae"] = VAEAdapter(opened["vae_decoder"], models.vae, device, dtype)
    log.info("Stage II backend %s for %s", backend, ", ".join(opened))
    return dataclasses.replace(models, **changes)


DECODE_FRAMES_PER_CALL = 4  # the accelerated decoder's one static batch (chunk - overlap is a multiple of 4 in
# every preset, so the new frames of a chunk split without padding)


def accelerate(models, settings=None, *, compile: Union[bool, str] = False, cuda_graphs: bool = False):
    """The torch path's speed options on a ModelSet (the CLI's ``--compile`` / ``--cuda-graphs``).

    ``compile``: torch.compile the denoiser step and the frame decoder (static shapes; True or a torch.compile mode:
    "max-autotune-no-cudagraphs" tunes GEMM/conv kernels, longer to compile). ``cuda_graphs``: replay the
    denoiser step, the frame decoder and the SMGA step as CUDA graphs, one per input signature
    (engine.backends.graphs). The decoder in use (the light one when set, else the VAE's) runs in fixed batches of
    ``DECODE_FRAMES_PER_CALL`` frames, so it has one shape however many frames a chunk emits. Both options change
    speed, not results: the same math on the same inputs (compile may reorder float sums; the decoder adapter's
    [-1, 1] round trip costs at most one float rounding). ``settings`` fix the denoiser's CFG layout (its guidance),
    as for the other backends. The first call of each shape compiles/captures: call ``Runner.warm_up`` before timing
    or streaming.
    """
    if not (compile or cuda_graphs):
        return models
    if cuda_graphs and models.device.type != "cuda":
        raise BackendUnavailable(f"CUDA graphs need a CUDA device; the models are on {models.device}")
    from engine.backends.torch_backend import TorchBackend

    out = apply_backend(models, "torch", settings=settings, networks=("denoising_unet",), compile=compile,
                        cuda_graph=cuda_graphs)
    # the frame decoder in use, in fixed batches
    decoder = TorchBackend("vae_decoder", models, ExportShapes.from_config(models.cfg), compile=compile,
                           cuda_graph=cuda_graphs, fixed_frames=DECODE_FRAMES_PER_CALL)
    if models.decoder is not None:
        out = dataclasses.replace(out, decoder=VAEAdapter(decoder, models.decoder, models.device, models.dtype))
    else:
        out = dataclasses.replace(out, vae=VAEAdapter(decoder, models.vae, models.device, models.dtype))
    if cuda_graphs:
        from engine.backends.graphs import StaticGraph

        out = dataclasses.replace(out, smga_denoise=StaticGraph(models.smga.guided_denoise, name="smga step",
                                                                capture=True))
    return out


__all__ = ["BACKENDS", "BackendUnavailable", "IOSpec", "Backend", "PoseGuiderAdapter", "AudioProjAdapter",
           "ReferenceNetAdapter", "DenoiserAdapter", "VAEAdapter", "open_backend", "apply_backend", "accelerate",
           "DECODE_FRAMES_PER_CALL"]
