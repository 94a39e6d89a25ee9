"""`engine batch`: manifests, per-job reports, resuming, failures, interruption, and the Ray fan-out.

Renders use the tiny preset on the CPU with 1 Stage II step and 2 Stage I steps, on 0.6 s clips (15 frames).
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

from engine.batch import cli as batch_cli
from engine.batch import job as batch_job
from engine.batch.fingerprint import model_identity
from engine.batch.manifest import ManifestError, read_manifest
from engine.options import CLIError
from engine.settings import OFFLINE

ROOT = Path(__file__).resolve().parents[2]
# --threads 1 everywhere: CPU sums depend on the thread count, and a Ray task with 1 CPU runs 1 thread
FLAGS = ["-q", "--steps", "1", "--smga-steps", "2", "--threads", "1"]
SR = 16000


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def write_wav(path: Path, seconds: float, f0: float) -> None:
    """A tone with a slow tremolo, 16-bit mono wav via PyAV."""
    t = np.arange(int(SR * seconds)) / SR
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))  # (N,)
    with av.open(str(path), "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=SR)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = SR
        for p in [*s.encode(frame), *s.encode(None)]:
            c.mux(p)


def write_image(path: Path) -> None:
    Image.fromarray((np.random.RandomState(0).rand(80, 64, 3) * 255).astype(np.uint8)).save(path)


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # (F, H, W, 3)


def run_batch(argv):
    """engine.batch.cli.main in this process: (exit code, stdout, seconds)."""
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = batch_cli.main([str(a) for a in argv])
    return rc, out.getvalue(), time.perf_counter() - t


def report(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / f"{name}.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def calls():
    """Counts model loads and avatar preparations in this process (for the whole module)."""
    from mmgt import pipeline as P

    counts = {"models": 0, "avatars": 0}
    load, prepare = batch_job.load_model_set, P.prepare_avatar

    def counted_load(*a, **k):
        counts["models"] += 1
        return load(*a, **k)

    def counted_prepare(*a, **k):
        counts["avatars"] += 1
        return prepare(*a, **k)

    batch_job._MODELS.clear()
    batch_job._AVATARS.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_job, "load_model_set", counted_load)
        mp.setattr(P, "prepare_avatar", counted_prepare)
        yield counts


@pytest.fixture(scope="module")
def first(tmp_path_factory, calls):
    """3 jobs (one with a missing audio file) rendered once, locally, with Ray made unimportable."""
    root = tmp_path_factory.mktemp("batch")
    inputs = root / "inputs"
    inputs.mkdir()
    write_image(inputs / "face.png")
    write_wav(inputs / "a.wav", 0.6, 220.0)
    write_wav(inputs / "b.wav", 0.6, 330.0)
    manifest = inputs / "jobs.jsonl"
    manifest.write_text(
        '{"image": "face.png", "audio": "a.wav", "output": "one"}\n'
        "\n# comments and blank lines are skipped\n"
        '{"image": "face.png", "audio": "b.wav", "output": "two.mp4", "seed": 3}\n'
        '{"image": "face.png", "audio": "missing.wav", "output": "three"}\n')
    out_dir = root / "out"
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "ray", None)  # any `import ray` now raises ImportError and fails the run
            rc, stdout, seconds = run_batch([manifest, "--out-dir", out_dir, *FLAGS])
    finally:
        torch.set_num_threads(threads)
    frames = {n: decode(out_dir / f"{n}.mp4") for n in ("one", "two") if (out_dir / f"{n}.mp4").exists()}
    return SimpleNamespace(root=root, inputs=inputs, manifest=manifest, out=out_dir, rc=rc, stdout=stdout,
                           seconds=seconds, frames=frames, calls=dict(calls))


# ----------------------------------------------------------------------------------------------------------------
# acceptance 1: two videos with reports, one error report, non-zero exit, summary
# ----------------------------------------------------------------------------------------------------------------
def test_first_run_renders_the_good_jobs_and_reports_the_missing_audio(first):
    assert first.rc == 1  # one job failed
    for name in ("one", "two"):
        mp4, rep = first.out / f"{name}.mp4", report(first.out, name)
        assert rep["status"] == "ok" and rep["error"] is None
        assert first.frames[name].shape == (15, 64, 64, 3)
        assert rep["frames"] == 15 and rep["duration_seconds"] == pytest.approx(0.6)
        assert rep["audio_seconds"] == pytest.approx(0.6, abs=1e-3)
        assert 0 < rep["first_frame_latency"] <= rep["wall_seconds"]
        assert rep["real_time_factor"] == pytest.approx(rep["metrics"]["media_seconds"]
                                                        / rep["metrics"]["wall_seconds"])
        assert rep["output_bytes"] == mp4.stat().st_size
        assert rep["settings"]["steps"] == 1 and rep["settings"]["smga_steps"] == 2
        assert rep["model"]["preset"] == "tiny"
        assert rep["inputs"]["image"]["sha256"] == sha256(first.inputs / "face.png")
        assert rep["worker"]["pid"] == os.getpid()  # local: rendered in this process
    assert report(first.out, "two")["settings"]["seed"] == 3  # per-job override
    assert report(first.out, "one")["settings"]["seed"] == 0
    assert report(first.out, "two")["inputs"]["audio"]["sha256"] == sha256(first.inputs / "b.wav")
    assert not np.array_equal(first.frames["one"], first.frames["two"])
    # the failed job: a report naming the missing file, no video
    bad = report(first.out, "three")
    assert bad["status"] == "error" and bad["manifest_line"] == 5
    assert str(first.inputs / "missing.wav") in bad["error"] and "not found" in bad["error"]
    assert not (first.out / "three.mp4").exists()
    assert not list(first.out.glob(".*")), "no temp files left"
    # the summary table
    rows = {line.split()[0]: line.split() for line in first.stdout.splitlines() if line.split()}
    assert rows["one"][1] == "ok" and rows["one"][2] == "15"
    assert rows["two"][1] == "ok"
    assert rows["three"][1] == "error" and "missing.wav" in rows["three"][-1]
    assert "3 jobs: 2 rendered, 0 skipped, 1 failed" in first.stdout
    # the two jobs shared one model set and, having the same image, one set of reference features
    assert first.calls == {"models": 1, "avatars": 1}


def test_importing_the_batch_command_imports_no_ray():
    code = "import sys, engine.batch.cli, engine.batch.run, engine.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------------------------
# acceptance 2: resuming
# ----------------------------------------------------------------------------------------------------------------
def test_rerun_skips_complete_jobs_quickly(first):
    before = {n: (first.out / f"{n}.mp4").stat().st_mtime_ns for n in ("one", "two")}
    rc, stdout, seconds = run_batch([first.manifest, "--out-dir", first.out, *FLAGS])
    assert rc == 1  # the missing audio still fails
    for name in ("one", "two"):
        rep = report(first.out, name)
        assert rep["status"] == "skipped" and rep["frames"] == 15 and "skipped_at" in rep
        assert (first.out / f"{name}.mp4").stat().st_mtime_ns == before[name]
    assert report(first.out, "three")["status"] == "error"
    assert "3 jobs: 0 rendered, 2 skipped, 1 failed" in stdout
    assert seconds < 0.1 * first.seconds, (seconds, first.seconds)


def test_deleting_one_output_rerenders_only_that_job(first, calls):
    before = dict(calls)
    two_mtime = (first.out / "two.mp4").stat().st_mtime_ns
    (first.out / "one.mp4").unlink()
    rc, stdout, _ = run_batch([first.manifest, "--out-dir", first.out, *FLAGS])
    assert rc == 1
    assert report(first.out, "one")["status"] == "ok"
    assert report(first.out, "two")["status"] == "skipped"
    assert (first.out / "two.mp4").stat().st_mtime_ns == two_mtime
    np.testing.assert_array_equal(decode(first.out / "one.mp4"), first.frames["one"])  # same seed, same frames
    assert "3 jobs: 1 rendered, 1 skipped, 1 failed" in stdout
    assert calls == before  # models and reference features still cached in this process


# ----------------------------------------------------------------------------------------------------------------
# acceptance 3: Ray
# ----------------------------------------------------------------------------------------------------------------
def test_ray_auto_renders_the_same_frames_as_the_local_run(first):
    pytest.importorskip("ray")
    import ray

    ray_dir = first.root / "ray"
    ray_dir.mkdir()
    manifest = ray_dir / "jobs.csv"  # CSV this time, relative paths against its own folder
    manifest.write_text("image,audio,output,seed\n../inputs/face.png,../inputs/a.wav,one,\n"
                        "../inputs/face.png,../inputs/b.wav,two,3\n")
    rc, stdout, _ = run_batch([manifest, "--out-dir", ray_dir / "out", "--ray", "auto", "--ray-num-cpus", "2",
                               "--cpus-per-job", "1", *FLAGS])
    assert rc == 0, stdout
    assert not ray.is_initialized()  # the instance the batch started was shut down
    for name in ("one", "two"):
        rep = report(ray_dir / "out", name)
        assert rep["status"] == "ok" and rep["frames"] == 15
        assert rep["worker"]["pid"] != os.getpid()  # rendered in a Ray worker process
        assert rep["fingerprint"] == report(first.out, name)["fingerprint"]  # same inputs, settings, model
        np.testing.assert_array_equal(decode(ray_dir / "out" / f"{name}.mp4"), first.frames[name])
    assert "2 jobs: 2 rendered, 0 skipped, 0 failed" in stdout


def test_changed_input_rerenders_only_that_job(first):
    wav = first.inputs / "b.wav"
    original = wav.read_bytes()
    try:
        write_wav(wav, 0.6, 440.0)  # same path, new content
        rc, stdout, _ = run_batch([first.manifest, "--out-dir", first.out, *FLAGS])
        assert rc == 1
        rep = report(first.out, "two")
        assert rep["status"] == "ok" and rep["inputs"]["audio"]["sha256"] == sha256(wav)
        assert report(first.out, "one")["status"] == "skipped"
        assert not np.array_equal(decode(first.out / "two.mp4"), first.frames["two"])
    finally:
        wav.write_bytes(original)


def test_pose_driven_job_with_an_initial_pose(first, calls):
    from mmgt.init_pose import template_pose_512

    kps = template_pose_512().astype(np.float32)  # (134, 3)
    d = first.root / "posed"
    d.mkdir()
    np.save(d / "pose.npy", np.repeat(kps[None], 15, axis=0))  # (15, 134, 3)
    np.save(d / "init.npy", kps)
    manifest = d / "jobs.jsonl"
    manifest.write_text(json.dumps({"image": str(first.inputs / "face.png"), "audio": str(first.inputs / "a.wav"),
                                    "output": "posed", "pose": "pose.npy", "init_pose": "init.npy"}) + "\n")
    avatars = calls["avatars"]
    rc, _, _ = run_batch([manifest, "--out-dir", d / "out", *FLAGS])
    assert rc == 0
    rep = report(d / "out", "posed")
    assert rep["status"] == "ok" and rep["frames"] == 15 and rep["pose_method"] == "pose_file"
    assert rep["inputs"]["pose"]["sha256"] == sha256(d / "pose.npy")
    assert rep["inputs"]["init_pose"]["sha256"] == sha256(d / "init.npy")
    assert calls["avatars"] == avatars + 1  # another initial pose: new reference features for the same image
    assert not np.array_equal(decode(d / "out" / "posed.mp4"), first.frames["one"])  # poses given, not SMGA's


# ----------------------------------------------------------------------------------------------------------------
# acceptance 4: killed mid-job
# ----------------------------------------------------------------------------------------------------------------
def test_sigterm_mid_job_leaves_no_partial_mp4_and_the_next_run_completes(tmp_path):
    write_image(tmp_path / "face.png")
    write_wav(tmp_path / "long.wav", 2.0, 250.0)  # 50 frames: several render chunks
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"image": "face.png", "audio": "long.wav", "output": "long"}\n')
    out_dir = tmp_path / "out"
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "engine.batch", str(manifest), "--out-dir", str(out_dir), *FLAGS],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 150
        while not (out_dir / ".long.mp4.resume").is_dir():  # the sink is open: the job is being rendered
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "the render never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert rc == 143, (tmp_path / "stderr.txt").read_text()
    assert "interrupted" in (tmp_path / "stderr.txt").read_text()
    assert not (out_dir / "long.mp4").exists()
    assert not list(out_dir.glob(".long.mp4.*.part")), "the temp file was removed"
    assert {p.name for p in out_dir.iterdir()} <= {".long.mp4.resume"}  # at most the documented resume folder
    assert not (out_dir / "long.json").exists()  # no report: the job is not done
    # the next run completes it
    rc, stdout, _ = run_batch([manifest, "--out-dir", out_dir, *FLAGS])
    assert rc == 0
    rep = report(out_dir, "long")
    assert rep["status"] == "ok" and rep["frames"] == 50
    assert decode(out_dir / "long.mp4").shape == (50, 64, 64, 3)


# ----------------------------------------------------------------------------------------------------------------
# manifests and the command line
# ----------------------------------------------------------------------------------------------------------------
def test_manifest_csv_and_jsonl(tmp_path):
    sub = tmp_path / "m"
    sub.mkdir()
    csv_path = sub / "jobs.csv"
    csv_path.write_text("image, audio, output, steps, guidance, pose, init_pose\n"
                        "faces/a.png, /abs/a.wav, talk01.mp4, 30, 3.5, poses/p.npz,\n"
                        "\n"
                        "b.png, b.wav, talk02, , , , init.json\n")
    jobs = read_manifest(csv_path)
    assert [j.name for j in jobs] == ["talk01", "talk02"] and [j.line for j in jobs] == [2, 4]
    assert jobs[0].image == sub / "faces/a.png" and jobs[0].audio == Path("/abs/a.wav")
    assert jobs[0].pose == sub / "poses/p.npz" and jobs[0].init_pose is None
    assert jobs[0].overrides == {"steps": 30, "guidance": 3.5}
    assert jobs[1].overrides == {} and jobs[1].init_pose == sub / "init.json"
    base = OFFLINE.with_(steps=4, seed=7)
    assert jobs[0].settings(base).steps == 30 and jobs[0].settings(base).seed == 7
    assert jobs[1].settings(base).steps == 4
    jl = sub / "jobs.txt"  # unknown suffix: sniffed as JSON lines
    jl.write_text('# header comment\n{"image": "a.png", "audio": "a.wav", "output": "x", "seed": 5, '
                  '"smga_guidance": 2, "pose": null}\n')
    (job,) = read_manifest(jl)
    assert job.line == 2 and job.overrides == {"seed": 5, "smga_guidance": 2.0} and job.pose is None


@pytest.mark.parametrize("name, text, expect", [
    ("j.jsonl", '{"image": "a", "audio": "b", "output": "c"}\n{"image": "a", "audio": \n', "line 2: not valid JSON"),
    ("j.jsonl", '{"image": "a", "output": "c"}\n', "line 1: missing 'audio'"),
    ("j.jsonl", '\n{"image": "a", "audio": "b", "output": "c", "stpes": 3}\n', "line 2: unknown field(s) 'stpes'"),
    ("j.jsonl", '{"image": "a", "audio": "b", "output": "c", "steps": "many"}\n', "line 1: 'steps' must be an integer"),
    ("j.jsonl", '{"image": "a", "audio": "b", "output": "c", "steps": 0}\n', "line 1: 'steps' must be >= 1"),
    ("j.jsonl", '{"image": "a", "audio": "b", "output": "c", "guidance": true}\n', "line 1: 'guidance' must be"),
    ("j.jsonl", '[1, 2]\n', "line 1: expected a JSON object"),
    ("j.jsonl", '{"image": "a", "audio": "b", "output": "x/c"}\n', "line 1: 'output' must be a plain file name"),
    ("j.jsonl", '{"image": "a", "audio": "b", "output": "c"}\n{"image": "d", "audio": "e", "output": "c.mp4"}\n',
     "line 2: output 'c' is already written by line 1"),
    ("j.csv", "image,audio,output\na,b,c\nd,e,f,g\n", "line 3: 4 cells but the header has 3 columns"),
    ("j.csv", "image,audio,output,speed\na,b,c,1\n", "line 1: unknown column(s) 'speed'"),
    ("j.csv", "image,audio,output,guidance\na,b,c,nan\n", "line 2: 'guidance' must be a finite number"),
    ("j.csv", "", "no jobs"),
])
def test_manifest_errors_name_the_line(tmp_path, name, text, expect):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert str(path) in str(e.value) and expect in str(e.value)


def test_bad_manifest_is_exit_code_2_with_the_line(tmp_path, capsys):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"image": "a", "audio": "b", "output": "c"}\n{"image": "a"\n')
    assert batch_cli.main([str(path), "--out-dir", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 2: not valid JSON" in err
    assert not (tmp_path / "out" / "c.json").exists()  # nothing runs on a bad manifest
    assert batch_cli.main([str(tmp_path / "nope.csv"), "--out-dir", str(tmp_path / "out"), "-q"]) == 2
    assert "nope.csv: manifest not found" in capsys.readouterr().err


def test_add_batch_parser_registers_the_command():
    ap = argparse.ArgumentParser(prog="engine")
    batch_cli.add_batch_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["batch", "jobs.csv", "--out-dir", "d", "--ray", "auto", "--gpus-per-job", "1",
                          "--steps", "3", "--preset", "tiny"])
    assert args.func is batch_cli.cmd_batch and args.manifest == Path("jobs.csv") and args.out_dir == Path("d")
    assert args.ray == "auto" and args.gpus_per_job == 1.0 and args.steps == 3 and args.preset == "tiny"
    assert model_identity(args)["preset"] == "tiny"


def test_speed_flags_apply_once_per_cfg_layout(tiny_models, tiny_avatar, monkeypatch):
    """--compile / --cuda-graphs: one accelerated model set (and one warm-up) per CFG layout the jobs use; a CPU
    model set with --cuda-graphs is one clear error."""
    import dataclasses

    import engine.backends as backends
    from engine.runner import Runner

    made, warmed = [], []
    monkeypatch.setattr(backends, "accelerate", lambda m, **kw: made.append(m.shapes.unet_batch) or dataclasses.replace(m))
    monkeypatch.setattr(Runner, "warm_up", lambda self: warmed.append(self.settings.guidance) or 1.5)
    monkeypatch.setattr(batch_job, "_ACCELERATED", {})
    plain = argparse.Namespace(compile=False, cuda_graphs=False)
    assert batch_job._accelerated(tiny_models, plain, OFFLINE, tiny_avatar) == (tiny_models, 0.0)
    fast = argparse.Namespace(compile=True, cuda_graphs=False)
    a, wa = batch_job._accelerated(tiny_models, fast, OFFLINE.with_(guidance=1.0), tiny_avatar)
    b, wb = batch_job._accelerated(tiny_models, fast, OFFLINE.with_(guidance=3.5), tiny_avatar)
    c, wc = batch_job._accelerated(tiny_models, fast, OFFLINE.with_(guidance=2.0), tiny_avatar)
    assert made == [1, 2] and warmed == [1.0, 3.5] and (wa, wb, wc) == (1.5, 1.5, 0.0)
    assert c is b and a is not b
    monkeypatch.undo()
    monkeypatch.setattr(batch_job, "_ACCELERATED", {})
    with pytest.raises(CLIError, match="--cuda-graphs: CUDA graphs need a CUDA device"):
        batch_job._accelerated(tiny_models, argparse.Namespace(compile=False, cuda_graphs=True), OFFLINE, tiny_avatar)
