"""`engine`: the command line (the composition root).

    engine render --image IMG --audio AUDIO --out OUT.mp4     offline render of any length (tiny preset by default)
    engine render --pose POSE.npz --image IMG --audio AUDIO   pose-driven: given keypoints instead of Stage I
    engine demo --out demo.mp4                                the bundled portrait + speech, no download
    engine export ...                                         ONNX / TensorRT artifacts (see `engine export --help`)

Every command defaults to the built-in ``tiny`` preset (random weights, untrained: its frames are not a real avatar).
Use ``--weights DIR`` (the release layout, see ``python -m mmgt.weights --help``) for the real model.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from engine.settings import OFFLINE, RenderSettings

log = logging.getLogger("engine")
ASSETS = Path(__file__).resolve().parent / "assets"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Shared flags
# ----------------------------------------------------------------------------------------------------------------
def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from mmgt.config import DEFAULT_PRESET, PRESETS

    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help=f"built-in model preset (default {DEFAULT_PRESET!r}: toy widths, seeded random weights, "
                          "runs on a CPU, output is untrained noise). 'mmgt' alone has the release's sizes but random "
                          "weights; use --weights for the trained model")
    src.add_argument("--weights", metavar="DIR", type=Path,
                     help="release weights directory (MMGT_pretrained/, stable-diffusion-v1-5/, sd-vae-ft-mse/, ...); "
                          "implies the 'mmgt' sizes. Nothing is downloaded")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="Stage II compute dtype (default: fp16 on GPU, fp32 on CPU)")
    g.add_argument("--tiny-decoder", metavar="DIR", type=Path, default=None,
                   help="decode frames with a light AutoencoderTiny (TAESD architecture) from this local diffusers "
                        "directory instead of the SD VAE: several times faster, slightly softer. Its weights are "
                        "yours to supply (trained for SD latents)")
    g.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "max-autotune-no-cudagraphs"], metavar="MODE",
                   help="torch.compile the denoiser and the frame decoder (fixed shapes; compiled during a warm-up "
                        "before the run, a minute or two per shape, then every step is faster; worth it on a GPU). "
                        "MODE max-autotune-no-cudagraphs also tunes the matmul/conv kernels (much longer to compile)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay the denoiser step, the frame decoder and the SMGA pose step as CUDA graphs (captured "
                        "during the warm-up; removes per-kernel launch overhead; CUDA only; combines with --compile)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny preset on a CPU, whose ops are too small to gain "
                        "from more; torch's own choice otherwise). CPU frames depend slightly on it: equal counts "
                        "give equal frames")


def _add_settings_flags(p: argparse.ArgumentParser, base: RenderSettings) -> None:
    g = p.add_argument_group("scheduling and sampling (defaults from engine/settings.py)")
    g.add_argument("--steps", type=int, help="Stage II denoising steps (default: the preset's; reference quality 30)")
    g.add_argument("--guidance", type=float,
                   help="Stage II classifier-free guidance scale (1.0 = off, one UNet pass; reference 3.5)")
    g.add_argument("--smga-steps", type=int, help="Stage I (pose) DDIM steps (default: the preset's; reference 50)")
    g.add_argument("--smga-guidance", type=float, help="Stage I guidance weight (reference 2.0)")
    g.add_argument("--seed", type=int, help=f"noise seed; the same seed gives the same frames (default {base.seed})")
    g.add_argument("--window", type=int, help=f"SMGA window in frames (default {base.window} = 3.2 s)")
    g.add_argument("--hop", type=int, help=f"frames between SMGA windows (default {base.hop})")
    g.add_argument("--crossfade", type=int, help=f"pose seam frames blended between windows (default {base.crossfade})")
    g.add_argument("--chunk", type=int, help=f"Stage II frames per render chunk, <= 32 (default {base.chunk})")
    g.add_argument("--overlap", type=int, help=f"frames a chunk takes over from the previous one (default {base.overlap})")


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("backend")
    b.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch",
                   help="runtime for the Stage II networks (onnxruntime/tensorrt need `engine export` artifacts)")
    b.add_argument("--artifacts", type=Path, help="directory written by `engine export` (for onnxruntime/tensorrt)")


def _settings_from(args, base: RenderSettings) -> RenderSettings:
    return base.with_(steps=args.steps, guidance=args.guidance, smga_steps=args.smga_steps,
                      smga_guidance=args.smga_guidance, seed=args.seed, window=args.window, hop=args.hop,
                      crossfade=args.crossfade, chunk=args.chunk, overlap=args.overlap)


def _load_models(args, settings: Optional[RenderSettings] = None):
    """The ModelSet the flags ask for; ``settings`` (default: the offline preset with the flags applied) fix the
    static shapes that exported artifacts and compiled/graphed calls are chosen for."""
    import torch

    from mmgt import pipeline as P
    from mmgt.config import DEFAULT_PRESET, MMGT, get_preset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = getattr(args, "threads", None) or (1 if device == "cpu" and args.weights is None and (args.preset or DEFAULT_PRESET) ==
                               "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    if args.weights is not None:
        models = P.load_models(args.weights, MMGT, device=device, dtype=dtype)
    else:
        cfg = get_preset(args.preset or DEFAULT_PRESET)
        models = P.build_models(cfg, device=device, dtype=dtype)
    if not models.cfg.trained:
        log.warning("preset %r: %s", models.cfg.name, P.UNTRAINED_NOTE)
    if getattr(args, "tiny_decoder", None) is not None:
        from mmgt.vae import load_tiny_decoder

        try:
            models.decoder = load_tiny_decoder(args.tiny_decoder).to(models.device, models.dtype)
        except (OSError, ValueError) as e:
            raise CLIError(f"--tiny-decoder {args.tiny_decoder}: {e}") from e
        log.info("decoding with the tiny decoder from %s", args.tiny_decoder)
    settings = settings or _settings_from(args, OFFLINE)
    backend = getattr(args, "backend", "torch")
    compile_, graphs = getattr(args, "compile", None) or False, getattr(args, "cuda_graphs", False)
    if backend != "torch":
        from engine.backends import apply_backend

        if compile_ or graphs:
            raise CLIError(f"--compile / --cuda-graphs are options of the torch backend, not of --backend {backend}")
        if args.artifacts is None:
            raise CLIError(f"--backend {backend} needs --artifacts DIR (made by `engine export`)")
        models = apply_backend(models, backend, args.artifacts, settings=settings)
    elif compile_ or graphs:
        from engine.backends import BackendUnavailable, accelerate

        try:
            models = accelerate(models, settings, compile=compile_, cuda_graphs=graphs)
        except BackendUnavailable as e:
            raise CLIError(f"--cuda-graphs: {e}") from e
        log.info("torch path: %s (paid in the warm-up before the run)",
                 " + ".join(n for n, on in (("torch.compile", compile_), ("CUDA graphs", graphs)) if on))
    return models


def _wants_warm_up(args) -> bool:
    """Compiled or graphed calls are built on their first call: do that before the run, not inside it."""
    return bool(getattr(args, "compile", False) or getattr(args, "cuda_graphs", False))


def _read_image(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise CLIError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{path}: not a readable image ({e})") from e


def _check_output(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise CLIError(f"{path}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{path}: output directory {parent} is not writable")
    if path.is_dir():
        raise CLIError(f"{path}: is a directory; give a file name ending in .mp4")


# ----------------------------------------------------------------------------------------------------------------
# render / demo
# ----------------------------------------------------------------------------------------------------------------
def _render(args, image_path: Path, audio_path: Path) -> int:
    from tqdm import tqdm

    from engine.runner import Runner
    from engine.sinks import Mp4Sink
    from mmgt import pipeline as P
    from mmgt.audio_io import AudioError, load_audio
    from mmgt.keypoints import load_pose_file

    settings = _settings_from(args, OFFLINE)
    out = Path(args.out)
    # 1. every input is checked before a model is loaded: a bad file costs nothing
    _check_output(out)
    image = _read_image(image_path)
    try:
        audio = load_audio(audio_path)
    except AudioError as e:
        raise CLIError(str(e)) from e
    poses = None
    if args.pose is not None:
        try:
            poses = load_pose_file(args.pose)
        except (OSError, ValueError) as e:
            raise CLIError(str(e)) from e
    # 2. models, avatar, run
    models = _load_models(args, settings)
    avatar = P.prepare_avatar(models, image, pose_file=args.init_pose, weights_dir=args.weights)
    log.info("initial pose: %s", avatar.pose_method)
    runner = Runner(models, avatar, settings, poses=poses)
    if _wants_warm_up(args):
        log.info("warming up (compile / graph capture) ...")
        runner.warm_up()
    sink = Mp4Sink(out, audio)
    total = max(1, round(len(audio) * 25 / 16000))
    with tqdm(total=total, unit="frame", desc=f"render {out.name}", disable=args.quiet or None) as bar:
        report = runner.run(audio, sink, progress=bar.update)
    if args.metrics_json:
        report.to_json(args.metrics_json)
    print(f"wrote {out}: {report.summary()}" + (f" [{report.note}]" if report.note else ""))
    return 0


def cmd_render(args) -> int:
    if args.image is None or args.audio is None:
        raise CLIError("render needs --image IMG and --audio AUDIO (or run `engine demo`)")
    return _render(args, args.image, args.audio)


def cmd_demo(args) -> int:
    args.pose = args.init_pose = None
    return _render(args, ASSETS / "portrait.jpg", ASSETS / "speech.flac")


# ----------------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    # render
    r = sub.add_parser("render", help="render audio + one image into an mp4 (any length)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Render a talking, gesturing upper-body video of the person in --image speaking "
                                   "--audio. Stage I (SMGA) turns audio into poses window by window while Stage II "
                                   "renders the previous window; the mp4 (H.264 + AAC, the source audio in sync) is "
                                   "written to a temporary file and renamed only when complete.")
    io = r.add_argument_group("input and output")
    io.add_argument("--image", type=Path, help="reference image of the person (any size; centre-cropped to square)")
    io.add_argument("--audio", type=Path, help="speech: any file PyAV reads (wav, mp3, flac, m4a, mp4 audio ...)")
    io.add_argument("--out", type=Path, required=True, help="output .mp4 path")
    io.add_argument("--pose", type=Path, help="pose-driven mode: keypoints (F, 134, 3) .npz/.npy/.json replace Stage I")
    io.add_argument("--init-pose", type=Path, help="initial pose of the reference image (134, 3) instead of "
                    "DWPose / the built-in template")
    io.add_argument("--metrics-json", type=Path, help="write the run's metrics (latency, RTF, stage times) here")
    _add_model_flags(r)
    _add_settings_flags(r, OFFLINE)
    _add_backend_flags(r)
    r.set_defaults(func=cmd_render)

    # demo
    d = sub.add_parser("demo", help="render the bundled portrait and speech (no download, tiny preset)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", type=Path, default=Path("demo.mp4"), help="output .mp4 path")
    d.add_argument("--metrics-json", type=Path, help="write the run's metrics here")
    _add_model_flags(d)
    _add_settings_flags(d, OFFLINE)
    d.set_defaults(func=cmd_demo, backend="torch", artifacts=None)

    # commands that live in their own modules (imported here, inside the composition root, and nowhere else)
    from engine.batch import add_batch_parser
    from export.cli import add_export_parser
    from streaming.cli import add_serve_parser

    add_export_parser(sub)
    add_serve_parser(sub)
    add_batch_parser(sub)
    return ap


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.INFO if verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        for noisy in ("diffusers", "transformers", "PIL", "numba", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # -v/-q are global flags; accept them after the command too (`engine render ... -q`)
    flags = [a for a in argv if a in ("-q", "--quiet", "--verbose") or (len(a) > 1 and set(a[1:]) == {"v"} and a[0] == "-")]
    args = ap.parse_args(flags + [a for a in argv if a not in flags])
    if not getattr(args, "command", None):
        ap.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"engine {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Exception as e:  # one line for known failure types, the traceback with -v
        from engine.runner import RenderCancelled
        from engine.sinks import SinkError
        from mmgt.weights import WeightsError

        if isinstance(e, (WeightsError, SinkError, RenderCancelled, ValueError, FileNotFoundError)) and not args.verbose:
            print(f"engine {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
