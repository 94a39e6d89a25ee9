"""mmgt.audio: decoding + resampling, librosa features, WavLM (incl. the unilm checkpoint remap), wav2vec2 at
25 fps, audio windows and the audio projection. Tiny seeded models; test media are written with PyAV into tmp dirs."""
import contextlib
import json
import logging
import threading
import wave

import av
import numpy as np
import pytest
import torch

from mmgt import audio as A
from mmgt.config import MMGT, TINY, WavLMConfig, replace

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def write_media(path, data, rate, codec, container_format=None, video=False):
    """Encode float (channels, n) audio with PyAV (optionally beside a black mpeg4 video stream)."""
    with av.open(str(path), "w", format=container_format) as out:
        if video:
            vs = out.add_stream("mpeg4", rate=25)
            vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        if data is not None:
            st = out.add_stream(codec, rate=rate, layout="stereo" if data.shape[0] == 2 else "mono")
            for i in range(0, data.shape[1], 1000):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, i:i + 1000], dtype=np.float32),
                                                format="fltp", layout=st.layout.name)
                fr.sample_rate, fr.pts = rate, i
                for pk in st.encode(fr):
                    out.mux(pk)
            for pk in st.encode(None):
                out.mux(pk)
        if video:
            for k in range(10):
                vf = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
                vf.pts = k
                for pk in vs.encode(vf):
                    out.mux(pk)
            for pk in vs.encode(None):
                out.mux(pk)
    return path


def stereo_sine(rate, seconds=1.0, freq=440.0):
    """Left 0.6 sin, right 0.2 sin: the channel mean is 0.4 sin (librosa's mixdown)."""
    t = np.arange(int(round(rate * seconds))) / rate
    s = np.sin(2 * np.pi * freq * t)
    return np.stack([0.6 * s, 0.2 * s]).astype(np.float32)


def peak_hz(wav, rate):
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return np.argmax(spectrum) * rate / len(wav)


@pytest.fixture(scope="module")
def wavlm():
    return A.build_wavlm(TINY.wavlm, seed=0)


@pytest.fixture(scope="module")
def w2v():
    return A.build_wav2vec2(TINY.wav2vec2, seed=0)


def noise(n, seed=0):
    return (0.1 * np.random.RandomState(seed).randn(n)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------

def test_wav_44k_stereo_to_16k_mono_keeps_duration_frequency_and_averages_channels(tmp_path):
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
def test_other_containers_and_codecs(tmp_path, name, codec, fmt, rate, video, tol_s):
    path = write_media(tmp_path / name, stereo_sine(rate, freq=1000.0), rate, codec, fmt, video)
    wav = A.load_audio(path)
    assert abs(len(wav) / 16_000 - 1.0) <= tol_s  # lossy codecs may keep a few ms of encoder padding
    assert abs(peak_hz(wav, 16_000) - 1000.0) <= 2.0
    assert np.abs(wav).max() <= 1.0


def test_load_errors_name_the_file_and_the_problem(tmp_path):
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


# ---------------------------------------------------------------------------------------------------------------
# librosa features
# ---------------------------------------------------------------------------------------------------------------

def test_librosa_features_shape_one_hots_and_beats_of_a_click_train():
    # 4 s at 16 kHz: a click every 0.5 s (120 bpm) over a quiet 220 Hz tone
    sr, seconds = 16_000, 4.0
    n = int(sr * seconds)
    wav = 0.05 * np.sin(2 * np.pi * 220 * np.arange(n) / sr)
    for k in range(8):
        start = int(k * 0.5 * sr)
        wav[start:start + 80] += np.hanning(80) * 0.9
    n_frames = A.frames_for_samples(n)  # 100
    feats = A.librosa_features(wav.astype(np.float32), n_frames)
    assert feats.shape == (100, 35) and feats.dtype == np.float32 and np.isfinite(feats).all()
    peaks, beats = feats[:, 33], feats[:, 34]
    assert set(np.unique(peaks)) <= {0.0, 1.0} and set(np.unique(beats)) <= {0.0, 1.0}
    # clicks at frames 12.5 k: every detected onset is within 2 frames of a click, and most clicks are found
    clicks = np.arange(8) * 12.5
    onset_frames = np.flatnonzero(peaks)
    assert len(onset_frames) >= 5
    assert all(np.min(np.abs(clicks - f)) <= 2 for f in onset_frames)
    # beats at 120 bpm: 12.5 frames apart at 25 fps
    beat_frames = np.flatnonzero(beats)
    assert len(beat_frames) >= 4
    assert 11 <= np.median(np.diff(beat_frames)) <= 14
    # the onset envelope peaks on the clicks too
    assert np.argmax(feats[:, 0]) in {int(round(c)) + d for c in clicks for d in (-1, 0, 1, 2)}

    # trimmed / padded to n_frames; padding repeats the last row but never the one-hot events
    short = A.librosa_features(wav[:8000].astype(np.float32), 40)
    assert short.shape == (40, 35)
    assert np.array_equal(short[-1, :33], short[-2, :33]) and not short[13:, 33:].any()


# ---------------------------------------------------------------------------------------------------------------
# WavLM
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_samples", [100, 6401, 12345, 51200])
def test_wavlm_features_exact_frame_counts(wavlm, n_samples):
    n_frames = A.frames_for_samples(n_samples)
    feats = A.wavlm_features(wavlm, noise(n_samples), n_frames)
    assert feats.shape == (n_frames, TINY.wavlm.hidden_size) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_wavlm_features_follow_the_reference_50_to_25_fps(wavlm):
    wav = noise(51_200, seed=1)  # 3.2 s
    x = torch.from_numpy(wav)[None]
    x = torch.nn.functional.layer_norm(x, x.shape[-1:])  # unilm cfg.normalize
    with torch.no_grad():
        hidden = wavlm(input_values=x).last_hidden_state[0]  # (159, H) at 50 fps
    assert hidden.shape[0] == 159
    padded = torch.cat([hidden, hidden[-1:]])  # 160 rows, reference repeats the last frame
    feats = A.wavlm_features(wavlm, wav, 80)  # ceil(160 / 2) = 80 as in the reference
    # 160 -> 80 with align_corners: positions i * 159 / 79, so the ends are exact and the rest interpolate
    torch.testing.assert_close(feats[0], padded[0])
    torch.testing.assert_close(feats[-1], padded[-1])
    pos = 40 * 159 / 79
    lo = int(pos)
    torch.testing.assert_close(feats[40], padded[lo] * (lo + 1 - pos) + padded[lo + 1] * (pos - lo))
    # 2k-1 rows -> k rows picks every other row exactly
    feats_odd = A.wavlm_features(wavlm, wav[:50_880], 80)  # 158 frames + 1 = 159 rows -> 80
    with torch.no_grad():
        h2 = wavlm(input_values=torch.nn.functional.layer_norm(torch.from_numpy(wav[:50_880])[None], (50_880,))
                   ).last_hidden_state[0]
    rows = torch.cat([h2, h2[-1:]])
    assert rows.shape[0] == 159
    torch.testing.assert_close(feats_odd, rows[::2])


def test_build_is_deterministic_given_a_seed():
    a = A.build_wavlm(TINY.wavlm, seed=3).state_dict()
    b = A.build_wavlm(TINY.wavlm, seed=3).state_dict()
    c = A.build_wavlm(TINY.wavlm, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    before = torch.random.get_rng_state()
    A.build_wav2vec2(TINY.wav2vec2, seed=1)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left alone


def unilm_cfg(cfg: WavLMConfig, normalize=True):
    """What WavLM-Large.pt's 'cfg' holds, at ``cfg``'s sizes."""
    return {
        "extractor_mode": "layer_norm", "encoder_layers": cfg.num_layers, "encoder_embed_dim": cfg.hidden_size,
        "encoder_ffn_embed_dim": cfg.intermediate_size, "encoder_attention_heads": cfg.num_heads,
        "activation_fn": "gelu", "layer_norm_first": True,
        "conv_feature_layers": f"[({cfg.conv_dim[0]},10,5)] + [({cfg.conv_dim[0]},3,2)] * 4 + "
                               f"[({cfg.conv_dim[0]},2,2)] * 2",
        "conv_bias": False, "normalize": normalize, "conv_pos": 128, "conv_pos_groups": 16,
        "relative_position_embedding": True, "num_buckets": cfg.num_buckets, "max_distance": cfg.max_bucket_distance,
        "gru_rel_pos": True,
    }


def test_unilm_checkpoint_round_trip(tmp_path):
    # conv width 24 != hidden 32, so the unilm model has post_extract_proj as WavLM-Large does
    cfg = replace(TINY.wavlm, conv_dim=(24,) * 7)
    model = A.build_wavlm(cfg, seed=7)
    unilm_sd, unmatched = A.remap_state_dict(model.state_dict(), A.WAVLM_HF_TO_UNILM)
    assert unmatched == []
    # the names are unilm's
    assert "encoder.layers.0.self_attn.relative_attention_bias.weight" in unilm_sd
    assert "feature_extractor.conv_layers.3.2.1.weight" in unilm_sd
    assert {"post_extract_proj.weight", "mask_emb", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v",
            "encoder.layers.1.self_attn.grep_a", "encoder.layers.1.fc1.weight", "layer_norm.bias"} <= set(unilm_sd)
    assert not any("attention." in k or "feed_forward" in k for k in unilm_sd)

    path = tmp_path / "WavLM-Large.pt"
    torch.save({"cfg": unilm_cfg(cfg), "model": {k: v.clone() for k, v in unilm_sd.items()}}, path)
    loaded = A.load_wavlm(path, cfg)
    assert not loaded.training and loaded.config.normalize_input is True
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    wav = noise(9_999, seed=2)
    assert torch.equal(A.wavlm_features(loaded, wav, 16), A.wavlm_features(model, wav, 16))

    # the checkpoint's normalize flag travels with the model
    torch.save({"cfg": unilm_cfg(cfg, normalize=False), "model": unilm_sd}, path)
    raw = A.load_wavlm(path, cfg)
    assert raw.config.normalize_input is False
    assert torch.equal(A.wavlm_features(raw, wav, 16), A.wavlm_features(model, wav, 16, normalize=False))


def test_unilm_without_post_extract_proj_loads_as_identity(tmp_path):
    cfg = TINY.wavlm  # conv width 32 == hidden 32: unilm builds no post_extract_proj
    model = A.build_wavlm(cfg, seed=5)
    with torch.no_grad():
        model.feature_projection.projection.weight.copy_(torch.eye(32))
        model.feature_projection.projection.bias.zero_()
    unilm_sd, _ = A.remap_state_dict(model.state_dict(), A.WAVLM_HF_TO_UNILM)
    del unilm_sd["post_extract_proj.weight"], unilm_sd["post_extract_proj.bias"]
    torch.save({"cfg": unilm_cfg(cfg), "model": unilm_sd}, tmp_path / "w.pt")
    loaded = A.load_wavlm(tmp_path / "w.pt", cfg)
    wav = noise(4_000, seed=3)
    assert torch.equal(A.wavlm_features(loaded, wav, 7), A.wavlm_features(model, wav, 7))


def test_unilm_checkpoint_errors_name_keys_and_sizes(tmp_path):
    cfg = replace(TINY.wavlm, conv_dim=(24,) * 7)
    unilm_sd, _ = A.remap_state_dict(A.build_wavlm(cfg, seed=0).state_dict(), A.WAVLM_HF_TO_UNILM)
    bad = dict(unilm_sd)
    del bad["encoder.layers.1.fc2.bias"]
    bad["encoder.layers.1.extra_gate.weight"] = torch.zeros(2)
    torch.save({"cfg": unilm_cfg(cfg), "model": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt") as err:
        A.load_wavlm(tmp_path / "bad.pt", cfg)
    assert "encoder.layers.1.feed_forward.output_dense.bias" in str(err.value)  # missing, in transformers names
    assert "encoder.layers.1.extra_gate.weight" in str(err.value)  # unexpected, as found

    torch.save({"cfg": unilm_cfg(cfg), "model": unilm_sd}, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match=r"num_layers: checkpoint 2 != config 3"):
        A.load_wavlm(tmp_path / "ok.pt", replace(cfg, num_layers=3))

    torch.save({"weights": unilm_sd}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt.*not a unilm WavLM checkpoint"):
        A.load_wavlm(tmp_path / "plain.pt", cfg)
    with pytest.raises(ValueError, match=r"no config\.json"):
        A.load_wavlm(tmp_path, cfg)


def test_transformers_directories_load_local(tmp_path, wavlm, w2v):
    wavlm.save_pretrained(tmp_path / "wavlm")
    w2v.save_pretrained(tmp_path / "w2v")
    (tmp_path / "w2v" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    wav = noise(7_000, seed=4)
    lw = A.load_wavlm(tmp_path / "wavlm", TINY.wavlm)
    assert torch.equal(A.wavlm_features(lw, wav, 11), A.wavlm_features(wavlm, wav, 11))
    lv = A.load_wav2vec2(tmp_path / "w2v", TINY.wav2vec2)
    assert lv.config.normalize_input is False
    assert torch.equal(A.wav2vec2_features(lv, wav, 11), A.wav2vec2_features(w2v, wav, 11, normalize=False))
    with pytest.raises(ValueError, match="hidden_size: model 32 != config 48"):
        A.load_wav2vec2(tmp_path / "w2v", replace(TINY.wav2vec2, hidden_size=48))
    with pytest.raises(ValueError, match="no config.json"):
        A.load_wav2vec2(tmp_path)


def test_smga_condition_is_wavlm_then_librosa(wavlm):
    wav = noise(51_200, seed=5)
    cond = A.smga_condition(wavlm, wav, 80)
    assert cond.shape == (80, TINY.wavlm.hidden_size + 35) == (80, TINY.smga.audio_dim)
    torch.testing.assert_close(cond[:, :32], A.wavlm_features(wavlm, wav, 80))
    np.testing.assert_array_equal(cond[:, 32:].numpy(), A.librosa_features(wav, 80))


# ---------------------------------------------------------------------------------------------------------------
# wav2vec2
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_samples", [100, 6401, 12345])
def test_wav2vec2_features_exact_frame_counts(w2v, n_samples):
    n_frames = A.frames_for_samples(n_samples)
    feats = A.wav2vec2_features(w2v, noise(n_samples), n_frames)
    assert feats.shape == (n_frames, TINY.wav2vec2.num_layers, TINY.wav2vec2.hidden_size)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_wav2vec2_features_match_transformers_hidden_states(w2v):
    wav = noise(12_345, seed=6)
    x = torch.from_numpy(wav)[None]
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)  # Wav2Vec2FeatureExtractor normalisation
    with torch.no_grad():
        out = w2v(x, output_hidden_states=True)
    n_cnn = out.last_hidden_state.shape[1]
    # at the CNN's own frame count the interpolation is the identity: transformers' hidden_states[1:] exactly
    ours = A.wav2vec2_features(w2v, wav, n_cnn)
    torch.testing.assert_close(ours, torch.stack(out.hidden_states[1:], dim=2)[0], rtol=0, atol=1e-6)
    # at 25 fps the CNN features are interpolated BEFORE the transformer (different from resampling its output)
    at25 = A.wav2vec2_features(w2v, wav, 20)
    after = torch.nn.functional.interpolate(ours.permute(1, 2, 0), size=20, mode="linear", align_corners=True)
    assert at25.shape == (20, 2, 32) and not torch.allclose(at25, after.permute(2, 0, 1), atol=1e-3)


def test_bad_waveforms_are_refused(w2v):
    with pytest.raises(A.AudioError, match="empty"):
        A.wav2vec2_features(w2v, np.zeros(0, np.float32), 4)
    with pytest.raises(A.AudioError, match="1-D"):
        A.wav2vec2_features(w2v, np.zeros((2, 100), np.float32), 4)
    with pytest.raises(A.AudioError, match="NaN"):
        A.librosa_features(np.full(1000, np.nan, np.float32), 4)
    with pytest.raises(A.AudioError, match="n_frames"):
        A.wav2vec2_features(w2v, noise(1000), 0)


# ---------------------------------------------------------------------------------------------------------------
# windows and projection
# ---------------------------------------------------------------------------------------------------------------

def test_audio_windows_clamp_at_the_edges():
    feats = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1) * torch.ones(4, 2, 3)  # (T=4, L=2, C=3)
    win = A.audio_windows(feats, radius=2)
    assert win.shape == (4, 5, 2, 3)
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]], dtype=torch.float32)
    assert torch.equal(win[:, :, 0, 0], expected)
    assert torch.equal(win[:, :, 1, 2], expected)
    np.testing.assert_array_equal(A.audio_windows(np.arange(3), radius=1), [[0, 0, 1], [0, 1, 2], [1, 2, 2]])
    assert np.array_equal(A.audio_windows(np.arange(1), radius=2), [[0, 0, 0, 0, 0]])


def test_audio_proj_shape_and_math():
    cfg = TINY.audio_proj
    torch.manual_seed(0)
    proj = A.AudioProjModel(cfg).eval()
    x = torch.randn(2, 3, cfg.seq_len, cfg.blocks, cfg.channels)  # (B, F, 5, L, C)
    y = proj(x)
    assert y.shape == (2, 3, cfg.context_tokens, cfg.output_dim)
    # the same numbers by hand: flatten (window, layer, channel) row-major, MLP, split tokens, LayerNorm
    flat = x.reshape(6, -1)
    h = torch.relu(flat @ proj.proj1.weight.T + proj.proj1.bias)
    h = torch.relu(h @ proj.proj2.weight.T + proj.proj2.bias)
    t = (h @ proj.proj3.weight.T + proj.proj3.bias).reshape(6, cfg.context_tokens, cfg.output_dim)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, t.reshape(y.shape), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(B, F, 5, 2, 32\)"):
        proj(torch.zeros(1, 3, 4, 2, 32))


def test_audio_proj_release_keys_and_shapes_on_meta(release_keys):
    expected = release_keys("net_state_dict_keys_shapes.json", "audioproj.")
    assert len(expected) == 8
    with torch.device("meta"):
        proj = A.AudioProjModel(MMGT.audio_proj)
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == expected
    assert expected["proj1.weight"] == (512, 46080)
    assert sum(p.numel() for p in proj.parameters()) == 36_465_152  # 36.5 M (MMGT_SPEC.md)
    with torch.device("meta"):
        y = proj(torch.empty(1, 80, 5, 12, 768))
    assert y.shape == (1, 80, 32, 768)


# ---------------------------------------------------------------------------------------------------------------
# memo of librosa's constant-Q filter basis (librosa_features' chroma_cens)
# ---------------------------------------------------------------------------------------------------------------

VQT_BASIS = "__vqt_filter_fft"  # librosa.core.constantq's module global that vqt calls


def speechlike(seconds=3.2, sr=16_000, seed=1):
    """A voiced pitch sweep under a 4 Hz syllable envelope, plus noise."""
    rs = np.random.RandomState(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (env * (0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sr) + 0.05 * rs.randn(t.size))).astype(np.float32)


def click_train(seconds=3.2, sr=16_000):
    """A click every 0.4 s over a quiet 330 Hz tone."""
    n = int(seconds * sr)
    wav = 0.05 * np.sin(2 * np.pi * 330 * np.arange(n) / sr)
    for start in range(0, n - 80, int(0.4 * sr)):
        wav[start:start + 80] += np.hanning(80) * 0.9
    return wav.astype(np.float32)


@pytest.fixture
def fresh_memo():
    """Each test starts with no memo (the next librosa_features installs an empty one) and leaves none behind."""
    A._set_vqt_basis_memo(True)
    yield
    A._set_vqt_basis_memo(True)


@contextlib.contextmanager
def plain_librosa():
    """librosa's own filter-basis function, no memo in front of it."""
    from librosa.core import constantq

    A._set_vqt_basis_memo(False)
    try:
        assert not isinstance(getattr(constantq, VQT_BASIS), A._FilterBasisMemo)
        yield
    finally:
        A._set_vqt_basis_memo(True)


def installed_memo_counting_librosa_calls():
    """Install the memo and count the calls that reach librosa's function behind it."""
    from librosa.core import constantq

    memo = A._vqt_basis_memo()
    assert memo is not None and getattr(constantq, VQT_BASIS) is memo
    calls = []
    inner = memo.fn

    def counting(*args, **kwargs):
        calls.append(args[0])  # the octave's sample rate
        return inner(*args, **kwargs)

    memo.fn = counting
    return memo, calls


def test_cqt_basis_memo_is_bit_exact_and_skips_librosa_on_a_repeat(fresh_memo):
    waves = {"speech": speechlike(), "clicks": click_train()}
    with plain_librosa():
        plain = {k: A.librosa_features(w, 80) for k, w in waves.items()}
        again = {k: A.librosa_features(w, 80) for k, w in waves.items()}
    assert all(np.array_equal(plain[k], again[k]) for k in waves)  # plain librosa is deterministic

    memo, calls = installed_memo_counting_librosa_calls()
    for name, wav in waves.items():
        n_before = len(calls)
        first = A.librosa_features(wav, 80)
        hits = memo.hits
        second = A.librosa_features(wav, 80)  # all from the memo
        # bit for bit, including the cache hit: vqt scales its lower-octave bases in place, so a memo that
        # handed out its own arrays would change the second call's chroma
        assert first.tobytes() == plain[name].tobytes(), name
        assert second.tobytes() == plain[name].tobytes(), name
        assert first.shape == (80, 35) and np.abs(first[:, 21:33]).sum() > 0  # chroma columns are in there
        # the repeat builds no basis: 7 octaves (12800 Hz down to 200 Hz) answered by the memo
        assert len(calls) == memo.misses and len(calls) - n_before <= 7
        assert memo.hits == hits + 7
    assert calls[:7] == [12800, 6400.0, 3200.0, 1600.0, 800.0, 400.0, 200.0]
    assert memo.bypassed == 0 and len(memo) == memo.misses


def test_cqt_basis_memo_from_four_threads_matches_serial(fresh_memo, in_threads):
    waves = [speechlike(seed=2), click_train(), speechlike(seed=3), click_train(seconds=3.0)]
    with plain_librosa():
        serial = [A.librosa_features(w, 80) for w in waves]
    memo, calls = installed_memo_counting_librosa_calls()
    start = threading.Barrier(4)
    out = [None] * 8

    def work(i):
        start.wait()  # all four start together on an empty memo: racing misses, then hits
        for r in range(2):
            out[2 * i + r] = A.librosa_features(waves[i], 80)

    errors = in_threads(work, 4)
    assert not errors, errors
    for i in range(8):
        assert out[i].tobytes() == serial[i // 2].tobytes(), i
    assert memo.hits + memo.misses == 8 * 7 and memo.hits >= 4 * 7  # every second round is a hit
    assert len(calls) == memo.misses


def test_filter_basis_memo_copies_results_bounds_bytes_and_bypasses_unkeyable_args():
    built = []

    def basis(sr, freqs, window="hann"):
        built.append(sr)
        return np.full((4, 8), float(sr) + freqs.sum(), dtype=np.complex64), 8, freqs * 2.0

    entry = A._MEMO_ENTRY_OVERHEAD + 4 * 8 * 8 + 3 * 8 + 3 * 8  # + basis + lengths + the freqs key, bytes
    memo = A._FilterBasisMemo(basis, max_bytes=2 * entry + 100)
    f = np.array([1.0, 2.0, 3.0])
    b1, n_fft, lengths = memo(100, f)
    b1 *= 0  # the caller scales its copy in place ...
    b2, _, _ = memo(100, f.copy())  # ... equal key, no rebuild, untouched values
    assert built == [100] and memo.hits == 1 and n_fft == 8 and np.array_equal(lengths, 2 * f)
    assert np.all(b2 == 106)
    memo(100.0, f)  # 100.0 and 100 are keyed apart; so are dtypes
    memo(100, f.astype(np.float32))
    assert built == [100, 100.0, 100] and len(memo) == 2  # LRU within the byte bound: the first entry went
    memo(100, f)
    assert built[-1] == 100 and memo.misses == 4
    memo(100, f, window=["hann"])  # lists key by value
    memo(100, f, window={"hann": 1})  # unhashable: straight to the function, not stored
    assert memo.bypassed == 1 and memo.misses == 5


def test_cqt_basis_memo_falls_back_to_plain_librosa_without_the_function(fresh_memo, monkeypatch, caplog):
    from librosa.core import constantq

    original = getattr(constantq, VQT_BASIS)
    monkeypatch.delattr(constantq, VQT_BASIS)
    with caplog.at_level(logging.DEBUG, logger="mmgt.audio"):
        assert A._vqt_basis_memo() is None
        assert A._vqt_basis_memo() is None  # decided once: no second look, no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "mmgt.audio"]
    assert len(lines) == 1 and VQT_BASIS in lines[0] and "not memoised" in lines[0]
    assert not hasattr(constantq, VQT_BASIS)
    monkeypatch.setattr(constantq, VQT_BASIS, original, raising=False)
    A._set_vqt_basis_memo(True)
    A.librosa_features(click_train(), 80)  # librosa back: installed on the next call
    assert isinstance(getattr(constantq, VQT_BASIS), A._FilterBasisMemo)
