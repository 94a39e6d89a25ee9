"""The mp4 carries the source's own audio: its rate and channels, copied (aac, mp3) or AAC-encoded, aligned with frame 0
and ending with the video (engine/source_audio.py through Mp4Sink and `engine render`)."""
import os
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from engine.cli import build_parser, main  # noqa: E402
from engine.sinks import Mp4Sink  # noqa: E402
from engine.options import parse_bitrate  # noqa: E402
from engine.source_audio import SourceAudio, default_aac_bitrate  # noqa: E402
from engine.types import FrameBatch, RunMeta  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--hop", "40", "--chunk", "12", "--overlap", "4", "-q"]
FRAME = 0.040  # one frame at 25 fps, in seconds


def _sweeps(rate: int, seconds: float, channels: int = 2) -> np.ndarray:
    """(C, n) float32: a different sine sweep per channel (220->440 Hz, 1.5->3 kHz). A one-sample shift of the
    second costs its correlation about 0.045 (1 - cos 2 pi f / rate), so >= 0.99 at lag 0 means sample-exact."""
    t = np.arange(int(round(rate * seconds))) / rate
    sweeps = [0.4 * np.sin(2 * np.pi * (220 + 110 * t / seconds) * t),
              0.3 * np.sin(2 * np.pi * (1500 + 750 * t / seconds) * t)]
    return np.stack(sweeps[:channels]).astype(np.float32)


def _decode(path: Path) -> np.ndarray:
    """(C, n) float32 of the first audio stream, as a player hears it (priming skipped)."""
    with av.open(str(path)) as c:
        resampler = av.AudioResampler(format="fltp")
        return np.concatenate([g.to_ndarray() for f in c.decode(audio=0) for g in resampler.resample(f)], axis=1)


def _ncc(a: np.ndarray, b: np.ndarray) -> list:
    """Normalised cross-correlation per channel at lag 0 over the common length."""
    n = min(a.shape[1], b.shape[1])
    a, b = a[:, :n].astype(np.float64), b[:, :n].astype(np.float64)
    return [float(a[i] @ b[i] / np.sqrt((a[i] @ a[i]) * (b[i] @ b[i]))) for i in range(a.shape[0])]


def _streams(path: Path) -> dict:
    with av.open(str(path)) as c:
        a, v = c.streams.audio[0], c.streams.video[0]
        info = dict(codec=a.codec_context.codec.canonical_name, rate=a.rate, channels=a.channels,
                    bit_rate=a.bit_rate, audio_start=a.start_time, video_start=v.start_time,
                    audio_seconds=float(a.duration * a.time_base), video_seconds=float(v.duration * v.time_base))
    with av.open(str(path)) as c:
        info["frames"] = sum(1 for _ in c.decode(video=0))
    return info


def _meta(samples16k: int) -> RunMeta:
    return RunMeta(fps=25, width=32, height=32, audio_samples=samples16k, sample_rate=16000, preset="tiny",
                   trained=False)


def _sink_render(src: Path, out: Path, frames: int, bitrate=None) -> Path:
    """What a render does with the sink: the frames (flat grey) in batches of 12, the source's audio beside them."""
    sink = Mp4Sink(out, SourceAudio.probe(src), audio_bitrate=bitrate)
    sink.open(_meta(frames * 640))
    for first in range(0, frames, 12):
        n = min(12, frames - first)
        sink.write(FrameBatch(np.full((n, 32, 32, 3), 128, np.uint8), first, 25))
    sink.close(ok=True)
    return out


def _packets(path: Path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


# ----------------------------------------------------------------------------------------------------------------
# end to end: `engine render`
# ----------------------------------------------------------------------------------------------------------------
def test_render_from_48k_stereo_keeps_its_rate_channels_duration_and_waveform(tmp_path, write_media):
    """Acceptance 1: the mp4's audio is 48 kHz, 2 channels, as long as the video within one frame, and correlates
    with the source >= 0.99 per channel at lag 0."""
    x = _sweeps(48000, 3.0)
    src = write_media(tmp_path / "lecture.wav", x, 48000, "pcm_s16le", "wav")
    out = tmp_path / "out.mp4"
    rc = main(["render", "--image", str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(src), "--out", str(out),
               *FAST])
    assert rc == 0
    info = _streams(out)
    y = _decode(out)
    ncc = _ncc(x, y)
    diff = info["audio_seconds"] - info["frames"] / 25
    print(f"\nacceptance 1: audio {info['codec']} {info['rate']} Hz, {info['channels']} channels, "
          f"{info['bit_rate'] // 1000} kb/s; audio {info['audio_seconds']:.4f} s vs video {info['frames']} frames = "
          f"{info['frames'] / 25:.4f} s (difference {diff * 1000:+.1f} ms; decoded {y.shape[1] / 48000:.4f} s); "
          f"correlation with the source L {ncc[0]:.5f} R {ncc[1]:.5f}")
    assert (info["codec"], info["rate"], info["channels"]) == ("aac", 48000, 2)
    assert info["frames"] == 75 and info["video_seconds"] == pytest.approx(3.0)
    assert abs(diff) <= FRAME and abs(y.shape[1] / 48000 - info["frames"] / 25) <= FRAME
    assert info["audio_start"] == 0 and info["video_start"] == 0  # both start at t = 0
    assert min(ncc) >= 0.99
    assert default_aac_bitrate(2, 48000) == 192_000 and abs(info["bit_rate"] - 192_000) <= 0.15 * 192_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lecture.wav", "out.mp4"]  # no temp file left


def test_render_audio_bitrate_flag_sets_the_aac_bitrate(tmp_path, write_media):
    src = write_media(tmp_path / "s.wav", _sweeps(48000, 1.2), 48000, "pcm_s16le", "wav")
    out = tmp_path / "o.mp4"
    rc = main(["render", "--image", str(ROOT / "engine/assets/portrait.jpg"), "--audio", str(src), "--out", str(out),
               "--audio-bitrate", "96k", *FAST])
    assert rc == 0
    info = _streams(out)
    assert (info["codec"], info["rate"], info["channels"]) == ("aac", 48000, 2)
    assert abs(info["bit_rate"] - 96_000) <= 0.15 * 96_000, info["bit_rate"]


def test_batch_audio_bitrate_reaches_every_job(tmp_path, write_media):
    """`engine batch --audio-bitrate`: the flag travels in each job's payload to its Mp4Sink."""
    write_media(tmp_path / "s.wav", _sweeps(48000, 1.2), 48000, "pcm_s16le", "wav")
    (tmp_path / "jobs.jsonl").write_text(
        f'{{"image": "{ROOT / "engine/assets/portrait.jpg"}", "audio": "s.wav", "output": "o"}}\n')
    rc = main(["batch", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "out"), "--audio-bitrate", "96k",
               "--threads", "1", *FAST])
    assert rc == 0
    info = _streams(tmp_path / "out" / "o.mp4")
    assert (info["codec"], info["rate"], info["channels"]) == ("aac", 48000, 2)
    assert abs(info["bit_rate"] - 96_000) <= 0.15 * 96_000, info["bit_rate"]


def test_audio_bitrate_flag_is_parsed_and_checked(capsys):
    assert [parse_bitrate(v) for v in ("96k", "192000", "1.5M", " 128 kb/s")] == [96_000, 192_000, 1_500_000, 128_000]
    for argv in (["render", "--out", "o.mp4"], ["demo"], ["batch", "jobs.jsonl", "--out-dir", "d"]):
        assert build_parser().parse_args(argv + ["--audio-bitrate", "64k"]).audio_bitrate == 64_000
        assert build_parser().parse_args(argv).audio_bitrate is None  # the source decides
    for bad in ("lots", "3", "9M"):
        with pytest.raises(SystemExit) as e:
            main(["render", "--out", "o.mp4", "--audio-bitrate", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "--audio-bitrate" in err[-1] and bad in err[-1]


# ----------------------------------------------------------------------------------------------------------------
# the sink: copy or encode, fitted to the video
# ----------------------------------------------------------------------------------------------------------------
def test_mono_16k_wav_is_mono_16k_aac(tmp_path, write_media):
    x = _sweeps(16000, 2.0, channels=1)
    src = write_media(tmp_path / "m.wav", x, 16000, "pcm_s16le", "wav")
    out = _sink_render(src, tmp_path / "m.mp4", 50)
    info = _streams(out)
    assert (info["codec"], info["rate"], info["channels"], info["frames"]) == ("aac", 16000, 1, 50)
    assert abs(info["audio_seconds"] - 2.0) <= FRAME
    assert min(_ncc(x, _decode(out))) >= 0.99
    assert default_aac_bitrate(1, 16000) == 96_000 and info["bit_rate"] <= 96_000 * 1.15  # AAC's most at 16 kHz


def test_8_channel_wav_becomes_stereo_aac(tmp_path, write_wav):
    """More channels than AAC keeps (5.1): mixed down to stereo, still fitted to the video."""
    t = np.arange(48000) / 48000
    x = np.stack([0.1 * np.sin(2 * np.pi * (300 + 100 * k) * t) for k in range(8)])  # (8, n)
    src = tmp_path / "eight.wav"
    write_wav(src, x, 48000)
    assert SourceAudio.probe(src).channels == 8
    info = _streams(_sink_render(src, tmp_path / "e.mp4", 25))
    assert (info["codec"], info["rate"], info["channels"], info["frames"]) == ("aac", 48000, 2, 25)
    assert info["audio_seconds"] == pytest.approx(1.0, abs=1 / 48000)


def test_m4a_source_is_copied_not_reencoded(tmp_path, write_media):
    x = _sweeps(48000, 2.0)
    src = write_media(tmp_path / "talk.m4a", x, 48000, "aac", "mp4")
    out = _sink_render(src, tmp_path / "c.mp4", 50)
    info = _streams(out)
    with av.open(str(src)) as c:
        src_rate = c.streams.audio[0].bit_rate
    assert (info["codec"], info["rate"], info["channels"]) == ("aac", 48000, 2)
    assert info["bit_rate"] == pytest.approx(src_rate, rel=0.01)  # the source's bits (over a slightly other length)
    assert _packets(out) == _packets(src)  # the very packets: a remux
    a, b = _decode(src), _decode(out)
    n = min(a.shape[1], b.shape[1])
    assert n >= 2.0 * 48000 and np.array_equal(a[:, :n], b[:, :n])  # same samples from the same first sample
    assert abs(info["audio_seconds"] - 2.0) <= FRAME


def test_m4a_source_with_audio_bitrate_is_reencoded_at_that_rate(tmp_path, write_media):
    src = write_media(tmp_path / "talk.m4a", _sweeps(48000, 2.0), 48000, "aac", "mp4")
    out = _sink_render(src, tmp_path / "r.mp4", 50, bitrate=96_000)
    info = _streams(out)
    assert (info["codec"], info["rate"], info["channels"]) == ("aac", 48000, 2)
    assert abs(info["bit_rate"] - 96_000) <= 0.15 * 96_000
    assert _packets(out) != _packets(src)


def test_mp3_44k_source_lands_at_44k(tmp_path, write_media):
    x = _sweeps(44100, 2.0)
    src = write_media(tmp_path / "talk.mp3", x, 44100, "libmp3lame", "mp3")
    assert SourceAudio.probe(src).codec == "mp3"
    out = _sink_render(src, tmp_path / "p.mp4", 50)
    info = _streams(out)
    assert (info["codec"], info["rate"], info["channels"]) == ("mp3", 44100, 2)  # copied
    a, b = _decode(src), _decode(out)
    n = min(a.shape[1], b.shape[1])
    # the mp3 encoder delay stays skipped (an edit list): the same samples from the same first sample
    assert n >= 1.95 * 44100 and np.array_equal(a[:, :n], b[:, :n])
    assert abs(info["audio_seconds"] - 2.0) <= FRAME


@pytest.mark.parametrize("codec", ["pcm_s16le", "aac"])
def test_audio_is_cut_at_the_video_end(tmp_path, codec, write_media):
    """A source longer than the video ends with it (encoded: exactly; copied: at the last packet, within a frame)."""
    src = write_media(tmp_path / ("s.wav" if codec == "pcm_s16le" else "s.m4a"), _sweeps(48000, 2.5), 48000, codec,
                  "wav" if codec == "pcm_s16le" else "mp4")
    info = _streams(_sink_render(src, tmp_path / "cut.mp4", 40))  # 1.6 s of video
    assert info["frames"] == 40
    assert 1.6 - FRAME <= info["audio_seconds"] <= 1.6 + 1e-6
    if codec == "pcm_s16le":
        assert info["audio_seconds"] == pytest.approx(1.6, abs=1 / 48000)


def test_short_source_is_padded_with_silence_to_the_video_end(tmp_path, write_media):
    x = _sweeps(48000, 1.0)
    src = write_media(tmp_path / "short.wav", x, 48000, "pcm_s16le", "wav")
    out = _sink_render(src, tmp_path / "pad.mp4", 40)  # 1.6 s of video over 1 s of audio
    info = _streams(out)
    assert info["audio_seconds"] == pytest.approx(1.6, abs=1 / 48000)
    y = _decode(out)
    assert min(_ncc(x, y)) >= 0.99
    assert np.abs(y[:, int(1.05 * 48000):int(1.6 * 48000)]).max() < 1e-3  # silence after the source's end


def test_audio_is_interleaved_with_the_frames(tmp_path, write_media):
    """The source is read in step with the frames, not at close: audio packets lie between video packets."""
    src = write_media(tmp_path / "s.wav", _sweeps(48000, 6.0), 48000, "pcm_s16le", "wav")
    out = _sink_render(src, tmp_path / "i.mp4", 150)
    with av.open(str(out)) as c:
        kinds = [p.stream.type for p in c.demux() if p.size]
    first_video, last_video = kinds.index("video"), len(kinds) - 1 - kinds[::-1].index("video")
    assert "audio" in kinds[first_video:last_video] and kinds.count("audio") > 200


def test_failed_render_leaves_nothing_and_closes_the_source(tmp_path, write_media):
    src = write_media(tmp_path / "s.m4a", _sweeps(48000, 2.0), 48000, "aac", "mp4")
    fds = len(os.listdir("/proc/self/fd"))
    for bitrate in (None, 96_000):  # copy, encode
        sink = Mp4Sink(tmp_path / "f.mp4", SourceAudio.probe(src), audio_bitrate=bitrate)
        sink.open(_meta(32000))
        sink.write(FrameBatch(np.zeros((12, 32, 32, 3), np.uint8), 0, 25))
        sink.close(ok=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.m4a"]
    assert len(os.listdir("/proc/self/fd")) == fds  # the source's file handle was closed too


def test_probe_names_the_file_without_audio(tmp_path, write_media):
    from mmgt.audio_io import AudioError

    text = tmp_path / "notes.wav"
    text.write_text("not audio\n" * 10)
    with pytest.raises(AudioError, match="notes.wav"):
        SourceAudio.probe(text)
    silent_video = write_media(tmp_path / "v.mp4", None, 0, None, "mp4", video=True)
    with pytest.raises(AudioError, match="v.mp4: no audio stream"):
        SourceAudio.probe(silent_video)
