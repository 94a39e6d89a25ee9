"""The demo page in a real browser: headless Chromium (Debian package) driven by Playwright, its fake microphone
playing the bundled speech, media over WebRTC inside a network namespace this test creates.

Chromium ignores loopback ICE candidates, so the test makes a namespace with a veth pair (10.213.0.1/24 and
10.213.0.2/24, both ends inside it, so nothing leaves the namespace), brings its ``lo`` up for the page and
signalling (127.0.0.1), and runs the server and the browser in it (browser_scenario.py). Needs root (or
CAP_NET_ADMIN) for ``ip netns``; skipped, saying why, without it or without chromium / playwright.
"""
import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
ADDRESS, PEER = "10.213.0.1", "10.213.0.2"

pytestmark = pytest.mark.browser


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def netns():
    """A private network namespace with lo up and a veth pair (both ends inside); deleted afterwards."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is missing (pip install playwright; never `playwright install`)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is missing")
    name = f"mmgtst{os.getpid()}"
    made = _ip("netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (`ip netns add` not permitted?): {made.stderr.strip()}")
    try:
        for cmd in (["-n", name, "link", "set", "lo", "up"],
                    ["-n", name, "link", "add", "mv0", "type", "veth", "peer", "name", "mv1"],
                    ["-n", name, "addr", "add", f"{ADDRESS}/24", "dev", "mv0"],
                    ["-n", name, "addr", "add", f"{PEER}/24", "dev", "mv1"],
                    ["-n", name, "link", "set", "mv0", "up"],
                    ["-n", name, "link", "set", "mv1", "up"]):
            r = _ip(*cmd)
            assert r.returncode == 0, f"ip {' '.join(cmd)}: {r.stderr}"
        yield name
    finally:
        _ip("netns", "del", name)


def _speech_wav(path: Path, speech: np.ndarray) -> None:
    """16-bit 48 kHz mono WAV (what Chromium's fake audio capture reads)."""
    import librosa

    pcm = librosa.resample(speech.astype(np.float32), orig_sr=16000, target_sr=48000)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype(np.int16).tobytes())


def test_page_in_headless_chromium_decodes_video_and_sends_the_microphone(netns, tmp_path, speech):
    wav, out = tmp_path / "speech.wav", tmp_path / "report.json"
    _speech_wav(wav, speech)
    cmd = ["ip", "netns", "exec", netns, sys.executable, str(HERE / "browser_scenario.py"), "--address", ADDRESS,
           "--wav", str(wav), "--out", str(out), "--chromium", CHROMIUM]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    report = json.loads(out.read_text()) if out.exists() else {}
    assert proc.returncode == 0 and "error" not in report, \
        f"scenario failed ({proc.returncode}): {report}\n{proc.stderr[-4000:]}"
    page, stats = report["page"], report["server_stats"]
    # the page decoded the avatar video (and its stream carries the rendered audio)
    assert page["decoded"] >= 100, page
    assert page["audioTracks"] == 1 and not page["error"], page
    assert page["firstFrameMs"] is not None and page["firstFrameMs"] > 0
    # the server received the fake microphone: speech, not silence, from the browser
    assert stats["input"]["source"] == "browser", stats["input"]
    assert stats["input"]["received_seconds"] > 2.0, stats["input"]
    assert stats["input"]["peak"] > 0.05, stats["input"]
    assert stats["frames_sent"] >= 100
    # Stop on the page freed the session
    assert report["closed"] is not None and report["sessions_after_stop"] == 0, report
    assert not [c for c in report["console"] if c.startswith("pageerror")], report["console"]
