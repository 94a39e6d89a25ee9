"""Speech to avatar: output latency of a live session, the baseline CPU live settings against the new default.

    python -m benchmarks.bench_latency --preset tiny --out FILE.json

For each settings ("baseline": engine/settings.py LIVE_CPU_WIDE, the CPU live layout before the latency work;
"default": LIVE_CPU on a CPU, LIVE on a GPU) one live session (streaming.session.Session: the server's code without
WebRTC) hears ``--utterances`` stretches of the bundled speech separated by silences, pushed in 20 ms pieces at the
pace of a microphone, while two consumers take its video and audio tracks as an encoder would. Measured per frame that
leaves the video track (streaming/latency.py): the output latency (the frame's last audio sample in -> the frame out)
over the frames under speech, p50 and p95; the first-speech-frame latency of each utterance (its first frame's output
latency); the fresh-frame rate, drops, holds, skips and the A/V offset; the latency budget (audio wait, Stage I,
Stage II, decode, sink, playout) and how its parts add up against the measured latency, per frame. JSON
{"baseline": {...}, "default": {...}} also goes to benchmarks/results/latency-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from benchmarks.common import REPO_ROOT, machine_info, result_path, write_json

log = logging.getLogger("bench_latency")
SR = 16000
PIECE = 320  # 20 ms: what a browser microphone sends per packet
BUDGET = ("audio_wait", "stage1", "stage2", "decode", "sink", "playout")


def utterances(speech: np.ndarray, n: int, speech_s: float, gap_s: float) -> tuple:
    """The input: ``n`` stretches of ``speech_s`` seconds cut from ``speech`` (different parts of it, in turn), each
    followed by ``gap_s`` of silence, after ``gap_s`` of silence. Returns (audio, onsets in samples, offsets)."""
    seg, gap = int(speech_s * SR), int(gap_s * SR)
    parts, onsets, offsets, pos = [np.zeros(gap, np.float32)], [], [], gap
    starts = np.linspace(0, max(len(speech) - seg, 0), n).astype(int)
    for s in starts:
        piece = speech[s:s + seg]
        onsets.append(pos)
        offsets.append(pos + len(piece))
        parts += [piece, np.zeros(gap, np.float32)]
        pos += len(piece) + gap
    return np.concatenate(parts).astype(np.float32), onsets, offsets


def speech_spans(engine_audio: np.ndarray, n: int, min_gap_s: float = 0.3) -> List[tuple]:
    """[(start, end) samples] of the non-silent stretches of the engine's audio separated by >= ``min_gap_s`` of
    exact zeros (the first ``n``)."""
    loud = np.flatnonzero(engine_audio != 0.0)
    if not len(loud):
        return []
    breaks = np.flatnonzero(np.diff(loud) > min_gap_s * SR)
    starts = np.concatenate([[loud[0]], loud[breaks + 1]])
    ends = np.concatenate([loud[breaks] + 1, [loud[-1] + 1]])
    return [(int(a), int(b)) for a, b in zip(starts, ends)][:n]


async def consume(track, stop: asyncio.Event) -> None:
    """Take frames / packets as an encoder would, until the track ends or ``stop``."""
    from aiortc.mediastreams import MediaStreamError

    while not stop.is_set():
        try:
            await track.recv()
        except MediaStreamError:
            return


def feed(session, audio: np.ndarray, started: threading.Event) -> None:
    """Push ``audio`` into the session in 20 ms pieces at real-time pace (a microphone)."""
    t0 = time.monotonic()
    started.set()
    for i in range(0, len(audio), PIECE):
        delay = t0 + i / SR - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        session.push_input(audio[i:i + PIECE], SR)


def percentiles(values: List[float]) -> Optional[Dict[str, float]]:
    if not values:
        return None
    return {"p50": round(float(np.percentile(values, 50)), 1), "p95": round(float(np.percentile(values, 95)), 1),
            "max": round(float(np.max(values)), 1), "n": len(values)}


async def run_one(models, avatar, settings, audio: np.ndarray, onsets: List[int], offsets: List[int]) -> Dict:
    from streaming.session import Session, SessionOptions, min_queue_frames

    options = SessionOptions(settings=settings, queue_frames=max(100, min_queue_frames(settings)),
                             record_seconds=len(audio) / SR + 10)
    session = Session(models, avatar, options)
    stop = asyncio.Event()
    session.start()
    started = threading.Event()
    feeder = threading.Thread(target=feed, args=(session, audio, started), daemon=True)
    feeder.start()
    consumers = [asyncio.ensure_future(consume(t, stop)) for t in (session.video, session.audio)]
    av: List[float] = []  # the server's A/V offset, sampled every 0.5 s while the audio plays
    while feeder.is_alive():
        await asyncio.sleep(0.5)
        offset = session.clock.av_offset_ms()
        if offset is not None:
            av.append(offset)
    await asyncio.sleep(3.0)  # the last utterance's frames leave
    stats = session.stats()
    records = session.latency.records()  # (frame, latency s, playout s, time sent) per fresh frame sent
    entries = {e.frame: e for e in session.runner.latency_entries()}
    stop.set()
    session.close("benchmark done")
    for c in consumers:
        c.cancel()

    # 1. where the speech landed on the engine's timeline (silence may have been filled in whenever a piece came late):
    # the gaps are digital silence, so an utterance starts at the first non-zero sample after a long run of zeros
    spans = speech_spans(session.record.read(0, session.record.end), len(onsets))
    speech_frames = set()
    for on, off in spans:
        speech_frames.update(range(on // 640, off // 640))
    by_frame = {f: (lat, play) for f, lat, play, _ in records}
    under_speech = [by_frame[f][0] * 1000 for f in sorted(speech_frames) if f in by_frame]
    first_speech = []
    for on, _ in spans:
        f0 = on // 640
        later = [f for f in range(f0, f0 + 5) if f in by_frame]
        first_speech.append(round(by_frame[later[0]][0] * 1000, 1) if later else None)
    # 2. the budget's parts against the measured latency, frame by frame (a render chunk's first frame)
    sums = []
    for f, e in entries.items():
        if f in by_frame:
            parts = e.audio_wait + e.stage1 + e.stage2 + e.decode + e.sink + by_frame[f][1]
            sums.append(parts / by_frame[f][0])
    sent = [r[3] for r in records]
    st = settings.structural()
    return {
        "settings": dataclasses.asdict(settings),
        "structural_latency_frames": {"first": st.first, "max": st.max, "min": st.min},
        "output_latency_ms": percentiles(under_speech),
        "output_latency_all_frames_ms": percentiles([r[1] * 1000 for r in records]),
        "utterances_found": len(spans),
        "first_speech_frame_latency_ms": {"per_utterance": first_speech,
                                          **(percentiles([x for x in first_speech if x is not None]) or {})},
        "fps": round((len(sent) - 1) / max(sent[-1] - sent[0], 1e-9), 2) if len(sent) > 1 else 0.0,  # fresh frames
        "frames_sent": stats["frames_sent"], "fresh_frames": len(records),
        "frames_dropped": stats["frames_dropped"], "frames_repeated": stats["frames_repeated"],
        "holds": stats["holds"], "skipped": stats["skipped"], "late_slots": stats["late_slots"],
        "av_offset_ms": percentiles([abs(x) for x in av]), "first_frame_latency_ms": stats["first_frame_latency_ms"],
        "latency_budget_ms": stats["latency_budget_ms"],
        "budget_sum_over_measured": percentiles([100.0 * x for x in sums]),  # in %: 100 = the parts add up exactly
        "input": stats["input"],
    }


def schedule_flops(steps: int = 4) -> Dict[str, object]:
    """Stage II FLOPs per emitted frame at the release size (meta device, no CFG), the chunk schedule against the
    rolling one at the same latency: chunk 8 / overlap 4 (every frame denoised twice) vs rolling calls of 4 frames
    (``steps`` groups), both letting a frame wait 4 frames of poses (engine/flops.py)."""
    from engine.flops import flops_per_frame, latency_frames
    from engine.settings import RenderSettings
    from mmgt.config import MMGT

    chunk = RenderSettings(chunk=8, overlap=4, steps=steps, guidance=1.0)
    rolling = RenderSettings(chunk=4, steps=steps, guidance=1.0, schedule="rolling")
    c, r = flops_per_frame(MMGT, chunk), flops_per_frame(MMGT, rolling)
    return {"steps": steps, "latency_frames": latency_frames(chunk, steps),
            "chunk_8_overlap_4_tflop": round(c / 1e12, 3), "rolling_4_tflop": round(r / 1e12, 3),
            "rolling_over_chunk": round(r / c, 3)}


def main(argv=None) -> int:
    from engine.settings import LIVE, LIVE_CPU, LIVE_CPU_WIDE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "mmgt"], help="model preset (default tiny)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--utterances", type=int, default=10, help="speech stretches (default 10)")
    ap.add_argument("--speech-seconds", type=float, default=1.5, help="length of each (default 1.5)")
    ap.add_argument("--gap-seconds", type=float, default=1.0, help="silence between them (default 1.0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the stages run in threads)")
    ap.add_argument("--only", choices=["baseline", "default"], help="measure one of the two")
    ap.add_argument("--steps", type=int, help="Stage II steps of both settings (default: theirs; e.g. 4 on a GPU)")
    ap.add_argument("--guidance", type=float, help="Stage II CFG scale of both (default: theirs; 1 = no CFG)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/latency-<device>-<date>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc", "streaming", "engine", "mmgt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Trying to estimate tuning")  # librosa on silent windows
    torch.set_num_threads(args.threads)

    from mmgt import pipeline as P
    from mmgt.audio_io import load_audio
    from mmgt.config import get_preset
    from PIL import Image

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    runs = {"baseline": LIVE_CPU_WIDE, "default": LIVE if cuda else LIVE_CPU}
    runs = {k: v.with_(steps=args.steps, guidance=args.guidance) for k, v in runs.items()}
    if args.only:
        runs = {args.only: runs[args.only]}
    models = P.build_models(get_preset(args.preset), device=device)  # eager (torch); random weights for "mmgt"
    image = np.asarray(Image.open(REPO_ROOT / "engine" / "assets" / "portrait.jpg").convert("RGB"))
    avatar = P.prepare_avatar(models, image)
    speech = load_audio(REPO_ROOT / "engine" / "assets" / "speech.flac")
    audio, onsets, offsets = utterances(speech, args.utterances, args.speech_seconds, args.gap_seconds)
    from engine.runner import Runner

    out: Dict[str, Dict] = {}
    for name, settings in runs.items():
        warm = Runner(models, avatar, settings).warm_up()
        log.info("%s: warm-up %.1f s; %d utterances, %.1f s of audio", name, warm, len(onsets), len(audio) / SR)
        out[name] = asyncio.run(run_one(models, avatar, settings, audio, onsets, offsets))
        r = out[name]
        log.info("%s: output latency p50 %s p95 %s ms, first speech frame p50 %s ms, %.1f fps, dropped %d, holds %d",
                 name, (r["output_latency_ms"] or {}).get("p50"), (r["output_latency_ms"] or {}).get("p95"),
                 r["first_speech_frame_latency_ms"].get("p50"), r["fps"], r["frames_dropped"], r["holds"])
    payload = {"benchmark": "latency", "machine": machine_info(device), "preset": args.preset,
               "utterances": args.utterances, "speech_seconds": args.speech_seconds, "gap_seconds": args.gap_seconds,
               "threads": args.threads, **out}
    if "baseline" in out and "default" in out and out["baseline"]["output_latency_ms"] and out["default"][
            "output_latency_ms"]:
        payload["default_over_baseline_p95"] = round(
            out["default"]["output_latency_ms"]["p95"] / out["baseline"]["output_latency_ms"]["p95"], 3)
    payload["flops_per_frame"] = schedule_flops()
    path = write_json(payload, args.out or result_path("latency", device))
    summary = "; ".join(f"{k}: p95 {(v['output_latency_ms'] or {}).get('p95')} ms at {v['fps']} fps"
                        for k, v in out.items())
    print(f"{summary} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
