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
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from engine.batch.cli import add_batch_parser
from engine.doctor import add_doctor_parser
from engine.models import ExportSource, load_model_set, prepare_avatar
from engine.native_memory import limit_arenas
from engine.options import (ASSETS, CLIError, DefaultsHelpFormatter, OneLineParser, add_audio_bitrate_flag,
                            add_backend_flags, add_model_flags, add_output_flags, add_settings_flags,
                            interrupt_exit_code, read_audio, read_image, settings_from, setup_logging,
                            sigterm_as_interrupt)
from engine.preflight import check_model_flags, check_output, check_segment_seconds
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
    # 1. every input is checked before anything heavy is imported or a model is loaded: a bad one costs a second
    settings = settings_from(args, OFFLINE)
    check_model_flags(args)
    check_segment_seconds(args.segment_seconds)
    out = Path(args.out)
    check_output(out, args.overwrite)
    limit_arenas()  # an hours-long render keeps its heap flat (engine/native_memory.py); before any thread starts
    image = read_image(image_path)
    audio, source = read_audio(audio_path)  # (N,) the model's 16 kHz mono copy; the source's own audio for the mp4
    poses = None
    if args.pose is not None:
        from mmgt.keypoints import load_pose_file

        try:
            poses = load_pose_file(args.pose)
        except (OSError, ValueError) as e:
            raise CLIError(f"--pose {args.pose}: {e}") from e
    # 2. models, avatar, runner (every network call noted with its backend, for the metrics)
    from tqdm import tqdm

    from engine.metrics import CallLog
    from engine.models import ModelOptions
    from engine.resume import ResumableMp4Sink, Sidecar, fingerprint, model_identity
    from engine.runner import Runner

    call_log = CallLog()
    models = call_log.observe(load_model_set(args, settings))
    avatar = prepare_avatar(models, image, pose_file=args.init_pose, weights_dir=args.weights)
    log.info("initial pose: %s", avatar.pose_method)
    runner = Runner(models, avatar, settings, poses=poses, call_log=call_log)
    if _wants_warm_up(args):
        log.info("warming up (compile / graph capture) ...")
        runner.warm_up()
    # 3. what an interrupted run of this very command kept beside the output, if anything: continue from there
    sidecar = Sidecar(out)
    inputs = {"image": image_path, "audio": audio_path, "pose": args.pose, "init_pose": args.init_pose}
    key = fingerprint(inputs, settings, model_identity(ModelOptions.from_args(args), models))
    saved = sidecar.load(key) if sidecar.exists() and not args.restart else None
    sink = ResumableMp4Sink(out, source, sidecar, key, saved, audio_bitrate=args.audio_bitrate,
                            segment_frames=max(1, round(args.segment_seconds * 25)))
    start = saved.point if saved is not None else None
    if start is not None:
        log.info("resuming %s from frame %d (%d segments kept in %s)", out, start.frame, len(saved.segments),
                 sidecar.dir)
    # 4. the run: segments into the sidecar, joined with the source's audio into `out` at the end
    total = max(1, round(len(audio) * 25 / 16000))
    try:
        with tqdm(total=total, initial=start.frame if start else 0, unit="frame", desc=f"render {out.name}",
                  disable=args.quiet or None) as bar:
            report = runner.run(audio, sink, progress=bar.update, start=start)
    except KeyboardInterrupt as e:
        e.hint = sink.resume_hint()  # how to continue, for the one line the command prints
        raise
    if args.metrics_json:
        report.to_json(args.metrics_json)
    resumed = f" (resumed at frame {start.frame})" if start is not None else ""
    print(f"wrote {out}{resumed}: {report.summary()}" + (f" [{report.note}]" if report.note else ""))
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
    if args.out.exists() and not args.out.is_dir():  # before export.cli imports the model stack
        raise CLIError(f"--out {args.out}: is a file; export writes a directory of artifacts there")
    from export.cli import run_export

    return run_export(args, ExportSource.from_args(args))


# ----------------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------------
def add_render_parser(sub) -> argparse.ArgumentParser:
    """`engine render`."""
    r = sub.add_parser("render", help="render audio + one image into an mp4 (any length)",
                       formatter_class=DefaultsHelpFormatter,
                       description="Render a talking, gesturing upper-body video of the person in --image speaking "
                                   "--audio. Stage I (SMGA) turns audio into poses window by window while Stage II "
                                   "renders the previous window. The video (H.264) is written in segments into "
                                   ".OUT.resume/ beside OUT, with what is needed to continue exactly; at the end they "
                                   "are joined with the source's own audio (its sample rate and channels, in sync) "
                                   "into a temporary file renamed over OUT, and the folder is removed. An "
                                   "interrupted render continues from its last complete segment when the same "
                                   "command is run again (--restart starts over).")
    io = r.add_argument_group("input and output")
    io.add_argument("--image", type=Path, help="reference image of the person (any size; centre-cropped to square)")
    io.add_argument("--audio", type=Path, help="speech: any file PyAV reads (wav, mp3, flac, m4a, mp4 audio ...)")
    io.add_argument("--out", type=Path, required=True, help="output .mp4 path")
    io.add_argument("--pose", type=Path, help="pose-driven mode: keypoints (F, 134, 3) .npz/.npy/.json replace Stage I")
    io.add_argument("--init-pose", type=Path, help="initial pose of the reference image (134, 3) instead of "
                    "DWPose / the built-in template")
    io.add_argument("--metrics-json", type=Path, help="write the run's metrics (latency, RTF, stage times) here")
    add_output_flags(io)
    add_audio_bitrate_flag(io)
    add_model_flags(r)
    add_settings_flags(r, OFFLINE)
    add_backend_flags(r)
    r.set_defaults(func=cmd_render)
    return r


def add_demo_parser(sub) -> argparse.ArgumentParser:
    """`engine demo`: render with the bundled inputs."""
    d = sub.add_parser("demo", help="render the bundled portrait and speech (no download, tiny preset)",
                       formatter_class=DefaultsHelpFormatter)
    d.add_argument("--out", type=Path, default=Path("demo.mp4"), help="output .mp4 path")
    d.add_argument("--metrics-json", type=Path, help="write the run's metrics here")
    add_output_flags(d)
    add_audio_bitrate_flag(d)
    add_model_flags(d)
    add_settings_flags(d, OFFLINE)
    d.set_defaults(func=cmd_demo, backend="torch", artifacts=None)
    return d


def build_parser() -> argparse.ArgumentParser:
    """The `engine` parser. Building it imports no torch (engine --help and argument errors stay fast): every
    module named here keeps its heavy imports inside the command functions."""
    ap = OneLineParser(prog="engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    # export and streaming are imported here, inside the composition root, and nowhere else in the engine
    from export.cli import add_export_parser
    from streaming.cli import add_live_parser, add_serve_parser

    # one line per sub-command
    add_render_parser(sub)
    add_demo_parser(sub)
    export = add_export_parser(sub)
    export.set_defaults(func=cmd_export)
    export.formatter_class = DefaultsHelpFormatter  # one default per flag (export imports nothing of the engine)
    add_serve_parser(sub)
    add_live_parser(sub)
    add_batch_parser(sub)
    add_weights_parser(sub)
    add_doctor_parser(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `engine` command: its exit code. Errors are one line (the traceback with -v); Ctrl-C exits 130 and SIGTERM
    143, at any moment, with one line and nothing half-written."""
    command, argv_given = "engine", argv is not None
    try:
        with sigterm_as_interrupt():
            ap = build_parser()
            argv = list(sys.argv[1:] if argv is None else argv)
            # -v/-q are global flags; accept them after the command too (`engine render ... -q`)
            flags = [a for a in argv
                     if a in ("-q", "--quiet", "--verbose") or (len(a) > 1 and set(a[1:]) == {"v"} and a[0] == "-")]
            args = ap.parse_args(flags + [a for a in argv if a not in flags])
            if not getattr(args, "command", None):
                ap.print_help()
                return 2
            command = f"engine {args.command}"
            setup_logging(args.verbose, args.quiet)
            return _run_command(args, command)
    except KeyboardInterrupt as e:
        print(f"{command}: interrupted; {getattr(e, 'hint', None) or 'no partial output was left'}", file=sys.stderr)
        code = interrupt_exit_code(e)
    if argv_given:
        return code
    # The program itself (argv None): everything is cleaned up by now; leave without the interpreter's finalisation,
    # which after an interruption inside a half-initialised extension module can kill the process by SIGINT (exit
    # status -2 instead of 130, seen once in a few dozen interruptions while the model stack was being imported).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_command(args, command: str) -> int:
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one line for known failure types, the traceback with -v
        interrupt = _interruption(e)
        if interrupt is not None:  # Ctrl-C inside a library that turned it into its own error (an import, ...)
            raise interrupt from None
        if isinstance(e, _known_errors()) and not args.verbose:
            print(f"{command}: error: {e}", file=sys.stderr)
            return 1
        raise


def _interruption(e: BaseException) -> Optional[KeyboardInterrupt]:
    """The KeyboardInterrupt ``e`` was caused by, if any (a C extension interrupted while it initialises raises
    ImportError, and a library may wrap that again)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _known_errors() -> tuple:
    """The failure types reported as one line: those of the modules this run has imported (importing one now could
    fail again, e.g. after an interrupted import of the model stack)."""
    known = [ValueError, FileNotFoundError]
    for module, name in (("engine.runner", "RenderCancelled"), ("engine.sinks", "SinkError"),
                         ("mmgt.weights", "WeightsError")):
        if module in sys.modules:
            known.append(getattr(sys.modules[module], name))
    return tuple(known)


if __name__ == "__main__":
    sys.exit(main())
