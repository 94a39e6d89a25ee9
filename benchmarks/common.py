"""Shared pieces of the benchmarks: what machine ran them, how to time a call, where the JSON goes.

* :func:`machine_info` -- GPU name, driver, CUDA/cuDNN, torch version, CPU, git commit and dirty flag, plus a hash
  of the source that ran (the device machine gets a copy of the working tree without ``.git``, and the hash still
  names the code).
* :func:`time_call` -- warm-up, then one timed call per iteration: CUDA events on a GPU (no host clock inside the
  region), ``perf_counter`` around a synchronised call elsewhere; median, p90, mean, min, in milliseconds.
* :func:`peak_tflops` -- the GPU's dense fp16/bf16 tensor-core peak, looked up by device name, for MFU.
* :func:`write_json` -- ``benchmarks/results/<name>-<device-tag>-<date>.json`` (or an explicit path).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets. Matched against the
# lower-cased device name, first hit wins, so the more specific patterns come first.
PEAK_FP16_TFLOPS: Tuple[Tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.5),
    ("h100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("h800", 989.4),
    ("gh200", 989.4),
    ("h200", 989.4),
    ("a100", 312.0),
    ("l40s", 362.05),
    ("a10g", 125.0),
)


# ----------------------------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------------------------
def _run(cmd: List[str], cwd: Optional[Path] = None) -> Optional[str]:
    """stdout of a command, or None when it is missing or fails (the device machine has no .git, say)."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_hash(root: Path = REPO_ROOT, packages: Iterable[str] = ("mmgt", "benchmarks")) -> str:
    """sha256 over the .py files of ``packages`` (path + content, sorted): names the code that ran."""
    digest = hashlib.sha256()
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def git_info(root: Path = REPO_ROOT) -> Dict[str, Optional[object]]:
    """Commit and dirty flag via ``git``; None where there is no repository or no commit yet."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root) if commit else None
    return {"commit": commit or os.environ.get("MMGT_GIT_COMMIT"),
            "dirty": None if status is None else bool(status)}


def gpu_driver() -> Optional[str]:
    """NVIDIA driver version from nvidia-smi (None without one)."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def machine_info(device: torch.device) -> Dict[str, object]:
    """Everything a reader needs to know about where and with what the numbers were taken."""
    info: Dict[str, object] = {
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
        "driver": None,
        "source_sha256": source_hash(),
        **git_info(),
    }
    for package in ("diffusers", "transformers", "triton"):  # read from metadata: importing them is slow
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 2),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    driver=gpu_driver())
    return info


def device_tag(device: torch.device) -> str:
    """Short file-name tag: "cpu", or the GPU name lower-cased, e.g. "h100-80gb-hbm3"."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def peak_tflops(device: torch.device, override: Optional[float] = None) -> Tuple[Optional[float], str]:
    """(dense fp16 peak TFLOP/s, where it came from); (None, reason) when unknown (CPUs, unlisted GPUs)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {override}")
        return float(override), "command line"
    if device.type != "cuda":
        return None, "no peak known for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for pattern, value in PEAK_FP16_TFLOPS:
        if pattern in name.lower():
            return value, f"datasheet dense fp16 for {name!r} (pattern {pattern!r})"
    return None, f"no datasheet peak for {name!r}; pass --peak-tflops"


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(times_ms: List[float]) -> Dict[str, float]:
    return {"median_ms": statistics.median(times_ms), "p90_ms": percentile(times_ms, 90),
            "mean_ms": statistics.fmean(times_ms), "min_ms": min(times_ms), "iters": len(times_ms)}


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10,
              max_seconds: Optional[float] = None) -> Dict[str, float]:
    """Time ``fn()`` ``iters`` times after ``warmup`` untimed calls; milliseconds per call.

    On CUDA each call sits between two events recorded on the current stream and the host syncs once at the end,
    so launch queueing overlaps as it does in a real loop. ``max_seconds`` stops early (after at least 3 timed
    calls) when a slow configuration would eat the run's budget.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"time_call: need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    start_wall = time.perf_counter()
    if device.type == "cuda":
        events = []
        for i in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if max_seconds is not None and i >= 2:
                end.synchronize()
                if time.perf_counter() - start_wall > max_seconds:
                    break
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if max_seconds is not None and i >= 2 and time.perf_counter() - start_wall > max_seconds:
                break
    return summarise(times)


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")


def result_path(name: str, device: torch.device, results_dir: Path = RESULTS_DIR) -> Path:
    return results_dir / f"{name}-{device_tag(device)}-{today()}.json"


def _clean(value):
    """JSON-safe copy: non-finite floats become None (json.dump would write NaN, which is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(payload: Dict[str, object], path: Path) -> Path:
    """Write ``payload`` as indented JSON (atomically: a killed run leaves the previous complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


__all__ = ["REPO_ROOT", "RESULTS_DIR", "PEAK_FP16_TFLOPS", "machine_info", "source_hash", "git_info", "gpu_driver",
           "device_tag", "peak_tflops", "synchronize", "percentile", "summarise", "time_call", "today",
           "result_path", "write_json"]
