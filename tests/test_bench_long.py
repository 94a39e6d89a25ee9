"""benchmarks/bench_long.py: per-minute times from the render's saves, the memory and time verdicts, a short run."""
import json

import pytest

from benchmarks import bench_long as B


def test_minute_times_interpolate_between_saves():
    # the first save (500 frames) 5 s after the start, then one every 10 s: 25 s for the first minute, then 30 s
    progress = [(105.0 + 10 * k, 500 * (k + 1)) for k in range(9)]  # 500 .. 4500 frames
    times = B.minute_times(progress, start=100.0, minutes=3)
    assert times == pytest.approx([25.0, 30.0, 30.0])
    assert B.minute_times(progress[:4], start=100.0, minutes=3) == pytest.approx([25.0])  # only covered minutes


def test_verdicts_flag_growth_and_nonlinear_time():
    flat = [{"t": t, "rss_mb": 900.0 + (5 if t % 2 else 0), "frames": 100 * t} for t in range(100)]
    growing = [{"t": t, "rss_mb": 900.0 + t, "frames": 100 * t} for t in range(100)]
    # buffers allocated and freed: 100 MB swings every few seconds, the same highs each minute
    sawtooth = [{"t": t, "rss_mb": 900.0 - (100 if t % 7 == 0 else 0), "frames": 100 * t} for t in range(100)]
    assert B.verdicts(flat, [40, 30, 30, 30])["memory"]["flat"] is True
    saw = B.verdicts(sawtooth, [40, 30, 30, 30])["memory"]
    assert saw["flat"] is True and saw["growth_mb"] == 0.0 and min(saw["rss_trough_per_minute_mb"]) == 800.0
    v = B.verdicts(growing, [40, 30, 30, 30])
    # the second minute of audio (frames 1500-2999: t 15-29) peaks at 929, the last sample is 999
    assert v["memory"]["flat"] is False and v["memory"]["growth_mb"] == pytest.approx(70.0)
    assert v["memory"]["rss_peak_per_minute_mb"] == [929.0, 944.0, 959.0, 974.0, 989.0, 999.0]
    assert v["time"]["fit_r2"] > 0.99 and v["time"]["seconds_per_minute_mean"] == pytest.approx(30.0)
    slower = B.verdicts(flat, [40, 30, 35, 40, 45, 50, 55])["time"]
    assert slower["last_over_first"] > 1.3


def test_short_run_writes_samples_and_minutes(tmp_path):
    out = tmp_path / "long.json"
    assert B.main(["--minutes", "1.2", "--interval", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["frames"] == 1800 and data["audio_seconds"] == 72.0
    rendering = [s for s in data["rss_samples"] if s["frames"] > 0]  # the models are loaded by then
    assert len(rendering) >= 10 and all(s["rss_mb"] > 100 for s in rendering)
    frames = [s["frames"] for s in data["rss_samples"]]
    assert frames == sorted(frames) and frames[-1] >= 1500
    assert len(data["seconds_per_audio_minute"]) == 1 and data["machine"]["cpu_count"] >= 1
    assert "growth_mb" in data["memory"] and data["time"]["minutes_timed"] == 1
