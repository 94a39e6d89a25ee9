"""The torch backend's speed options around a contract's torch module: torch.compile, CUDA graphs, fixed batches.

A plain torch run needs nothing from here: every network's default executor is its contract's ``TorchCall``
(mmgt/contract.py). ``TorchExecutor`` is the same call with options, and ``FixedFrames`` gives a per-frame network one
static batch size, so a compiled or graphed call has one shape to build however many frames a chunk emits.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Union

import torch

log = logging.getLogger(__name__)


class TorchExecutor:
    """One contract's torch module with named inputs and outputs, optionally compiled and/or CUDA-graphed.

    ``compile``: wrap the call in torch.compile (static shapes; the first call compiles; True or a torch.compile mode
    such as "max-autotune-no-cudagraphs"). ``cuda_graph``: replay the call as a CUDA graph per input signature
    (engine.backends.graphs.StaticGraph; on top of ``compile`` when both are set: the compiled kernels, launched by
    one replay).
    """

    def __init__(self, contract, models, compile: Union[bool, str] = False, cuda_graph: bool = False):
        self.contract = contract
        self.module = contract.module(models)
        self.device = models.device
        mode = compile if isinstance(compile, str) and compile != "default" else None
        self._call = torch.compile(self._positional, dynamic=False, mode=mode) if compile else self._positional
        self.graph = None
        if cuda_graph:
            from engine.backends.base import BackendUnavailable
            from engine.backends.graphs import StaticGraph

            if torch.device(self.device).type != "cuda":
                raise BackendUnavailable(f"{contract.name}: CUDA graphs need the network on a CUDA device, "
                                         f"it is on {self.device}")
            self.graph = StaticGraph(self._call, name=f"{contract.name} (torch)", capture=True)
        self.kind = "torch" + ("+compile" if compile else "") + ("+cuda_graph" if cuda_graph else "")

    def _positional(self, *inputs: torch.Tensor):
        return self.module(*inputs)

    @torch.no_grad()
    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = [feeds[n] for n in self.contract.input_names]
        out = (self.graph or self._call)(*inputs)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(self.contract.output_names, outs))

    def __repr__(self) -> str:
        return f"TorchExecutor({self.contract.name}, {self.kind})"


class FixedFrames:
    """A per-frame executor called with exactly ``frames`` frames on ``axis``: longer inputs are split, the last
    piece padded by repeating its last frame, the outputs cut back and joined. One shape to compile and capture."""

    def __init__(self, executor: Any, frames: int, input_name: str, axis: int = 0):
        self.executor, self.frames, self.input_name, self.axis = executor, int(frames), input_name, axis
        self.contract = getattr(executor, "contract", None)
        self.kind = getattr(executor, "kind", "torch")

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x, axis = feeds[self.input_name], self.axis
        n = x.shape[axis]
        pieces: Dict[str, list] = {}
        for start in range(0, n, self.frames):
            part = x.narrow(axis, start, min(self.frames, n - start))  # (k, ...) on the frame axis
            k = part.shape[axis]
            if k < self.frames:
                pad = part.narrow(axis, k - 1, 1).expand(*[self.frames - k if a == axis else -1
                                                           for a in range(part.dim())])
                part = torch.cat([part, pad], dim=axis)
            for name, y in self.executor({**feeds, self.input_name: part}).items():
                pieces.setdefault(name, []).append(y.narrow(axis, 0, k))
        return {name: torch.cat(ys, dim=axis) for name, ys in pieces.items()}

    def __repr__(self) -> str:
        return f"FixedFrames({self.executor!r}, {self.frames})"


__all__ = ["TorchExecutor", "FixedFrames"]
