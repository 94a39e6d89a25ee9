"""ONNX -> TensorRT plan with TensorRT's Python API (imported lazily: it is optional and GPU-only).

``build_plan`` parses the contract's ONNX file, sets the optimisation profile from the contract (min/opt/max per
input), the precision, a timing cache and the builder optimisation level, and writes a serialized plan.

Precision. fp16 plans are built the way the installed TensorRT supports:

* TensorRT 10 (weak typing): the fp32 ONNX with ``BuilderFlag.FP16``; normalisation, softmax and reduction layers
  are pinned to fp32 (layer precision + output type, with ``PREFER_PRECISION_CONSTRAINTS``) because their
  sums over thousands of elements overflow or lose the small differences in fp16.
* TensorRT 11 (strong typing only; ``BuilderFlag.FP16`` is gone): a strongly typed network built from the fp16
  ONNX, whose attention softmax the export math already computes in fp32.

Plans are specific to the TensorRT version and the GPU's compute capability; both are part of the cache key.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

from mmgt.contract import Contract

from .manifest import DEFAULT_OPT_LEVEL, DEFAULT_WORKSPACE_GB, atomic_write_bytes

if TYPE_CHECKING:  # numpy is imported where plans run: `engine export`'s cached path stays light
    import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mmgt-engine[tensorrt]' on a machine with an NVIDIA GPU and driver"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message is one line saying which and how to get it."""


def tensorrt_problem() -> Optional[str]:
    """None when TensorRT can build here, else the one-line reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed: {INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU: no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def require_tensorrt() -> None:
    problem = tensorrt_problem()
    if problem:
        raise TensorRTUnavailable(problem)


def trt_environment(device: int = 0) -> Dict[str, str]:
    """What a plan is specific to: TensorRT version, GPU compute capability and name."""
    require_tensorrt()
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return {"version": trt.__version__, "compute_capability": f"{major}.{minor}",
            "device": torch.cuda.get_device_name(device)}


def typing_mode(precision: str) -> str:
    """"weak" (fp32 ONNX + FP16 flag) where the FP16 builder flag exists, else "strong" (fp16 ONNX)."""
    import tensorrt as trt

    if precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16"):
        return "strong"
    return "weak"


def source_precision(precision: str) -> str:
    """Precision of the ONNX a plan of ``precision`` is built from."""
    return "fp16" if precision == "fp16" and typing_mode(precision) == "strong" else "fp32"


def _pin_fp32(network, trt) -> int:
    """Pin the layers whose fp16 math is unsafe to fp32; returns how many."""
    kinds = {trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    if hasattr(trt.LayerType, "NORMALIZATION"):
        kinds.add(trt.LayerType.NORMALIZATION)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_plan(spec: Contract, onnx_path: Path, plan_path: Path, precision: str = "fp16",
               timing_cache: Optional[Path] = None, opt_level: int = DEFAULT_OPT_LEVEL,
               workspace_gb: float = DEFAULT_WORKSPACE_GB) -> Dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path`` for the contract's profile; returns build facts for the manifest."""
    require_tensorrt()
    import tensorrt as trt

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    mode = typing_mode(precision)
    flags = 0
    if mode == "strong":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # 1. parse (external weights are found beside the file)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{spec.name}: TensorRT cannot parse {onnx_path}: {errors}")
    # 2. builder config: memory, precision, optimisation level
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = int(opt_level)
    pinned = 0
    if precision == "fp16" and mode == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(network, trt)
    # 3. one optimisation profile from the contract
    profile = builder.create_optimization_profile()
    for t in spec.inputs:
        lo, opt, hi = t.profile()
        profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    # 4. timing cache: read, extend, write back (atomically) so repeated builds skip layer timing
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    # 5. build
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{spec.name}: TensorRT failed to build a plan from {onnx_path} (see the log above)")
    atomic_write_bytes(Path(plan_path), bytes(serialized))
    if timing_cache:
        atomic_write_bytes(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - start
    log.info("%s: TensorRT %s plan built in %.1f s (%s typing, %d layers pinned to fp32)", spec.name, precision,
             seconds, mode, pinned)
    return {"typing": mode, "pinned_fp32_layers": pinned, "build_seconds": round(seconds, 3),
            "opt_level": int(opt_level), "workspace_gb": workspace_gb}


_TORCH_OF_TRT = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
                 "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8"}


def run_plan(plan_path: Path, feeds: Mapping[str, "np.ndarray"]) -> Dict[str, np.ndarray]:
    """Run a plan once on GPU 0 (for parity at export time): numpy in, numpy out."""
    require_tensorrt()
    import numpy as np
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"{plan_path}: TensorRT could not deserialize the plan (other TensorRT version or GPU?)")
    context = engine.create_execution_context()
    keep, outputs = [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = getattr(torch, _TORCH_OF_TRT[engine.get_tensor_dtype(name).name])
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            x = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", dtype).contiguous()
            context.set_input_shape(name, tuple(x.shape))
            context.set_tensor_address(name, x.data_ptr())
            keep.append(x)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = getattr(torch, _TORCH_OF_TRT[engine.get_tensor_dtype(name).name])
            y = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=dtype)
            context.set_tensor_address(name, y.data_ptr())
            outputs[name] = y
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"{plan_path}: TensorRT execution failed")
    stream.synchronize()
    return {k: v.float().cpu().numpy() for k, v in outputs.items()}


def check_plan_parity(spec: Contract, plan_path: Path, reference, precision: str) -> Dict[str, Any]:
    """Max abs diff of the plan against the fp32 torch reference (on CPU) at the contract's opt point."""
    import numpy as np

    from .onnx import torch_outputs

    feeds = spec.sample_inputs("fp32", seed=1)
    expected = torch_outputs(reference, spec, feeds)
    got = run_plan(plan_path, {k: v.numpy() for k, v in feeds.items()})
    per_output = {n: float(np.max(np.abs(got[n] - expected[n].numpy()))) for n in spec.output_names}
    worst = max(per_output, key=per_output.get)
    tol = spec.tol(precision)
    return {"max_abs_diff": per_output[worst], "worst_output": worst, "tolerance": tol,
            "passed": per_output[worst] <= tol, "provider": "tensorrt", "points": 1, "per_output": per_output}


__all__ = ["INSTALL_HINT", "DEFAULT_OPT_LEVEL", "DEFAULT_WORKSPACE_GB", "TensorRTUnavailable", "tensorrt_problem",
           "require_tensorrt", "trt_environment", "typing_mode", "source_precision", "build_plan", "run_plan",
           "check_plan_parity"]
