"""Several live sessions on one model set: aggregate and per-session frames per second, batched vs one call each.

    python -m benchmarks.bench_sessions [--preset tiny] [--sessions 1 2 4 8] [--seconds 3] [--settings NAME]
                                        [--repeat K] [--out PATH]

For each session count N, N sessions stream near-silence flat out at the same time (``engine.runner.probe_sessions``:
each its own Runner and threads, the live settings of the device -- LIVE on a GPU, LIVE_CPU_WIDE, the capacity-first
CPU layout, on a CPU; ``--settings`` picks another), once through the
plain model set (every session's network calls run on their own: "one call each") and once through the batched one
(engine/backends/batching.py: the calls that coincide run as one, a row per session). Reports each session's steady fps,
their minimum and sum, the ratio batched / one call each, and the batch sizes the batchers formed. No WebRTC: this is
the engine's capacity; a live server also encodes and sends (streaming/server.py measures its own capacity at start-up
the same way, as sessions will run).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from benchmarks.common import machine_info, result_path, write_json
from engine.backends.batching import batched, batchers, close_batchers
from engine.runner import Runner, probe_sessions
from engine.settings import SETTINGS
from mmgt import pipeline as P
from mmgt.config import FPS, get_preset
from mmgt.contract import Shapes

ASSETS = Path(__file__).resolve().parents[1] / "engine" / "assets"


def measure(models, avatar, settings, n: int, seconds: float) -> Dict[str, object]:
    """N sessions flat out at once on ``models``: each one's fps, their minimum and sum, the batch sizes formed."""
    for b in batchers(models).values():
        b.sizes.clear()
    t = time.perf_counter()
    rates = probe_sessions(models, avatar, settings, n, seconds)
    return {"per_session_fps": rates, "min_fps": min(rates), "aggregate_fps": sum(rates),
            "real_time": min(rates) >= FPS, "wall_seconds": time.perf_counter() - t,
            "batch_sizes": {name: dict(b.sizes) for name, b in batchers(models).items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_sessions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8], help="session counts to measure")
    ap.add_argument("--seconds", type=float, default=3.0, help="near-silence each session streams per probe")
    ap.add_argument("--settings", choices=sorted(SETTINGS), default=None,
                    help="live settings (default: live on a GPU, live-cpu-wide on a CPU)")
    ap.add_argument("--repeat", type=int, default=1, help="measure each count K times, the two modes alternating "
                    "(a shared machine's load then weighs on both alike); the medians are reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU, as serve)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/sessions-<device>-<date>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "numba"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    name = args.settings or ("live" if device.type == "cuda" else "live-cpu-wide")
    settings = SETTINGS[name]
    cfg = get_preset(args.preset)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = P.build_models(cfg, device=device, dtype=dtype, shapes=Shapes.from_settings(cfg, settings))
    from PIL import Image

    avatar = P.prepare_avatar(models, np.asarray(Image.open(ASSETS / "portrait.jpg").convert("RGB")))
    Runner(models, avatar, settings).warm_up()
    fast = batched(models)
    modes = {"one_call_each": models, "batched": fast}
    runs: Dict[str, Dict[int, List[Dict[str, object]]]] = {mode: {n: [] for n in args.sessions} for mode in modes}
    try:
        Runner(fast, avatar, settings).warm_up()
        for n in args.sessions:  # 1. per count, the modes alternate, K times
            for k in range(args.repeat):
                for mode in (modes if k % 2 == 0 else reversed(list(modes))):
                    runs[mode][n].append(measure(modes[mode], avatar, settings, n, args.seconds))
                    logging.getLogger("bench_sessions").info("%d sessions, %s: %s", n, mode, runs[mode][n][-1])
    finally:
        close_batchers(fast)
    # 2. per count and mode: the run with the median aggregate (and every run's aggregate)
    results = {mode: {n: dict(sorted(r, key=lambda x: x["aggregate_fps"])[len(r) // 2],
                              aggregate_fps_runs=[x["aggregate_fps"] for x in r]) for n, r in by_n.items()}
               for mode, by_n in runs.items()}
    ratio = {n: results["batched"][n]["aggregate_fps"] / results["one_call_each"][n]["aggregate_fps"]
             for n in args.sessions}
    pairs = {n: [b["aggregate_fps"] / a["aggregate_fps"] for a, b in zip(runs["one_call_each"][n], runs["batched"][n])]
             for n in args.sessions}
    payload = {"benchmark": "bench_sessions", "machine": machine_info(device), "preset": cfg.name,
               "settings_name": name, "settings": dataclasses.asdict(settings), "seconds_per_probe": args.seconds,
               "repeat": args.repeat, "results": results, "batched_over_one_call_each": ratio,
               "batched_over_one_call_each_per_repeat": pairs}
    path = write_json(payload, args.out or result_path("sessions-" + cfg.name, device))
    print(f"{'sessions':>8} {'one call each: min / sum fps':>30} {'batched: min / sum fps':>24} {'batched / each':>15}")
    for n in args.sessions:
        a, b = results["one_call_each"][n], results["batched"][n]
        print(f"{n:>8} {a['min_fps']:>17.1f} / {a['aggregate_fps']:>6.1f} {b['min_fps']:>15.1f} / "
              f"{b['aggregate_fps']:>6.1f} {ratio[n]:>15.2f}   (per repeat: "
              f"{', '.join(f'{x:.2f}' for x in pairs[n])})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
