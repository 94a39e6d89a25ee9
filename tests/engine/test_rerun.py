"""Re-runs with nothing to do are instant: measured as whole commands (a fresh interpreter each), an `engine export`
re-run with every artifact cached and an `engine batch` re-run with every job complete take < 10 % of the first
run's wall time, and neither imports torch (so no model is built)."""
import json
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def run_engine(argv):
    """`engine ARGV` in a fresh interpreter: (exit code, stdout, wall seconds, whether torch got imported)."""
    code = (
        "import json, sys\n"
        "from engine.cli import main\n"
        f"rc = main({list(argv)!r})\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    return result["rc"], "\n".join(lines[:-1]), wall, result["torch"]


def _job(tmp_path: Path) -> Path:
    t = np.arange(int(16000 * 0.6)) / 16000  # 15 frames
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    Image.fromarray((np.random.RandomState(0).rand(80, 64, 3) * 255).astype(np.uint8)).save(tmp_path / "i.png")
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"image": "i.png", "audio": "a.wav", "output": "one"}) + "\n")
    return manifest


def test_export_and_batch_reruns_take_under_a_tenth_of_the_first_run(tmp_path):
    # 1. export: two small networks, then the same command again
    export = ["export", "--preset", "tiny", "--out", str(tmp_path / "A"), "--only", "audio_proj", "pose_guider",
              "--chunk", "4", "-q"]
    rc, stdout, first, _ = run_engine(export)
    assert rc == 0 and "2 built" in stdout, stdout
    rc, stdout, again, torch_imported = run_engine(export)
    assert rc == 0 and "2 cached" in stdout and "built" not in stdout, stdout
    assert not torch_imported, "the export re-run imported torch"
    assert again < 0.1 * first, f"export re-run {again:.2f} s vs first run {first:.2f} s"
    # 2. batch: one short job, then the same command again
    batch = ["batch", str(_job(tmp_path)), "--out-dir", str(tmp_path / "R"), "-q", "--steps", "1", "--smga-steps",
             "2", "--threads", "1"]
    rc, stdout, first_batch, _ = run_engine(batch)
    assert rc == 0 and "1 rendered" in stdout, stdout
    rc, stdout, again_batch, torch_imported = run_engine(batch)
    assert rc == 0 and "1 skipped" in stdout, stdout
    assert not torch_imported, "the batch re-run imported torch"
    assert again_batch < 0.1 * first_batch, f"batch re-run {again_batch:.2f} s vs first run {first_batch:.2f} s"
    print(f"export {first:.2f} s -> {again:.2f} s; batch {first_batch:.2f} s -> {again_batch:.2f} s")
