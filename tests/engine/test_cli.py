"""`engine render` / `engine demo` end to end: mp4 length and sync, clear errors, nothing half-written."""
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--hop", "40", "--chunk", "12", "--overlap", "4", "-q"]


def _write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _probe(path: Path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        fps = float(v.average_rate)
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(audio=0))
        rate = a.rate
    return n, fps, samples / rate


@pytest.fixture
def speech_wav(tmp_path, speech):
    # 44.1 kHz stereo: the CLI must resample and mix it down
    from mmgt.audio_io import resample

    clip = resample(speech[: int(16000 * 3.0)], 16000, 44100)
    stereo = np.stack([clip, 0.5 * clip], axis=1).reshape(-1)
    return _write_wav(tmp_path / "speech.wav", stereo, rate=44100, channels=2)


def test_render_writes_mp4_with_synced_audio(tmp_path, speech_wav, capsys):
    out = tmp_path / "out.mp4"
    metrics = tmp_path / "m.json"
    rc = main(["render", "--image", str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(speech_wav),
               "--out", str(out), "--metrics-json", str(metrics), *FAST])
    assert rc == 0
    frames, fps, audio_s = _probe(out)
    assert abs(frames - 75) <= 1 and fps == 25
    assert abs(audio_s - 3.0) <= 0.040
    assert "untrained" in capsys.readouterr().out
    import json

    m = json.loads(metrics.read_text())
    assert m["frames"] == frames and m["real_time_factor"] > 0 and m["first_frame_latency"] > 0
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


@pytest.mark.parametrize("case", ["missing_image", "missing_audio", "text_as_wav", "empty_wav", "bad_image",
                                  "unwritable_out", "out_is_dir"])
def test_bad_input_one_clear_error(tmp_path, speech_wav, capsys, case):
    image, audio, out = ROOT / "engine/assets/portrait.jpg", speech_wav, tmp_path / "o.mp4"
    expect = None
    if case == "missing_image":
        image, expect = tmp_path / "nope.png", "nope.png: image not found"
    elif case == "missing_audio":
        audio, expect = tmp_path / "nope.wav", "nope.wav"
    elif case == "text_as_wav":
        audio = tmp_path / "text.wav"
        audio.write_text("this is not audio\n" * 20)
        expect = "text.wav"
    elif case == "empty_wav":
        audio, expect = _write_wav(tmp_path / "empty.wav", np.zeros(0)), "empty.wav"
    elif case == "bad_image":
        image = tmp_path / "bad.png"
        image.write_bytes(b"\x89PNG not really")
        expect = "bad.png: not a readable image"
    elif case == "unwritable_out":
        out, expect = tmp_path / "no" / "such" / "dir" / "o.mp4", "does not exist"
    elif case == "out_is_dir":
        out, expect = tmp_path, "is a directory"
    rc = main(["render", "--image", str(image), "--audio", str(audio), "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("engine render: error:") and expect in err[0], err
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*.mp4*"))


def test_ctrl_c_leaves_no_partial_file(tmp_path, speech):
    audio = _write_wav(tmp_path / "long.wav", np.tile(speech, 3))  # 36 s: still rendering when interrupted
    out = tmp_path / "long.mp4"
    log = open(tmp_path.parent / f"{tmp_path.name}-render.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "render", "--image",
                             str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(audio), "--out", str(out)],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # wait until the mp4 is being written
        if any(p.name.startswith(".long.mp4") for p in tmp_path.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "render ended before it could be interrupted"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    log.seek(0)
    text = log.read()
    assert proc.returncode == 130, text
    assert "interrupted" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.wav"]


def test_help_teaches_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["render", "--help"])
    text = capsys.readouterr().out
    for flag in ("--image", "--audio", "--out", "--weights", "--preset", "--steps", "--guidance", "--seed",
                 "--window", "--hop", "--metrics-json", "--pose", "--backend", "--artifacts"):
        assert flag in text, flag


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_onnxruntime_backend_render_matches_torch(tmp_path, speech_wav):
    """engine export, then engine render --backend onnxruntime: every network the run called (Stage I and the speech
    encoders included) ran on onnxruntime, says the metrics JSON, and the video matches the torch backend's
    (>= 35 dB)."""
    import json

    from mmgt.contracts import NETWORKS

    art = tmp_path / "artifacts"
    assert main(["export", "--preset", "tiny", "--out", str(art), "--format", "onnx", "--chunk", "12"]) == 0
    common = ["--image", str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(speech_wav), *FAST]
    assert main(["render", *common, "--out", str(tmp_path / "torch.mp4"), "--metrics-json",
                 str(tmp_path / "torch.json")]) == 0
    assert main(["render", *common, "--out", str(tmp_path / "ort.mp4"), "--backend", "onnxruntime",
                 "--artifacts", str(art), "--metrics-json", str(tmp_path / "ort.json")]) == 0
    ort = json.loads((tmp_path / "ort.json").read_text())["backends"]
    assert ort == {name: "onnxruntime" for name in NETWORKS}, ort
    assert json.loads((tmp_path / "torch.json").read_text())["backends"] == {name: "torch" for name in NETWORKS}
    a, b = _frames(tmp_path / "torch.mp4").astype(np.float64), _frames(tmp_path / "ort.mp4").astype(np.float64)
    assert a.shape == b.shape and len(a) == 75
    mse = np.mean((a - b) ** 2)
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    assert psnr >= 35.0, psnr


def test_tiny_decoder_flag(tmp_path, speech_wav, caplog):
    """--tiny-decoder DIR decodes with a local AutoencoderTiny: same frame count, other pixels; a bad DIR is one
    clear error."""
    from mmgt.config import TINY
    from mmgt.vae import build_tiny_decoder

    taesd = tmp_path / "taesd"
    build_tiny_decoder(TINY.vae, channels=16, seed=1).save_pretrained(str(taesd))
    common = ["--image", str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(speech_wav), *FAST]
    assert main(["render", *common, "--out", str(tmp_path / "vae.mp4")]) == 0
    assert main(["render", *common, "--out", str(tmp_path / "taesd.mp4"), "--tiny-decoder", str(taesd)]) == 0
    a, b = _frames(tmp_path / "vae.mp4"), _frames(tmp_path / "taesd.mp4")
    assert a.shape == b.shape and len(a) == 75
    assert np.abs(a.astype(int) - b).mean() > 1
    rc = main(["render", *common, "--out", str(tmp_path / "x.mp4"), "--tiny-decoder", str(tmp_path / "nope")])
    assert rc != 0 and not (tmp_path / "x.mp4").exists()


def test_speed_flags_are_refused_where_they_cannot_work(tmp_path, speech_wav, capsys):
    """--cuda-graphs on a CPU, and --compile / --cuda-graphs with an exported backend: one clear line, no file."""
    common = ["--image", str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(speech_wav), "--device", "cpu",
              *FAST]
    rc = main(["render", *common, "--out", str(tmp_path / "g.mp4"), "--cuda-graphs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--cuda-graphs: CUDA graphs need a CUDA device" in err[0], err
    rc = main(["render", *common, "--out", str(tmp_path / "o.mp4"), "--compile", "--backend", "onnxruntime",
               "--artifacts", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "options of the torch backend" in err[0], err
    assert not list(tmp_path.glob("*.mp4"))
    with pytest.raises(SystemExit):
        main(["render", "--help"])
    assert "--cuda-graphs" in capsys.readouterr().out
