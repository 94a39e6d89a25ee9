"""Audio input: decoding files, mono mixdown, resampling, and the checks every audio path applies to a waveform.

Owns ``AudioError`` (the one exception for unusable audio input), ``to_mono``, ``resample`` (soxr, as librosa),
``load_audio`` (any file PyAV reads -> 16 kHz float32 mono), the waveform / frame-count checks the feature
paths share (``_as_numpy_wave``, ``_check_frames``) and ``frames_for_samples`` (audio length -> 25 fps frames).
PyAV and librosa are imported inside the functions that need them, and torch is not imported at all (a tensor can
only be passed in once it is), so a command checks and decodes its audio before the model stack is loaded.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Union

import numpy as np

from mmgt.config import AUDIO_SAMPLE_RATE, FPS

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Waveform = Union[np.ndarray, "torch.Tensor"]
PathLike = Union[str, Path]


class AudioError(ValueError):
    """An audio input that cannot be used; the message names the file or input and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Decoding and resampling
# ----------------------------------------------------------------------------------------------------------------

def _is_tensor(x: object) -> bool:
    """``x`` is a torch tensor (without importing torch: if it is not imported, nothing can be a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_mono(x: Waveform, axis: int = 0) -> np.ndarray:
    """Mix a waveform down to float32 mono by averaging channels (as librosa.load does).

    ``x`` is 1-D (already mono) or 2-D with channels on ``axis`` (0: channels-first like PyAV/librosa; use
    ``axis=1`` for sounddevice's (frames, channels)). Integer PCM is scaled to [-1, 1].
    """
    if _is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise AudioError(f"to_mono: expected a 1-D or 2-D waveform, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        half = 2.0 ** (np.iinfo(x.dtype).bits - 1)  # 32768 for int16
        # unsigned PCM (uint8) is centred on its midpoint
        offset = 0.0 if np.issubdtype(x.dtype, np.signedinteger) else half
        x = (x.astype(np.float64) - offset) / half
    if x.ndim == 2:
        x = x.mean(axis=axis)
    return np.ascontiguousarray(x, dtype=np.float32)


def resample(wav: Waveform, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample an in-memory waveform (last axis is time) with soxr (librosa's default, as the reference).

    Output length is ceil(n * dst_rate / src_rate). Used for live chunks; files go through ``load_audio``.
    """
    import librosa

    if src_rate <= 0 or dst_rate <= 0:
        raise AudioError(f"resample: sample rates must be positive, got {src_rate} -> {dst_rate}")
    if _is_tensor(wav):
        wav = wav.detach().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if src_rate == dst_rate:
        return wav.copy()
    if wav.shape[-1] == 0:
        return np.zeros(wav.shape[:-1] + (0,), dtype=np.float32)
    return librosa.resample(wav, orig_sr=src_rate, target_sr=dst_rate, res_type="soxr_hq").astype(np.float32)


def load_audio(path: PathLike, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of any file PyAV reads -> float32 mono in [-1, 1] at ``sample_rate``.

    Works for wav, mp3, flac, m4a, the audio of an mp4, ... at any rate and channel count: PyAV's resampler
    changes the rate (keeping the channels), then channels are averaged (librosa.load's mixdown, whatever the
    layout: an 8-channel file gives the mean of its 8 channels).
    Raises AudioError for a missing file, an unreadable file, no audio stream, or 0 samples. A stream that fails
    to decode after some audio (a truncated file's broken last packet) keeps what decoded, with a warning.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise AudioError(f"{path}: not a readable audio/video file ({exc})") from exc

    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise AudioError(f"{path}: no audio stream (streams found: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        # packed (interleaved) float, the channels kept as they are, so the mixdown below is a plain mean. Not
        # planar: PyAV finds a planar frame's planes by walking FFmpeg's plane pointers up to a NULL, and from 8
        # channels on that list has no NULL at its end, so to_ndarray reads a pointer past it and crashes
        resampler = av.AudioResampler(format="flt", layout=None, rate=sample_rate)
        chunks: List[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                chunks.extend(_interleaved(out) for out in resampler.resample(frame))
            # flush the resampler's delay line
            chunks.extend(_interleaved(out) for out in resampler.resample(None))
        except av.FFmpegError as exc:
            if not any(c.shape[0] for c in chunks):
                raise AudioError(f"{path}: decoding the audio stream failed ({exc})") from exc
            logger.warning("%s: decoding stopped after %.2f s (%s); the file looks truncated, the rest is left out",
                           path, sum(c.shape[0] for c in chunks) / sample_rate, exc)

    chunks = [c for c in chunks if c.shape[0] > 0]
    if not chunks:
        raise AudioError(f"{path}: the audio stream has no samples (0-length audio)")
    wav = to_mono(np.concatenate(chunks, axis=0), axis=1)  # (n, C) -> (n,)
    # lossy decoders (aac, mp3) overshoot full scale slightly
    np.clip(wav, -1.0, 1.0, out=wav)
    logger.debug("loaded %s: %d samples at %d Hz", path, wav.shape[0], sample_rate)
    return wav


def _interleaved(frame) -> np.ndarray:
    """A packed float PyAV audio frame -> (n, C) float32 (its one plane holds the samples channel-interleaved)."""
    return frame.to_ndarray().reshape(frame.samples, frame.layout.nb_channels)  # (1, n * C) -> (n, C)


# ----------------------------------------------------------------------------------------------------------------
# Checks every feature path applies to its input
# ----------------------------------------------------------------------------------------------------------------

def _as_numpy_wave(wav: Waveform, what: str) -> np.ndarray:
    """1-D finite float32 numpy waveform, or an AudioError naming ``what``."""
    if _is_tensor(wav):
        wav = wav.detach().float().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise AudioError(f"{what}: expected a 1-D mono waveform, got shape {wav.shape} (use to_mono)")
    if wav.shape[0] == 0:
        raise AudioError(f"{what}: empty waveform")
    if not np.isfinite(wav).all():
        raise AudioError(f"{what}: waveform contains NaN or Inf")
    return wav


def _check_frames(n_frames: int, what: str) -> None:
    if int(n_frames) != n_frames or n_frames < 1:
        raise AudioError(f"{what}: n_frames must be a positive integer, got {n_frames!r}")


def frames_for_samples(n_samples: int, sample_rate: int = AUDIO_SAMPLE_RATE, fps: int = FPS) -> int:
    """Video frames covered by ``n_samples`` of audio: ceil(n / sr * fps), the reference's seq_len."""
    return -(-int(n_samples) * fps // sample_rate)  # integer ceil: no float rounding at exact multiples


__all__ = ["AudioError", "Waveform", "PathLike", "to_mono", "resample", "load_audio", "frames_for_samples"]
