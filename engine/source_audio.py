"""The source's own audio in the output mp4: described once when the input is read, copied or encoded by Mp4Sink.

The model hears a 16 kHz mono copy of the speech (``mmgt.audio_io.load_audio``); the video carries the original
audio at its own sample rate and channel layout. ``SourceAudio.probe(path)`` describes the file's first audio stream
(the one load_audio decodes). ``open_track`` adds it to an output container in one of two ways:

- copy: the stream's packets are remuxed unchanged where mp4 takes the codec (``MP4_COPY_CODECS``: aac, mp3, alac);
- encode: the stream is decoded and encoded as AAC at its own rate (the nearest AAC rate above an unusual one) and
  layout, at ``--audio-bitrate`` or ``default_aac_bitrate(channels, rate)``.

Both read the source lazily, in step with the frames the sink writes (``until``): memory stays bounded for a file of
hours (a few packets or one decoded frame are held) and the mp4 interleaves audio with video. Time 0 is the source's
first decoded sample, as load_audio counts it (the stream's start time and encoder priming are skipped: a copied
stream keeps them as an edit list), so sample n lies under frame n * fps / rate as in the model. ``finish(end)`` ends
the audio where the video ends: encoded audio is trimmed or padded with silence to exactly ``end``; a copied stream
is cut at the last packet that starts before ``end`` (its duration shortened to ``end``) and may end before it by the
sub-frame difference between the source and the video (never more than one frame).

The module level is the standard library only (the CLI parser reads the bitrate constants for its --help); numpy and
PyAV are imported inside the functions that use them.
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

MP4_COPY_CODECS = frozenset({"aac", "mp3", "alac"})  # codecs mp4 carries as they are: copied, never re-encoded
AAC_BITRATES = {1: 128_000, 2: 192_000}  # default AAC bits/s by channel count (mono, stereo)
AAC_BITRATE_PER_CHANNEL = 64_000  # default AAC bits/s per channel above stereo
AAC_MAX_CHANNELS = 6  # layouts up to 5.1 are kept; a source with more channels is mixed down to stereo
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1"}  # FFmpeg's, by channel count


def default_aac_bitrate(channels: int, sample_rate: int) -> int:
    """AAC bits/s when no bitrate is asked for: 128k mono, 192k stereo, 64k per channel above; at most the 6 bits
    per sample and channel an AAC frame can hold (96k for 16 kHz mono)."""
    return min(AAC_BITRATES.get(channels, AAC_BITRATE_PER_CHANNEL * channels), 6 * sample_rate * channels)


@dataclass(frozen=True)
class SourceAudio:
    """The audio stream of an input file that the video carries (made once when the input is read)."""

    path: str  # the input file
    stream_index: int  # container-wide index of its first audio stream (the stream load_audio decodes)
    sample_rate: int  # samples per second, as stored
    channels: int  # channel count, as stored
    layout: str  # channel layout name as PyAV spells it ("mono", "stereo", "5.1(side)", ...)
    codec: str  # codec name ("aac", "mp3", "pcm_s16le", "flac", ...)
    declared_seconds: Optional[float] = None  # the duration the file's header states (None: it states none); a
    # truncated file decodes to less

    @classmethod
    def probe(cls, path: str | os.PathLike) -> "SourceAudio":
        """Describe ``path``'s first audio stream. AudioError (naming the file) if it has none or cannot be read."""
        import av

        from mmgt.audio_io import AudioError

        path = os.fspath(path)
        try:
            with av.open(path) as container:
                if not container.streams.audio:
                    raise AudioError(f"{path}: no audio stream")
                s = container.streams.audio[0]
                declared = wav_declared_seconds(path)
                if declared is None and s.duration is not None and s.time_base is not None:
                    declared = float(s.duration * s.time_base)
                src = cls(path=path, stream_index=s.index, sample_rate=int(s.rate or 0), channels=int(s.channels or 0),
                          layout=s.layout.name, codec=s.codec_context.codec.canonical_name, declared_seconds=declared)
        except (av.FFmpegError, OSError) as e:
            raise AudioError(f"{path}: not a readable audio/video file ({e})") from e
        if src.sample_rate < 1 or src.channels < 1:
            raise AudioError(f"{path}: its audio stream has no sample rate or no channels ({src.codec})")
        return src

    @property
    def copyable(self) -> bool:
        """mp4 takes this codec as it is: the stream can be remuxed without re-encoding."""
        return self.codec in MP4_COPY_CODECS

    def describe(self) -> str:
        return f"{self.codec} {self.sample_rate} Hz {self.layout}"


def wav_declared_seconds(path: str | os.PathLike) -> Optional[float]:
    """The duration a RIFF/WAVE header declares (its data chunk's size / byte rate), None for another format or a
    header without it. FFmpeg clamps a wav's duration to the bytes present, so a truncated wav needs this."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            byte_rate = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
                if kind == b"fmt ":
                    fmt = f.read(size + size % 2)
                    byte_rate = int.from_bytes(fmt[8:12], "little") if len(fmt) >= 12 else None
                elif kind == b"data":
                    if not byte_rate or size in (0, 0xFFFFFFFF):  # streamed wavs leave the size unset
                        return None
                    return size / byte_rate
                else:
                    f.seek(size + size % 2, os.SEEK_CUR)
    except OSError:
        return None


def open_track(container, audio, sample_rate: int, bitrate: Optional[int]) -> "AudioTrack":
    """Add the audio stream to the output ``container`` (before anything is muxed) and return its writer.

    ``audio``: a SourceAudio (copied where mp4 takes its codec and no ``bitrate`` is asked for, else AAC-encoded;
    fitted to the video's end) or 1-D float samples at ``sample_rate`` (AAC mono, written whole).
    """
    import numpy as np

    if isinstance(audio, SourceAudio):
        if audio.copyable and bitrate is None:
            return CopiedAudio(container, audio)
        return EncodedAudio.from_source(container, audio, bitrate)
    samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)  # (N,) AAC input in [-1, 1]
    return EncodedAudio(container, _array_frames(samples, sample_rate), sample_rate, "mono",
                        bitrate or default_aac_bitrate(1, sample_rate), fit_to_video=False,
                        what=f"{samples.shape[0]} samples")


class AudioTrack(ABC):
    """Writes one audio stream of an output container, in step with the video."""

    what = ""  # what is written, for the log

    @abstractmethod
    def until(self, t: Fraction) -> None:
        """Write the audio of media time [0, t) that is not written yet (t: the end of the last written frame)."""

    @abstractmethod
    def finish(self, video_end: Fraction) -> None:
        """Write the rest (ending with the video, or all of it for an in-memory array), flush, release the input."""

    @abstractmethod
    def close(self) -> None:
        """Release the input (idempotent; also after a failure)."""


def _mux(container, packets) -> None:
    for p in packets:
        container.mux(p)


# ----------------------------------------------------------------------------------------------------------------
# copy: the source's packets, remuxed
# ----------------------------------------------------------------------------------------------------------------
class CopiedAudio(AudioTrack):
    """Remuxes the source's packets (no decode): shifted so the first decoded sample is at 0, cut at the video's end.

    One packet is held back until the next is known, so a packet without a duration (some containers store none)
    gets one from the next packet's time, and the last one can be shortened to end with the video.
    """

    def __init__(self, container, source: SourceAudio) -> None:
        import av

        self.container = container
        self._input = av.open(source.path)
        try:
            stream = self._input.streams[source.stream_index]
            self.stream = container.add_stream_from_template(stream)
        except Exception:
            self._input.close()
            raise
        self.time_base = stream.time_base  # packet times, in the input's units
        # presentation start: the first decoded sample (priming before it stays in the file as an edit list)
        self._shift = stream.start_time or 0
        # a last packet without a duration: one codec frame (or 1024 samples)
        frame = stream.codec_context.frame_size or 1024
        self._default_duration = max(1, int(Fraction(frame, source.sample_rate) / self.time_base))
        self._packets = self._input.demux(stream)
        self._next = None  # the first packet not yet copied (read ahead)
        self._held = None  # the last copied packet, muxed once its successor or the end is known
        self._eof = False
        self.what = f"{source.codec} copied from {os.path.basename(source.path)} ({source.describe()})"

    def _peek(self):
        while self._next is None and not self._eof:
            pk = next(self._packets, None)
            if pk is None:
                self._eof = True
            elif pk.dts is not None and pk.size:  # skip the demuxer's empty flush packet
                if pk.pts is None:
                    pk.pts = pk.dts
                pk.pts, pk.dts = pk.pts - self._shift, pk.dts - self._shift
                self._next = pk
        return self._next

    def _limit(self, t: Fraction) -> Fraction:
        return t / self.time_base  # media time -> input time units

    def until(self, t: Fraction) -> None:
        limit = self._limit(t)
        while (pk := self._peek()) is not None and pk.pts < limit:
            self._next = None
            if self._held is not None:
                if not self._held.duration:
                    self._held.duration = pk.pts - self._held.pts
                self.container.mux(self._held)
            pk.stream = self.stream
            self._held = pk

    def finish(self, video_end: Fraction) -> None:
        self.until(video_end)
        held, self._held = self._held, None
        if held is not None:
            nxt = self._peek()
            if not held.duration:
                held.duration = nxt.pts - held.pts if nxt is not None else self._default_duration
            held.duration = max(1, min(held.duration, int(self._limit(video_end)) - held.pts))  # end with the video
            self.container.mux(held)
        self.close()

    def close(self) -> None:
        self._input.close()


# ----------------------------------------------------------------------------------------------------------------
# encode: decoded source (or an in-memory array) -> AAC
# ----------------------------------------------------------------------------------------------------------------
def _array_frames(samples: np.ndarray, rate: int) -> Iterator:
    import av

    for start in range(0, samples.shape[0], rate):  # one second per frame
        f = av.AudioFrame.from_ndarray(samples[None, start:start + rate], format="flt", layout="mono")  # (1, n)
        f.sample_rate = rate
        yield f


def _aac_rate(rate: int) -> int:
    """The source's rate if AAC has it, else the nearest AAC rate above it (the highest for a rate above all)."""
    import av

    rates = sorted(av.codec.Codec("aac", "w").audio_rates)
    return next((r for r in rates if r >= rate), rates[-1])


class EncodedAudio(AudioTrack):
    """Decoded frames -> resampler (AAC's sample format; rate and layout only where AAC lacks the source's) -> FIFO
    -> AAC, stamped with a running sample count from 0. ``fit_to_video``: trimmed or padded to the video's end;
    otherwise every sample is written."""

    def __init__(self, container, frames: Iterator, rate: int, layout: str, bitrate: int, *, fit_to_video: bool,
                 what: str, on_close=None) -> None:
        import av

        self.container, self.frames, self.rate, self.fit_to_video = container, frames, rate, fit_to_video
        self.stream = container.add_stream("aac", rate=rate)
        self.stream.layout = layout
        self.stream.bit_rate = bitrate
        self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        self._fifo = av.AudioFifo()
        self._pos = 0  # samples encoded so far
        self._eof = False
        self._on_close = on_close
        self.what = f"AAC {bitrate // 1000} kb/s {rate} Hz {layout} from {what}"

    @classmethod
    def from_source(cls, container, source: SourceAudio, bitrate: Optional[int]) -> "EncodedAudio":
        import av

        rate = _aac_rate(source.sample_rate)
        if source.channels > AAC_MAX_CHANNELS:
            layout = "stereo"
            logger.info("%s: %d channels mixed down to stereo for AAC", source.path, source.channels)
        elif source.layout.endswith("channels"):  # unspecified order ("2 channels", as wav may have): the default
            layout = _DEFAULT_LAYOUTS[source.channels]
        else:
            layout = source.layout
        bitrate = bitrate or default_aac_bitrate(av.AudioLayout(layout).nb_channels, rate)
        if rate != source.sample_rate:
            logger.info("%s: %d Hz is not an AAC rate; the video's audio is resampled to %d Hz", source.path,
                        source.sample_rate, rate)
        inp = av.open(source.path)
        try:
            frames = inp.decode(inp.streams[source.stream_index])
            return cls(container, frames, rate, layout, bitrate, fit_to_video=True, on_close=inp.close,
                       what=f"{os.path.basename(source.path)} ({source.describe()})")
        except Exception:
            inp.close()
            raise

    def _fill(self, n: int) -> None:
        """Decode until the FIFO holds ``n`` samples or the source ends."""
        while self._fifo.samples < n and not self._eof:
            frame = next(self.frames, None)
            for out in self._resampler.resample(frame):  # None flushes the resampler's delay line
                out.pts = None  # the FIFO restamps; decoded times are not used (t = 0 is the first sample)
                self._fifo.write(out)
            self._eof = frame is None

    def _encode(self, frame) -> None:
        frame.pts = self._pos
        frame.time_base = Fraction(1, self.rate)
        _mux(self.container, self.stream.encode(frame))
        self._pos += frame.samples

    def _encode_to(self, end: int) -> None:
        self._fill(end - self._pos)
        take = min(self._fifo.samples, end - self._pos)
        if take > 0:
            self._encode(self._fifo.read(take))

    def until(self, t: Fraction) -> None:
        self._encode_to(int(t * self.rate))

    def finish(self, video_end: Fraction) -> None:
        import av
        import numpy as np

        if self.fit_to_video:
            end = round(video_end * self.rate)
            self._encode_to(end)
            if self._pos < end:  # the source ended first: silence up to the video's end
                layout = self.stream.layout.name
                silence = np.zeros((self.stream.layout.nb_channels, end - self._pos), np.float32)  # (C, n)
                pad = av.AudioFrame.from_ndarray(silence, format="fltp", layout=layout)
                pad.sample_rate = self.rate
                self._encode(pad)
        else:
            self._fill(float("inf"))
            if self._fifo.samples:
                self._encode(self._fifo.read())
        _mux(self.container, self.stream.encode(None))  # flush the encoder
        self.close()

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
