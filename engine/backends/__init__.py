"""Backends: executors of a network contract, one per network, chosen once when the model set is made.

    torch         engine.backends.torch_backend.TorchExecutor           the contract's torch module (eager; options:
                                                                         torch.compile, CUDA graphs, fixed batches)
    onnxruntime   engine.backends.onnxruntime_backend.OnnxRuntimeBackend  model.onnx (CPU or CUDA provider)
    tensorrt      engine.backends.tensorrt_backend.TensorRTBackend        model.plan (CUDA, fixed buffers)

Every executor is a callable from the contract's named input tensors to its named output tensors (mmgt/contract.py);
``use_backend`` puts them into a ``ModelSet`` (``dataclasses.replace(models, executors=...)``) and the pipeline calls
each network by name, so the runner, the stage functions and the denoising loop hold no backend branch.

Artifacts are found by what the run needs (network, format, precision, config, shapes, weights) among
``<artifacts>/<network>/*/manifest.json`` and fully validated (sha256 of every file) before use; a missing or
invalid one is refused with the `engine export` command that makes it.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from engine.backends.base import Backend, BackendUnavailable, IOSpec
from export.manifest import (ONNX_NAME, PLAN_NAME, ArtifactError, config_hash, find_artifact, module_float_dtype,
                             network_weights, weights_digest)

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DECODE_FRAMES_PER_CALL = 4  # the accelerated decoder's one static batch (chunk - overlap is a multiple of 4 in
# every preset, so the new frames of a chunk split without padding)


# ----------------------------------------------------------------------------------------------------------------
# Opening executors and putting them into a ModelSet
# ----------------------------------------------------------------------------------------------------------------
def _export_hint(models, backend: str, artifacts: Path, precision: str) -> str:
    cfg, shapes = models.cfg, models.shapes
    source = f"--preset {cfg.name}" if not cfg.trained else "--weights DIR"
    fmt = "onnx" if backend == "onnxruntime" else "tensorrt"
    cmd = f"engine export {source} --out {artifacts} --format {fmt} --chunk {shapes.chunk}"
    if precision == "fp16":
        cmd += " --fp16"
    if shapes.unet_batch == 2:
        cmd += " --guidance <the CFG scale of this run>"
    if shapes.smga_batch == 1:
        cmd += " --smga-guidance 1"
    return f"run `{cmd}`"


def _weights_check(models, contract):
    """A manifest veto: the artifact must come from the weights this ModelSet holds (compared in its dtype)."""
    cache: Dict[str, str] = {}

    def check(manifest: Mapping[str, Any]) -> Optional[str]:
        if "digest" not in cache:
            mods = network_weights(models, contract)
            cache["dtype"] = module_float_dtype(mods)
            cache["digest"] = weights_digest(mods, cache["dtype"])
        recorded = manifest.get("info", {}).get("weights_digests", {}).get(cache["dtype"])
        if recorded != cache["digest"]:
            return f"exported from other weights (the {cache['dtype']} weights digest differs)"
        return None
    return check


def open_artifact(kind: str, network: str, models, artifacts: Path, precision: Optional[str] = None,
                  verify_weights: bool = True, provider: Optional[str] = None, cuda_graph: bool = False) -> Backend:
    """The onnxruntime or TensorRT executor of ``network`` for ``models``' contract shapes, from the matching
    validated artifact under ``artifacts``."""
    if kind not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown artifact backend {kind!r}; choose onnxruntime or tensorrt")
    if artifacts is None:
        raise ArtifactError(f"--backend {kind} needs --artifacts DIR (written by `engine export`)")
    contract = models.contracts[network]
    artifacts = Path(artifacts)
    precision = contract.precision(precision or ("fp16" if kind == "tensorrt" else "fp32"))
    want: Dict[str, Any] = {"network": network, "format": "onnx" if kind == "onnxruntime" else "tensorrt",
                            "precision": precision, "config_hash": config_hash(models.cfg, contract.config_sections),
                            "contract_version": contract.version, "shapes": models.shapes.to_dict()}
    require: Tuple[str, ...] = (ONNX_NAME,)
    if kind == "tensorrt":
        from engine.backends.tensorrt_backend import runtime_environment

        env = runtime_environment()  # raises BackendUnavailable without TensorRT / a GPU
        want["tensorrt"] = {"version": env["version"], "compute_capability": env["compute_capability"]}
        require = (ONNX_NAME, PLAN_NAME)
    directory, manifest = find_artifact(
        artifacts, network, want, check=_weights_check(models, contract) if verify_weights else None,
        require=require, hint=_export_hint(models, kind, artifacts, precision))
    log.info("%s: %s artifact %s", network, kind, directory)
    if kind == "onnxruntime":
        from engine.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(directory, manifest, device=models.device, provider=provider)
    from engine.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(directory, manifest, device=models.device, cuda_graph=cuda_graph)


def use_backend(models, backend: str = "torch", artifacts: Optional[Path] = None, *,
                networks: Optional[Sequence[str]] = None, precision: Optional[str] = None,
                verify_weights: bool = True, provider: Optional[str] = None, cuda_graph: bool = False):
    """A ModelSet whose ``networks`` (default: every network of its contracts) run on ``backend``.

    The artifacts must have the shapes of the model set's contracts (``models.shapes``: chunk, CFG layouts, window;
    make the model set for the run's settings first). ``precision``: the artifacts' precision (default fp32 for
    onnxruntime, fp16 for TensorRT; Stage I and the speech encoders are always fp32). ``verify_weights`` refuses
    artifacts exported from other weights (one digest of each network's weights).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    names = list(models.calls) if networks is None else list(networks)
    unknown = [n for n in names if n not in models.calls]
    if unknown:
        raise ValueError(f"use_backend: unknown networks {unknown}; known: {', '.join(models.calls)}")
    if backend == "torch":
        executors = {k: v for k, v in models.executors.items() if k not in names}  # back to the contracts' torch calls
        return dataclasses.replace(models, executors=executors)
    opened = {n: open_artifact(backend, n, models, artifacts, precision, verify_weights, provider, cuda_graph)
              for n in names}
    log.info("backend %s for %s", backend, ", ".join(opened))
    return dataclasses.replace(models, executors={**models.executors, **opened})


def accelerate(models, *, compile: Union[bool, str] = False, cuda_graphs: bool = False):
    """The torch path's speed options on a ModelSet (the CLI's ``--compile`` / ``--cuda-graphs``).

    ``compile``: torch.compile the denoiser step and the frame decoder (static shapes; True or a torch.compile mode:
    "max-autotune-no-cudagraphs" tunes GEMM/conv kernels, longer to compile). ``cuda_graphs``: replay the
    denoiser step, the frame decoder and the SMGA step as CUDA graphs, one per input signature
    (engine.backends.graphs). The frame decoder runs in fixed batches of ``DECODE_FRAMES_PER_CALL`` frames, so it has
    one shape however many frames a chunk emits. Both options change speed, not results: the same math on the same
    inputs (compile may reorder float sums). The denoiser's CFG layout is the model set's (its shapes). The first call
    of each shape compiles/captures: call ``Runner.warm_up`` before timing or streaming.
    """
    if not (compile or cuda_graphs):
        return models
    if cuda_graphs and models.device.type != "cuda":
        raise BackendUnavailable(f"CUDA graphs need a CUDA device; the models are on {models.device}")
    from engine.backends.torch_backend import FixedFrames, TorchExecutor

    contract = models.contracts
    executors = dict(models.executors)
    executors["denoising_unet"] = TorchExecutor(contract["denoising_unet"], models, compile=compile,
                                                cuda_graph=cuda_graphs)
    executors["vae_decoder"] = FixedFrames(
        TorchExecutor(contract["vae_decoder"], models, compile=compile, cuda_graph=cuda_graphs),
        frames=DECODE_FRAMES_PER_CALL, input_name="latents", axis=0)
    if cuda_graphs and "smga_denoise" in contract:
        executors["smga_denoise"] = TorchExecutor(contract["smga_denoise"], models, cuda_graph=True)
    return dataclasses.replace(models, executors=executors)


__all__ = ["BACKENDS", "DECODE_FRAMES_PER_CALL", "BackendUnavailable", "IOSpec", "Backend", "open_artifact",
           "use_backend", "accelerate"]
