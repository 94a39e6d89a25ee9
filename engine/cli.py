"""`engine`: the command line (the composition root).

    engine render --image IMG --audio AUDIO --out OUT.mp4     offline render of any length (tiny preset by default)
    engine render --pose POSE.npz --image IMG --audio AUDIO   pose-driven: given keypoints instead of Stage I
    engine demo --out demo.mp4                                the bundled portrait + speech, no download
    engine export ...                                         ONNX / TensorRT artifacts (see `engine export --help`)
    engine serve                                              the live avatar over WebRTC (see `engine serve --help`)
    engine live                                               the avatar to a virtual camera + sound device, no browser
    engine batch JOBS.jsonl --out-dir DIR                     many renders from a manifest, resumable (optional Ray)
    engine weights fetch|check|convert DIR                    download, verify or convert the release weights
    engine doctor [--weights DIR]                             what this machine has for the engine, what is missing

Every command defaults to the built-in ``tiny`` preset (random weights, untrained: its frames are not a real avatar).
Use ``--weights DIR`` (the release layout; ``engine weights fetch DIR`` downloads it) for the real model.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from engine.batch.cli import add_batch_parser
from engine.doctor import add_doctor_parser
from engine.models import ExportSource, load_model_set, prepare_avatar
from engine.options import (ASSETS, CLIError, add_audio_bitrate_flag, add_backend_flags, add_model_flags,
                            add_settings_flags, check_output, read_image, settings_from, setup_logging)
from engine.settings import OFFLINE
from engine.weights_cmd import add_weights_parser

log = logging.getLogger("engine")


def _wants_warm_up(args) -> bool:
    """Compiled or graphed calls are built on their first call: do that before the run, not inside it."""
    return bool(getattr(args, "compile", False) or getattr(args, "cuda_graphs", False))


# ----------------------------------------------------------------------------------------------------------------
# render / demo
# ----------------------------------------------------------------------------------------------------------------
def _render(args, image_path: Path, audio_path: Path) -> int:
    from tqdm import tqdm

    from engine.metrics import CallLog
    from engine.runner import Runner
    from engine.sinks import Mp4Sink
    from engine.source_audio import SourceAudio
    from mmgt.audio_io import AudioError, load_audio
    from mmgt.keypoints import load_pose_file

    settings = settings_from(args, OFFLINE)
    out = Path(args.out)
    # 1. every input is checked before a model is loaded: a bad file costs nothing
    check_output(out)
    image = read_image(image_path)
    try:
        audio = load_audio(audio_path)  # (N,) the model's 16 kHz mono copy
        source = SourceAudio.probe(audio_path)  # what the mp4 carries: the source's own audio
    except AudioError as e:
        raise CLIError(str(e)) from e
    poses = None
    if args.pose is not None:
        try:
            poses = load_pose_file(args.pose)
        except (OSError, ValueError) as e:
            raise CLIError(str(e)) from e
    # 2. models, avatar, run (every network call noted with its backend, for the metrics)
    call_log = CallLog()
    models = call_log.observe(load_model_set(args, settings))
    avatar = prepare_avatar(models, image, pose_file=args.init_pose, weights_dir=args.weights)
    log.info("initial pose: %s", avatar.pose_method)
    runner = Runner(models, avatar, settings, poses=poses, call_log=call_log)
    if _wants_warm_up(args):
        log.info("warming up (compile / graph capture) ...")
        runner.warm_up()
    sink = Mp4Sink(out, source, audio_bitrate=args.audio_bitrate)
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


def cmd_export(args) -> int:
    """`engine export`: export.cli runs it, with the networks engine.models loads (export imports no engine)."""
    from export.cli import run_export

    return run_export(args, ExportSource.from_args(args))


# ----------------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------------
def add_render_parser(sub) -> argparse.ArgumentParser:
    """`engine render`."""
    r = sub.add_parser("render", help="render audio + one image into an mp4 (any length)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Render a talking, gesturing upper-body video of the person in --image speaking "
                                   "--audio. Stage I (SMGA) turns audio into poses window by window while Stage II "
                                   "renders the previous window; the mp4 (H.264 + the source's own audio at its sample "
                                   "rate and channels, in sync) is written to a temporary file and renamed only when "
                                   "complete.")
    io = r.add_argument_group("input and output")
    io.add_argument("--image", type=Path, help="reference image of the person (any size; centre-cropped to square)")
    io.add_argument("--audio", type=Path, help="speech: any file PyAV reads (wav, mp3, flac, m4a, mp4 audio ...)")
    io.add_argument("--out", type=Path, required=True, help="output .mp4 path")
    io.add_argument("--pose", type=Path, help="pose-driven mode: keypoints (F, 134, 3) .npz/.npy/.json replace Stage I")
    io.add_argument("--init-pose", type=Path, help="initial pose of the reference image (134, 3) instead of "
                    "DWPose / the built-in template")
    io.add_argument("--metrics-json", type=Path, help="write the run's metrics (latency, RTF, stage times) here")
    add_audio_bitrate_flag(io)
    add_model_flags(r)
    add_settings_flags(r, OFFLINE)
    add_backend_flags(r)
    r.set_defaults(func=cmd_render)
    return r


def add_demo_parser(sub) -> argparse.ArgumentParser:
    """`engine demo`: render with the bundled inputs."""
    d = sub.add_parser("demo", help="render the bundled portrait and speech (no download, tiny preset)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", type=Path, default=Path("demo.mp4"), help="output .mp4 path")
    d.add_argument("--metrics-json", type=Path, help="write the run's metrics here")
    add_audio_bitrate_flag(d)
    add_model_flags(d)
    add_settings_flags(d, OFFLINE)
    d.set_defaults(func=cmd_demo, backend="torch", artifacts=None)
    return d


def build_parser() -> argparse.ArgumentParser:
    """The `engine` parser. Building it imports no torch (engine --help and argument errors stay fast): every
    module named here keeps its heavy imports inside the command functions."""
    ap = argparse.ArgumentParser(
        prog="engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    # export and streaming are imported here, inside the composition root, and nowhere else in the engine
    from export.cli import add_export_parser
    from streaming.cli import add_live_parser, add_serve_parser

    # one line per sub-command
    add_render_parser(sub)
    add_demo_parser(sub)
    add_export_parser(sub).set_defaults(func=cmd_export)
    add_serve_parser(sub)
    add_live_parser(sub)
    add_batch_parser(sub)
    add_weights_parser(sub)
    add_doctor_parser(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # -v/-q are global flags; accept them after the command too (`engine render ... -q`)
    flags = [a for a in argv
             if a in ("-q", "--quiet", "--verbose") or (len(a) > 1 and set(a[1:]) == {"v"} and a[0] == "-")]
    args = ap.parse_args(flags + [a for a in argv if a not in flags])
    if not getattr(args, "command", None):
        ap.print_help()
        return 2
    setup_logging(args.verbose, args.quiet)
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

        known = (WeightsError, SinkError, RenderCancelled, ValueError, FileNotFoundError)
        if isinstance(e, known) and not args.verbose:
            print(f"engine {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
