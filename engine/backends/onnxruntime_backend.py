"""The onnxruntime backend: one ``model.onnx`` artifact, CPU or CUDA execution provider.

On the CPU provider tensors cross as numpy arrays. On the CUDA provider inputs and outputs stay on the GPU: torch
tensors are bound to the session by pointer (IO binding), outputs are allocated by torch from the shapes the
manifest gives (dynamic axes take their input's size).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from engine.backends.base import Backend, BackendUnavailable, IOSpec
from engine.extras import install_hint
from export.manifest import ONNX_NAME

log = logging.getLogger(__name__)

# the backend's one line when onnxruntime is absent (also said before a model is loaded: engine.models)
ORT_MISSING = (f"--backend onnxruntime needs the ort extra (onnxruntime not installed): {install_hint('ort')}, "
               f"or {install_hint('ort-gpu')} for the CUDA provider")
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def _providers(provider: Optional[str], device: torch.device):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable(ORT_MISSING) from None
    provider = provider or ("cuda" if device.type == "cuda" else "cpu")
    if provider == "cpu":
        return ort, "cpu", ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(f"onnxruntime has no CUDAExecutionProvider here: {install_hint('ort-gpu')} "
                                     "(instead of the ort extra), or use --device cpu")
        return ort, "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown onnxruntime provider {provider!r}; use cpu or cuda")


class OnnxRuntimeBackend(Backend):
    """``model.onnx`` of a validated artifact directory; outputs come back on ``device``."""

    kind = "onnxruntime"

    def __init__(self, directory: Path, manifest: Mapping[str, Any], device=None, provider: Optional[str] = None,
                 threads: Optional[int] = None):
        io = manifest["key_fields"]["io"]
        super().__init__(manifest["network"], [IOSpec.from_json(t) for t in io["inputs"]],
                         [IOSpec.from_json(t) for t in io["outputs"]], manifest["key_fields"].get("meta"),
                         Path(directory))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        ort, self.provider, providers = _providers(provider, self.device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.source / ONNX_NAME), sess_options=options, providers=providers)
        names = [i.name for i in self.session.get_inputs()]
        if names != [s.name for s in self.inputs]:
            raise ValueError(f"{self.source / ONNX_NAME}: graph inputs {names} differ from its manifest")
        self._output_names = [s.name for s in self.outputs]

    @torch.no_grad()
    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        sizes = self.check_feeds(feeds)
        if self.provider == "cuda":
            return self._run_cuda(feeds, sizes)
        arrays = {s.name: feeds[s.name].detach().to("cpu", s.torch_dtype).contiguous().numpy() for s in self.inputs}
        outs = self.session.run(self._output_names, arrays)
        return {name: torch.from_numpy(np.ascontiguousarray(o)).to(self.device) for name, o in
                zip(self._output_names, outs)}

    def _run_cuda(self, feeds, sizes: Mapping[str, int]) -> Dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        index = self.device.index or 0
        keep = []
        for s in self.inputs:
            t = feeds[s.name].to(self.device, s.torch_dtype).contiguous()
            keep.append(t)
            binding.bind_input(s.name, "cuda", index, NP_DTYPES[s.dtype], list(t.shape), t.data_ptr())
        outputs = {}
        for s in self.outputs:
            y = torch.empty(s.shape_for(sizes), device=self.device, dtype=s.torch_dtype)
            binding.bind_output(s.name, "cuda", index, NP_DTYPES[s.dtype], list(y.shape), y.data_ptr())
            outputs[s.name] = y
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime runs on its own stream
        self.session.run_with_iobinding(binding)
        return outputs


__all__ = ["OnnxRuntimeBackend"]
