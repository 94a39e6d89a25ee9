"""What a network contract is: named tensors in and out, their shapes, dtypes and dynamic axes, and the torch call.

Every network of MMGT declares its contract ONCE, beside the network (``smga_contracts`` in mmgt/smga.py,
``denoiser_contract`` in mmgt/unet3d.py, ...; mmgt/contracts.py lists them). Everything that calls a network by
name reads that declaration: the pipeline's calls (``Executor``), the torch, onnxruntime and TensorRT backends, the
ONNX export and its manifests, the benchmarks. No second list of names or shapes exists.

A contract's ``module(models)`` is the torch call: an ``nn.Module`` whose ``forward`` takes the inputs positionally
in ``inputs`` order and returns the outputs in ``outputs`` order (one tensor or a tuple). ``torch_call`` wraps it as
an ``Executor``: a callable from named input tensors to named output tensors, the one interface every backend has.

Shapes come from ``Shapes``: the model config plus the run's choices that fix a static shape (the render chunk, the
CFG layouts of both stages, the SMGA window). A run, an export and a benchmark with the same ``Shapes`` see the same
contract. This module imports torch only inside the functions that make tensors, so reading a contract stays light.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

FLOAT = "float"  # an input/output dtype that follows the artifact's precision (float32 or float16)
DEFAULT_CHUNK = 16  # Stage II frames per render chunk when nothing else is said (the offline default)
SAMPLES_PER_FRAME = 640  # 16 kHz audio / 25 fps: speech encoders take their wave as (1, frames, 640)

Feeds = Mapping[str, Any]  # input name -> tensor
Executor = Callable[[Feeds], Dict[str, Any]]  # named tensors in -> named tensors out (torch, onnxruntime, tensorrt)


# ----------------------------------------------------------------------------------------------------------------
# Static shapes of a run (or an export, or a benchmark)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """Every size a network call is fixed to. Engines have static shapes: the runner pads to them."""

    resolution: int  # frame side R in pixels
    latent: int  # latent side h = w = R / 8
    chunk: int  # Stage II frames per render chunk C (<= motion_max_frames)
    unet_batch: int  # denoiser batch: 1, or 2 with classifier-free guidance (row 0 = unconditional)
    smga_window: int  # SMGA window W in frames (also the audio encoders' longest input)
    smga_batch: int  # SMGA decoder batch: 1, or 2 with guidance (audio row, then the null-condition row)
    audio_frames_max: int  # most frames one audio-projection / wav2vec2 call takes (TensorRT profile max)
    decode_frames_max: int  # most frames one VAE-decoder call takes (TensorRT profile max)

    @property
    def uncond_rows(self) -> int:  # leading CFG-unconditional samples of the denoiser batch
        return self.unet_batch - 1

    @classmethod
    def from_config(cls, cfg, chunk: int = DEFAULT_CHUNK, guidance: Optional[float] = None,
                    window: Optional[int] = None, smga_guidance: Optional[float] = None,
                    audio_frames_max: Optional[int] = None, decode_frames_max: Optional[int] = None) -> "Shapes":
        """Shapes for an ``MMGTConfig`` and a run's choices (None: the config's default)."""
        guidance = cfg.sampler.guidance if guidance is None else float(guidance)
        smga_guidance = cfg.smga.guidance if smga_guidance is None else float(smga_guidance)
        window = cfg.smga.window if window is None else int(window)
        chunk = int(chunk)
        if not 1 <= chunk <= cfg.unet.motion_max_frames:
            raise ValueError(f"Shapes: chunk must be in [1, {cfg.unet.motion_max_frames}] (motion-module position "
                             f"table), got {chunk}")
        if window < 1:
            raise ValueError(f"Shapes: window must be >= 1 frame, got {window}")
        shapes = cls(resolution=cfg.resolution, latent=cfg.latent_size, chunk=chunk,
                     unet_batch=1 if guidance == 1.0 else 2, smga_window=window,
                     smga_batch=1 if smga_guidance == 1.0 else 2,
                     audio_frames_max=int(audio_frames_max or max(window, chunk)),
                     decode_frames_max=int(decode_frames_max or chunk))
        if shapes.audio_frames_max < 1 or shapes.decode_frames_max < 1:
            raise ValueError(f"Shapes: frame limits must be >= 1: {shapes}")
        return shapes

    @classmethod
    def from_settings(cls, cfg, settings) -> "Shapes":
        """Shapes for an engine ``RenderSettings``-like object (reads chunk, guidance, smga_guidance, window)."""
        return cls.from_config(cfg, chunk=getattr(settings, "chunk", DEFAULT_CHUNK) or DEFAULT_CHUNK,
                               guidance=getattr(settings, "guidance", None),
                               window=getattr(settings, "window", None),
                               smga_guidance=getattr(settings, "smga_guidance", None))

    def to_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


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
    dtype: str = FLOAT  # FLOAT follows the precision; else a fixed dtype ("float32" for timesteps and waves)
    dynamic: Tuple[Dynamic, ...] = ()
    low: Optional[float] = None  # sample inputs: uniform(low, high); None: standard normal
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

    def fits(self, shape: Tuple[int, ...]) -> Optional[str]:
        """None when ``shape`` is a shape of this tensor (dynamic axes within their range), else what is wrong."""
        if len(shape) != len(self.shape):
            return f"{self.name} has rank {len(shape)}, the contract says rank {len(self.shape)} {self.shape}"
        ranges = {d.axis: (d.min, d.max) for d in self.dynamic}
        for axis, (got, want) in enumerate(zip(shape, self.shape)):
            lo, hi = ranges.get(axis, (want, want))
            if not lo <= got <= hi:
                span = f"{lo}..{hi}" if lo != hi else f"{want}"
                return f"{self.name} axis {axis} is {got}, the contract takes {span} (full shape {self.shape})"
        return None

    def to_json(self, precision: str, with_profile: bool) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.resolved_dtype(precision)}
        if self.dynamic:
            out["dynamic"] = [{"axis": d.axis, "min": d.min, "max": d.max, "symbol": d.symbol} for d in self.dynamic]
        if with_profile:
            out["profile"] = [list(s) for s in self.profile()]
        return out


def tensor(name: str, shape, low: Optional[float] = None, high: Optional[float] = None, dtype: str = FLOAT,
           dynamic=()) -> TensorSpec:
    """Short constructor used by the contract declarations."""
    return TensorSpec(name, tuple(int(s) for s in shape), dtype, tuple(dynamic), low, high)


@dataclass(frozen=True)
class Contract:
    """The contract of one network: how it is called by name, exported, cached and checked."""

    name: str
    description: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    module: Callable[[Any], Any]  # ModelSet-like -> nn.Module: forward(*inputs in order) -> output or tuple of outputs
    weights: Tuple[str, ...]  # attribute paths in a ModelSet holding the weights (the weights digest covers them)
    config_sections: Tuple[str, ...]  # MMGTConfig sections the network is built from (the config hash covers them)
    shape_fields: Tuple[str, ...]  # Shapes fields its shapes come from
    exporter: str = "torchscript"  # "torchscript" (torch.onnx.export dynamo=False) or "dynamo"
    allow_fp16: bool = True  # False: always exported/built in fp32 (Stage I and the audio encoders)
    tolerance: float = 1e-3  # max abs diff onnxruntime vs torch, fp32
    tolerance_fp16: float = 5e-2  # the same for an fp16 artifact against the fp32 torch reference
    version: int = 1  # bump when the torch call changes what the artifact computes
    meta: Mapping[str, Any] = field(default_factory=dict)  # facts for the runtime (e.g. uncond_rows)

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def precision(self, requested: str) -> str:
        """The precision this network is actually exported in when ``requested`` is asked for."""
        return requested if self.allow_fp16 else "fp32"

    def tol(self, precision: str) -> float:
        return self.tolerance_fp16 if precision == "fp16" else self.tolerance

    def io_json(self, precision: str, with_profile: bool = True) -> Dict[str, Any]:
        return {"inputs": [t.to_json(precision, with_profile) for t in self.inputs],
                "outputs": [t.to_json(precision, with_profile) for t in self.outputs]}

    def shape_values(self, shapes: Shapes) -> Dict[str, int]:
        return {name: getattr(shapes, name) for name in self.shape_fields}

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """torch.onnx.export's dynamic_axes for the TorchScript exporter."""
        return {t.name: {d.axis: d.symbol for d in t.dynamic} for t in self.inputs + self.outputs if t.dynamic}

    def check_feeds(self, feeds: Feeds) -> None:
        """Names and shapes of ``feeds`` against the inputs; ValueError naming the first problem."""
        names = self.input_names
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise ValueError(f"{self.name}: inputs missing {missing}, unexpected {extra}")
        for spec in self.inputs:
            why = spec.fits(tuple(feeds[spec.name].shape))
            if why:
                raise ValueError(f"{self.name}: {why}")

    def sample_inputs(self, precision: str = "fp32", seed: int = 0, sizes: Optional[Mapping[str, int]] = None,
                      device=None) -> Dict[str, Any]:
        """Seeded inputs in each input's range, at the opt shape (or ``sizes`` for the dynamic axes)."""
        import torch

        dtypes = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
        gen = torch.Generator().manual_seed(seed)
        feeds = {}
        for t in self.inputs:
            shape = t.shape_at(sizes or {})
            if t.low is None:
                x = torch.randn(shape, generator=gen)
            else:
                x = t.low + (t.high - t.low) * torch.rand(shape, generator=gen)
            feeds[t.name] = x.to(device=device, dtype=dtypes[t.resolved_dtype(precision)])
        return feeds

    def profile_points(self) -> Tuple[Dict[str, int], ...]:
        """Sizes of the dynamic axes to check parity at: opt, and min when it differs."""
        points = [{}]
        mins = {d.symbol: d.min for t in self.inputs for d in t.dynamic}
        if any(d.min != t.shape[d.axis] for t in self.inputs for d in t.dynamic):
            points.append(mins)
        return tuple(points)

    def torch_call(self, models: Any) -> "TorchCall":
        """The torch executor of this contract on ``models``' modules."""
        return TorchCall(self, self.module(models))


class TorchCall:
    """A contract's torch module behind the named-tensor interface: ``call(feeds) -> {output: tensor}``.

    Inputs are passed positionally in contract order; the outputs come back under their contract names. Runs without
    autograd. The module holds weights only, so one TorchCall serves any number of threads at once.
    """

    kind = "torch"

    def __init__(self, contract: Contract, module: Any):
        self.contract, self.module = contract, module

    def __call__(self, feeds: Feeds) -> Dict[str, Any]:
        import torch

        with torch.no_grad():
            out = self.module(*[feeds[n] for n in self.contract.input_names])
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(self.contract.outputs):
            raise RuntimeError(f"{self.contract.name}: the torch call returned {len(outs)} outputs, the contract "
                               f"lists {len(self.contract.outputs)}")
        return dict(zip(self.contract.output_names, outs))

    def __repr__(self) -> str:
        return f"TorchCall({self.contract.name})"


def resolve_attr(root: Any, path: str) -> Any:
    """``resolve_attr(models, "vae.decoder")`` -> models.vae.decoder, with an error naming the missing part."""
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"mmgt.contract: {type(root).__name__} has no {path!r} (missing {part!r})")
        obj = getattr(obj, part)
    return obj


__all__ = ["FLOAT", "DEFAULT_CHUNK", "SAMPLES_PER_FRAME", "Feeds", "Executor", "Shapes", "Dynamic", "TensorSpec",
           "tensor", "Contract", "TorchCall", "resolve_attr"]
