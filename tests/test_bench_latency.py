"""benchmarks/bench_latency.py runs end to end (two short utterances, the default settings) and writes its JSON."""
import json

import numpy as np


def test_speech_spans_find_the_utterances_after_filled_silence():
    from benchmarks.bench_latency import speech_spans

    audio = np.zeros(16000 * 4, np.float32)
    audio[8000:16000] = 0.3
    audio[40000:48000] = -0.2
    assert speech_spans(audio, 5) == [(8000, 16000), (40000, 48000)]
    assert speech_spans(np.zeros(100, np.float32), 2) == []


def test_bench_latency_writes_the_latency_its_budget_and_the_rate(tmp_path):
    from benchmarks import bench_latency

    out = tmp_path / "lat.json"
    assert bench_latency.main(["--only", "default", "--utterances", "2", "--speech-seconds", "1.0",
                               "--gap-seconds", "0.8", "--out", str(out)]) == 0
    d = json.loads(out.read_text())["default"]
    assert d["utterances_found"] == 2 and d["structural_latency_frames"]["max"] <= 10
    lat = d["output_latency_ms"]
    assert lat and 0 < lat["p50"] <= lat["p95"] and lat["n"] >= 20
    assert len(d["first_speech_frame_latency_ms"]["per_utterance"]) == 2
    # the budget's parts add up to the latency measured apart from them, frame by frame
    assert 90.0 <= d["budget_sum_over_measured"]["p50"] <= 110.0
    assert set(d["latency_budget_ms"]["p50"]) >= {"audio_wait", "stage1", "stage2", "decode", "sink", "playout"}
    assert d["fps"] > 0 and d["av_offset_ms"]["n"] >= 2
