"""The checks a command runs before any model loads: every bad input is one clear error (or a warning) in a second.

* :func:`check_settings` -- the scheduling and sampling values, each named by its flag, against the scheduler's rules;
* :func:`check_device` -- ``--device`` exists on this machine (a CPU build of torch asked for cuda is one line);
* :func:`check_output` -- the output path: its extension, its folder, an existing file only with ``--overwrite``;
* :func:`audio_warnings` -- short or truncated audio (decoded shorter than its header says), with the durations;
* :func:`gpu_present` -- whether this machine has an NVIDIA GPU, decided without importing torch (serve's help and
  its settings use it too).

Standard library only at module level; torch is imported only where no cheaper test can answer (a GPU driver is
present and the question is whether this torch build can use it).
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

from engine.settings import LIVE, LIVE_CPU, RenderSettings

SEED_LIMIT = 2**63  # seeds are in [0, 2^63): torch generators take a signed 64-bit seed
SHORT_AUDIO_SECONDS = 1.0  # audio shorter than this renders a handful of frames: warned
TRUNCATION_TOLERANCE = (0.1, 0.01)  # seconds, fraction of the header's duration: decoded shorter than that is warned
NVIDIA_PROC = Path("/proc/driver/nvidia/version")  # present while the NVIDIA kernel driver is loaded


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# settings and model flags
# ----------------------------------------------------------------------------------------------------------------
def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_settings(s: RenderSettings, max_chunk: int = 32) -> RenderSettings:
    """``s`` when every value is in range; else CLIError naming the flag, its value and the rule. The pose-window
    and render-chunk rules are the scheduler's (engine/scheduler.py); ``max_chunk`` is the motion modules' table."""
    for field in ("steps", "smga_steps"):
        v = getattr(s, field)
        if v is not None and v < 1:
            raise CLIError(f"{_flag(field)} must be >= 1, got {v}")
    for field in ("guidance", "smga_guidance"):
        v = getattr(s, field)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise CLIError(f"{_flag(field)} must be a number > 0 (1 = no guidance pass), got {v}")
    if not 0 <= s.seed < SEED_LIMIT:
        raise CLIError(f"--seed must be in [0, 2^63), got {s.seed}")
    if s.window < 1:
        raise CLIError(f"--window must be >= 1, got {s.window}")
    if not 1 <= s.hop <= s.window:
        raise CLIError(f"--hop must be in [1, --window = {s.window}], got {s.hop}")
    if not 0 <= s.crossfade <= s.window - s.hop:
        raise CLIError(f"--crossfade must be in [0, --window - --hop = {s.window} - {s.hop} = {s.window - s.hop}], "
                       f"got {s.crossfade}")
    if not 1 <= s.chunk <= max_chunk:
        raise CLIError(f"--chunk must be in [1, {max_chunk}] (the motion modules' frames), got {s.chunk}")
    if not 0 <= s.overlap < s.chunk:
        raise CLIError(f"--overlap must be in [0, --chunk - 1 = {s.chunk - 1}], got {s.overlap}")
    if s.schedule == "rolling" and s.steps is not None and s.chunk % s.steps:
        # a rolling call holds --steps groups of chunk / steps frames (engine/rolling_plan.py)
        raise CLIError(f"--schedule rolling: --chunk {s.chunk} must be a multiple of --steps {s.steps}")
    return s


def check_segment_seconds(seconds: float) -> None:
    """--segment-seconds is a positive number of seconds (at least one frame)."""
    if not (math.isfinite(seconds) and seconds >= 0.04):
        raise CLIError(f"--segment-seconds must be >= 0.04 (one frame), got {seconds}")


def check_model_flags(args) -> None:
    """The model flags a command has: --threads >= 1 and a --device this machine has."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise CLIError(f"--threads must be >= 1, got {threads}")
    check_device(getattr(args, "device", None))


# ----------------------------------------------------------------------------------------------------------------
# device
# ----------------------------------------------------------------------------------------------------------------
def gpu_present() -> Tuple[bool, str]:
    """(whether this machine has an NVIDIA GPU, why we think so), without importing torch: the kernel driver's
    /proc entry, else an nvidia-smi on PATH. Whether torch can use it is another question (``check_device``)."""
    if NVIDIA_PROC.exists():
        return True, f"the NVIDIA driver is loaded ({NVIDIA_PROC})"
    smi = shutil.which("nvidia-smi")
    if smi:
        return True, f"nvidia-smi is installed ({smi})"
    return False, f"no NVIDIA driver ({NVIDIA_PROC} is absent) and no nvidia-smi"


def live_settings(device: Optional[str] = None) -> Tuple[str, RenderSettings, str]:
    """(name, settings, why) of the live settings `engine serve` starts from on this machine: LIVE on a GPU, LIVE_CPU
    on a CPU, decided by ``--device`` when given, else by ``gpu_present`` (no torch import: its --help says it)."""
    if device is not None:
        gpu, why = device.startswith("cuda"), f"--device {device}"
    else:
        gpu, why = gpu_present()
    return ("LIVE", LIVE, why) if gpu else ("LIVE_CPU", LIVE_CPU, why)


def check_device(device: Optional[str]) -> None:
    """``--device`` names a device this machine and this torch have; CLIError in one line otherwise. ``None`` (the
    default: cuda when torch sees a GPU, else cpu) and ``cpu`` are always fine and import nothing."""
    if device is None or device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if index and not index.isdigit():
            raise CLIError(f"--device {device}: not a device (examples: cpu, cuda, cuda:1)")
        present, why = gpu_present()
        if not present:
            raise CLIError(f"--device {device}: this machine has no NVIDIA GPU ({why}); use --device cpu")
    import torch  # a driver is there (or another kind of device): only torch knows whether it can use it

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CLIError(f"--device {device}: not a device torch knows ({e}); examples: cpu, cuda, cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise CLIError(f"--device {device}: torch {torch.__version__} ({build}) cannot use this machine's GPU; "
                           "use --device cpu or install a CUDA build of torch")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise CLIError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0 .. cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: MPS is not available on this machine; use --device cpu")


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------
def check_output(path: Path, overwrite: bool = False, flag: str = "--out") -> None:
    """An mp4 can be written at ``path``: the name ends in .mp4, its folder exists and is writable, and no file is
    there unless ``overwrite`` (the old file is replaced only when the new one is complete)."""
    if path.is_dir():
        raise CLIError(f"{flag} {path}: is a directory; give a file name ending in .mp4")
    if path.suffix.lower() != ".mp4":
        raise CLIError(f"{flag} {path}: the output must be an .mp4 file (got {path.suffix or 'no extension'!r})")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise CLIError(f"{flag} {path}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{flag} {path}: output directory {parent} is not writable")
    if path.exists() and not overwrite:
        raise CLIError(f"{flag} {path}: already exists; pass --overwrite to replace it")


# ----------------------------------------------------------------------------------------------------------------
# audio
# ----------------------------------------------------------------------------------------------------------------
def audio_warnings(path: Path, decoded_seconds: float, declared_seconds: Optional[float]) -> List[str]:
    """Warnings for audio that renders but perhaps not as meant: shorter than a second, or shorter than its header
    says (a truncated file: only what decoded is rendered). Each names the file and the durations."""
    out = []
    if declared_seconds is not None:
        slack = max(TRUNCATION_TOLERANCE[0], TRUNCATION_TOLERANCE[1] * declared_seconds)
        if decoded_seconds < declared_seconds - slack:
            out.append(f"{path}: truncated? it decodes to {decoded_seconds:.2f} s but its header says "
                       f"{declared_seconds:.2f} s; rendering the {decoded_seconds:.2f} s that decode")
    if decoded_seconds < SHORT_AUDIO_SECONDS:
        frames = max(1, round(decoded_seconds * 25))
        out.append(f"{path}: only {decoded_seconds:.2f} s of audio ({frames} frames of video)")
    return out


__all__ = ["CLIError", "SEED_LIMIT", "check_settings", "check_segment_seconds", "check_model_flags", "gpu_present",
           "live_settings", "check_device", "check_output", "audio_warnings"]
