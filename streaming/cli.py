"""`engine serve`: the live presenter (WebRTC) from the command line.

Kept light on purpose: ``engine --help`` imports this module, so aiohttp, aiortc and torch are imported only inside
:func:`cmd_serve`. The shared flags and the model set come from the engine (engine.options, engine.models).
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


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, e.g. 400, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 ms, got {text}")
    return value


def add_voice_flag(parser) -> None:
    """``--voice``: the text-to-speech voice (streaming.tts.make_tts reads it)."""
    parser.add_argument("--voice", metavar="NAME|FILE.onnx",
                        help="text-to-speech voice for the spoken text (POST /say): an espeak-ng voice name "
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
    live.add_argument("--start-margin", type=float, default=0.25,
                      help="playout delay after the first frame, absorbs render jitter (seconds, default 0.25)")
    add_model_flags(p)
    add_settings_flags(p, base, name)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    """Load the models and the avatar once, then serve until Ctrl-C."""
    from engine.extras import require_extra

    # 1. the flags, before anything heavy is imported (the settings are checked against the base this machine gets)
    check_model_flags(args)
    name, base, why = live_settings(args.device)
    settings = settings_from(args, base)
    # 2. the optional live stack (and the microphone's), before a model is loaded: one line naming the extra
    require_extra("serve")
    if args.mic:
        require_extra("mic", "--mic")
    from engine.models import load_model_set, prepare_avatar, resolve_device, with_preset_steps
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

    # 4. torch decides the device; a driver it cannot use (a CPU build of torch) means the CPU settings after all
    if resolve_device(args.device).startswith("cuda") != (base is LIVE):
        name, base, why = ("LIVE", LIVE, "torch sees a GPU") if base is not LIVE else ("LIVE_CPU", LIVE_CPU,
                                                                                      "torch sees no GPU")
        settings = settings_from(args, base)
    settings = with_preset_steps(settings, args)
    log.info("live settings: %s (%s), with the flags given: %s", name, why, settings)
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


__all__ = ["add_serve_parser", "cmd_serve", "REACH"]
