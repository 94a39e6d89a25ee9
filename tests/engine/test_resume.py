"""Resumable renders: the runner continues exactly from any chunk boundary; the segmented sink keeps finished
segments and the point after them beside the output, joins them at the end, and a killed render re-run with the same
command continues from its last segment (faster, same frames, nothing left beside the output)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from engine.resume import ResumableMp4Sink, Sidecar
from engine.runner import Runner
from engine.settings import OFFLINE
from engine.source_audio import SourceAudio

ROOT = Path(__file__).resolve().parents[2]
PORTRAIT = str(ROOT / "engine/assets/portrait.jpg")
SMALL = OFFLINE.with_(hop=20, crossfade=4, chunk=12, overlap=4)  # many windows and chunks in a few seconds


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # (T, H, W, 3)


def _soundfile(path: Path, samples: np.ndarray) -> Path:
    import soundfile

    soundfile.write(path, samples, 16000)
    return path


# ----------------------------------------------------------------------------------------------------------------
# the runner: continuing from a ResumePoint gives the frames of a run from the beginning
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pose_driven", [False, True])
def test_runner_continues_exactly_from_any_chunk_boundary(tiny_models, tiny_avatar, speech, collecting_sink,
                                                          pose_driven):
    audio = speech[: 8 * 16000]  # 200 frames: 10 pose windows, 24 chunks
    poses = None
    if pose_driven:
        jitter = np.random.default_rng(0).normal(0, 2, (200, 134, 3)).astype(np.float32)
        poses = tiny_avatar.init_pose[None] + jitter * np.array([1, 1, 0], np.float32)  # (200, 134, 3)
    runner = Runner(tiny_models, tiny_avatar, SMALL, poses=poses)
    full = collecting_sink()
    runner.run(audio, full)
    reference = full.video()
    points = [b.resume for b in full.out]
    assert all(p is not None for p in points) and points[-1].frame == len(reference) == 200
    for k in (0, 4, 9, len(points) - 2, len(points) - 1):  # early, mid-window, late, the last chunk, past the end
        part = collecting_sink()
        runner.run(audio, part, start=points[k])
        got = part.video() if part.out else np.zeros((0, *reference.shape[1:]), np.uint8)
        assert (part.out[0].first_frame if part.out else 200) == points[k].frame
        assert np.array_equal(got, reference[points[k].frame:]), f"resumed at frame {points[k].frame}"


# ----------------------------------------------------------------------------------------------------------------
# the sink: segments, state, join
# ----------------------------------------------------------------------------------------------------------------
class _StopAfter:
    """A progress callback that interrupts the run (as Ctrl-C would) once ``frames`` frames are out."""

    def __init__(self, frames: int):
        self.frames, self.seen = frames, 0

    def __call__(self, n: int) -> None:
        self.seen += n
        if self.seen >= self.frames:
            raise KeyboardInterrupt


def test_interrupted_render_continues_and_joins_byte_identical(tmp_path, tiny_models, tiny_avatar, speech):
    wav = _soundfile(tmp_path / "speech.wav", speech[: 8 * 16000])
    source = SourceAudio.probe(wav)
    audio = speech[: 8 * 16000]
    runner = Runner(tiny_models, tiny_avatar, SMALL)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    full, out = tmp_path / "a" / "o.mp4", tmp_path / "b" / "o.mp4"
    runner.run(audio, ResumableMp4Sink(full, source, Sidecar(full), "key", segment_frames=30))
    assert sorted(p.name for p in full.parent.iterdir()) == ["o.mp4"]  # the sidecar is gone
    # interrupted after ~110 frames: the finished segments and their state stay, the unfinished one goes
    sidecar = Sidecar(out)
    with pytest.raises(KeyboardInterrupt):
        runner.run(audio, ResumableMp4Sink(out, source, sidecar, "key", segment_frames=30),
                   progress=_StopAfter(110))
    assert not out.exists()
    saved = sidecar.load("key")
    assert saved is not None and 60 <= saved.frames <= 110 and saved.point.frame == saved.frames
    assert sorted(p.name for p in sidecar.dir.iterdir()) == sorted([s.file for s in saved.segments] + ["state.npz"])
    (sidecar.dir / ".seg-000099.mp4.x.part").write_bytes(b"half a segment of a killed run")
    # another command's fingerprint does not continue it
    assert sidecar.load("other key") is None
    # the same command continues: same bytes as the uninterrupted render, and nothing is left beside the output
    kept = saved.frames
    sink = ResumableMp4Sink(out, source, sidecar, "key", saved, segment_frames=30)
    report = runner.run(audio, sink, start=saved.point)
    assert report.frames == 200 - kept
    assert out.read_bytes() == full.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.mp4"]
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == 200 and c.streams.audio[0].rate == 16000


def test_a_render_killed_while_joining_only_joins(tmp_path, tiny_models, tiny_avatar, speech, monkeypatch):
    import engine.resume as R

    audio = speech[: 4 * 16000]
    source = SourceAudio.probe(_soundfile(tmp_path / "s.wav", audio))
    out = tmp_path / "o.mp4"
    runner = Runner(tiny_models, tiny_avatar, SMALL)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "join_segments", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(audio, ResumableMp4Sink(out, source, Sidecar(out), "key", segment_frames=40))
    monkeypatch.undo()
    saved = Sidecar(out).load("key")
    assert saved.frames == 100 and not out.exists()
    report = runner.run(audio, ResumableMp4Sink(out, source, Sidecar(out), "key", saved), start=saved.point)
    assert report.frames == 0 and len(_decode(out)) == 100 and not Sidecar(out).exists()


# ----------------------------------------------------------------------------------------------------------------
# the command: SIGKILL at ~60 % of a 60 s render, then the same command
# ----------------------------------------------------------------------------------------------------------------
def _render_cmd(audio: str, out: str, *extra: str):
    return [sys.executable, "-m", "engine", "render", "--image", PORTRAIT, "--audio", audio, "--out", out,
            "--segment-seconds", "2", *extra]


def _run_timed(cmd, cwd: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return out, time.perf_counter() - t


def _saved_frames(sidecar: Path) -> int:
    try:
        with np.load(sidecar / "state.npz") as data:
            return json.loads(str(data["meta"]))["point"]["frame"]
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_60s_render_resumes_faster_with_the_same_frames(tmp_path, speech):
    """Acceptance (issue 14, item 2): an uninterrupted 60 s render, then the same render SIGKILLed at ~60 % and run
    again with the same command: it resumes (the log says from which frame), takes < 60 % of the uninterrupted
    render's time, gives its frames, and leaves nothing beside the output."""
    _soundfile(tmp_path / "talk.wav", np.tile(speech, 5)[: 60 * 16000])
    (tmp_path / "full").mkdir(), (tmp_path / "killed").mkdir()
    full, t_full = _run_timed(_render_cmd("../talk.wav", "talk.mp4", "-q"), tmp_path / "full")
    assert full.returncode == 0, full.stderr
    # the same command, killed once the saved state holds ~60 % of the 1500 frames
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_render_cmd("../talk.wav", "talk.mp4", "-q"), cwd=tmp_path / "killed", env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = tmp_path / "killed" / ".talk.mp4.resume"
    deadline = time.monotonic() + 300
    while _saved_frames(sidecar) < 900 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = _saved_frames(sidecar)
    assert 900 <= kept < 1500, kept
    resumed, t_resumed = _run_timed(_render_cmd("../talk.wav", "talk.mp4"), tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    said = [line for line in resumed.stderr.splitlines() if "resuming" in line]
    print(f"\nuninterrupted 60 s render: {t_full:.1f} s; killed with {kept} of 1500 frames saved; resumed run: "
          f"{t_resumed:.1f} s = {100 * t_resumed / t_full:.0f} % of the uninterrupted time; log: {said[:1]}")
    assert any(f"from frame {kept}" in line for line in said), resumed.stderr
    assert t_resumed < 0.6 * t_full
    a, b = _decode(tmp_path / "full" / "talk.mp4"), _decode(tmp_path / "killed" / "talk.mp4")
    assert a.shape == b.shape == (1500, 64, 64, 3)
    diff = int(np.abs(a.astype(np.int16) - b).max())
    print(f"largest pixel difference from the uninterrupted render: {diff} level(s)")
    assert diff <= 1
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["talk.mp4"]


def test_ctrl_c_says_how_to_resume_and_restart_starts_over(tmp_path, speech):
    _soundfile(tmp_path / "talk.wav", speech[: 8 * 16000])  # 200 frames: interrupted after 2 of 4 segments
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_render_cmd("talk.wav", "talk.mp4", "-q"), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _saved_frames(tmp_path / ".talk.mp4.resume") < 100 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]
    assert proc.returncode == 130 and len(lines) == 1, err
    assert "run the same command again to continue from frame" in lines[0] and "--restart" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [".talk.mp4.resume", "talk.wav"]
    again, _ = _run_timed(_render_cmd("talk.wav", "talk.mp4", "--restart"), tmp_path)
    assert again.returncode == 0 and "resuming" not in again.stderr, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4", "talk.wav"]


def test_killed_batch_job_resumes(tmp_path, speech):
    """engine batch: a job killed mid-render continues from its last segment on the next run (same frames)."""
    _soundfile(tmp_path / "talk.wav", speech)  # 12 s: 300 frames, one 250-frame segment before the end
    (tmp_path / "face.jpg").write_bytes(Path(PORTRAIT).read_bytes())
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"image": "face.jpg", "audio": "talk.wav", "output": "talk"}\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "engine.batch", str(manifest), "--hop", "40", "--chunk", "12", "-q"]
    full, _ = _run_timed(base + ["--out-dir", "full"], tmp_path)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(base + ["--out-dir", "killed"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sidecar = tmp_path / "killed" / ".talk.mp4.resume"
    deadline = time.monotonic() + 300
    while _saved_frames(sidecar) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = _saved_frames(sidecar)
    assert 250 <= kept < 300, kept
    again, _ = _run_timed(base[:-1] + ["--out-dir", "killed"], tmp_path)  # not quiet: the log says it resumed
    assert again.returncode == 0, again.stderr
    assert f"resuming from frame {kept}" in again.stderr
    assert np.array_equal(_decode(tmp_path / "full" / "talk.mp4"), _decode(tmp_path / "killed" / "talk.mp4"))
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["talk.json", "talk.mp4"]
