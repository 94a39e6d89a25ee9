"""A long live session: memory and A/V sync over minutes (tiny preset, CPU, in-process WebRTC client).

The server (streaming.server, the same code `engine serve` runs) and an aiortc client that sends the bundled speech
on a loop run in this process over loopback ICE. Every minute the process RSS (/proc/self/status VmRSS) and the
session's counters are logged; at the end the A/V offset is measured on what the client received (video: the
engine frame stamped into each picture vs its pts; audio: the lag that aligns the received audio with the engine's
input, per 2-second window of the last minute) and read from the server's own clock. JSON goes to
benchmarks/results/stream-cpu-<date>.json.

    .venv/bin/python -m benchmarks.bench_stream --minutes 5
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from benchmarks.common import REPO_ROOT, machine_info, result_path, write_json

log = logging.getLogger("bench_stream")


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc; psutil elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


END_SECONDS = 60.0  # the A/V offset at the end: measured over the last minute


async def session_run(models, avatar, speech: np.ndarray, minutes: float, client, options) -> Dict:
    import aiohttp

    rows: List[Dict] = []
    async with client.running_server(models, avatar, max_sessions=1, idle_timeout=30.0,
                                     session=options) as (server, url):
        rec = client.Received(keep_audio_seconds=END_SECONDS + 30.0)
        t_start = time.monotonic()
        pc, tasks = await client.offer_and_connect(url, speech, rec, loop=True)
        # 1. one row a minute (and one at 10 s, before the session's buffers have filled)
        marks = [10.0] + [60.0 * (m + 1) for m in range(int(np.ceil(minutes)))]
        marks = [m for m in marks if m <= minutes * 60.0 + 1e-6]
        async with aiohttp.ClientSession() as http:
            for mark in marks:
                await asyncio.sleep(max(0.0, t_start + mark - time.monotonic()))
                async with http.get(f"{url}/stats/{rec.session}") as r:
                    stats = await r.json()
                row = {"t_s": round(time.monotonic() - t_start, 1), "rss_mb": round(rss_mb(), 1),
                       "frames_received": len(rec.video), **{k: stats.get(k) for k in (
                           "state", "fps", "frames_rendered", "frames_sent", "frames_dropped", "frames_repeated",
                           "holds", "skipped", "av_offset_ms", "output_latency_ms", "engine_lag_ms")},
                       "input_dropped_s": stats["input"]["dropped_seconds"]}
                rows.append(row)
                log.info("t=%5.0f s  RSS %.1f MB  fps %.2f  rendered %s  holds %s  skipped %s  dropped %s  A/V %s ms",
                         row["t_s"], row["rss_mb"], row["fps"] or 0, row["frames_rendered"], row["holds"],
                         row["skipped"], row["frames_dropped"], row["av_offset_ms"])
        # 2. the A/V offset at the end, from what the client received
        session = server.sessions[rec.session]
        e0 = max(0, session.record.end - session.record.capacity)
        engine_audio = session.record.read(e0, session.record.end)
        last_pts = rec.video[-1][0] / 90000.0
        first_pts = rec.video[0][0] / 90000.0
        rejected: Dict[str, int] = {}
        windows = client.av_offsets(rec, engine_audio, e0, window=2.0, rejected=rejected,
                                    skip=max(0.0, last_pts - first_pts - END_SECONDS))
        final_stats = session.stats()
        await pc.close()
        for t in tasks:
            t.cancel()
    return {"rows": rows, "end_windows": windows, "end_windows_rejected": rejected, "final_stats": final_stats,
            "first_frame_latency_s": rec.first_frame_latency, "received_fps": rec.fps(),
            "frames_received": len(rec.video), "audio_packets_received": rec.audio_packets}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="session length (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: two stage threads)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/stream-cpu-<date>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc", "aiohttp.access", "streaming", "engine", "mmgt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Trying to estimate tuning")  # librosa on silent windows
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(REPO_ROOT / "tests" / "streaming"))
    import stream_client as client  # the test client: loopback ICE, speech track, A/V measurement

    from mmgt import pipeline as P
    from mmgt.audio_io import load_audio
    from mmgt.config import TINY
    from PIL import Image

    client.pin_loopback()
    models = P.build_models(TINY)
    image = np.asarray(Image.open(REPO_ROOT / "engine" / "assets" / "portrait.jpg").convert("RGB"))
    avatar = P.prepare_avatar(models, image)
    speech = np.concatenate([load_audio(REPO_ROOT / "engine" / "assets" / "speech.flac"),
                             np.zeros(3 * 16000, np.float32)])  # 12 s of speech, 3 s of silence, on a loop
    from streaming.server import AvatarServer, ServerConfig
    from streaming.session import SessionOptions

    options = SessionOptions(settings=client.TEST_SETTINGS, queue_frames=client.QUEUE_FRAMES, stamp_frames=True,
                             record_seconds=END_SECONDS + 30.0)  # engine audio for the end measurement
    warm = AvatarServer(models, avatar, ServerConfig(session=options)).warmup()
    log.info("warm-up %.1f s; RSS %.1f MB; streaming for %.1f min", warm, rss_mb(), args.minutes)

    result = asyncio.run(session_run(models, avatar, speech, args.minutes, client, options))
    rows = result["rows"]
    after_first = [r["rss_mb"] for r in rows if r["t_s"] >= 59.0]
    growth = (after_first[-1] - after_first[0]) if len(after_first) >= 2 else None
    peak_growth = (max(after_first) - after_first[0]) if len(after_first) >= 2 else None
    av = [w["av_ms"] for w in result["end_windows"]]
    summary = {
        "rss_growth_after_minute_1_mb": growth,  # last row minus the minute-1 row
        "rss_peak_growth_after_minute_1_mb": peak_growth,  # highest row minus the minute-1 row
        "final_av_offset_ms_client": float(np.median(av)) if av else None,
        "final_av_windows": len(av),
        "final_av_offset_ms_client_max_abs": float(np.max(np.abs(av))) if av else None,
        "final_av_offset_ms_server": result["final_stats"]["av_offset_ms"],
        "received_fps": result["received_fps"],
        "first_frame_latency_s": result["first_frame_latency_s"],
    }
    payload = {"benchmark": "stream", "machine": machine_info(torch.device("cpu")), "preset": "tiny",
               "minutes": args.minutes, "settings": asdict(client.TEST_SETTINGS),
               "queue_frames": client.QUEUE_FRAMES, "summary": summary, **result}
    out = write_json(payload, args.out or result_path("stream", torch.device("cpu")))
    print(f"RSS growth after minute 1: {growth} MB; A/V offset at the end: "
          f"client {summary['final_av_offset_ms_client']}"
          f" ms (max |.| {summary['final_av_offset_ms_client_max_abs']}), server {summary['final_av_offset_ms_server']}"
          f" ms; received {summary['received_fps']:.2f} fps -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
