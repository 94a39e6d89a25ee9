"""Every bad input is one clear error before any model loads; short or truncated audio is a warning; Ctrl-C and
SIGTERM at any moment exit 130 / 143 with one line and leave nothing behind."""
import logging
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from engine.options import CLIError, read_audio
from engine.preflight import check_settings, gpu_present
from engine.settings import OFFLINE

ROOT = Path(__file__).resolve().parents[2]
PORTRAIT = str(ROOT / "engine/assets/portrait.jpg")
ERROR_SECONDS = 2.0  # a bad input is reported within this (process start included): before any model loads


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _engine(args, cwd: Path, timeout: float = 60):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out, time.perf_counter() - t


# (case id, argv after the command's inputs, exit code, text the one error line must hold)
RENDER = ["render", "--image", "portrait.jpg", "--audio", "speech.wav", "--out", "new.mp4"]
CASES = [
    ("steps_0", RENDER + ["--steps", "0"], 2, "--steps must be >= 1, got 0"),
    ("smga_steps_0", RENDER + ["--smga-steps", "0"], 2, "--smga-steps must be >= 1, got 0"),
    ("steps_not_int", RENDER + ["--steps", "x"], 2, "argument --steps: invalid int value: 'x'"),
    ("seed_negative", RENDER + ["--seed", "-1"], 2, "--seed must be in [0, 2^63), got -1"),
    ("seed_2_63", RENDER + ["--seed", str(2**63)], 2, "--seed must be in [0, 2^63)"),
    ("seed_huge", RENDER + ["--seed", "99999999999999999999999"], 2, "--seed must be in [0, 2^63)"),
    ("guidance_0", RENDER + ["--guidance", "0"], 2, "--guidance must be a number > 0"),
    ("guidance_nan", RENDER + ["--guidance", "nan"], 2, "--guidance must be a number > 0"),
    ("smga_guidance_neg", RENDER + ["--smga-guidance", "-2"], 2, "--smga-guidance must be a number > 0"),
    ("window_0", RENDER + ["--window", "0"], 2, "--window must be >= 1, got 0"),
    ("hop_0", RENDER + ["--hop", "0"], 2, "--hop must be in [1, --window = 80], got 0"),
    ("hop_past_window", RENDER + ["--hop", "90"], 2, "--hop must be in [1, --window = 80], got 90"),
    ("crossfade_past_seam", RENDER + ["--hop", "78"], 2, "--crossfade must be in [0, --window - --hop = 80 - 78"),
    ("chunk_0", RENDER + ["--chunk", "0"], 2, "--chunk must be in [1, 32]"),
    ("chunk_33", RENDER + ["--chunk", "33"], 2, "--chunk must be in [1, 32]"),
    ("overlap_eq_chunk", RENDER + ["--chunk", "8", "--overlap", "8"], 2, "--overlap must be in [0, --chunk - 1 = 7]"),
    ("overlap_negative", RENDER + ["--overlap", "-1"], 2, "--overlap must be in [0,"),
    ("threads_0", RENDER + ["--threads", "0"], 2, "--threads must be >= 1, got 0"),
    ("segment_seconds_0", RENDER + ["--segment-seconds", "0"], 2, "--segment-seconds must be >= 0.04"),
    ("device_bad_index", RENDER + ["--device", "cuda:x"], 2, "--device cuda:x: not a device"),
    ("out_exists", RENDER[:-1] + ["o.mp4"], 2, "--out o.mp4: already exists; pass --overwrite"),
    ("out_not_mp4", RENDER[:-1] + ["o.avi"], 2, "--out o.avi: the output must be an .mp4 file"),
    ("out_no_extension", RENDER[:-1] + ["o"], 2, "--out o: the output must be an .mp4 file"),
    ("out_dir_missing", RENDER[:-1] + ["no/such/o.mp4"], 2, "does not exist"),
    ("out_is_dir", RENDER[:-1] + ["sub"], 2, "--out sub: is a directory"),
    ("image_missing", ["render", "--image", "nope.png", "--audio", "speech.wav", "--out", "new.mp4"], 2,
     "nope.png: image not found"),
    ("audio_missing", ["render", "--image", "portrait.jpg", "--audio", "nope.wav", "--out", "new.mp4"], 2,
     "nope.wav: no such audio file"),
    ("audio_not_audio", ["render", "--image", "portrait.jpg", "--audio", "text.wav", "--out", "new.mp4"], 2,
     "text.wav: not a readable audio/video file"),
    ("pose_not_pose", RENDER + ["--pose", "text.wav"], 2, "--pose text.wav:"),
    ("demo_out_exists", ["demo", "--out", "demo.mp4"], 2, "--out demo.mp4: already exists; pass --overwrite"),
    ("demo_steps_0", ["demo", "--out", "new.mp4", "--steps", "0"], 2, "--steps must be >= 1"),
    ("batch_hop_0", ["batch", "jobs.jsonl", "--out-dir", "renders", "--hop", "0"], 2, "--hop must be in [1,"),
    ("serve_chunk_40", ["serve", "--chunk", "40"], 2, "--chunk must be in [1, 32]"),
    ("serve_port_0", ["serve", "--port", "0"], 2, "argument --port: port must be in 1-65535"),
    ("export_out_is_file", ["export", "--out", "o.mp4"], 2, "--out o.mp4: is a file"),
]
if not gpu_present()[0]:  # on a GPU machine cuda is a fine device
    CASES.append(("device_cuda_without_gpu", RENDER + ["--device", "cuda"], 2, "--device cuda: this machine has no "
                                                                              "NVIDIA GPU"))


@pytest.fixture
def workdir(tmp_path):
    """A folder with the inputs the cases name; o.mp4 and demo.mp4 exist (to be refused without --overwrite)."""
    (tmp_path / "portrait.jpg").write_bytes(Path(PORTRAIT).read_bytes())
    _wav(tmp_path / "speech.wav", 2.0)
    (tmp_path / "text.wav").write_text("this is not audio\n" * 20)
    (tmp_path / "o.mp4").write_bytes(b"an earlier render")
    (tmp_path / "demo.mp4").write_bytes(b"an earlier demo")
    (tmp_path / "sub").mkdir()
    (tmp_path / "jobs.jsonl").write_text('{"image": "portrait.jpg", "audio": "speech.wav", "output": "a"}\n')
    return tmp_path


@pytest.mark.parametrize("case,argv,code,expect", CASES, ids=[c[0] for c in CASES])
def test_every_bad_input_is_one_line_before_models_load(workdir, case, argv, code, expect):
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    out, seconds = _engine(argv, workdir)
    lines = out.stderr.strip().splitlines()
    print(f"{case}: exit {out.returncode} in {seconds:.2f} s: {lines}")
    assert out.returncode == code, out.stderr
    assert len(lines) == 1 and "error:" in lines[0] and expect in lines[0], lines
    assert "Traceback" not in out.stderr
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before  # nothing written, nothing changed
    assert seconds < ERROR_SECONDS, f"{case}: the error took {seconds:.2f} s"


def test_overwrite_replaces_an_existing_output(workdir):
    out, _ = _engine(RENDER[:-1] + ["o.mp4", "--overwrite", "--hop", "40", "--chunk", "12", "-q"], workdir,
                     timeout=300)
    assert out.returncode == 0, out.stderr
    assert (workdir / "o.mp4").read_bytes()[4:8] == b"ftyp"  # the old bytes were replaced by an mp4


def test_settings_check_names_the_flag():
    assert check_settings(OFFLINE) is OFFLINE
    for change, flag in (({"steps": 0}, "--steps"), ({"seed": 2**63}, "--seed"), ({"overlap": 16}, "--overlap"),
                         ({"smga_guidance": float("inf")}, "--smga-guidance")):
        with pytest.raises(CLIError, match=flag):
            check_settings(OFFLINE.with_(**change))


# ----------------------------------------------------------------------------------------------------------------
# short and truncated audio: a warning with the duration, the audio that decodes is used
# ----------------------------------------------------------------------------------------------------------------
def test_short_audio_is_warned_with_its_duration(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="engine"):
        audio, _ = read_audio(_wav(tmp_path / "clip.wav", 0.1))
    assert len(audio) == 1600
    assert any("clip.wav: only 0.10 s of audio (2 frames" in r.getMessage() for r in caplog.records), caplog.text


def test_truncated_audio_is_warned_with_both_durations(tmp_path, caplog, write_media):
    full = _wav(tmp_path / "full.wav", 5.0)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:44 + 2 * 16000 * 2])  # the header (5 s) and 2 s of samples
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, (1, 5 * 16000)).astype(np.float32)  # (1, n): no compression
    flac = write_media(tmp_path / "full.flac", noise, 16000, "flac", "flac")
    cut_flac = tmp_path / "cut.flac"
    cut_flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 3])
    with caplog.at_level(logging.WARNING):
        audio, source = read_audio(cut)
        flac_audio, flac_source = read_audio(cut_flac)
        read_audio(full)
    assert len(audio) == 2 * 16000 and source.declared_seconds == 5.0
    messages = [r.getMessage() for r in caplog.records]
    assert any("cut.wav: truncated? it decodes to 2.00 s but its header says 5.00 s" in m for m in messages), messages
    assert flac_source.declared_seconds == 5.0 and 0 < len(flac_audio) < 5 * 16000  # what decoded is kept
    assert any("cut.flac: truncated?" in m for m in messages), messages
    assert not any("full.wav" in m for m in messages), messages


# ----------------------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM at any moment
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,delay", [(signal.SIGINT, 0.3), (signal.SIGTERM, 0.3), (signal.SIGINT, 1.0),
                                       (signal.SIGTERM, 2.0), (signal.SIGINT, 3.0), (signal.SIGTERM, 4.0)])
def test_interrupt_at_any_moment_is_one_line_and_leaves_nothing(tmp_path, speech, sig, delay):
    """Start-up, imports, model loading, avatar preparation, rendering: 130 for Ctrl-C, 143 for SIGTERM, one line,
    no file beside the inputs. (A signal in the first few tens of milliseconds, before the interpreter runs any of
    the engine's code, gets the operating system's default action: nothing has been written then either.)"""
    import soundfile

    soundfile.write(tmp_path / "long.wav", np.tile(speech, 5), 16000)  # 60 s: still rendering when interrupted
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "engine", "render", "--image", PORTRAIT, "--audio", "long.wav",
                             "--out", "o.mp4", "-q"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]
    assert proc.returncode == 128 + sig, err
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.wav"]
