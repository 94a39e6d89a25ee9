"""Text to speech for the live presenter: a sentence in, 16 kHz mono float32 speech out.

Two engines behind one interface (:class:`TTSEngine`):

* :class:`EspeakTTS` (the default): the ``espeak-ng`` program (``apt-get install espeak-ng``; scripts/setup.sh
  installs it), run once per sentence with ``--stdout``; any of its voices by name (``--voice en-us``);
* :class:`PiperTTS`: a piper voice model the user gives (``--voice FILE.onnx`` with ``FILE.onnx.json`` beside it),
  through the ``piper`` extra (piper-tts), imported only when such a voice is asked for.

Text is spoken sentence by sentence (:func:`split_sentences`), so the first sentence is synthesised and can play
while the rest is still text (streaming/speech.py does the queueing). Nothing here imports torch or aiortc.
"""
from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import threading
import wave
from math import gcd
from pathlib import Path
from typing import List, Optional

import numpy as np

from engine.extras import extra_problem
from engine.types import SAMPLE_RATE

log = logging.getLogger(__name__)

ESPEAK = "espeak-ng"
ESPEAK_INSTALL = "apt-get install espeak-ng (Debian/Ubuntu; scripts/setup.sh installs it), brew install espeak-ng " \
                 "(macOS)"
# abbreviations whose full stop does not end a sentence
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "e.g", "i.e", "no", "fig", "approx"}
_END = re.compile(r"([.!?\u2026]+[\"')\]\u201d\u2019]*)\s+")  # a sentence end, then the space after it


class TTSError(RuntimeError):
    """Speech synthesis failed (the message names the engine and the cause)."""


class TTSUnavailable(TTSError):
    """The TTS engine cannot run here (program or extra missing, bad voice); the message says how to fix it."""


# ----------------------------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------------------------
def _cut_long(sentence: str, max_chars: int) -> List[str]:
    """``sentence`` in pieces of at most ``max_chars``, cut after a comma, semicolon, colon or dash where one is in
    the second half of the piece, else at the last space, else hard."""
    pieces = []
    rest = sentence
    while len(rest) > max_chars:
        head = rest[:max_chars + 1]
        cut = max(head.rfind(p) for p in (", ", "; ", ": ", " - ", " \u2013 "))
        if cut < max_chars // 2:
            cut = head.rfind(" ")
        cut = cut + 1 if cut > 0 else max_chars
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


def split_sentences(text: str, max_chars: int = 250) -> List[str]:
    """The sentences of ``text`` in order (whitespace collapsed, nothing dropped but blanks); a sentence longer than
    ``max_chars`` is cut at a clause or word boundary, so no piece keeps the first sound waiting for long."""
    if max_chars < 20:
        raise ValueError(f"split_sentences: max_chars must be >= 20, got {max_chars}")
    out: List[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        start = 0
        for m in _END.finditer(flat + " "):
            word = flat[start:m.start()].rsplit(" ", 1)[-1].lower()
            if m.group(1) == "." and word in _ABBREVIATIONS:
                continue  # "Dr. Smith": not an end
            out.extend(_cut_long(flat[start:m.end()].strip(), max_chars))
            start = m.end()
        if start < len(flat):
            out.extend(_cut_long(flat[start:].strip(), max_chars))
    return [s for s in out if s]


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float samples at ``rate`` -> (n,) float32 at 16 kHz in [-1, 1] (polyphase resampling of one whole
    sentence; the filter's overshoot on a full-scale signal is clipped)."""
    x = np.asarray(samples, np.float32).reshape(-1)
    if rate == SAMPLE_RATE or x.size == 0:
        return x
    from scipy.signal import resample_poly

    g = gcd(int(rate), SAMPLE_RATE)
    return np.clip(resample_poly(x, SAMPLE_RATE // g, int(rate) // g), -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------------------
class TTSEngine:
    """One sentence -> speech. Implementations are thread-safe (sessions share one engine)."""

    name = "tts"

    def synthesize(self, sentence: str) -> np.ndarray:
        """(n,) float32 mono speech at 16 kHz for ``sentence``; TTSError when synthesis fails."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class EspeakTTS(TTSEngine):
    """The ``espeak-ng`` program, one run per sentence (text on stdin, WAV on stdout)."""

    name = "espeak-ng"

    def __init__(self, voice: Optional[str] = None, speed: Optional[int] = None, executable: str = ESPEAK,
                 timeout: float = 30.0) -> None:
        exe = shutil.which(executable)
        if exe is None:
            raise TTSUnavailable(f"text to speech needs the {executable} program, which is not on PATH: "
                                 f"{ESPEAK_INSTALL}")
        self.executable, self.voice, self.speed, self.timeout = exe, voice, speed, timeout
        try:  # an unknown voice fails (or, in some versions, writes an empty stream and exits 0)
            probe = self.synthesize("a")
        except TTSError as e:
            raise TTSUnavailable(f"{executable} voice {voice!r}: {e} (`{executable} --voices` lists them)") from e
        if not probe.size:
            raise TTSUnavailable(f"{executable} voice {voice!r} gave no audio (`{executable} --voices` lists them)")

    def describe(self) -> str:
        return f"espeak-ng ({self.voice or 'default voice'})"

    def synthesize(self, sentence: str) -> np.ndarray:
        cmd = [self.executable, "--stdout", "--stdin", "-b", "1"]  # the text on stdin, UTF-8: never an option
        if self.voice:
            cmd += ["-v", self.voice]
        if self.speed:
            cmd += ["-s", str(self.speed)]
        try:
            run = subprocess.run(cmd, input=sentence.encode("utf-8"), capture_output=True, timeout=self.timeout,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TTSError(f"{ESPEAK}: {type(e).__name__}: {e}") from e
        err = run.stderr.decode("utf-8", "replace").strip()
        if run.returncode != 0:
            raise TTSError(f"{ESPEAK} exited with {run.returncode}: {err or 'no message'}")
        if len(run.stdout) <= 44:
            if err:
                raise TTSError(f"{ESPEAK}: {err}")
            return np.zeros(0, np.float32)  # nothing speakable (e.g. only punctuation)
        # espeak-ng streams its WAV: the header's sizes are placeholders, so read the samples up to the end
        with wave.open(io.BytesIO(run.stdout)) as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            data = w.readframes(w.getnframes())
        if width != 2:
            raise TTSError(f"{ESPEAK}: expected 16-bit WAV, got {8 * width}-bit")
        pcm = np.frombuffer(data[:len(data) // (2 * channels) * 2 * channels], "<i2").reshape(-1, channels)
        return to_16k(pcm.mean(axis=1) / 32768.0, rate)


class PiperTTS(TTSEngine):
    """A piper voice (``FILE.onnx`` + ``FILE.onnx.json``), through the ``piper`` extra (piper-tts >= 1.3)."""

    name = "piper"

    def __init__(self, model: str | Path) -> None:
        problem = extra_problem("piper", f"the piper voice {Path(model).name}")
        if problem:
            raise TTSUnavailable(problem)
        path = Path(model)
        config = Path(f"{path}.json")
        for f, what in ((path, "voice model"), (config, "voice config (the .onnx.json beside the model)")):
            if not f.is_file():
                raise TTSUnavailable(f"the piper {what} {f} does not exist")
        from piper import PiperVoice

        try:
            self.voice = PiperVoice.load(str(path), config_path=str(config))
        except Exception as e:  # noqa: BLE001 - onnxruntime and json raise many kinds; one line names the file
            raise TTSUnavailable(f"piper cannot load the voice {path}: {type(e).__name__}: {e}") from e
        self.path = path
        self._lock = threading.Lock()  # one synthesis at a time per voice (its phonemizer keeps state)

    def describe(self) -> str:
        return f"piper ({self.path.name})"

    def synthesize(self, sentence: str) -> np.ndarray:
        try:
            with self._lock:
                chunks = list(self.voice.synthesize(sentence))  # one AudioChunk per sentence piper finds
        except Exception as e:  # noqa: BLE001 - surfaced as one TTSError line
            raise TTSError(f"piper ({self.path.name}): {type(e).__name__}: {e}") from e
        parts = [to_16k(c.audio_float_array, c.sample_rate) for c in chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def make_tts(voice: Optional[str] = None) -> TTSEngine:
    """The engine for ``--voice``: None -> espeak-ng's default voice; ``FILE.onnx`` -> that piper voice; any other
    name -> that espeak-ng voice (``en-us``, ``de``, ...). TTSUnavailable says what is missing and how to get it."""
    if voice and voice.lower().endswith(".onnx"):
        return PiperTTS(voice)
    return EspeakTTS(voice=voice or None)


__all__ = ["TTSEngine", "EspeakTTS", "PiperTTS", "TTSError", "TTSUnavailable", "make_tts", "split_sentences", "to_16k",
           "ESPEAK_INSTALL"]
