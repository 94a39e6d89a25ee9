"""mmgt.audio_io: decoding any container/codec to 16 kHz mono, in-memory resampling and mixdown, and the errors
that name the file and the problem. Test media are written with PyAV into tmp dirs."""
import wave

import numpy as np
import pytest

from mmgt import audio_io as A

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def stereo_sine(rate, seconds=1.0, freq=440.0):
    """Left 0.6 sin, right 0.2 sin: the channel mean is 0.4 sin (librosa's mixdown)."""
    t = np.arange(int(round(rate * seconds))) / rate
    s = np.sin(2 * np.pi * freq * t)
    return np.stack([0.6 * s, 0.2 * s]).astype(np.float32)


def peak_hz(wav, rate):
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return np.argmax(spectrum) * rate / len(wav)


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------

def test_wav_44k_stereo_to_16k_mono_keeps_duration_frequency_and_averages_channels(tmp_path, write_media):
    path = write_media(tmp_path / "tone.wav", stereo_sine(44_100), 44_100, "pcm_s16le")
    wav = A.load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 16_000) <= 16  # 1.000 s +- 1 ms
    assert abs(peak_hz(wav, 16_000) - 440.0) <= 1.0
    # mean of the channels: amplitude 0.4 (RMS of the steady part * sqrt 2)
    amp = np.sqrt(np.mean(wav[1000:-1000] ** 2)) * np.sqrt(2)
    assert abs(amp - 0.4) < 0.005
    assert np.abs(wav).max() <= 1.0
    # another target rate
    wav22 = A.load_audio(path, sample_rate=22_050)
    assert abs(len(wav22) - 22_050) <= 22 and abs(peak_hz(wav22, 22_050) - 440.0) <= 1.0


@pytest.mark.parametrize("name,codec,fmt,rate,video,tol_s", [
    ("tone.flac", "flac", None, 44_100, False, 0.001),
    ("tone.mp3", "libmp3lame", None, 44_100, False, 0.03),
    ("tone.m4a", "aac", "ipod", 44_100, False, 0.03),
    ("clip.mp4", "aac", None, 48_000, True, 0.03),  # the audio stream of a video file
    ("tone.ogg", "libopus", None, 48_000, False, 0.03),
])
def test_other_containers_and_codecs(tmp_path, write_media, name, codec, fmt, rate, video, tol_s):
    path = write_media(tmp_path / name, stereo_sine(rate, freq=1000.0), rate, codec, fmt, video)
    wav = A.load_audio(path)
    assert abs(len(wav) / 16_000 - 1.0) <= tol_s  # lossy codecs may keep a few ms of encoder padding
    assert abs(peak_hz(wav, 16_000) - 1000.0) <= 2.0
    assert np.abs(wav).max() <= 1.0


def test_8_channel_wav_loads_as_the_mean_of_its_channels(tmp_path, write_wav):
    """Eight channels (each its own tone and level) at 16 kHz: no resampling, so the result is exactly the mean of
    the channels. PyAV's planar frames of >= 8 channels used to crash the process here (a segfault in to_ndarray)."""
    t = np.arange(16_000) / 16_000
    x = np.stack([0.1 * (1 + k % 4) * np.sin(2 * np.pi * (200 + 150 * k) * t) for k in range(8)])  # (8, n)
    held = write_wav(tmp_path / "eight.wav", x, 16_000)
    wav = A.load_audio(tmp_path / "eight.wav")
    assert wav.dtype == np.float32 and wav.shape == (16_000,)
    np.testing.assert_allclose(wav, held.mean(axis=0), atol=1e-6)
    assert np.abs(wav - held[0]).max() > 0.1  # not one channel: the mean of all eight


def test_12_channel_wav_at_44k_is_resampled_and_averaged(tmp_path, write_wav):
    t = np.arange(44_100) / 44_100
    x = np.stack([0.05 * (k + 1) * np.sin(2 * np.pi * 440 * t) for k in range(12)])  # (12, n): mean amplitude 0.325
    write_wav(tmp_path / "twelve.wav", x, 44_100)
    wav = A.load_audio(tmp_path / "twelve.wav")
    assert abs(len(wav) - 16_000) <= 16 and abs(peak_hz(wav, 16_000) - 440.0) <= 1.0
    amp = np.sqrt(np.mean(wav[1000:-1000] ** 2)) * np.sqrt(2)
    assert abs(amp - 0.325) < 0.005


def test_load_errors_name_the_file_and_the_problem(tmp_path, write_media):
    missing = tmp_path / "nope.wav"
    with pytest.raises(A.AudioError, match=r"nope\.wav.*no such"):
        A.load_audio(missing)

    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(A.AudioError, match=r"notes\.wav.*not a readable"):
        A.load_audio(text)

    video_only = write_media(tmp_path / "silent.mp4", None, 0, None, video=True)
    with pytest.raises(A.AudioError, match=r"silent\.mp4.*no audio stream.*video"):
        A.load_audio(video_only)

    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:  # a valid header and no samples
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
    with pytest.raises(A.AudioError, match=r"empty\.wav.*no samples"):
        A.load_audio(empty)
    assert issubclass(A.AudioError, ValueError)


def test_in_memory_resample_and_to_mono():
    t = np.arange(44_100) / 44_100
    x = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    y = A.resample(x, 44_100, 16_000)
    assert y.dtype == np.float32 and len(y) == 16_000  # ceil(44100 * 16000 / 44100)
    assert abs(peak_hz(y, 16_000) - 440.0) <= 1.0
    assert np.array_equal(A.resample(x, 16_000, 16_000), x)
    # channels-first and channels-last
    st = np.stack([x, -x, 3 * x])
    np.testing.assert_allclose(A.to_mono(st), x, atol=1e-6)
    np.testing.assert_allclose(A.to_mono(st.T, axis=1), x, atol=1e-6)
    # integer PCM is scaled to [-1, 1]
    pcm = np.array([[-32768, 16384], [0, 16384]], dtype=np.int16)  # (C, n)
    np.testing.assert_allclose(A.to_mono(pcm), [-0.5, 0.5])
    np.testing.assert_allclose(A.to_mono(np.array([0, 128, 255], np.uint8)), [-1.0, 0.0, 127 / 128])
    with pytest.raises(A.AudioError, match="shape"):
        A.to_mono(np.zeros((1, 2, 3)))
