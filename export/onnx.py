"""torch -> ONNX for one export contract: export, external data, onnx.checker, parity in onnxruntime.

``export_onnx(contract, models, directory)`` writes ``directory/model.onnx`` (and ``model.onnx.data`` when the weights
are too big for one protobuf) and returns what the manifest records about it. It raises ``ExportError`` when the
graph fails the checker, lacks a contract input, or does not match torch within the contract's tolerance.

The shared ModelSet is left as it was: mmgt's attention layers use their export math only while tracing
(``torch.onnx.is_in_onnx_export()``), and an fp16 export works on a deep copy.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping

import numpy as np
import torch
from torch import nn

from mmgt.contract import Contract

from .manifest import DEFAULT_OPSET, ONNX_DATA_NAME, ONNX_NAME

log = logging.getLogger(__name__)

DYNAMO_MIN_OPSET = 18
# Protobuf caps one message at 2 GiB: weights above this go to model.onnx.data (one file beside model.onnx).
EXTERNAL_DATA_THRESHOLD = 1_900_000_000


class ExportError(RuntimeError):
    """The export of one network failed (exporter, checker or parity); the message names the network."""


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@torch.no_grad()
def torch_outputs(wrapper: nn.Module, spec: Contract, feeds: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Run the torch wrapper on named inputs (in contract order) -> named fp32 outputs."""
    outs = _as_tuple(wrapper(*[feeds[n] for n in spec.input_names]))
    if len(outs) != len(spec.outputs):
        raise ExportError(f"{spec.name}: wrapper returned {len(outs)} outputs, contract lists {len(spec.outputs)}")
    return {t.name: o.float() for t, o in zip(spec.outputs, outs)}


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_loggers(names=("onnx_ir", "onnxscript", "torch.onnx"), level=logging.ERROR) -> Iterator[None]:
    """The dynamo exporter logs every pass (and benign skips: torchvision ops, multi-output folding); keep
    that out of the progress output. Errors still show."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lv in zip(loggers, before):
            lg.setLevel(lv)


def _run_exporter(wrapper: nn.Module, spec: Contract, args: tuple, path: Path, opset: int) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as chatter, _quiet_loggers():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks: shapes are static here
        if spec.exporter == "torchscript":
            torch.onnx.export(wrapper, args, str(path), input_names=list(spec.input_names),
                              output_names=list(spec.output_names), opset_version=opset, dynamo=False,
                              dynamic_axes=spec.dynamic_axes() or None, do_constant_folding=True)
        elif spec.exporter == "dynamo":
            if spec.dynamic_axes():
                raise ExportError(f"{spec.name}: dynamic axes are only wired for the TorchScript exporter")
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=list(spec.input_names),
                                        output_names=list(spec.output_names),
                                        opset_version=max(opset, DYNAMO_MIN_OPSET), optimize=True, verbose=False)
            weight_bytes = sum(t.numel() * t.element_size() for t in wrapper.state_dict().values())
            program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD)
        else:
            raise ExportError(f"{spec.name}: unknown exporter {spec.exporter!r}")
    if chatter.getvalue().strip():
        log.debug("%s exporter output:\n%s", spec.name, chatter.getvalue().strip())


def _tensor_bytes(tensor) -> int:
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(tensor):
        info = {e.key: e.value for e in tensor.external_data}
        return int(info.get("length", 0))
    return len(tensor.raw_data)


def finalize_onnx(src: Path, dst: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> List[str]:
    """Write the exported model as ``dst`` (+ one ``model.onnx.data`` when its weights exceed ``threshold``).

    The exporters write big models with external data of their own layout (the TorchScript exporter: one file per
    tensor). Tensors are streamed one at a time into a single data file, never all held in memory. Returns the
    file names written beside ``dst``.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    tensors = list(model.graph.initializer)
    external = any(uses_external_data(t) for t in tensors)
    total = sum(_tensor_bytes(t) for t in tensors)
    if not external and total <= threshold:
        onnx.save(model, str(dst))
        return [dst.name]
    data_path = dst.parent / ONNX_DATA_NAME
    with open(data_path, "wb") as data:
        for t in tensors:
            if uses_external_data(t):
                info = {e.key: e.value for e in t.external_data}
                offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
                with open(src.parent / info["location"], "rb") as f:
                    f.seek(offset)
                    raw = f.read(length) if length else f.read()
            elif t.HasField("raw_data") and len(t.raw_data) >= 1024:
                raw = t.raw_data
            else:
                continue  # small or typed-field tensors stay inline
            pad = (-data.tell()) % 64  # aligned offsets let onnxruntime map the weights directly
            data.write(b"\0" * pad)
            start = data.tell()
            data.write(raw)
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", ONNX_DATA_NAME), ("offset", str(start)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    onnx.save(model, str(dst))
    log.info("%s: %.2f GB of weights in %s", dst, total / 1e9, ONNX_DATA_NAME)
    return [dst.name, ONNX_DATA_NAME]


def graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_graph(spec: Contract, path: Path) -> None:
    """onnx.checker, and the graph's inputs/outputs are exactly the contract's, in order."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{spec.name}: {path} fails onnx.checker: {e}") from None
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(i.name for i in model.graph.input if i.name not in initializers)
    outputs = tuple(o.name for o in model.graph.output)
    if inputs != spec.input_names:
        missing = [n for n in spec.input_names if n not in inputs]
        raise ExportError(f"{spec.name}: {path} has inputs {list(inputs)}, contract {list(spec.input_names)}"
                          + (f" (dropped as unused: {missing})" if missing else ""))
    if outputs != spec.output_names:
        raise ExportError(f"{spec.name}: {path} has outputs {list(outputs)}, contract {list(spec.output_names)}")


def export_onnx(spec: Contract, models: Any, directory: Path, precision: str = "fp32",
                opset: int = DEFAULT_OPSET, parity: bool = True, provider: str = "cpu",
                external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Dict[str, Any]:
    """Export one network into ``directory``; returns {files, opset, exporter, seconds, parity}."""
    directory = Path(directory)
    start = time.perf_counter()
    precision = spec.precision(precision)
    reference = spec.module(models).eval()
    wrapper = copy.deepcopy(reference).half() if precision == "fp16" else reference
    feeds = spec.sample_inputs(precision)
    args = tuple(feeds[n] for n in spec.input_names)
    raw_dir = directory / "raw"
    raw_dir.mkdir(parents=True)
    try:
        # 1. trace and write (the exporter's own external-data layout, if any, stays in raw/)
        with torch.no_grad():  # mmgt's attention layers spell their math out while torch.onnx.export traces
            try:
                _run_exporter(wrapper, spec, args, raw_dir / ONNX_NAME, opset)
            except ExportError:
                raise
            except Exception as e:  # exporter failures are long; keep the first line and the network name
                text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # the dynamo exporter colours its errors
                first = text.splitlines()[0] if text else type(e).__name__
                raise ExportError(f"{spec.name}: torch.onnx.export ({spec.exporter}) failed: {first}") from e
        # 2. one model file (+ one data file), checked
        files = finalize_onnx(raw_dir / ONNX_NAME, directory / ONNX_NAME, external_threshold)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    path = directory / ONNX_NAME
    check_graph(spec, path)
    export_seconds = time.perf_counter() - start
    # 3. parity against the fp32 torch network
    result = None
    if parity:
        result = check_parity(spec, path, reference, precision, provider)
        if not result["passed"]:
            raise ExportError(f"{spec.name}: onnxruntime differs from torch by {result['max_abs_diff']:.3g} "
                              f"(output {result['worst_output']}), tolerance {result['tolerance']:.1g}")
    return {"files": files, "opset": graph_opset(path), "exporter": spec.exporter, "precision": precision,
            "export_seconds": round(export_seconds, 3), "seconds": round(time.perf_counter() - start, 3),
            "parity": result}


# ----------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------
def ort_providers(provider: str = "cpu") -> List[str]:
    """onnxruntime providers for "cpu" or "cuda" (an error when CUDA is asked for and absent)."""
    import onnxruntime as ort

    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown onnxruntime provider {provider!r}; use cpu or cuda")


def ort_session(path: Path, provider: str = "cpu"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs log a warning per fallback node otherwise
    return ort.InferenceSession(str(path), sess_options=options, providers=ort_providers(provider))


@torch.no_grad()
def check_parity(spec: Contract, path: Path, reference: nn.Module, precision: str = "fp32",
                 provider: str = "cpu", seed: int = 1) -> Dict[str, Any]:
    """Max abs diff between onnxruntime and the fp32 torch ``reference`` at each profile point of the contract."""
    session = ort_session(path, provider)
    tol = spec.tol(precision)
    per_output: Dict[str, float] = {}
    for point in spec.profile_points():
        feeds = spec.sample_inputs(precision, seed=seed, sizes=point)
        # the reference sees exactly the values the artifact sees (fp16-rounded for an fp16 artifact), in fp32
        expected = torch_outputs(reference, spec, {k: v.float() if v.is_floating_point() else v
                                                   for k, v in feeds.items()})
        got = session.run(list(spec.output_names), {k: v.numpy() for k, v in feeds.items()})
        for name, value in zip(spec.output_names, got):
            value = np.asarray(value, dtype=np.float32)
            want = expected[name].numpy()
            if value.shape != want.shape:
                raise ExportError(f"{spec.name}: onnxruntime output {name} has shape {value.shape}, torch "
                                  f"{want.shape}")
            diff = float(np.max(np.abs(value - want))) if value.size else 0.0
            if not np.isfinite(diff):
                diff = float("inf")
            per_output[name] = max(per_output.get(name, 0.0), diff)
    worst = max(per_output, key=per_output.get)
    return {"max_abs_diff": per_output[worst], "worst_output": worst, "tolerance": tol,
            "passed": per_output[worst] <= tol, "provider": provider, "points": len(spec.profile_points()),
            "per_output": per_output}


__all__ = ["DEFAULT_OPSET", "DYNAMO_MIN_OPSET", "EXTERNAL_DATA_THRESHOLD", "ExportError",
           "torch_outputs", "finalize_onnx", "graph_opset", "check_graph", "export_onnx", "ort_providers",
           "ort_session", "check_parity"]
