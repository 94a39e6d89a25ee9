"""The core install renders; a command whose extra is missing says which one to install, in one line.

Each scenario runs `engine` in a fresh interpreter whose optional modules are blocked (``sys.modules[name] = None``:
an import raises ImportError and ``find_spec`` finds nothing, as on a machine without them).
"""
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from engine.extras import EXTRAS, extra_problem, install_hint

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = tuple(sorted({m for modules in EXTRAS.values() for m in modules}))  # every module an extra brings


def run_blocked(blocked, argv, timeout=300):
    """`engine ARGV` with ``blocked`` modules unimportable: (exit code, stdout, stderr, the blocked modules that got
    imported anyway -- none can be)."""
    code = (
        "import json, sys\n"
        f"for name in {tuple(blocked)!r}:\n"
        "    sys.modules[name] = None\n"
        "from engine.cli import main\n"
        "try:\n"
        f"    rc = main({list(argv)!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print(json.dumps({'rc': rc}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1])["rc"], "\n".join(lines[:-1]), out.stderr


def _error_lines(stderr: str):
    return [line for line in stderr.splitlines() if "error" in line]


def _wav(path: Path, seconds: float = 0.6) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return path


def test_render_needs_no_extra(tmp_path):
    """The tiny preset renders with every extra's modules blocked (onnx, onnxruntime, onnxscript, aiortc, aiohttp,
    aioice, sounddevice, ray, tensorrt)."""
    assert {"onnx", "onnxruntime", "onnxscript", "aiortc", "aiohttp", "sounddevice", "ray"} <= set(OPTIONAL)
    out = tmp_path / "out.mp4"
    rc, stdout, stderr = run_blocked(OPTIONAL, [
        "render", "--image", str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(_wav(tmp_path / "a.wav")),
        "--out", str(out), "--steps", "1", "--smga-steps", "2", "--threads", "1", "-q"])
    assert rc == 0, stderr[-2000:]
    assert out.is_file() and out.stat().st_size > 0 and f"wrote {out}" in stdout


def test_serve_without_serve_extra_names_it(tmp_path):
    rc, _, stderr = run_blocked(("aiortc",), ["serve", "--port", "18731"], timeout=120)
    assert rc == 2
    [line] = _error_lines(stderr)
    assert line == ("engine serve: error: the serve extra is missing (aiortc not installed): "
                    "pip install 'mmgt-engine[serve]'")


def test_mic_without_mic_extra_names_it():
    rc, _, stderr = run_blocked(("sounddevice",), ["serve", "--mic", "--port", "18732"], timeout=120)
    assert rc == 2
    [line] = _error_lines(stderr)
    assert "--mic needs the mic extra (sounddevice not installed)" in line and install_hint("mic") in line


def test_live_without_live_extra_names_it():
    """Before any device is opened or model loaded; the sound device's module only when audio is asked for."""
    rc, _, stderr = run_blocked(("pyvirtualcam",), ["live", "--no-stdin"], timeout=120)
    assert rc == 2
    [line] = _error_lines(stderr)
    assert line == ("engine live: error: the live extra is missing (pyvirtualcam not installed): "
                    "pip install 'mmgt-engine[live]'")
    rc, _, stderr = run_blocked(("sounddevice",), ["live", "--no-camera", "--preview", "--no-stdin"], timeout=120)
    assert rc == 2 and "the live extra is missing (sounddevice not installed)" in stderr


def test_export_without_export_extra_names_it(tmp_path):
    """Caught when the first artifact must be built, before any network is built."""
    rc, _, stderr = run_blocked(("onnx",), ["export", "--preset", "tiny", "--out", str(tmp_path / "A"), "--only",
                                            "audio_proj", "-q"])
    assert rc == 2
    [line] = _error_lines(stderr)
    assert line == ("engine export: error: the export extra is missing (onnx not installed): "
                    "pip install 'mmgt-engine[export]'")
    assert not (tmp_path / "A" / "audio_proj").exists() or not any((tmp_path / "A" / "audio_proj").iterdir())
    rc, _, stderr = run_blocked(("onnxruntime",), ["export", "--preset", "tiny", "--out", str(tmp_path / "A"),
                                                   "--only", "audio_proj", "-q"])
    assert rc == 2 and "the parity check (or pass --skip-parity) needs the ort extra" in stderr


def test_onnxruntime_backend_without_ort_extra_names_it(tmp_path):
    rc, _, stderr = run_blocked(("onnxruntime",), [
        "render", "--image", str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(_wav(tmp_path / "a.wav")),
        "--out", str(tmp_path / "o.mp4"), "--backend", "onnxruntime", "--artifacts", str(tmp_path), "-q"])
    assert rc == 2
    [line] = _error_lines(stderr)
    assert "--backend onnxruntime needs the ort extra (onnxruntime not installed)" in line
    assert install_hint("ort") in line and not (tmp_path / "o.mp4").exists()


def test_batch_ray_without_ray_extra_names_it(tmp_path):
    rc, _, stderr = run_blocked(("ray",), ["batch", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "R"),
                                           "--ray", "auto"], timeout=120)
    assert rc == 2
    [line] = _error_lines(stderr)
    assert line == "engine batch: error: --ray needs the ray extra (ray not installed): pip install 'mmgt-engine[ray]'"


def test_extra_problem_is_none_when_installed():
    assert extra_problem("serve") is None  # the test environment has every extra the tests use
    assert extra_problem("ray", "--ray", modules=("no_such_module_here",)) == (
        "--ray needs the ray extra (no_such_module_here not installed): pip install 'mmgt-engine[ray]'")
