"""The TensorRT backend: one ``model.plan``, fixed device buffers, torch's CUDA stream, optional CUDA graph.

Buffers are allocated once per tensor at the profile's max size (flat storage, viewed at the call's shape), so no
allocation happens per call. Without a CUDA graph, inputs already on the device in the right dtype are bound
directly (no copy); with ``cuda_graph=True`` (static-shape plans only) inputs are copied into the fixed buffers
and the captured launch is replayed, which removes the per-call CPU launch cost. Outputs are cloned out of the
fixed buffers unless ``copy_outputs=False`` (then they are valid until the next call).

TensorRT is imported when a backend is created; ``import engine`` works without it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from engine.backends.base import Backend, BackendUnavailable, IOSpec
from export.manifest import PLAN_NAME

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mmgt-engine[tensorrt]' on a machine with an NVIDIA GPU and driver"
_TORCH_OF_TRT = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs an NVIDIA GPU: no CUDA device is visible")
    return trt


def runtime_environment(device: int = 0) -> Dict[str, str]:
    """TensorRT version and GPU compute capability a plan must have been built for."""
    trt = _import_tensorrt()
    major, minor = torch.cuda.get_device_capability(device)
    return {"version": trt.__version__, "compute_capability": f"{major}.{minor}"}


class TensorRTBackend(Backend):
    """``model.plan`` of a validated artifact directory, run on ``device`` (a CUDA device)."""

    kind = "tensorrt"

    def __init__(self, directory: Path, manifest: Mapping[str, Any], device=None, cuda_graph: bool = False,
                 copy_outputs: bool = True):
        trt = _import_tensorrt()
        io = manifest["key_fields"]["io"]
        super().__init__(manifest["network"], [IOSpec.from_json(t) for t in io["inputs"]],
                         [IOSpec.from_json(t) for t in io["outputs"]], manifest["key_fields"].get("meta"),
                         Path(directory))
        device = torch.device(device) if device is not None else torch.device("cuda")
        if device.type != "cuda":
            raise BackendUnavailable(f"the tensorrt backend runs on a CUDA device; the models are on {device} "
                                     "(load them with --device cuda)")
        # an explicit index, so tensors on "cuda:0" compare equal to it (zero-copy binding)
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.copy_outputs = copy_outputs
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine((self.source / PLAN_NAME).read_bytes())
            if self.engine is None:
                raise BackendUnavailable(f"{self.source / PLAN_NAME}: TensorRT cannot load this plan (built by another "
                                         "TensorRT version or for another GPU): re-run "
                                         "`engine export --format tensorrt`")
            self.context = self.engine.create_execution_context()
        # 1. the plan's tensors must be the manifest's
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        declared = {s.name for s in self.inputs + self.outputs}
        if names != declared:
            raise ValueError(f"{self.source / PLAN_NAME}: plan tensors {sorted(names)} differ from the manifest's "
                             f"{sorted(declared)}")
        # 2. fixed buffers at the profile's max size
        self._buffers: Dict[str, torch.Tensor] = {}
        for spec in self.inputs + self.outputs:
            dtype = _TORCH_OF_TRT[self.engine.get_tensor_dtype(spec.name).name]
            numel = 1
            for axis in range(len(spec.shape)):
                numel *= spec.axis_range(axis)[1]
            self._buffers[spec.name] = torch.empty(numel, device=self.device, dtype=dtype)
        self.static = all(not s.dynamic for s in self.inputs)
        self.cuda_graph = cuda_graph and self.static
        if cuda_graph and not self.static:
            log.warning("%s: CUDA graph needs static shapes; running without one", self.network)
        self._graph: Optional[torch.cuda.CUDAGraph] = None

    def _view(self, name: str, shape) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        return self._buffers[name][:n].view(tuple(int(s) for s in shape))

    def _bind(self, feeds: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> Dict[str, torch.Tensor]:
        for spec in self.inputs:
            x = feeds[spec.name]
            buf = self._buffers[spec.name]
            shape = tuple(x.shape)
            self.context.set_input_shape(spec.name, shape)
            if (not self.cuda_graph and x.device == self.device and x.dtype == buf.dtype and x.is_contiguous()):
                self.context.set_tensor_address(spec.name, x.data_ptr())  # zero copy
            else:
                view = self._view(spec.name, shape)
                if view.data_ptr() != x.data_ptr():
                    view.copy_(x.to(self.device, buf.dtype))
                self.context.set_tensor_address(spec.name, view.data_ptr())
        outputs = {}
        for spec in self.outputs:
            view = self._view(spec.name, spec.shape_for(sizes))
            self.context.set_tensor_address(spec.name, view.data_ptr())
            outputs[spec.name] = view
        return outputs

    @torch.no_grad()
    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        sizes = self.check_feeds(feeds)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            outputs = self._bind(feeds, sizes)
            if self.cuda_graph and self._graph is not None:
                self._graph.replay()
            elif self.cuda_graph:
                # first call: a plain launch initialises TensorRT's lazy state, then the launch is captured
                self._launch(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._launch(torch.cuda.current_stream(self.device))
                self._graph = graph
                self._graph.replay()
            else:
                self._launch(stream)
        return {k: v.clone() for k, v in outputs.items()} if self.copy_outputs else outputs

    def _launch(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.network}: TensorRT execution failed ({self.source / PLAN_NAME})")


__all__ = ["INSTALL_HINT", "runtime_environment", "TensorRTBackend"]
