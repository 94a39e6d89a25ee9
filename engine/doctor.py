"""`engine doctor`: what this machine has for the engine, one line per piece, each missing one with how to get it.

Exit status 0 unless the engine cannot run at all (no torch); everything else only limits what it can do (no GPU:
the tiny preset on the CPU; no TensorRT: other backends; no PortAudio: no local microphone; ...).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from engine.extras import install_hint

# how to create a virtual camera on Linux (`engine live` says it too when it finds none)
V4L2LOOPBACK_MODPROBE = "sudo modprobe v4l2loopback devices=1 video_nr=10 card_label=MMGT exclusive_caps=1"


@dataclass(frozen=True)
class Finding:
    """One piece of the machine."""

    name: str  # what was looked at
    ok: bool  # present and usable
    detail: str  # what was found (version, device, providers) or what is wrong
    how: str = ""  # how to get it, when missing
    required: bool = False  # the engine cannot run without it

    def line(self) -> str:
        state = "ok" if self.ok else ("MISSING (required)" if self.required else "missing")
        return f"{self.name:<22} {state}: {self.detail}" + ("" if self.ok or not self.how else f" -> {self.how}")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _python() -> Finding:
    return Finding("python", sys.version_info >= (3, 10), f"{platform.python_version()} ({sys.executable})",
                   "Python >= 3.10", required=True)


def _torch() -> List[Finding]:
    try:
        import torch
    except ImportError as e:
        return [Finding("torch", False, f"not importable ({e})", "pip install torch (see "
                        "https://pytorch.org/get-started/locally/ for a CUDA build)", required=True)]
    out = [Finding("torch", True, f"{torch.__version__}" + (f", built for CUDA {torch.version.cuda}"
                                                           if torch.version.cuda else ", CPU-only build"))]
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
        out.append(Finding("cuda-gpu", True, "; ".join(gpus)))
    else:
        how = ("install a CUDA build of torch" if not torch.version.cuda else "an NVIDIA driver and GPU visible to "
               "this process (nvidia-smi)")
        out.append(Finding("cuda-gpu", False, "no CUDA device: the tiny preset runs on the CPU, the release model "
                                              "needs a GPU", how))
    return out


def _module(name: str, dist: str, how: str, what: str = "") -> Finding:
    """An importable module, with its distribution's version."""
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or OSError for a missing shared library
        return Finding(dist, False, f"not importable ({type(e).__name__}: {str(e)[:120]}){what}", how)
    return Finding(dist, True, _version(dist))


def _onnxruntime() -> Finding:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return Finding("onnxruntime", False, f"not importable ({e}): no --backend onnxruntime",
                       f"{install_hint('ort')} (CPU) or {install_hint('ort-gpu')} (CUDA)")
    return Finding("onnxruntime", True, f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}")


def _pyav() -> Finding:
    try:
        import av
    except ImportError as e:
        return Finding("pyav", False, f"not importable ({e}): no mp4 output", "pip install av")
    missing = []
    for codec in ("libx264", "aac"):
        try:
            av.codec.Codec(codec, "w")
        except Exception:  # av raises UnknownCodecError (its version-dependent type)
            missing.append(codec)
    if missing:
        return Finding("pyav", False, f"{av.__version__} without the {'/'.join(missing)} encoder(s): no H.264 + AAC "
                                      "mp4", "pip install --force-reinstall av (the PyPI wheels bundle both)")
    return Finding("pyav", True, f"{av.__version__}, encoders libx264 + aac")


def _espeak() -> Finding:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return Finding("espeak-ng", False, "not on PATH: no speech synthesis from text", "apt-get install espeak-ng")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return Finding("espeak-ng", False, f"{exe} does not run ({e})", "apt-get install --reinstall espeak-ng")
    return Finding("espeak-ng", True, out.splitlines()[0].split("  Data at")[0] if out else exe)


def _virtual_camera() -> Finding:
    """A v4l2loopback device (what a virtual camera writes to), and pyvirtualcam to write to it."""
    loopback = []
    for dev in sorted(glob.glob("/dev/video*")):
        node = Path("/sys/class/video4linux") / Path(dev).name
        name = (node / "name").read_text().strip() if (node / "name").is_file() else ""
        # v4l2loopback's devices are virtual ones (any card_label), a real camera's hang under its bus
        virtual = "/devices/virtual/" in str(node.resolve()) or any(w in name.lower() for w in ("loopback", "dummy"))
        if Path("/sys/module/v4l2loopback").is_dir() and virtual:
            loopback.append(f"{dev} ({name})")
    pyvcam = importlib.util.find_spec("pyvirtualcam") is not None
    if loopback:
        return Finding("virtual-camera", True, ", ".join(loopback) + ("; pyvirtualcam installed" if pyvcam else
                                                                      "; pyvirtualcam not installed"))
    return Finding("virtual-camera", False, "no v4l2loopback device" + ("" if pyvcam else ", no pyvirtualcam"),
                   f"apt-get install v4l2loopback-dkms; {V4L2LOOPBACK_MODPROBE}; {install_hint('live')}")


def _sounddevice() -> Finding:
    try:
        import sounddevice as sd  # needs the PortAudio shared library at import time
    except ImportError as e:
        return Finding("sounddevice", False, f"not importable ({e}): no local microphone", install_hint("mic"))
    except OSError as e:
        return Finding("sounddevice", False, f"PortAudio library missing ({e}): no local microphone",
                       "apt-get install libportaudio2")
    try:
        inputs = [d for d in sd.query_devices() if d.get("max_input_channels", 0) > 0]
    except Exception as e:  # PortAudio errors
        return Finding("sounddevice", False, f"PortAudio cannot list devices ({e})", "check the audio setup")
    portaudio = sd.get_portaudio_version()[1].split(",")[0]  # "PortAudio V19.6.0-devel, revision ..."
    return Finding("sounddevice", True, f"{sd.__version__}, {portaudio}, {len(inputs)} input device(s)")


PROBES: Tuple[Callable[[], object], ...] = (
    _python, _torch,
    lambda: _module("tensorrt", "tensorrt", f"{install_hint('tensorrt')} (NVIDIA GPU; for --backend tensorrt and "
                    "`engine export --format tensorrt`)", ": no --backend tensorrt"),
    _onnxruntime, _pyav, _espeak, _virtual_camera, _sounddevice,
    lambda: _module("aiortc", "aiortc", f"{install_hint('serve')} (for `engine serve`)", ": no `engine serve`"),
)


def doctor(weights: Optional[Path] = None, preset: str = "mmgt") -> List[Finding]:
    findings: List[Finding] = []
    for probe in PROBES:
        got = probe()
        findings.extend(got if isinstance(got, list) else [got])
    if weights is not None:
        findings.extend(_weights(Path(weights), preset, torch_ok=all(f.ok for f in findings if f.name == "torch")))
    return findings


def _weights(root: Path, preset: str, torch_ok: bool) -> List[Finding]:
    if not torch_ok:
        return [Finding("weights", False, f"{root}: not checked without torch", "install torch first")]
    if not root.is_dir():
        return [Finding("weights", False, f"{root}: not a directory", f"engine weights fetch {root}")]
    from engine.weights_cmd import check, quiet_libraries
    from mmgt.config import get_preset

    quiet_libraries(verbose=0, loaders=True)
    return [Finding(f"weights/{line.name}", line.usable, line.detail if line.state != "absent" else
                    f"absent {line.detail}", f"engine weights fetch {root}")
            for line in check(root, get_preset(preset))]


def cmd_doctor(args) -> int:
    findings = doctor(args.weights, args.preset)
    for f in findings:
        print(f.line())
    fatal = [f.name for f in findings if f.required and not f.ok]
    missing = [f.name for f in findings if not f.ok]
    print("the engine cannot run: " + ", ".join(fatal) if fatal else
          f"the engine runs here; {len(missing)} optional piece(s) missing" + (f": {', '.join(missing)}" if missing
                                                                              else ""))
    return 1 if fatal else 0


def add_doctor_parser(subparsers) -> None:
    from mmgt.config import PRESETS

    d = subparsers.add_parser("doctor", help="what this machine has for the engine (GPU, backends, codecs, devices)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--weights", metavar="DIR", type=Path, default=None,
                   help="also check this weights directory (as `engine weights check DIR`)")
    d.add_argument("--preset", choices=sorted(PRESETS), default="mmgt",
                   help="the network sizes the weights must fit (with --weights; default: mmgt)")
    d.set_defaults(func=cmd_doctor)
