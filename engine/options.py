"""The command-line pieces every command shares: flag groups, flags -> RenderSettings, input and output checks.

Used by ``engine/cli.py`` (render, demo), ``engine/batch/cli.py`` and ``streaming/cli.py``. Building a parser must
stay cheap (``engine --help`` and every argument error run it), so this module imports only the standard library,
``engine.settings``, ``engine.preflight`` and ``mmgt.config`` (plain dataclasses) at module level; numpy and PIL are
imported inside :func:`read_image`, PyAV inside :func:`read_audio` (no torch: a bad file is found before the models
load), ``engine.source_audio`` (whose module level is standard library only) inside :func:`add_audio_bitrate_flag`.
SIGTERM is turned into an interruption like Ctrl-C (:func:`sigterm_as_interrupt`), exit 143 instead of 130.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Iterator

from engine.preflight import CLIError, check_settings
from engine.settings import OFFLINE, SCHEDULES, RenderSettings

ASSETS = Path(__file__).resolve().parent / "assets"  # the bundled portrait and speech (engine demo, engine serve)
BITRATE_RANGE = (8_000, 1_536_000)  # accepted --audio-bitrate values, bits/s


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each flag's help names its default once: "(default: X)" is added only where the help text does not already
    say what the default is, and never for a default of None or False (an unset optional flag, a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class RawDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """DefaultsHelpFormatter for a parser whose description and epilog are laid out by hand."""


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line on stderr (which flag, what is wrong), exit code 2; not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------------------------
# Flag groups
# ----------------------------------------------------------------------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--preset / --weights, --device, --dtype, --tiny-decoder, --compile, --cuda-graphs, --threads."""
    from mmgt.config import DEFAULT_PRESET, PRESETS

    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"built-in model preset (default {DEFAULT_PRESET!r}: toy widths, seeded random weights, "
                        "runs on a CPU, output is untrained noise). 'mmgt' alone has the release's sizes but random "
                        "weights; use --weights for the trained model. With --weights it gives the sizes the "
                        "weights must fit")
    g.add_argument("--weights", metavar="DIR", type=Path,
                   help="release weights directory (MMGT_pretrained/, stable-diffusion-v1-5/, sd-vae-ft-mse/, ...; "
                        "`engine weights fetch DIR` downloads it), at the sizes of --preset (default 'mmgt'). "
                        "Nothing is downloaded at run time")
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


def add_settings_flags(p: argparse.ArgumentParser, base: RenderSettings, name: str = "OFFLINE") -> None:
    """--steps, --guidance, --smga-steps, --smga-guidance, --seed, --window, --hop, --crossfade, --chunk, --overlap,
    --schedule; each help names its default once: ``base``'s value (engine/settings.py ``name``: OFFLINE for render and batch,
    this machine's live settings for serve), or where ``base`` leaves it to the model, the presets' values
    (mmgt/config.py)."""
    from mmgt.config import PRESETS

    def preset_default(value, per_preset, reference: str) -> str:
        if value is not None:
            return f"default {value}"
        values = ", ".join(f"{n} {per_preset(cfg)}" for n, cfg in sorted(PRESETS.items()))
        return f"default: the preset's, {values}; {reference}"

    g = p.add_argument_group(f"scheduling and sampling (defaults: engine/settings.py {name})")
    g.add_argument("--steps", type=int, help="Stage II denoising steps "
                   f"({preset_default(base.steps, lambda c: c.sampler.steps, 'reference quality 30')})")
    g.add_argument("--guidance", type=float, help="Stage II classifier-free guidance scale, 1 = off (one UNet pass) "
                   f"({preset_default(base.guidance, lambda c: c.sampler.guidance, 'reference 3.5')})")
    g.add_argument("--smga-steps", type=int, help="Stage I (pose) DDIM steps "
                   f"({preset_default(base.smga_steps, lambda c: c.smga.sample_steps, 'reference 50')})")
    g.add_argument("--smga-guidance", type=float, help="Stage I guidance weight "
                   f"({preset_default(base.smga_guidance, lambda c: c.smga.guidance, 'reference 2.0')})")
    g.add_argument("--seed", type=int, help=f"noise seed in [0, 2^63); the same seed gives the same frames "
                                            f"(default {base.seed})")
    g.add_argument("--window", type=int, help=f"SMGA window in frames (default {base.window} = "
                                              f"{base.window / 25:g} s)")
    g.add_argument("--hop", type=int, help=f"frames between SMGA windows, <= --window (default {base.hop})")
    g.add_argument("--crossfade", type=int,
                   help=f"pose seam frames blended between windows, <= --window - --hop (default {base.crossfade})")
    g.add_argument("--chunk", type=int, help=f"Stage II frames per render chunk, <= 32 (default {base.chunk})")
    g.add_argument("--overlap", type=int,
                   help=f"frames a chunk takes over from the previous one, < --chunk (default {base.overlap})")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help=f"Stage II schedule (default {base.schedule}). 'rolling' (opt-in, quality not yet judged with "
                        "trained weights): each denoiser call holds --steps groups of chunk/steps frames at as many "
                        "noise levels and emits the oldest group, so no frame is denoised twice (--overlap unused; "
                        "--chunk must be a multiple of --steps)")


def add_backend_flags(p: argparse.ArgumentParser) -> None:
    """--backend torch|onnxruntime|tensorrt and --artifacts DIR."""
    b = p.add_argument_group("backend")
    b.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch",
                   help="runtime of every network, Stage I and the speech encoders included (onnxruntime/tensorrt "
                        "need the artifacts `engine export` writes for this run's chunk and guidance)")
    b.add_argument("--artifacts", type=Path, help="directory written by `engine export` (for onnxruntime/tensorrt)")


def parse_bitrate(text: str) -> int:
    """``--audio-bitrate`` value -> bits/s: ``192k``, ``192000`` or ``1.5M`` (an argparse type: its error message is
    argparse's one line)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*(?:b/?s|bps)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a bit rate: {text!r} (examples: 96k, 192000, 1.5M)")
    bits = round(float(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()])
    lo, hi = BITRATE_RANGE
    if not lo <= bits <= hi:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [{lo // 1000}k, {hi // 1000}k]")
    return bits


def add_audio_bitrate_flag(g) -> None:
    """--audio-bitrate RATE on a parser or argument group (render, demo, batch): the AAC rate of the video's audio,
    None when not given (the source decides: copied, or AAC at a rate by channels; see engine/source_audio.py)."""
    from engine.source_audio import AAC_BITRATE_PER_CHANNEL, AAC_BITRATES  # constants only: no numpy, no PyAV

    g.add_argument("--audio-bitrate", type=parse_bitrate, metavar="RATE",
                   help="AAC bit rate of the video's audio (96k, 256000, ...). The video carries the source's audio at "
                        "its own sample rate and channels: without this flag an aac, mp3 or alac stream is copied as "
                        f"is and anything else (wav, flac, opus ...) becomes AAC at {AAC_BITRATES[1] // 1000}k mono, "
                        f"{AAC_BITRATES[2] // 1000}k stereo, {AAC_BITRATE_PER_CHANNEL // 1000}k per channel above; "
                        "with it the audio is always encoded as AAC at RATE")


def settings_from(args, base: RenderSettings = OFFLINE) -> RenderSettings:
    """``base`` with the settings flags the user gave (unset flags keep the preset's value), every value checked
    (CLIError naming the flag: engine/preflight.py)."""
    return check_settings(base.with_(steps=args.steps, guidance=args.guidance, smga_steps=args.smga_steps,
                                     smga_guidance=args.smga_guidance, seed=args.seed, window=args.window,
                                     hop=args.hop, crossfade=args.crossfade, chunk=args.chunk, overlap=args.overlap,
                                     schedule=args.schedule))


# ----------------------------------------------------------------------------------------------------------------
# Inputs, outputs, logging
# ----------------------------------------------------------------------------------------------------------------
def add_output_flags(g) -> None:
    """--overwrite, --restart and --segment-seconds on a parser or argument group (render, demo)."""
    from engine.resume import SEGMENT_SECONDS  # constants only: standard library at module level

    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (it is replaced only once the new video is complete)")
    g.add_argument("--restart", action="store_true",
                   help="start over: ignore what an interrupted render of this output kept in .<name>.mp4.resume/ "
                        "(without it the same command continues from there)")
    g.add_argument("--segment-seconds", type=float, default=SEGMENT_SECONDS, metavar="S",
                   help="the video is written in segments of about S seconds beside the output and joined at the "
                        "end; an interrupted render continues from its last complete segment")


def read_image(path: Path):
    """The image at ``path`` as a uint8 RGB array (H, W, 3); CLIError naming the file when it cannot be read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise CLIError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{path}: not a readable image ({e})") from e


def read_audio(path: Path):
    """(the model's 16 kHz mono float32 copy (N,), the SourceAudio the mp4 carries) of an audio file; CLIError naming
    the file when it cannot be used. Short or truncated audio is rendered with a warning naming its duration. Imports
    no torch: a bad file is found before the models load."""
    from engine.preflight import audio_warnings
    from engine.source_audio import SourceAudio
    from mmgt.audio_io import AudioError, load_audio
    from mmgt.config import AUDIO_SAMPLE_RATE

    try:
        audio = load_audio(path)  # (N,)
        source = SourceAudio.probe(path)
    except AudioError as e:
        raise CLIError(str(e)) from e
    for warning in audio_warnings(path, len(audio) / AUDIO_SAMPLE_RATE, source.declared_seconds):
        logging.getLogger("engine").warning("%s", warning)
    return audio, source


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so every cleanup path of an interrupted
    run is taken (workers joined, temp files removed); the command then exits 143 instead of 130."""


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread while the block runs; a second SIGTERM kills
    at once (what it leaves is cleaned up by the next run). A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def setup_logging(verbose: int, quiet: bool) -> None:
    """-q: warnings only; default: info; -vv: debug, the libraries' own chatter included."""
    level = logging.WARNING if quiet else (logging.INFO if verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        for noisy in ("diffusers", "transformers", "PIL", "numba", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # diffusers and transformers set their own level when they are first imported (later, lazily): tell them
        # through the variables they read then
        for env in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
            os.environ.setdefault(env, "error")


__all__ = ["ASSETS", "BITRATE_RANGE", "CLIError", "DefaultsHelpFormatter", "RawDefaultsHelpFormatter",
           "OneLineParser", "add_model_flags", "add_settings_flags",
           "add_backend_flags", "add_audio_bitrate_flag", "parse_bitrate", "settings_from", "add_output_flags",
           "read_image", "read_audio", "Terminated",
           "interrupt_exit_code", "sigterm_as_interrupt", "setup_logging"]
