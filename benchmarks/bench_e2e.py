"""End to end through the runner: real-time factor, first-frame latency and per-stage times.

    python -m benchmarks.bench_e2e --preset mmgt --device cuda:0 [--configs 4:1.0 8:1.0 30:3.5] [--seconds 8]
        [--chunk 16] [--overlap 4] [--decoder vae|taesd] [--compile] [--cuda-graphs] [--out PATH]

For each ``steps:guidance`` config the whole runner (Stage I: WavLM + librosa + SMGA + drawing + masks + wav2vec2;
Stage II: PoseGuider + UNet3D x steps + VAE decode) renders ``--seconds`` of the bundled speech offline into a null
sink (real-time factor = media seconds / wall seconds), then a live run (``engine.settings.LIVE``) of the same
audio gives the first-frame latency (audio of the first window available -> first frame out). Random weights at the
chosen preset's sizes: speed only. ``--compile`` / ``--cuda-graphs`` are the engine's torch-path options
(engine.backends.accelerate: torch.compile of the denoiser step, CUDA graphs of the denoiser and SMGA steps); every
configuration is warmed up (``Runner.warm_up``: compile, capture, first allocations) before it is timed, and the
warm-up time is reported beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, result_path, write_json
from engine.backends import accelerate
from engine.runner import Runner
from engine.settings import LIVE, OFFLINE
from engine.sinks import NullSink
from engine.types import AudioChunk
from mmgt import pipeline as P
from mmgt.config import get_preset
from mmgt.contract import Shapes

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "engine" / "assets"


def _speech(seconds: float) -> np.ndarray:
    npy = ROOT / ".whl" / "speech16k.npy"  # carried to machines without PyAV
    if npy.is_file():
        speech = np.load(npy)
    else:
        from mmgt.audio_io import load_audio

        speech = load_audio(ASSETS / "speech.flac")
    n = int(16000 * seconds)
    return np.tile(speech, int(np.ceil(n / len(speech))))[:n].astype(np.float32)


def _portrait() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(ASSETS / "portrait.jpg").convert("RGB"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    ap.add_argument("--configs", nargs="+", default=["4:1.0", "8:1.0", "30:3.5"], help="steps:guidance pairs")
    ap.add_argument("--seconds", type=float, default=8.0, help="audio per offline run")
    ap.add_argument("--cfg-seconds", type=float, default=None, help="audio for configs with CFG (default: --seconds)")
    ap.add_argument("--chunk", type=int, default=OFFLINE.chunk)
    ap.add_argument("--overlap", type=int, default=OFFLINE.overlap)
    ap.add_argument("--decoder", choices=["vae", "taesd"], default="vae")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile the denoiser and decoder (warmed before timing); MODE e.g. "
                         "max-autotune-no-cudagraphs")
    ap.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs for the denoiser and SMGA steps")
    ap.add_argument("--no-live", action="store_true", help="skip the live first-frame-latency runs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    cfg = get_preset(args.preset)

    # 1. models and avatar (random weights at the preset's sizes)
    t = time.perf_counter()
    models = P.build_models(cfg, device=device, dtype=dtype)
    if args.decoder == "taesd":
        from mmgt.vae import build_tiny_decoder

        models = dataclasses.replace(models, decoder=build_tiny_decoder(cfg.vae, seed=cfg.seed).to(device, dtype).eval())
    _sync(device)
    build_s = time.perf_counter() - t
    avatar = P.prepare_avatar(models, _portrait())
    print(f"built {cfg.name} on {device} ({dtype}) in {build_s:.1f} s; decoder {args.decoder}; compile {args.compile}; "
          f"cuda graphs {args.cuda_graphs}")

    results = []
    accelerated = {}  # call shapes -> the model set shaped (and compiled / graphed) for them, shared by configs

    def shaped(settings):
        shapes = Shapes.from_settings(cfg, settings)
        if shapes not in accelerated:
            accelerated[shapes] = accelerate(dataclasses.replace(models, shapes=shapes), compile=args.compile or False,
                                             cuda_graphs=args.cuda_graphs)
        return accelerated[shapes]

    for spec in args.configs:
        steps_s, guidance_s = spec.split(":")
        steps, guidance = int(steps_s), float(guidance_s)
        seconds = args.cfg_seconds if (guidance != 1.0 and args.cfg_seconds) else args.seconds
        audio = _speech(seconds)
        settings = OFFLINE.with_(steps=steps, guidance=guidance, chunk=args.chunk, overlap=args.overlap)
        # 2. the run's models (shaped, compiled / graphed for these settings), warmed up: compile, capture, allocate
        run_models = shaped(settings)
        warm_s = Runner(run_models, avatar, settings).warm_up()
        # 3. offline run: real-time factor and per-stage busy time
        t = time.perf_counter()
        rep = Runner(run_models, avatar, settings).run(audio, NullSink())
        _sync(device)
        wall = time.perf_counter() - t
        row = {"steps": steps, "guidance": guidance, "chunk": args.chunk, "overlap": args.overlap,
               "audio_seconds": seconds, "frames": rep.frames, "wall_seconds": wall,
               "real_time_factor": rep.media_seconds / wall, "fps": rep.frames / wall,
               "stage1_seconds": rep.stage1_seconds, "stage2_seconds": rep.stage2_seconds,
               "decode_seconds": rep.decode_seconds, "warmup_seconds": warm_s,
               "first_frame_latency_offline_s": rep.first_frame_latency}
        # 4. live run: chunks of 20 ms as they would arrive, fed without waiting (latency from audio-ready)
        if not args.no_live:
            live = LIVE.with_(steps=steps, guidance=guidance)
            live_models = shaped(live)  # the live chunk is another shape
            live_warm_s = Runner(live_models, avatar, live).warm_up()
            chunks = [AudioChunk(audio[i:i + 320], i) for i in range(0, min(len(audio), 16000 * 4), 320)]
            lrep = Runner(live_models, avatar, live).run_stream(iter(chunks), NullSink())
            row.update({"live_first_frame_latency_s": lrep.first_frame_latency, "live_settings": vars(live),
                        "live_steady_fps": Runner(live_models, avatar, live).probe(),
                        "live_warmup_seconds": live_warm_s, "live_real_time_factor": lrep.real_time_factor,
                        "live_stage1_seconds": lrep.stage1_seconds, "live_stage2_seconds": lrep.stage2_seconds,
                        "live_frames": lrep.frames})
        results.append(row)
        print(f"steps {steps:>2} guidance {guidance:.1f}: RTF {row['real_time_factor']:.2f} ({row['fps']:.1f} fps), "
              f"stage I {rep.stage1_seconds:.2f} s, stage II {rep.stage2_seconds:.2f} s, decode "
              f"{rep.decode_seconds:.2f} s" + (f", live first frame {row['live_first_frame_latency_s'] * 1000:.0f} ms, "
                                              f"live steady {row['live_steady_fps']:.1f} fps"
                                                 if "live_first_frame_latency_s" in row else ""))
    payload = {"benchmark": "bench_e2e", "machine": machine_info(device), "preset": cfg.name,
               "resolution": cfg.resolution, "dtype": str(dtype), "decoder": args.decoder, "compile": args.compile,
               "cuda_graphs": args.cuda_graphs,
               "build_seconds": build_s, "results": results}
    path = write_json(payload, args.out or result_path(f"e2e-{cfg.name}-{args.decoder}"
                                                       + (f"-compile-{args.compile}" if args.compile else "")
                                                       + ("-graphs" if args.cuda_graphs else ""), device))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
