"""engine.sources: file chunks, the live push source (streaming resample, threads, timeouts), the microphone
plumbing through a stand-in sounddevice module, and its errors."""
import sys
import threading
import time
import types
import wave

import numpy as np
import pytest

from engine.sources import AudioDeviceError, FileSource, LiveSource, MicrophoneSource

SR = 16000


def _sine(rate, seconds, freq=440.0, amp=0.5):
    t = np.arange(int(round(rate * seconds))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _drain(src):
    chunks = list(src)
    starts = [c.start_sample for c in chunks]
    ends = np.cumsum([0] + [c.n_samples for c in chunks])
    assert starts == list(ends[:-1])  # contiguous on one sample clock from 0
    return np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32), chunks


# ---------------------------------------------------------------------------------------------------------------
# FileSource (needs mmgt.audio_io.load_audio)
# ---------------------------------------------------------------------------------------------------------------
def _write_wav(path, samples, rate):
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def test_file_source_chunks_cover_the_file(tmp_path):
    pytest.importorskip("mmgt.audio_io")
    x = _sine(SR, 0.5)
    path = tmp_path / "speech.wav"
    _write_wav(path, x, SR)
    src = FileSource(path, chunk_ms=40)
    assert (src.n_samples, src.duration, src.chunk_samples) == (8000, 0.5, 640)
    y, chunks = _drain(src)
    assert len(chunks) == 13 and chunks[-1].n_samples == 8000 - 12 * 640
    assert all(c.samples.dtype == np.float32 and c.sample_rate == SR for c in chunks)
    np.testing.assert_allclose(y, x, atol=1e-4)  # int16 quantisation only


def test_file_source_resamples_and_paces_in_realtime(tmp_path):
    pytest.importorskip("mmgt.audio_io")
    path = tmp_path / "hi.wav"
    _write_wav(path, _sine(44100, 0.3), 44100)
    src = FileSource(path, chunk_ms=100, realtime=True)
    assert abs(src.n_samples - 4800) <= 2
    t0 = time.monotonic()
    arrivals = []
    for c in src:
        arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 3
    assert arrivals[0] >= 0.09 and arrivals[-1] >= 0.29  # a chunk leaves once its last sample "was spoken"


def test_file_source_missing_file_is_an_audio_error(tmp_path):
    audio = pytest.importorskip("mmgt.audio_io")
    with pytest.raises(audio.AudioError, match="nope.wav"):
        FileSource(tmp_path / "nope.wav")


# ---------------------------------------------------------------------------------------------------------------
# LiveSource
# ---------------------------------------------------------------------------------------------------------------
def test_live_source_16k_float_passes_through_exactly():
    src = LiveSource()
    x = _sine(SR, 0.2)
    for i in range(0, x.size, 333):
        src.push(x[i:i + 333], SR)
    src.close()
    y, chunks = _drain(src)
    np.testing.assert_array_equal(y, x)
    assert len(chunks) == -(-x.size // 333)


def test_live_source_resamples_48k_int16_from_a_thread():
    src = LiveSource(timeout=5)
    x48 = _sine(48000, 1.0)
    pcm = np.round(x48 * 32767).astype(np.int16)

    def produce():
        for i in range(0, pcm.size, 480):  # 10 ms blocks, like a browser track
            src.push(pcm[i:i + 480], 48000)
        src.close()

    threading.Thread(target=produce).start()
    y, _ = _drain(src)
    assert y.size == SR  # streaming resample: no drift, tail flushed on close
    ref = _sine(SR, 1.0)
    assert np.abs(y[100:-100] - ref[100:-100]).max() < 0.02  # same tone, in phase, no clicks at block edges


def test_live_source_rate_change_and_stereo_mixdown():
    src = LiveSource()
    src.push(_sine(48000, 0.1), 48000)
    stereo = np.stack([_sine(SR, 0.1), np.zeros(1600, np.float32)], axis=1)  # (N, 2)
    src.push(stereo, SR)
    src.close()
    y, _ = _drain(src)
    assert y.size == 1600 + 1600
    np.testing.assert_allclose(y[1600:], 0.5 * _sine(SR, 0.1), atol=1e-7)  # channels averaged


def test_live_source_timeout_end_and_errors():
    src = LiveSource(timeout=0.02)
    with pytest.raises(TimeoutError, match="no audio within 0.02"):
        next(iter(src))
    src.push(np.zeros(10, np.float32), SR)
    assert src.read(timeout=0.1).n_samples == 10
    with pytest.raises(TypeError, match="float32 or int16"):
        src.push(np.zeros(10, np.int32), SR)
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, channels\)"):
        src.push(np.zeros((2, 2, 2), np.float32), SR)
    src.close()
    assert src.read(timeout=0.1) is None and list(src) == []
    with pytest.raises(RuntimeError, match="after close"):
        src.push(np.zeros(10, np.float32), SR)


# ---------------------------------------------------------------------------------------------------------------
# MicrophoneSource through a stand-in sounddevice module
# ---------------------------------------------------------------------------------------------------------------
class _PortAudioError(Exception):
    pass


def _fake_sounddevice(signal=None, rate=48000, has_input=True):
    sd = types.ModuleType("sounddevice")
    sd.PortAudioError = _PortAudioError
    sd.opened = []

    def query_devices(device=None, kind=None):
        if not has_input:
            raise _PortAudioError("Error querying device -1")
        return {"name": "fake mic", "default_samplerate": float(rate)}

    class InputStream:
        def __init__(self, device, channels, samplerate, dtype, blocksize, callback):
            self.args = dict(device=device, channels=channels, samplerate=samplerate, dtype=dtype,
                             blocksize=blocksize)
            self.callback = callback
            self.thread = threading.Thread(target=self._run)
            sd.opened.append(self)

        def _run(self):  # PortAudio's thread: (frames, channels) float32 blocks
            for i in range(0, signal.size, self.args["blocksize"]):
                block = signal[i:i + self.args["blocksize"]]
                self.callback(np.repeat(block[:, None], self.args["channels"], axis=1), block.size, None, None)

        def start(self):
            self.thread.start()

        def stop(self):
            self.thread.join()

        def close(self):
            self.closed = True

    sd.query_devices, sd.InputStream = query_devices, InputStream
    return sd


def test_microphone_feeds_resampled_audio(monkeypatch):
    x = _sine(48000, 0.5)
    sd = _fake_sounddevice(x, rate=48000)
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    mic = MicrophoneSource(block_ms=20, channels=2, timeout=5)
    with mic:
        (stream,) = sd.opened
        assert stream.args == dict(device=None, channels=2, samplerate=48000, dtype="float32", blocksize=960)
        stream.thread.join()
    y, _ = _drain(mic.live)
    assert y.size == 8000 and stream.closed
    assert np.abs(y[100:-100] - _sine(SR, 0.5)[100:-100]).max() < 0.02


def test_microphone_without_input_device_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice(has_input=False))
    with pytest.raises(AudioDeviceError, match="no usable audio input: cannot open the default input device"):
        MicrophoneSource().start()


def test_microphone_without_sounddevice_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails as it does without the package
    with pytest.raises(AudioDeviceError, match=r"needs the mic extra .*pip install 'mmgt-engine\[mic\]'"):
        list(MicrophoneSource(device=3))
