"""CUDA graphs for the fixed-shape calls of a run: capture once per input signature, then replay.

A denoiser step at the release size launches thousands of kernels; eagerly, the Python and launch overhead of each
one shows up between them (and the Stage I thread competes for the interpreter). A CUDA graph records the launches
once and replays them with one call. The engine's calls have fixed shapes (chunks are padded to one size, SMGA windows
are always W frames), so each network needs one graph per run configuration.

``StaticGraph(fn)`` wraps any callable whose arguments are tensors, nested lists/tuples/dicts of tensors, and plain
constants (ints, floats, bools, strings, None):

* the *signature* of a call is its argument structure, every tensor's shape/dtype/device and every constant's value;
  the first call of a signature copies the tensors into static buffers, warms ``fn`` up on a side stream (lazy
  initialisation, cuBLAS workspaces, torch.compile's own compilation) and captures one ``fn`` call into a graph;
* every call copies its tensors into that signature's buffers, replays the graph and returns *copies* of the outputs
  (the next replay overwrites the static outputs). Calls are serialised by a lock, and on the GPU a call waits for the
  previous one (an event), so threads on different CUDA streams may share one graph: the streaming sessions do.

What ``fn`` may do: the same launches for the same signature, no host syncs (``.item()``, ``.cpu()``, printing a
tensor), no CPU tensors as inputs, no new random draws (noise is an input). Constants are part of the signature,
so a changed guidance scale captures a new graph instead of replaying a stale one.

``capture=False`` (and any CPU call) runs ``fn`` on the static buffers without a graph: the same buffer protocol,
testable without a GPU.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

_CONSTANTS = (type(None), bool, int, float, str)


class GraphError(RuntimeError):
    """A call that cannot be graphed as asked (an argument type, a CPU tensor, too many signatures)."""


def _leaf_key(leaf: Any, where: str) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device))
    if isinstance(leaf, _CONSTANTS):
        return ("const", type(leaf).__name__, leaf)
    raise GraphError(f"{where}: cannot graph an argument of type {type(leaf).__name__}; tensors (in lists, tuples "
                     "or dicts) and int/float/bool/str/None constants only")


@dataclass
class _Entry:
    """One captured signature: static input buffers, the graph (None: run eagerly on the buffers), static outputs."""

    inputs: List[Any]  # the flattened arguments: static tensors and constants
    spec: Any  # pytree spec of (args, kwargs)
    graph: Optional["torch.cuda.CUDAGraph"]
    outputs: Any = None


class StaticGraph:
    """``fn`` replayed as one CUDA graph per input signature (see the module doc)."""

    def __init__(self, fn: Callable[..., Any], name: str = "graph", capture: Optional[bool] = None, warmup: int = 2,
                 max_signatures: int = 8):
        """``capture``: None captures when the call's tensors are on a CUDA device; False never (the buffer protocol
        only); True demands CUDA. ``warmup``: eager calls on a side stream before capture (>= 1: torch.compile
        compiles there, not inside the capture). ``max_signatures``: more distinct signatures than this is a bug
        (shapes that should be fixed are not), reported instead of filling the GPU with graphs."""
        self.fn, self.name, self.capture, self.warmup = fn, name, capture, max(1, warmup)
        self.max_signatures = max_signatures
        self._entries: Dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()  # one replay at a time: the static buffers are shared by all callers
        self._pool = None  # one memory pool for all signatures of this call (they never run concurrently)
        self._done = None  # CUDA event after the last call's output copies: the next call, on any stream, waits on it
        self._device: Optional[torch.device] = None  # the CUDA device of the captured graphs

    @property
    def signatures(self) -> int:
        return len(self._entries)

    @torch.no_grad()  # inference only: a graph recorded with autograd would keep every activation alive
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (str(spec), tuple(_leaf_key(x, self.name) for x in leaves))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._new_entry(key, leaves, spec)
            if entry.graph is not None and self._done is not None:
                # the previous call may have come from another thread's stream and still be running on the GPU: its
                # replay must have read the buffers (and its outputs been copied out) before they are overwritten
                torch.cuda.current_stream(self._device).wait_event(self._done)
            # 1. this call's tensors into the signature's buffers (same shapes by construction of the key)
            for static, leaf in zip(entry.inputs, leaves):
                if isinstance(leaf, torch.Tensor) and leaf.data_ptr() != static.data_ptr():
                    static.copy_(leaf)
            # 2. replay (or, without a graph, run eagerly on the buffers)
            if entry.graph is not None:
                entry.graph.replay()
            else:
                args_s, kwargs_s = pytree.tree_unflatten(entry.inputs, entry.spec)
                entry.outputs = self.fn(*args_s, **kwargs_s)
            # 3. copies out: the next replay overwrites the static outputs
            out = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.outputs)
            if entry.graph is not None:
                if self._done is None:
                    self._done = torch.cuda.Event()
                self._done.record(torch.cuda.current_stream(self._device))  # after the copies, on the caller's stream
            return out

    # ------------------------------------------------------------------------------------------------------------
    def _new_entry(self, key: Hashable, leaves: List[Any], spec: Any) -> _Entry:
        if len(self._entries) >= self.max_signatures:
            raise GraphError(f"{self.name}: more than {self.max_signatures} input signatures; the shapes of this "
                             "call are not fixed (the newest: " + ", ".join(str(k) for k in key[1]) + ")")
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        cuda = bool(tensors) and all(t.is_cuda for t in tensors)
        if self.capture and not cuda:
            where = sorted({str(t.device) for t in tensors}) or ["no tensors"]
            raise GraphError(f"{self.name}: CUDA graphs need every input tensor on a CUDA device, got {where}")
        inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        entry = _Entry(inputs=inputs, spec=spec, graph=None)
        if self.capture is not False and cuda:
            start = time.perf_counter()
            self._device = tensors[0].device
            entry.graph, entry.outputs = self._capture(inputs, spec, self._device)
            log.info("%s: captured a CUDA graph for signature %d in %.1f s", self.name, len(self._entries) + 1,
                     time.perf_counter() - start)
        self._entries[key] = entry
        return entry

    def _capture(self, inputs: List[Any], spec: Any, device: torch.device) -> Tuple["torch.cuda.CUDAGraph", Any]:
        args, kwargs = pytree.tree_unflatten(inputs, spec)
        # 1. warm up on a side stream: lazy inits and autotuning must not happen inside the capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        # 2. capture. thread_local: the other stage's thread may keep launching and syncing on its own stream
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self.fn(*args, **kwargs)  # recorded, not run: the caller replays next
        return graph, outputs

    def __repr__(self) -> str:
        return f"StaticGraph({self.name}, {len(self._entries)} signature(s))"


__all__ = ["GraphError", "StaticGraph"]
