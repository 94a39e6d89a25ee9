"""A long render through the real command, its memory sampled: is memory flat and time linear in length?

    python -m benchmarks.bench_long [--minutes 60] [--interval 1] [--out PATH]

Renders ``--minutes`` of speech (the bundled clip looped, written as a 16 kHz wav) with ``engine render`` (tiny
preset, CPU, the command's defaults: segments of 10 s beside the output, joined with the audio at the end) in a
child process, and every ``--interval`` seconds reads the child's resident memory (``/proc/PID/status`` VmRSS) and
how many frames its resume state has saved (the state file's modification time says when). Writes JSON with the
machine, the command, every sample, the wall time of every minute of audio, and the two verdicts:

* memory: the growth of RSS after the first minute of audio is rendered (the model, the waveform and the first-call
  allocations are in by then), against a limit of +50 MB. RSS swings within seconds (buffers allocated and freed),
  so the verdict compares the highest RSS of each minute of audio with the second minute's (``verdicts``);
* time: seconds per minute of audio (mean, spread, first vs last minutes) and a straight-line fit of the cumulative
  time against minutes rendered (slope, R^2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks.common import REPO_ROOT, machine_info, result_path, write_json

FPS = 25
FRAMES_PER_MINUTE = 60 * FPS
GROWTH_LIMIT_MB = 50.0  # memory after the first minute may grow by at most this much
ASSETS = REPO_ROOT / "engine" / "assets"


def _rss_mb(pid: int) -> Optional[float]:
    """Resident memory of a process in MB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _saved(sidecar: Path) -> Tuple[int, Optional[float]]:
    """(frames the render's resume state holds, when it was saved: the file's mtime) of a running render."""
    path = sidecar / "state.npz"
    try:
        mtime = path.stat().st_mtime
        with np.load(path) as data:
            return int(json.loads(str(data["meta"]))["point"]["frame"]), mtime
    except (OSError, ValueError, KeyError):
        return 0, None


def write_speech(path: Path, minutes: float) -> float:
    """The bundled speech looped to ``minutes`` as a 16 kHz mono 16-bit wav; returns its seconds."""
    import soundfile

    from mmgt.audio_io import load_audio

    speech = load_audio(ASSETS / "speech.flac")  # (n,) 16 kHz
    n = int(round(minutes * 60 * 16000))
    soundfile.write(path, np.resize(speech, n), 16000, subtype="PCM_16")
    return n / 16000


def minute_times(progress: Sequence[Tuple[float, int]], start: float, minutes: int) -> List[float]:
    """Wall seconds each whole minute of audio took, from (time, frames saved) points: the time a minute's last frame
    was saved is interpolated between the two saves around it (the first minute counts from ``start``)."""
    points = [(start, 0)] + sorted(set(progress), key=lambda p: p[1])
    times, frames = [t for t, _ in points], [f for _, f in points]
    marks = [float(np.interp(k * FRAMES_PER_MINUTE, frames, times)) for k in range(minutes + 1)
             if k * FRAMES_PER_MINUTE <= frames[-1]]
    return [b - a for a, b in zip(marks, marks[1:])]


def verdicts(samples: List[Dict[str, float]], per_minute: List[float]) -> Dict[str, object]:
    """Memory growth after the first minute of audio, and how linear the time is in the length.

    Memory is a sawtooth, not a level: each chunk's working buffers are allocated and freed, and the freed heap is
    handed back after each segment (engine/native_memory.py), so two samples a second apart differ by up to ~100 MB.
    The verdict compares envelopes: the highest RSS sampled while each minute of audio was rendered (the join at the
    end counts as the last minute). Growth is the highest of those after the first minute over the second minute's."""
    after = [s for s in samples if s["frames"] >= FRAMES_PER_MINUTE and s["rss_mb"] is not None]
    memory: Dict[str, object] = {"limit_mb": GROWTH_LIMIT_MB}
    if after:
        peaks: Dict[int, float] = {}
        troughs: Dict[int, float] = {}
        for s in after:
            m = int(s["frames"] // FRAMES_PER_MINUTE)  # 1: the second minute of audio
            peaks[m] = max(peaks.get(m, 0.0), s["rss_mb"])
            troughs[m] = min(troughs.get(m, float("inf")), s["rss_mb"])
        minutes = sorted(peaks)
        base, peak = peaks[minutes[0]], max(peaks.values())
        memory.update(rss_peak_second_minute_mb=base, rss_peak_after_mb=peak, growth_mb=peak - base,
                      rss_peak_per_minute_mb=[peaks[m] for m in minutes],
                      rss_trough_per_minute_mb=[troughs[m] for m in minutes], rss_last_mb=after[-1]["rss_mb"],
                      flat=peak - base <= GROWTH_LIMIT_MB)
    timing: Dict[str, object] = {"minutes_timed": len(per_minute)}
    if per_minute:
        later = per_minute[1:] or per_minute  # the first minute holds the one-time costs (librosa's JIT, ...)
        cumulative = np.cumsum(per_minute)
        x = np.arange(1, len(per_minute) + 1, dtype=float)
        slope, intercept = np.polyfit(x, cumulative, 1) if len(x) > 1 else (cumulative[0], 0.0)
        fitted = slope * x + intercept
        ss_res = float(np.sum((cumulative - fitted) ** 2))
        ss_tot = float(np.sum((cumulative - cumulative.mean()) ** 2)) or 1.0
        k = max(1, min(5, len(later) // 2))
        timing.update(seconds_per_minute_mean=statistics.fmean(later),
                      seconds_per_minute_stdev=statistics.pstdev(later), first_minute_seconds=per_minute[0],
                      first_minutes_mean=statistics.fmean(later[:k]), last_minutes_mean=statistics.fmean(later[-k:]),
                      last_over_first=statistics.fmean(later[-k:]) / statistics.fmean(later[:k]),
                      fit_seconds_per_minute=float(slope), fit_r2=1.0 - ss_res / ss_tot)
    return {"memory": memory, "time": timing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_long", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="audio length in minutes (default 60)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples (default 1)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_long-cpu-<date>.json)")
    ap.add_argument("--keep", type=Path, help="keep the rendered mp4 here (default: rendered into a temp folder)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0:
        ap.error("--minutes and --interval must be > 0")

    with tempfile.TemporaryDirectory(prefix="bench_long-") as tmp:
        work = Path(tmp)
        audio_seconds = write_speech(work / "speech.wav", args.minutes)
        out = work / "long.mp4"
        cmd = [sys.executable, "-m", "engine", "render", "--image", str(ASSETS / "portrait.jpg"), "--audio",
               str(work / "speech.wav"), "--out", str(out), "--device", "cpu", "--metrics-json",
               str(work / "metrics.json"), "-q"]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        print(f"rendering {audio_seconds / 60:.1f} min of audio: {' '.join(cmd[1:])}", flush=True)
        # 1. the render, sampled until it ends
        start = time.time()
        child = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples: List[Dict[str, float]] = []
        progress: List[Tuple[float, int]] = []  # (when the state was saved, frames it holds): every save seen
        sidecar = work / ".long.mp4.resume"
        next_sample, frames = start, 0
        while child.poll() is None:
            saved, saved_at = _saved(sidecar)  # polled often: a save every few seconds, each one a time point
            if saved_at is not None and (not progress or progress[-1] != (saved_at, saved)):
                progress.append((saved_at, saved))
            frames = max(frames, saved)  # the state goes with the sidecar when the segments are joined at the end
            rss = _rss_mb(child.pid)
            if rss is not None and time.time() >= next_sample:
                next_sample += args.interval
                samples.append({"t": round(time.time() - start, 2), "rss_mb": round(rss, 1), "frames": frames})
                if len(samples) % max(1, round(60 / args.interval)) == 0:
                    print(f"  {samples[-1]['t']:7.0f} s: {frames / FRAMES_PER_MINUTE:6.2f} min rendered, "
                          f"RSS {rss:.0f} MB", flush=True)
            time.sleep(min(0.5, args.interval))
        wall = time.time() - start
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            print(stderr, file=sys.stderr)
            return 1
        metrics = json.loads((work / "metrics.json").read_text())
        if args.keep:
            args.keep.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, args.keep)
    # 2. per-minute times, verdicts, JSON
    total_frames = int(metrics["frames"])
    per_minute = minute_times(progress, start, int(total_frames // FRAMES_PER_MINUTE))  # the minutes saves cover
    result = verdicts(samples, per_minute)
    payload = {"benchmark": "bench_long", "machine": machine_info(torch.device("cpu")), "preset": "tiny",
               "command": cmd[1:], "audio_seconds": audio_seconds, "interval_seconds": args.interval,
               "wall_seconds": wall, "frames": total_frames, "render_metrics": metrics,
               "seconds_per_audio_minute": per_minute, "rss_samples": samples, **result}
    path = write_json(payload, args.out or result_path("bench_long", torch.device("cpu")))
    mem, tim = result["memory"], result["time"]
    print(stdout.strip())
    if "growth_mb" in mem:
        print(f"memory: peak {mem['rss_peak_second_minute_mb']:.0f} MB in the second minute of audio, "
              f"{mem['rss_peak_after_mb']:.0f} MB at most after it: growth {mem['growth_mb']:+.1f} MB "
              f"(limit +{GROWTH_LIMIT_MB:.0f})")
    if "seconds_per_minute_mean" in tim:
        print(f"time: {tim['seconds_per_minute_mean']:.1f} +- {tim['seconds_per_minute_stdev']:.1f} s per minute of "
              f"audio after the first ({tim['first_minute_seconds']:.1f} s); last/first minutes "
              f"{tim['last_over_first']:.2f}; linear fit {tim['fit_seconds_per_minute']:.1f} s/min, "
              f"R^2 {tim['fit_r2']:.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
