"""The artifact executor's interface: named tensors described by a manifest, and the error for a backend that
cannot run here. engine/backends/__init__.py and the onnxruntime / TensorRT backends import it (it imports neither)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple


class BackendUnavailable(ValueError):
    """The chosen backend cannot run here (library or device missing); one line says what to install or pass."""


# ----------------------------------------------------------------------------------------------------------------
# Named-tensor interface of an artifact (read from its manifest, which recorded the contract)
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
    """An artifact executor: one network behind the named tensors its manifest lists."""

    kind = "base"

    def __init__(self, network: str, inputs: Sequence[IOSpec], outputs: Sequence[IOSpec],
                 meta: Optional[Mapping[str, Any]] = None, source: Optional[Path] = None):
        self.network = network
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.meta = dict(meta or {})
        self.source = source  # artifact directory

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


__all__ = ["BackendUnavailable", "IOSpec", "Backend"]
