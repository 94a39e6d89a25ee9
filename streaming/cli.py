"""`engine serve` (the live presenter over WebRTC) and `engine live` (to a virtual camera and a sound device) from the
command line.

Kept light on purpose: ``engine --help`` imports this module, so aiohttp, aiortc, pyvirtualcam, sounddevice and torch
are imported only inside :func:`cmd_serve` and :func:`cmd_live`. The shared flags and the model set come from the
engine (engine.options, engine.models).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import textwrap
from pathlib import Path

from engine.options import (ASSETS, CLIError, RawDefaultsHelpFormatter, add_model_flags, add_settings_flags,
                            read_image, settings_from)
from engine.preflight import check_model_flags, live_settings
from engine.settings import LIVE, LIVE_CPU

log = logging.getLogger("engine.serve")

REACH = """\
reaching it from another machine:
  The page and signalling (HTTP) listen on --host:--port, 127.0.0.1:8080 by default, so only this machine can open
  it. To serve other machines, bind a reachable address and open the ports:
      engine serve --host 0.0.0.0 --port 8080 --udp-ports 40000-40100
  then browse to http://<this machine's address>:8080/ and allow TCP 8080 plus UDP 40000-40100 (the WebRTC media:
  every session's ICE host candidates bind ports in --udp-ports) in the firewall. Without --udp-ports the media uses
  random ephemeral UDP ports. --media-address pins the address(es) offered for media when the machine has several.
  Browsers allow the microphone only on https:// or http://localhost: from another machine use an https reverse
  proxy (or an SSH tunnel for the page and signalling, ssh -L 8080:127.0.0.1:8080 host, then
  http://localhost:8080/; the media still needs the UDP range), or pick "file" as the source on the page.
  No STUN/TURN server is used: client and server must reach each other's addresses directly.
"""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1-65535, got {value}")
    return value


def _port_range(text: str):
    from streaming.server import parse_port_range

    try:
        return parse_port_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str, unit: str, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {unit}, e.g. {example}, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_ms(text: str) -> float:
    return _positive_float(text, "milliseconds", "400")


def add_voice_flag(parser, what: str = "the spoken text (POST /say)") -> None:
    """``--voice``: the text-to-speech voice (streaming.tts.make_tts reads it) for ``what``."""
    parser.add_argument("--voice", metavar="NAME|FILE.onnx",
                        help=f"text-to-speech voice for {what}: an espeak-ng voice name "
                             "(default: espeak-ng's own; `espeak-ng --voices` lists them) or a piper voice model "
                             "FILE.onnx with FILE.onnx.json beside it (the piper extra: pip install "
                             "'mmgt-engine[piper]')")


def _describe(s) -> str:
    """The numbers of a live settings preset, in a few words."""
    steps = "the preset's denoising steps" if s.steps is None else f"{s.steps} denoising step{'s' * (s.steps != 1)}"
    return (f"hop {s.hop}, lookahead {s.lookahead}, chunk {s.chunk}, overlap {s.overlap}, {steps}, "
            f"{s.smga_steps} pose steps")


def _fill(text: str) -> str:
    """A paragraph of a hand-laid-out help text, wrapped as argparse wraps the rest."""
    return textwrap.fill(text, max(40, shutil.get_terminal_size().columns - 2))


def _add_start_margin(group) -> None:
    """--start-margin (serve and live): the session's playout delay (SessionOptions.start_margin)."""
    group.add_argument("--start-margin", type=float, default=0.25,
                       help="playout delay after the first frame, absorbs render jitter (seconds, default 0.25)")


def _check_live_flags(args) -> None:
    """The model and settings flags of serve and live, checked without torch (CLIError naming the flag): the
    settings against the base this machine gets; the run's own settings come later (_live_run_settings)."""
    check_model_flags(args)
    settings_from(args, live_settings(args.device)[1])


def _live_run_settings(args):
    """The live settings of this run: LIVE on a GPU, LIVE_CPU on a CPU, with the flags given. The base picked without
    torch (--help, the early flag checks) is checked against the device torch decides: a driver it cannot use (a CPU
    build of torch) means the CPU settings after all. The rolling schedule gets the preset's steps filled in."""
    from engine.models import resolve_device, with_preset_steps

    name, base, why = live_settings(args.device)
    if resolve_device(args.device).startswith("cuda") != (base is LIVE):
        name, base, why = ("LIVE", LIVE, "torch sees a GPU") if base is not LIVE else ("LIVE_CPU", LIVE_CPU,
                                                                                      "torch sees no GPU")
    settings = with_preset_steps(settings_from(args, base), args)
    log.info("live settings: %s (%s), with the flags given: %s", name, why, settings)
    return settings


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` command to the `engine` command line."""
    name, base, why = live_settings()  # on this machine, decided without torch (a GPU driver or not)
    p = subparsers.add_parser(
        "serve", help="live avatar over WebRTC: a demo page, microphone or file in, avatar video + audio out",
        formatter_class=RawDefaultsHelpFormatter, epilog=REACH,
        description=_fill(
            "Serve the live presenter: open http://HOST:PORT/ in a browser, press start, speak (or pick an audio "
            "file); the avatar video and the matching audio come back over WebRTC, on one media clock. While nobody "
            "speaks the avatar idles. The models are loaded once and shared by all sessions, each with its own "
            "avatar (--image, --avatars, or uploaded on the page). Text typed on the page (or POST /say/SESSION) is "
            "spoken by the avatar (espeak-ng, or --voice), and Interrupt (POST /interrupt/SESSION) stops it "
            "mid-sentence. The calls that sessions make at the same time can run as one batched call "
            "(--batching).") + "\n\n" + _fill(
            f"Scheduling on this machine: engine/settings.py {name} ({_describe(base)}), because {why}. "
            f"engine/settings.py LIVE is for a GPU ({_describe(LIVE)}), LIVE_CPU for a CPU ({_describe(LIVE_CPU)}); "
            "both wait for 10 frames (400 ms) of audio at most. --device picks the other one, the flags below "
            "override single values, and --latency-target picks the layout by measurement."))
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="HTTP bind address for the page and signalling (default 127.0.0.1: this machine only; "
                          "0.0.0.0 for every interface)")
    net.add_argument("--port", type=_port, default=8080, help="HTTP port (default 8080)")
    net.add_argument("--udp-ports", type=_port_range, metavar="MIN-MAX",
                     help="UDP port range for the WebRTC media (ICE); open it in the firewall (default: ephemeral)")
    net.add_argument("--media-address", action="append", metavar="ADDR",
                     help="offer media only on this local address (repeatable; default: every non-loopback one)")
    net.add_argument("--max-sessions", type=_positive, default=None,
                     help="concurrent sessions; more offers get HTTP 503 (default: measured at start-up, the most "
                          "sessions this machine renders at once in real time with a 20%% margin)")
    net.add_argument("--batching", choices=["auto", "on", "off"], default="auto",
                     help="run the network calls that sessions make at the same time as one batched call (auto: on a "
                          "GPU; on a CPU the sessions' own threads use the cores better)")
    net.add_argument("--idle-timeout", type=float, default=15.0,
                     help="free a session whose client sent nothing (no RTCP) for this many seconds (default 15)")
    src = p.add_argument_group("audio input")
    src.add_argument("--mic", action="store_true",
                     help="drive every session from this machine's microphone (sounddevice) instead of the browser's")
    src.add_argument("--mic-device", metavar="DEV", help="input device index or name for --mic (default: system's)")
    add_voice_flag(src)
    av = p.add_argument_group("avatar")
    av.add_argument("--image", type=Path, help="reference image of the person, the avatar a session gets unless it "
                                               "picks another (default: the bundled portrait)")
    av.add_argument("--avatars", type=Path, metavar="DIR",
                    help="every image in DIR is an avatar a session can pick (id = file name without extension); "
                         "the page lists them and can upload more")
    av.add_argument("--init-pose", type=Path, help="initial pose of the reference image (134, 3) .npz/.npy/.json")
    live = p.add_argument_group("live session")
    live.add_argument("--queue-frames", type=_positive,
                      help="per-session frame queue; a slow client drops the oldest frames beyond it (default: 100, "
                           "or what the chunk layout needs if more)")
    live.add_argument("--latency-target", type=_positive_ms, metavar="MS",
                      help="pick the live layout by measurement at start-up: the lowest structural latency (audio a "
                           "frame waits for, in ms; 400 = 10 frames) within MS whose sessions (--max-sessions, or 1) "
                           "render in real time here; the log prints the choice. Latency for one session, capacity "
                           "for many: a smaller target admits fewer. Default: the preset's layout (10 frames)")
    _add_start_margin(live)
    add_model_flags(p)
    add_settings_flags(p, base, name)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    """Load the models and the avatar once, then serve until Ctrl-C."""
    from engine.extras import require_extra

    # 1. the flags, before anything heavy is imported
    _check_live_flags(args)
    # 2. the optional live stack (and the microphone's), before a model is loaded: one line naming the extra
    require_extra("serve")
    if args.mic:
        require_extra("mic", "--mic")
    from engine.models import load_model_set, prepare_avatar
    from streaming.server import ServerConfig, serve
    from streaming.session import SessionOptions, min_queue_frames
    from streaming.tts import TTSUnavailable, make_tts

    # 3. a /say voice asked for by name must work: checked before a model is loaded (without --voice the server
    # makes espeak-ng's default; where that is missing it serves anyway and /say answers 503 saying how to get it)
    tts = None
    if args.voice:
        try:
            tts = make_tts(args.voice)
        except TTSUnavailable as e:
            raise CLIError(f"--voice: {e}") from e

    settings = _live_run_settings(args)
    try:
        queue = args.queue_frames or max(100, min_queue_frames(settings))
        options = SessionOptions(settings=settings, queue_frames=queue, start_margin=args.start_margin)
        options.layout()
    except ValueError as e:
        raise CLIError(str(e)) from e
    from streaming.avatars import AvatarError, AvatarStore

    image = read_image(args.image or ASSETS / "portrait.jpg")
    models = load_model_set(args, settings)
    avatars = AvatarStore(lambda im: prepare_avatar(models, im, weights_dir=args.weights))
    default = prepare_avatar(models, image, pose_file=args.init_pose, weights_dir=args.weights)
    avatars.add(Path(args.image).stem if args.image else "portrait", default.image, "default", default=True)
    avatars.seed(avatars.default_id, default)
    if args.avatars is not None:
        try:
            avatars.add_folder(args.avatars)
        except AvatarError as e:
            raise CLIError(f"--avatars: {e}") from e
    config = ServerConfig(host=args.host, port=args.port, max_sessions=args.max_sessions, udp_ports=args.udp_ports,
                          media_addresses=tuple(args.media_address) if args.media_address else None,
                          idle_timeout=args.idle_timeout, mic=args.mic, mic_device=args.mic_device, session=options,
                          batch={"auto": None, "on": True, "off": False}[args.batching],
                          voice=args.voice, latency_target_ms=args.latency_target)
    where = f"http://{'localhost' if args.host in ('127.0.0.1', 'localhost') else args.host}:{args.port}/"
    limit = args.max_sessions or "the measured number of"
    print(f"engine serve: {where} (preset {models.cfg.name}, {len(avatars.list())} avatar(s), up to {limit} "
          "sessions; Ctrl-C stops)", flush=True)
    from engine.sources import AudioDeviceError

    try:
        serve(models, avatars, config, tts=tts)
    except AudioDeviceError as e:
        raise CLIError(f"--mic: {e}") from e
    except OSError as e:  # the HTTP port is taken or the address is not ours
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e}") from e
    return 0


# ----------------------------------------------------------------------------------------------------------------
# engine live
# ----------------------------------------------------------------------------------------------------------------
LIVE_EPILOG = """\
a virtual camera:
  Linux: the v4l2loopback module (apt-get install v4l2loopback-dkms), loaded with
      {MODPROBE}
  then `engine live --camera-device /dev/video10`; call apps list it as "MMGT". Windows and macOS: OBS Studio's
  Virtual Camera (install OBS 28+, start its virtual camera once).
the audio as a call app's microphone (PipeWire or PulseAudio):
      pactl load-module module-null-sink sink_name=mmgt sink_properties=device.description=MMGT
      PULSE_SINK=mmgt engine live --audio-device pulse ...
  and pick "Monitor of MMGT" as the microphone in the call app (README: "engine live").
typed text: every line on stdin is spoken; a line starting with ! interrupts first (a lone ! only interrupts).
"""


def _size(text: str):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1280x720, got {text!r}") from None
    if not (16 <= w <= 7680 and 16 <= h <= 4320):
        raise argparse.ArgumentTypeError(f"size must be within 16x16 and 7680x4320, got {text}")
    return w, h


def _device(text: str):
    """A sound device: its index (digits) or (part of) its name."""
    return int(text) if text.isdigit() else text


def _seconds(text: str) -> float:
    return _positive_float(text, "seconds", "30")


def add_live_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `live` command to the `engine` command line."""
    from .live import MODPROBE

    name, base, why = live_settings()  # on this machine, decided without torch (a GPU driver or not)
    p = subparsers.add_parser(
        "live", help="the presenter on this machine: microphone or text in, a virtual camera (and/or a preview "
                     "window) plus the matching audio out, for call apps",
        formatter_class=RawDefaultsHelpFormatter, epilog=LIVE_EPILOG.format(MODPROBE=MODPROBE),
        description=_fill(
            "Run the live presenter without a browser: the avatar speaks what the microphone hears (--mic) and the "
            "text it is given (--say-file, lines typed on stdin), idles in between, and goes to a virtual camera "
            "(pyvirtualcam) and/or a preview window, with the matching audio on a sound device, delayed by the "
            "device's own buffer so the camera frame and the sound of each 40 ms leave together.") + "\n\n" + _fill(
            f"Scheduling on this machine: engine/settings.py {name} ({_describe(base)}), because {why}; as for "
            "`engine serve` (LIVE on a GPU, LIVE_CPU on a CPU), the flags below override single values."))
    src = p.add_argument_group("input")
    src.add_argument("--mic", action="store_true", help="drive the avatar with this machine's microphone "
                                                        "(sounddevice)")
    src.add_argument("--mic-device", type=_device, metavar="DEV", help="input device index or name for --mic")
    src.add_argument("--say-file", type=Path, metavar="FILE", help="a UTF-8 text file the avatar says at start")
    src.add_argument("--no-stdin", action="store_true", help="do not read lines to say from stdin")
    add_voice_flag(src, "--say-file and typed lines")
    out = p.add_argument_group("output")
    out.add_argument("--no-camera", action="store_true", help="no virtual camera (then --preview is needed)")
    out.add_argument("--camera-device", metavar="DEV",
                     help="virtual camera device: /dev/videoN on Linux (default: the first v4l2loopback device), the "
                          "camera's name elsewhere")
    out.add_argument("--camera-backend", metavar="NAME",
                     help="pyvirtualcam backend: v4l2loopback (Linux), obs (Windows, macOS), unitycapture (Windows); "
                          "default: any that works")
    out.add_argument("--camera-size", type=_size, metavar="WxH",
                     help="size the camera sends, e.g. 1280x720: the avatar scaled to fit, edges extended (default: "
                          "the frame's own size)")
    out.add_argument("--preview", action="store_true", help="show the avatar in a window (tkinter)")
    out.add_argument("--no-audio", action="store_true", help="do not play the audio")
    out.add_argument("--audio-device", type=_device, metavar="DEV",
                     help="output device index or name for the audio (default: the system's; `python -m sounddevice` "
                          "lists them): a null sink a call app takes as its microphone, see below")
    run = p.add_argument_group("run")
    run.add_argument("--duration", type=_seconds, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    run.add_argument("--exit-when-done", action="store_true",
                     help="stop once the text (--say-file, stdin until it closes) has been said and played")
    _add_start_margin(run)
    av = p.add_argument_group("avatar")
    av.add_argument("--image", type=Path, help="reference image of the person (default: the bundled portrait)")
    av.add_argument("--init-pose", type=Path, help="initial pose of the reference image (134, 3) .npz/.npy/.json")
    add_model_flags(p)
    add_settings_flags(p, base, name)
    p.set_defaults(func=cmd_live)
    return p


def cmd_live(args) -> int:
    """Open the outputs, load the models and the avatar, then present until Ctrl-C (or --duration / done)."""
    from engine.extras import require_extra
    from engine.models import ModelOptions

    from .live import LiveOptions, OutputError, open_outputs

    # 1. what is asked for, and the extras it needs, before anything is opened or loaded
    _check_live_flags(args)
    if args.no_camera and not args.preview:
        raise CLIError("--no-camera needs --preview: the avatar must go somewhere")
    modules = (["pyvirtualcam"] if not args.no_camera else []) + (
        ["sounddevice"] if args.mic or not args.no_audio else [])
    require_extra("live", modules=modules)
    text = None
    if args.say_file is not None:
        try:
            text = args.say_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--say-file {args.say_file}: {e}") from e
    tts, tts_error = _live_tts(args, needed=text is not None)
    # 2. the outputs (a missing virtual camera is one line saying how to create one)
    cfg = ModelOptions.from_args(args).config
    options = LiveOptions(camera=not args.no_camera, camera_device=args.camera_device,
                          camera_backend=args.camera_backend, camera_size=args.camera_size, preview=args.preview,
                          audio=not args.no_audio, audio_device=args.audio_device)
    try:
        outputs = open_outputs(options, (cfg.resolution, cfg.resolution))
    except OutputError as e:
        raise CLIError(str(e)) from e
    try:
        return _present(args, outputs, text, tts, tts_error)
    finally:
        for out in outputs[:2]:
            if out is not None:
                out.close()


def _live_tts(args, needed: bool):
    """(tts engine, why there is none): --voice must work; without it espeak-ng's default where installed."""
    from streaming.tts import TTSUnavailable, make_tts

    try:
        return make_tts(args.voice), None
    except TTSUnavailable as e:
        if args.voice or needed:
            raise CLIError(f"{'--voice' if args.voice else '--say-file'}: {e}") from e
        return None, str(e)


def _present(args, outputs, text, tts, tts_error) -> int:
    """Models, avatar, session, player; present; print the one-line summary."""
    import json

    from engine.models import load_model_set, prepare_avatar
    from engine.sources import AudioDeviceError

    from .live import LivePresenter, TextInput, start_microphone, stdin_or_none
    from .player import SlotPlayer
    from .session import SessionCore, SessionOptions, min_queue_frames

    settings = _live_run_settings(args)
    try:
        options = SessionOptions(settings=settings, queue_frames=max(100, min_queue_frames(settings)),
                                 start_margin=args.start_margin)
        options.layout()
    except ValueError as e:
        raise CLIError(str(e)) from e
    image = read_image(args.image or ASSETS / "portrait.jpg")
    models = load_model_set(args, settings)
    avatar = prepare_avatar(models, image, pose_file=args.init_pose, weights_dir=args.weights)
    session = SessionCore(models, avatar, options, session_id="live", tts=tts, tts_error=tts_error)
    camera, audio, preview = outputs
    presenter = LivePresenter(session, SlotPlayer(session), camera=camera, audio=audio, preview=preview)
    mic = None
    if args.mic:
        try:
            mic = start_microphone(session, args.mic_device)
        except AudioDeviceError as e:
            session.close("no microphone")
            raise CLIError(f"--mic: {e}") from e
    inputs = TextInput(session, text, None if args.no_stdin else stdin_or_none())
    inputs.start()
    where = ", ".join(w for w in (f"camera {camera.device}" if camera else "", "preview" if preview else "",
                                  f"audio on {audio.name}" if audio else "") if w)
    print(f"engine live: {where} (preset {models.cfg.name}; Ctrl-C stops)", flush=True)
    try:
        presenter.run(duration=args.duration, done=inputs.done if args.exit_when_done else None)
    finally:
        if mic is not None:
            mic.close()
    print(f"engine live: stopped: {json.dumps(presenter.summary())}", flush=True)
    return 0


__all__ = ["add_serve_parser", "cmd_serve", "add_live_parser", "cmd_live", "REACH"]
