"""The same render through the overlapped runner and through a strictly sequential loop.

    python -m benchmarks.bench_runner [--preset tiny] [--seconds 12] [--device cpu] [--out PATH]

Both runs render the same audio with the same avatar and settings into a null sink; the sequential run executes
Stage I and Stage II one after the other in one thread (``Runner(overlapped=False)``). Prints both wall times, their
ratio, frames per second, first-frame latency and the per-stage busy times, and writes them as JSON with the machine
and the commit.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, result_path, write_json
from engine.runner import Runner
from engine.settings import LIVE, OFFLINE
from engine.sinks import NullSink
from mmgt import pipeline as P
from mmgt.audio_io import load_audio
from mmgt.config import get_preset

ASSETS = Path(__file__).resolve().parents[1] / "engine" / "assets"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--settings", choices=["offline", "live"], default="offline",
                    help="engine/settings.py preset of scheduling and sampling")
    ap.add_argument("--seconds", type=float, default=12.0, help="audio length (the bundled speech, looped)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default=None)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each mode (the best is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU, as the CLI)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_runner-<device>-<date>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    cfg = get_preset(args.preset)
    models = P.build_models(cfg, device=device, dtype=dtype)
    import numpy as np
    from PIL import Image

    speech = load_audio(ASSETS / "speech.flac")
    n = int(16000 * args.seconds)
    audio = np.tile(speech, int(np.ceil(n / len(speech))))[:n]
    avatar = P.prepare_avatar(models, np.asarray(Image.open(ASSETS / "portrait.jpg").convert("RGB")))
    settings = OFFLINE if args.settings == "offline" else LIVE

    # warm-up (first-call allocations, lazy inits) on a short clip, not measured
    Runner(models, avatar, settings).run(audio[: 16000 * 2], NullSink())

    results = {}
    for mode, overlapped in (("overlapped", True), ("sequential", False)):
        best = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            rep = Runner(models, avatar, settings, overlapped=overlapped).run(audio, NullSink())
            wall = time.perf_counter() - t
            if best is None or wall < best["wall_seconds"]:
                best = {"wall_seconds": wall, "frames": rep.frames, "fps": rep.frames / wall,
                        "real_time_factor": rep.media_seconds / wall,
                        "first_frame_latency_s": rep.first_frame_latency, "stage1_seconds": rep.stage1_seconds,
                        "stage2_seconds": rep.stage2_seconds, "decode_seconds": rep.decode_seconds,
                        "windows": rep.windows, "chunks": rep.chunks}
        results[mode] = best
        print(f"{mode:>10}: {best['wall_seconds']:.2f} s for {best['frames']} frames = {best['fps']:.1f} fps, "
              f"RTF {best['real_time_factor']:.2f}, first frame {best['first_frame_latency_s'] * 1000:.0f} ms, "
              f"stage I {best['stage1_seconds']:.2f} s, stage II {best['stage2_seconds']:.2f} s")
    ratio = results["sequential"]["wall_seconds"] / results["overlapped"]["wall_seconds"]
    print(f"sequential / overlapped wall time = {ratio:.2f}x")
    payload = {"benchmark": "bench_runner", "machine": machine_info(device), "preset": cfg.name,
               "trained": cfg.trained, "settings_name": args.settings,
               "settings": {k: v for k, v in vars(settings).items()}, "audio_seconds": args.seconds,
               "dtype": str(dtype), "results": results, "speedup_overlapped_vs_sequential": ratio}
    path = write_json(payload, args.out or result_path("bench_runner", device))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
