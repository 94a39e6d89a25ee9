"""Text to speech (streaming/tts.py): sentence splitting, the espeak-ng engine against the program's own output, the
errors that say how to install what is missing, and the piper engine through a tiny generated voice model."""
import io
import json
import subprocess
import sys
import wave

import numpy as np
import pytest

from streaming.tts import EspeakTTS, PiperTTS, TTSUnavailable, make_tts, split_sentences, to_16k

needs_espeak = pytest.mark.skipif(subprocess.run(["which", "espeak-ng"], capture_output=True).returncode != 0,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def test_split_sentences():
    text = "Hello there. Dr. Smith is here!  Is it?\n\"Yes.\" We met e.g. at noon... Then\n\nA new paragraph"
    assert split_sentences(text) == ["Hello there.", "Dr. Smith is here!", "Is it?", "\"Yes.\"",
                                     "We met e.g. at noon...", "Then", "A new paragraph"]
    assert split_sentences("  \n ") == []
    # a sentence longer than the limit is cut at a clause, else a word boundary; nothing is lost
    long = "one two three four five six, seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    pieces = split_sentences(long, max_chars=40)
    assert all(len(p) <= 40 for p in pieces) and pieces[0] == "one two three four five six,"
    assert " ".join(pieces) == long
    assert "".join(split_sentences("x" * 90, max_chars=40)) == "x" * 90  # no space at all: cut hard
    with pytest.raises(ValueError, match="max_chars"):
        split_sentences("Hi.", max_chars=5)


def test_to_16k_resamples_a_tone():
    t = np.arange(22050) / 22050.0
    out = to_16k(np.sin(2 * np.pi * 300 * t), 22050)
    assert out.dtype == np.float32 and len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) == 300  # 1 Hz bins over one second


@needs_espeak
def test_espeak_speaks_a_sentence_as_the_program_does():
    import librosa

    tts = EspeakTTS()
    audio = tts.synthesize("The quick brown fox jumps over the lazy dog.")
    assert audio.dtype == np.float32 and audio.ndim == 1 and 1.5 < len(audio) / 16000 < 4.0
    assert 0.2 < np.abs(audio).max() <= 1.0
    wav = subprocess.run(["espeak-ng", "--stdout", "The quick brown fox jumps over the lazy dog."],
                         capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
        ref = librosa.resample(pcm, orig_sr=w.getframerate(), target_sr=16000)
    n = min(len(ref), len(audio))
    assert abs(len(ref) - len(audio)) <= 2
    assert np.corrcoef(ref[:n], audio[:n])[0, 1] > 0.99
    # text that looks like a flag is spoken, not parsed as one; text with nothing to say gives no speech
    assert len(tts.synthesize("-v nonsense --help")) > 8000
    assert np.abs(tts.synthesize("...")).max() < 0.01
    assert make_tts("en-us").describe() == "espeak-ng (en-us)"


@needs_espeak
def test_espeak_errors_say_how_to_fix_them(monkeypatch):
    with pytest.raises(TTSUnavailable, match="voice 'zz-nonexistent'.*espeak-ng --voices"):
        EspeakTTS(voice="zz-nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TTSUnavailable, match="espeak-ng program, which is not on PATH: apt-get install espeak-ng"):
        make_tts()


def test_piper_without_its_extra_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "piper", None)  # as on a machine without piper-tts
    with pytest.raises(TTSUnavailable) as e:
        make_tts(str(tmp_path / "voice.onnx"))
    assert str(e.value) == ("the piper voice voice.onnx needs the piper extra (piper not installed): "
                            "pip install 'mmgt-engine[piper]'")


def _tiny_piper_voice(path, sample_rate=22050, hop=256):
    """A piper voice model of our own (no download): every phoneme id becomes ``hop`` samples of sin(id), so the
    audio's length follows the text's. Its config says phonemes are the text's characters."""
    import onnx
    from onnx import TensorProto, helper

    from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP

    nodes = [
        helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["x", "axis2"], ["x3"]),
        helper.make_node("Tile", ["x3", "repeats"], ["tiled"]),
        helper.make_node("Reshape", ["tiled", "shape"], ["flat"]),
        helper.make_node("Sin", ["flat"], ["output"]),
    ]
    inits = [helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
             helper.make_tensor("repeats", TensorProto.INT64, [3], [1, 1, hop]),
             helper.make_tensor("shape", TensorProto.INT64, [3], [1, 1, -1])]
    graph = helper.make_graph(
        nodes, "tiny_voice",
        [helper.make_tensor_value_info("input", TensorProto.INT64, [1, "n"]),
         helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, "samples"])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    config = {"audio": {"sample_rate": sample_rate}, "espeak": {"voice": "en-us"}, "num_symbols": 256,
              "num_speakers": 1, "phoneme_type": "text", "phoneme_id_map": DEFAULT_PHONEME_ID_MAP,
              "hop_length": hop}
    path.with_name(path.name + ".json").write_text(json.dumps(config))
    return path


def test_piper_voice_speaks_through_the_extra(tmp_path):
    pytest.importorskip("piper", reason="the piper extra is not installed (pip install 'mmgt-engine[piper]')")
    pytest.importorskip("onnx", reason="building the test voice needs onnx (the export extra)")
    voice = _tiny_piper_voice(tmp_path / "tiny.onnx")
    tts = make_tts(str(voice))
    assert isinstance(tts, PiperTTS) and tts.describe() == "piper (tiny.onnx)"
    short, longer = tts.synthesize("hello"), tts.synthesize("hello there, friend")
    assert short.dtype == np.float32 and short.ndim == 1
    ids = tts.voice.phonemes_to_ids(tts.voice.phonemize("hello")[0])
    assert abs(len(short) - len(ids) * 256 * 16000 / 22050) <= 2  # resampled to 16 kHz
    assert len(longer) > len(short) and 0.9 < np.abs(short).max() <= 1.0  # piper normalises its audio
    (tmp_path / "bare.onnx").write_bytes(voice.read_bytes())
    with pytest.raises(TTSUnavailable, match=r"voice config .*/bare.onnx.json does not exist"):
        make_tts(str(tmp_path / "bare.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    (tmp_path / "broken.onnx.json").write_text(voice.with_name("tiny.onnx.json").read_text())
    with pytest.raises(TTSUnavailable, match="piper cannot load the voice .*broken.onnx"):
        make_tts(str(tmp_path / "broken.onnx"))
